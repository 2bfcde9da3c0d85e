"""Save and load a pruned + patched model as a self-describing Hugging Face checkpoint.

A directory written by ``save_pruned`` (format version 2) is an ordinary checkpoint of a *patched
architecture* (see ``modeling_linearpatch``), so that every loader either applies the patch or refuses:

* ``config.json``: the family's config with ``model_type`` ``"linearpatch_<family>"``,
  ``architectures`` ``["LinearPatch<Family>ForCausalLM"]``, ``auto_map`` pointing at the modeling file,
  and the record ``"linearpatch"``: ``{"format_version": 2, "record_version", "num_layers_original",
  "hidden_size", "base_model_type", "cuts": [{"start", "end", "mode", "kept_index", "position"}],
  "hadamard": {"construction", "k", "n"} | null, "package_version"}``;
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
from pathlib import Path

import torch
from torch import nn

from ..atomic_files import atomic_directory, check_new_directory
from ..devices import resolve_device
from ..hadamard import hadamard_factors
from . import modeling_linearpatch
from .patch import PATCH_MODES, LinearPatch, check_cut_patches
from .surgery import (SUPPORTED_MODEL_TYPES, attach_patches, check_blocks, cut_positions, decoder_layers,
                      get_patches, plain_layers, pruning_cuts, pruning_record)

__all__ = ["FORMAT_VERSION", "is_pruned_checkpoint", "load_pruned", "save_pruned", "upgrade_checkpoint", "validated_cuts"]

FORMAT_VERSION = modeling_linearpatch.FORMAT_VERSION
MODELING_FILE = "modeling_linearpatch.py"
# Format version 1: the patch and its metadata in files of their own beside a plain checkpoint.
PATCH_FILE = "linearpatch.safetensors"
METADATA_FILE = "linearpatch.json"
PATCH_PREFIX = "model.linearpatch."
# Written into each checkpoint: transformers' refusal of the unknown architecture points at the folder.
CHECKPOINT_README = """# A layer-pruned model with LinearPatch cuts ({arch})

Written by the Python package `linearpatch-kernels`. Its patch is part of the model: load it with

- `import linearpatch_kernels` and then `AutoModelForCausalLM.from_pretrained(path)`, or
  `linearpatch_kernels.load_pruned(path)`;
- without that package: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (runs
  `modeling_linearpatch.py` from this folder);
- vLLM: `pip install "linearpatch-kernels[vllm]"`, then `vllm serve path` or `vllm.LLM(path)`.
"""


def _package_version() -> str:
    from .. import __version__  # the package root imports this module, so import lazily

    return __version__


def _hadamard_record(d: int) -> dict:
    f = hadamard_factors(d)
    return {"construction": f.construction, "k": f.k, "n": f.n}


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (returned by ``prune_and_patch`` or ``load_pruned``) to ``directory`` as a
    checkpoint of its patched architecture (module docstring); returns the path.

    The checkpoint is written into a hidden staging folder beside ``directory`` and renamed into
    place at the end, so an interrupted save (an exception, Ctrl-C, a killed process, a full disk)
    leaves no loadable half checkpoint, and an existing checkpoint stays intact until the new one is
    complete. ``directory`` must be new or an empty folder; ``overwrite=True`` replaces a non-empty one.
    ``extra_files`` (``{file name: text}``, e.g. a run record) are written into the same atomic save.
    """
    record = getattr(model.config, "linearpatch", None)
    if not isinstance(record, dict):
        raise ValueError("save_pruned: model.config.linearpatch is missing; prune the model with prune_and_patch first")
    family = model.config.model_type
    if family not in modeling_linearpatch.PATCHED_ARCHITECTURES:
        raise ValueError(f"save_pruned: model_type {family!r}; accepted: {', '.join(SUPPORTED_MODEL_TYPES)}")
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
    disk_record = {**pruning_record(cuts, record["num_layers_original"], d), "format_version": FORMAT_VERSION,
                   "base_model_type": family, "cuts": disk_cuts, "hadamard": hadamard,
                   "package_version": _package_version()}
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
    with atomic_directory(directory, overwrite) as staging:
        _write_checkpoint(model, holders, patched_config, staging, tokenizer)
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
    return directory


def _write_checkpoint(model: nn.Module, holders: nn.ModuleList, patched_config, directory: Path, tokenizer) -> None:
    """All of ``save_pruned``'s writing, into the (staging) folder ``directory``: the plain family
    weights with the patch tensors added under ``model.linearpatch.*``, the patched config over the
    family's, the modeling file, the tokenizer."""
    inner = model.model
    with plain_layers(model):
        inner.linearpatch = holders
        try:
            model.save_pretrained(directory)
        finally:
            del inner.linearpatch
    patched_config.save_pretrained(directory)
    shutil.copyfile(Path(modeling_linearpatch.__file__), directory / MODELING_FILE)
    (directory / "README.md").write_text(CHECKPOINT_README.format(arch=patched_config.architectures[0]))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


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


def validated_cuts(config, where="config.json") -> list[dict]:
    """The cuts of a patched (format version 2) config as stored, ``{"start", "end", "mode",
    "kept_index", "position"}`` sorted by ``start``, after checking the record against the config: the
    cuts fit the original and kept layer counts, each stored position is the one derived from the
    cuts, the hidden size matches, and a rotate patch's hidden size has this package's Hadamard matrix.
    Used by every loader of this package (``load_pruned``, the vLLM models)."""
    record = getattr(config, "linearpatch", None)
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        got = record.get("format_version") if isinstance(record, dict) else record
        raise ValueError(f"{where}: linearpatch record format_version {got!r}; this package reads {FORMAT_VERSION} "
                         f"(and version 1 with {METADATA_FILE})")
    try:
        modes = [c["mode"] for c in pruning_cuts(record)]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from None
    if record.get("hidden_size") != config.hidden_size:
        raise ValueError(f"{where}: the linearpatch record has hidden_size {record.get('hidden_size')!r} but the "
                         f"config has {config.hidden_size}; the patch does not belong to this model")
    if "rotate" in modes:
        try:
            expected = _hadamard_record(config.hidden_size)
        except ValueError as e:
            raise ValueError(f"{where}: a rotate patch with hidden_size {config.hidden_size}: {e}") from None
        if record.get("hadamard") != expected:
            raise ValueError(f"{where}: the patch was calibrated with Hadamard matrix {record.get('hadamard')!r}; this "
                             f"package builds {expected!r} for d={config.hidden_size}, so the scales do not apply")
    try:
        return modeling_linearpatch.checkpoint_cuts(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from None


def _read_cut_tensors(directory: Path, files: list[Path], cuts: list[dict], d: int) -> list[LinearPatch]:
    """The patch of each cut from the ``model.linearpatch.{c}.*`` tensors, checked against the record."""
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(PATCH_PREFIX):
                    found[name] = f.get_tensor(name)
    patches = []
    expected_names = set()
    for c, cut in enumerate(cuts):
        mode = cut["mode"]
        name, shape = ("weight", (d, d)) if mode == "dense" else ("scale", (d,))
        want = {f"{PATCH_PREFIX}{c}.{name}": shape}
        if mode == "rotate":
            k = hadamard_factors(d).k
            want[f"{PATCH_PREFIX}{c}.hadamard_k"] = (k, k)
        for key, shape_ in want.items():
            t = found.get(key)
            if t is None or tuple(t.shape) != shape_ or t.dtype != torch.float32:
                what = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
                raise ValueError(f"{directory}: tensor {key!r} is {what}; the record's cut [{cut['start']}, "
                                 f"{cut['end']}) mode {mode!r} needs float32 of shape {shape_}")
        if mode == "rotate" and not torch.equal(found[f"{PATCH_PREFIX}{c}.hadamard_k"].double(), hadamard_factors(d).h_k):
            raise ValueError(f"{directory}: {PATCH_PREFIX}{c}.hadamard_k is not the Hadamard factor this package builds "
                             f"for d={d}; the scales do not apply")
        expected_names.update(want)
        patches.append(LinearPatch(d, mode=mode, **{name: found[f"{PATCH_PREFIX}{c}.{name}"]}))
    extra = sorted(set(found) - expected_names)
    if extra:
        raise ValueError(f"{directory}: patch tensors {extra} belong to no cut of the record ({len(cuts)} cut(s))")
    return patches


@functools.lru_cache(maxsize=None)
def _base_model_class(family: str):
    """The family's ``*ForCausalLM``, told to expect the ``model.linearpatch.*`` tensors it does not load
    (``load_pruned`` reads them itself), so that loading reports no unexpected weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(family))]
    return type(base.__name__, (base,), {"_keys_to_ignore_on_load_unexpected": [r"^model\.linearpatch\."],
                                         "__module__": base.__module__, "__qualname__": base.__qualname__})


def _load_v2(directory: Path, dtype: torch.dtype | None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    cuts = validated_cuts(config, directory / "config.json")
    files = _weight_files(directory)
    d = int(config.hidden_size)
    patches = _read_cut_tensors(directory, files, cuts, d)
    check_cut_patches(patches, cuts, f"load_pruned: {directory}")
    family = config.linearpatch.get("base_model_type")
    if family != config.model_type[len(modeling_linearpatch.MODEL_TYPE_PREFIX):]:
        raise ValueError(f"{directory / 'config.json'}: base_model_type {family!r} does not match model_type "
                         f"{config.model_type!r}")
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map", "linearpatch")}
    base_config = AutoConfig.for_model(family, **fields)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = _base_model_class(family).from_pretrained(directory, config=base_config, **kwargs)
    return model, cuts, patches, config.linearpatch["num_layers_original"]


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
    return model, meta["cuts"], patches, meta["num_layers_original"]


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
        model, cuts, patches, total = _load_v2(directory, dtype)
    elif (directory / METADATA_FILE).is_file():
        model, cuts, patches, total = _load_v1(directory, dtype)
    elif "linearpatch" in raw:
        raise FileNotFoundError(f"{directory / METADATA_FILE} not found, but config.json records a pruning: a format "
                                f"version 1 checkpoint missing its patch metadata ({METADATA_FILE}, {PATCH_FILE}); "
                                "refusing to load the pruned model without its patch")
    else:
        raise FileNotFoundError(f"{directory}: not a LinearPatch checkpoint written by save_pruned (config.json has "
                                f"model_type {raw.get('model_type')!r}, no linearpatch record, no {METADATA_FILE})")
    d = int(model.config.hidden_size)
    model.config.linearpatch = pruning_record(cuts, total, d)
    model.to(device)
    attach_patches(model, cut_positions(model.config.linearpatch["cuts"]), patches, fuse=fuse)
    return model.eval()

"""Save and load a pruned + patched model as an ordinary Hugging Face checkpoint plus the patch.

A directory written by ``save_pruned`` holds:

* what ``model.save_pretrained`` writes for the pruned model with the wrappers taken out, so the
  weight names are the plain Hugging Face ones (``model.layers.3.self_attn.q_proj.weight``) and
  ``AutoModelForCausalLM.from_pretrained(directory)`` loads the pruned model *without* the patch;
  ``config.json`` carries the ``linearpatch`` record of the pruning;
* ``linearpatch.safetensors``: the patch parameter in fp32, ``scale`` ``[d]`` (rotate/diag) or
  ``weight`` ``[d, d]`` (dense);
* ``linearpatch.json``: the metadata, e.g.
  ``{"format": "linearpatch", "format_version": 1, "start": 10, "end": 15, "mode": "rotate",
  "num_layers_original": 30, "num_layers": 25, "hidden_size": 576, "model_family": "llama",
  "hadamard": {"construction": "paley1(q=...)", "k": 36, "n": 16}, "package_version": "0.1.0"}``;
* the tokenizer, when one is passed.

A model with several cuts adds ``"cuts": [{"start", "end", "mode"}, ...]`` (original layer indices,
sorted by ``start``) to ``linearpatch.json`` in place of the top-level ``start``/``end``/``mode``
(``"hadamard"`` then describes the matrix of the rotate patches, ``null`` when there are none), and
``linearpatch.safetensors`` holds one tensor per cut, ``cuts.{k}.scale`` or ``cuts.{k}.weight``.
A one-cut checkpoint is written exactly as before.

``load_pruned`` checks all of it before building anything (files present, safetensors files complete,
metadata consistent with the config and the patch tensor, same Hadamard construction) and raises
``FileNotFoundError`` / ``ValueError`` naming the path and what was expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic_files import atomic_directory, check_new_directory
from ..devices import resolve_device
from ..hadamard import hadamard_factors
from .patch import PATCH_MODES, LinearPatch
from .surgery import (SUPPORTED_MODEL_TYPES, attach_patches, check_blocks, cut_positions, decoder_layers, get_patches,
                      plain_layers, pruning_cuts, pruning_record)

__all__ = ["PATCH_FILE", "METADATA_FILE", "load_pruned", "save_pruned"]

PATCH_FILE = "linearpatch.safetensors"
METADATA_FILE = "linearpatch.json"
FORMAT_VERSION = 1


def _package_version() -> str:
    from .. import __version__  # the package root imports this module, so import lazily

    return __version__


def _hadamard_record(d: int) -> dict:
    f = hadamard_factors(d)
    return {"construction": f.construction, "k": f.k, "n": f.n}


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (returned by ``prune_and_patch`` or ``load_pruned``) to ``directory``; returns the path.

    The checkpoint is written into a hidden staging folder beside ``directory`` and renamed into
    place at the end, so an interrupted save (an exception, Ctrl-C, a killed process, a full disk)
    leaves no loadable half checkpoint, and an existing checkpoint stays intact until the new one is
    complete. ``directory`` must be new or an empty folder; ``overwrite=True`` replaces a non-empty one.
    ``extra_files`` (``{file name: text}``, e.g. a run record) are written into the same atomic save.
    """
    patches = get_patches(model)
    record = getattr(model.config, "linearpatch", None)
    if not isinstance(record, dict):
        raise ValueError("save_pruned: model.config.linearpatch is missing; prune the model with prune_and_patch first")
    cuts = pruning_cuts(record)
    if len(cuts) != len(patches):
        raise ValueError(f"save_pruned: config.linearpatch records {len(cuts)} cuts but the model holds "
                         f"{len(patches)} patches")
    for cut, patch in zip(cuts, patches):
        cut["mode"] = patch.mode
    directory = check_new_directory(directory, overwrite, what="save_pruned: checkpoint folder")

    layers = decoder_layers(model)
    d = int(model.config.hidden_size)
    # Everything that can fail is computed before the first file is written.
    metadata = {
        "format": "linearpatch",
        "format_version": FORMAT_VERSION,
        **(cuts[0] if len(cuts) == 1 else {"cuts": cuts}),
        "num_layers_original": int(record["num_layers_original"]),
        "num_layers": len(layers),
        "hidden_size": d,
        "model_family": model.config.model_type,
        "hadamard": _hadamard_record(d) if any(p.mode == "rotate" for p in patches) else None,
        "package_version": _package_version(),
    }
    tensors = {}
    for k, patch in enumerate(patches):
        name = "weight" if patch.mode == "dense" else "scale"
        key = name if len(patches) == 1 else f"cuts.{k}.{name}"
        tensors[key] = getattr(patch, name).detach().to(device="cpu", dtype=torch.float32).contiguous()

    from safetensors.torch import save_file

    with atomic_directory(directory, overwrite) as staging:
        with plain_layers(model):  # plain Hugging Face weight names while saving, fused cut or not
            model.save_pretrained(staging)
        save_file(tensors, str(staging / PATCH_FILE), metadata={"format": "pt"})
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
    return directory


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
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}; this package reads {FORMAT_VERSION}")
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


def load_pruned(directory: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, fuse: bool = True) -> nn.Module:
    """Load a checkpoint written by ``save_pruned``: the pruned ``*ForCausalLM`` with its patch in place,
    on ``device``, weights in ``dtype`` (``None``: as saved); the patch stays fp32. ``fuse`` applies
    the fused cut where possible, as ``prune_and_patch`` does (the checkpoint itself is the same
    either way: fusion is a way of running the model, not part of its weights)."""
    if not isinstance(fuse, bool):
        raise TypeError(f"load_pruned: fuse must be a bool, got {fuse!r}")
    device = resolve_device(device, "load_pruned: device")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; expected a checkpoint directory written by save_pruned")
    meta = _read_metadata(directory)
    config = _check_config(directory, meta)
    weight_files = sorted(directory.glob("*.safetensors"))
    model_files = [p for p in weight_files if p.name != PATCH_FILE]
    if not model_files:
        raise FileNotFoundError(f"{directory}: no model weights (*.safetensors besides {PATCH_FILE}); expected the "
                                "weights written by save_pretrained")
    for p in model_files:
        _check_safetensors_file(p)
    patches = _load_patches(directory, meta)

    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, **kwargs)
    if len(decoder_layers(model)) != meta["num_layers"]:
        raise ValueError(f"{directory}: the loaded model has {len(decoder_layers(model))} layers; "
                         f"{METADATA_FILE} says {meta['num_layers']}")
    model.config.linearpatch = pruning_record(meta["cuts"], meta["num_layers_original"], meta["hidden_size"])
    model.to(device)
    attach_patches(model, cut_positions(meta["cuts"]), patches, fuse=fuse)
    return model.eval()

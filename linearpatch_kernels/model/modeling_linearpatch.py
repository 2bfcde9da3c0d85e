"""Patched decoder architectures for checkpoints written by ``linearpatch_kernels.save_pruned``.

This file is self-contained (torch and transformers only) because ``save_pruned`` copies it into
every checkpoint: ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` then loads
the pruned model *with* its patch even where ``linearpatch_kernels`` is not installed. Where the
package is installed, it registers these same classes with transformers' Auto classes at import, and
the patch runs through its ``linearpatch::hadamard_patch`` op; otherwise through the plain PyTorch
transform below (same math, fp32 inside).

A checkpoint's ``config.json`` has ``model_type`` ``"linearpatch_<family>"`` (family: llama, mistral,
qwen2, qwen3), ``architectures`` ``["LinearPatch<Family>ForCausalLM"]`` and the record
``"linearpatch": {"cuts": [{"start", "end", "mode", "kept_index", "position"}, ...],
"num_layers_original", "hidden_size", "hadamard", ...}`` (original layer indices; ``kept_index`` and
``position`` say which kept layer carries the cut's patch, on its output, or on the input of kept
layer 0 for a cut at the very start). Its safetensors hold the family's usual weight names plus, per
cut ``c``, ``model.linearpatch.{c}.scale`` (rotate/diag, fp32 ``[d]``) or ``.weight`` (dense, fp32
``[d, d]``), and for a rotate patch ``model.linearpatch.{c}.hadamard_k``: the ``K x K`` factor of
``H_d = H_K (x) H_{d/K}`` (Sylvester for the power-of-two part) that the scales were calibrated with.

An engine that does not know the ``linearpatch_<family>`` model type refuses the checkpoint instead
of running the pruned model without its patch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

PATCH_MODES = ("rotate", "diag", "dense")
FORMAT_VERSION = 2  # of the checkpoint layout described above
MODEL_TYPE_PREFIX = "linearpatch_"


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x . H_n`` along the last dim (``n`` a power of two, Sylvester's +-1 matrix, natural order),
    by ``log2 n`` butterfly stages: stage ``h`` pairs entries ``h`` apart into ``(a + b, a - b)``."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def hadamard_rotate(x: torch.Tensor, h_k: torch.Tensor) -> torch.Tensor:
    """``x . H`` with ``H = (H_K (x) H_n) / sqrt(d)`` orthonormal and symmetric: ``x`` viewed as the
    ``K x n`` matrix ``X`` (row-major), ``x . (A (x) B) = vec(A^T X B)`` with ``A = H_K`` symmetric."""
    k = h_k.shape[0]
    d = x.shape[-1]
    xs = fwht(x.reshape(*x.shape[:-1], k, d // k))
    if k > 1:
        xs = torch.matmul(h_k.to(xs.dtype), xs)
    return xs.reshape(x.shape) * (1.0 / math.sqrt(d))


def _package_patch_op():
    """``(torch.ops.linearpatch.hadamard_patch, its H_K for d)`` when ``linearpatch_kernels`` is
    installed, else None. (An import inside try/except, so that transformers does not require the
    package to load this file as remote code.)"""
    try:
        from linearpatch_kernels.hadamard import hadamard_factors  # importing the package registers the op
    except ImportError:
        return None
    return torch.ops.linearpatch.hadamard_patch, hadamard_factors


class LinearPatchCut(nn.Module):
    """The patch of one cut: ``y = h . P`` on the last dim, fp32 inside, ``h``'s dtype out.
    ``P = H diag(scale) H^T`` (rotate), ``diag(scale)`` (diag) or ``weight`` (dense)."""

    def __init__(self, hidden_size: int, mode: str, hadamard_k: int = 1):
        super().__init__()
        if mode not in PATCH_MODES:
            raise ValueError(f"LinearPatchCut: unknown mode {mode!r}; accepted: {', '.join(PATCH_MODES)}")
        self.hidden_size, self.mode = hidden_size, mode
        if mode == "dense":
            self.weight = nn.Parameter(torch.eye(hidden_size, dtype=torch.float32))
        else:
            self.scale = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        if mode == "rotate":
            if hidden_size % hadamard_k:
                raise ValueError(f"LinearPatchCut: hadamard K={hadamard_k} does not divide hidden_size {hidden_size}")
            n = hidden_size // hadamard_k
            if n & (n - 1):
                raise ValueError(f"LinearPatchCut: hidden_size {hidden_size} / K={hadamard_k} = {n} is not a power of two")
            self.register_buffer("hadamard_k", torch.zeros(hadamard_k, hadamard_k, dtype=torch.float32))
        self._op = _package_patch_op() if mode == "rotate" else None
        self._checked = False

    def _check_hadamard(self) -> None:
        """The stored factor must be a symmetric +-1 Hadamard matrix (``H_K H_K^T = K I``); with the
        package installed it must also be the one the package's op applies."""
        h = self.hadamard_k.detach().double().cpu()
        k = h.shape[0]
        if not (h.abs() == 1).all() or not torch.equal(h, h.T) or not torch.equal(h @ h.T, k * torch.eye(k, dtype=h.dtype)):
            raise ValueError(f"LinearPatchCut: hadamard_k ({k}x{k}) is not a symmetric Hadamard matrix; the checkpoint "
                             "is incomplete or corrupt (model.linearpatch.*.hadamard_k)")
        if self._op is not None:
            if not torch.equal(self._op[1](self.hidden_size).h_k, h):
                raise ValueError(f"LinearPatchCut: the checkpoint's Hadamard factor for d={self.hidden_size} is not the "
                                 "one linearpatch_kernels builds; its scales do not apply with this version")
        self._checked = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return (h.float() @ self.weight).to(h.dtype)
        if self.mode == "diag":
            return (h.float() * self.scale).to(h.dtype)
        if not self._checked:
            self._check_hadamard()
        if self._op is not None:
            return self._op[0](h, self.scale)
        x = hadamard_rotate(h.float(), self.hadamard_k)
        return hadamard_rotate(x * self.scale, self.hadamard_k).to(h.dtype)


def _check_patch_values(patch: LinearPatchCut, where: str) -> None:
    """The values a patch can apply (as ``linearpatch_kernels.model.patch.check_patch_values``, which this
    self-contained file cannot import): finite, and scales > 0 (a scale is a ratio of magnitudes; NaN or
    infinity spreads to every later hidden state, 0 erases a channel, a negative value flips it)."""
    values = (patch.weight if patch.mode == "dense" else patch.scale).detach()
    if values.device.type == "meta":  # offloaded by accelerate: read at forward time, not here
        return
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: the {patch.mode} patch has {int((~torch.isfinite(values)).sum())} non-finite "
                         "values (NaN or infinite); the checkpoint is corrupt")
    if patch.mode != "dense" and not bool((values > 0).all()):
        raise ValueError(f"{where}: the {patch.mode} patch has {int((values <= 0).sum())} scales <= 0; scales are "
                         "ratios of channel magnitudes and must be > 0; the checkpoint is corrupt")


def kept_slots(cuts: list[dict]) -> list[tuple[int, str]]:
    """``(kept index, position)`` of each cut's patch, from the cuts' original indices (sorted)."""
    removed, slots = 0, []
    for c in cuts:
        slots.append((0, "input") if c["start"] == 0 else (c["start"] - 1 - removed, "output"))
        removed += c["end"] - c["start"]
    return slots


def checkpoint_cuts(config) -> list[dict]:
    """The cuts of a patched config, checked against its layer count and their stored slots."""
    record = getattr(config, "linearpatch", None)
    if not isinstance(record, dict) or not isinstance(record.get("cuts"), list) or not record["cuts"]:
        raise ValueError(f"{type(config).__name__}: config.linearpatch with a non-empty 'cuts' list is missing; "
                         "this config does not describe a checkpoint written by linearpatch_kernels.save_pruned")
    name = type(config).__name__
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{name}: linearpatch record format_version {record.get('format_version')!r}; this file "
                         f"reads {FORMAT_VERSION}")
    if record.get("hidden_size") != config.hidden_size:
        raise ValueError(f"{name}: the linearpatch record has hidden_size {record.get('hidden_size')!r} but the "
                         f"config has {config.hidden_size}")
    for c in record["cuts"]:
        ok = isinstance(c, dict) and all(type(c.get(k)) is int for k in ("start", "end"))
        if not ok or not 0 <= c["start"] < c["end"]:
            raise ValueError(f"{name}: cut {c!r} is not a block of layers; expected int start < end")
    cuts = sorted(record["cuts"], key=lambda c: c["start"])
    hadamard = record.get("hadamard")
    if any(c.get("mode") == "rotate" for c in cuts) and not (
            isinstance(hadamard, dict) and hadamard.get("k", 0) * hadamard.get("n", 0) == config.hidden_size):
        raise ValueError(f"{name}: a rotate patch needs the record's hadamard {{k, n}} with k * n = hidden_size "
                         f"{config.hidden_size}; got {hadamard!r}")
    total = record.get("num_layers_original")
    kept = total - sum(c["end"] - c["start"] for c in cuts) if isinstance(total, int) else None
    if kept != config.num_hidden_layers:
        raise ValueError(f"{name}: the cuts {[(c['start'], c['end']) for c in cuts]} of "
                         f"{total} original layers leave {kept}, but num_hidden_layers is {config.num_hidden_layers}")
    for c, (index, position) in zip(cuts, kept_slots(cuts)):
        if (c.get("kept_index"), c.get("position")) != (index, position) or c.get("mode") not in PATCH_MODES:
            raise ValueError(f"{name}: cut [{c['start']}, {c['end']}) records kept_index "
                             f"{c.get('kept_index')!r}, position {c.get('position')!r}, mode {c.get('mode')!r}; its "
                             f"original indices put the patch at kept_index {index}, position {position!r}, and "
                             f"mode must be one of {', '.join(PATCH_MODES)}")
    return cuts


def _patch_output(patch: LinearPatchCut):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):  # transformers >= 5: the hidden states alone
            return patch(output)
        return (patch(output[0]), *output[1:])

    return hook


def _patch_input(patch: LinearPatchCut):
    def pre_hook(module, args, kwargs):
        if args:
            return (patch(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": patch(kwargs["hidden_states"])}

    return pre_hook


class _LinearPatchMixin:
    """Builds the family's pruned stack (``num_hidden_layers`` kept layers), one ``LinearPatchCut``
    per cut in ``model.linearpatch``, and routes each to its kept layer with a forward hook (so the
    layers keep the family's weight names). ``linearpatch_kernels.load_pruned`` gives the same model
    with the patch as a module in the stack and the fused cut."""

    _keep_in_fp32_modules = ["linearpatch"]

    def __init__(self, config):
        super().__init__(config)
        cuts = checkpoint_cuts(config)
        d = config.hidden_size
        k = (config.linearpatch.get("hadamard") or {}).get("k", 1)
        self.model.linearpatch = nn.ModuleList(LinearPatchCut(d, c["mode"], k) for c in cuts)
        for patch, c in zip(self.model.linearpatch, cuts):
            layer = self.model.layers[c["kept_index"]]
            if c["position"] == "output":
                layer.register_forward_hook(_patch_output(patch))
            else:
                layer.register_forward_pre_hook(_patch_input(patch), with_kwargs=True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, refusing a checkpoint that lacks a patch tensor (it
        would otherwise be initialised like a missing weight and the cut silently run a wrong patch)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if "linearpatch" in k)
        if missing:
            raise ValueError(f"{cls.__name__}: the checkpoint lacks the patch tensors {missing} that its "
                             "config.json records; it is incomplete")
        for patch, c in zip(model.model.linearpatch, checkpoint_cuts(model.config)):
            _check_patch_values(patch, f"{cls.__name__}: cut [{c['start']}, {c['end']})")
        return (model, info) if want_info else model


def _patched_family(family: str, base_config, base_model):
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    config_cls = type(f"LinearPatch{name}Config", (base_config,), {
        "model_type": MODEL_TYPE_PREFIX + family,
        "__doc__": f"``{base_config.__name__}`` of a pruned {name} with LinearPatch cuts (``linearpatch`` record).",
        "__module__": __name__,
    })
    model_cls = type(f"LinearPatch{name}ForCausalLM", (_LinearPatchMixin, base_model), {
        "config_class": config_cls,
        "__doc__": f"A pruned ``{base_model.__name__}`` with its LinearPatch cuts applied.",
        "__module__": __name__,
    })
    return config_cls, model_cls


LinearPatchLlamaConfig, LinearPatchLlamaForCausalLM = _patched_family("llama", LlamaConfig, LlamaForCausalLM)
LinearPatchMistralConfig, LinearPatchMistralForCausalLM = _patched_family("mistral", MistralConfig, MistralForCausalLM)
LinearPatchQwen2Config, LinearPatchQwen2ForCausalLM = _patched_family("qwen2", Qwen2Config, Qwen2ForCausalLM)
LinearPatchQwen3Config, LinearPatchQwen3ForCausalLM = _patched_family("qwen3", Qwen3Config, Qwen3ForCausalLM)

# family -> (config class, model class)
PATCHED_ARCHITECTURES = {
    "llama": (LinearPatchLlamaConfig, LinearPatchLlamaForCausalLM),
    "mistral": (LinearPatchMistralConfig, LinearPatchMistralForCausalLM),
    "qwen2": (LinearPatchQwen2Config, LinearPatchQwen2ForCausalLM),
    "qwen3": (LinearPatchQwen3Config, LinearPatchQwen3ForCausalLM),
}

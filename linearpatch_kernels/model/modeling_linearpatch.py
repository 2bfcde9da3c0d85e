"""Patched decoder architectures for checkpoints written by ``linearpatch_kernels.save_pruned``.

This file is self-contained (torch, safetensors and transformers only) because ``save_pruned`` copies
it into every checkpoint: ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` then
loads the pruned model *with* its patch even where ``linearpatch_kernels`` is not installed. Where the
package is installed, it registers these same classes with transformers' Auto classes at import, and
the patch runs through its ``linearpatch::hadamard_patch`` op; otherwise through the plain PyTorch
transform below (same math, fp32 inside).

A checkpoint's ``config.json`` has ``model_type`` ``"linearpatch_<family>"`` (family: llama, mistral,
qwen2, qwen3), ``architectures`` ``["LinearPatch<Family>ForCausalLM"]`` and the record
``"linearpatch": {"format_version": 2, "base_model_type", "num_layers_original", "hidden_size",
"cuts": [{"start", "end", "mode", "kept_index", "position"}, ...], "hadamard": {"construction", "k",
"n"} | null, ...}`` (original layer indices; ``kept_index`` and ``position`` say which kept layer
carries the cut's patch, on its output, or on the input of kept layer 0 for a cut at the very start).
Its safetensors hold the family's usual weight names plus, per cut ``c``, ``model.linearpatch.{c}.scale``
(rotate/diag, fp32 ``[d]``) or ``.weight`` (dense, fp32 ``[d, d]``), and for a rotate patch
``model.linearpatch.{c}.hadamard_k``: the ``K x K`` factor of ``H_d = H_K (x) H_{d/K}`` (Sylvester for
the power-of-two part) that the scales were calibrated with.

The record check
----------------
Every loader -- ``linearpatch_kernels.load_pruned``, these classes through the Auto classes (package
imported) or as remote code (package absent), and the package's vLLM models -- checks a checkpoint
with the two functions of this file, so that they accept and refuse exactly the same checkpoints:

* ``check_record(config)``: the record against the config, before any weight is read: format version,
  base model type, hidden size, the cuts as disjoint blocks of the original layers that leave
  ``num_hidden_layers`` kept layers, each cut's mode, the kept layer and side each patch sits on (derived
  from the original indices, ``kept_slots``), and the Hadamard construction (present exactly when a cut
  is rotate, of order ``K`` with ``K * n = d``, buildable here, and -- with the package -- the one the
  package builds for ``d``);
* ``check_patch_tensors(config, tensors)``: the stored ``model.linearpatch.*`` tensors against the
  record: exactly the set its cuts need (none missing, none unexpected), each float32 of the right
  shape, and each ``hadamard_k`` equal to the factor of the construction the record names.

The check lives here, not in the package, because this file has to run it where the package is not
installed; the package imports it from here. Each failure is one ``ValueError`` line that names the
file or config, the field, what it holds and what was expected. An engine that does not know the
``linearpatch_<family>`` model type refuses the checkpoint instead of running it without its patch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

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
PATCH_PREFIX = "model.linearpatch."  # the patch tensors' names in the safetensors
MODELING_FILE = "modeling_linearpatch.py"
# Explicit on every tensor the checks build: transformers builds models under a meta-device context.
_CPU = torch.device("cpu")


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


def _quadratic_character(q: int) -> torch.Tensor:
    """``chi(r)`` for ``r = 0 .. q-1``: 0 at 0, +1 on the nonzero squares mod ``q``, -1 elsewhere."""
    chi = -torch.ones(q, dtype=torch.float64, device=_CPU)
    chi[0] = 0
    chi[sorted({(i * i) % q for i in range(1, q)})] = 1
    return chi


@functools.lru_cache(maxsize=64)
def hadamard_factor(construction: str, k: int) -> torch.Tensor:
    """The symmetric +-1 matrix ``H_K`` (float64) that a record's ``hadamard.construction`` names,
    built here so that a checkpoint's ``hadamard_k`` can be checked without the package. The same
    constructions as ``linearpatch_kernels.hadamard`` (a test holds the two equal for every order):

    * ``sylvester``: ``K = 1``, ``H_K = [[1]]``;
    * ``paley1(q=Q)``: ``K = Q + 1``, from the skew conference matrix ``C = [[0, 1^T], [-1, Q]]``
      (``Q[a, b] = chi(a - b)``), ``H = I + C``, made symmetric by the column permutation
      ``b -> -b`` of GF(Q) and a sign flip of column 0;
    * ``paley2(q=Q)``: ``K = 2 (Q + 1)``, ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``
      with the symmetric conference matrix ``C = [[0, 1^T], [1, Q]]``.

    Raises ``ValueError`` for another name, an order that is not ``k``, or a ``Q`` for which the
    construction is not a symmetric Hadamard matrix (``H H^T = K I``)."""
    if construction == "sylvester" and k == 1:
        return torch.ones(1, 1, dtype=torch.float64, device=_CPU)
    m = re.fullmatch(r"(paley1|paley2)\(q=(\d+)\)", str(construction))
    if m is None:
        raise ValueError(f"Hadamard construction {construction!r} of order K={k}; accepted: 'sylvester' (K=1), "
                         "'paley1(q=Q)' (K=Q+1), 'paley2(q=Q)' (K=2(Q+1))")
    kind, q = m.group(1), int(m.group(2))
    order = q + 1 if kind == "paley1" else 2 * (q + 1)
    if order != k or not 2 < q < 4096:
        raise ValueError(f"Hadamard construction {construction!r} has order {order}, but the record says K={k}")
    chi = _quadratic_character(q)
    a = torch.arange(q, device=_CPU)
    table = chi[(a[:, None] - a[None, :]) % q]  # chi(a - b)
    if kind == "paley1":
        h = torch.empty(k, k, dtype=torch.float64, device=_CPU)
        h[0, :], h[1:, 0] = 1, -1
        h[1:, 1:] = table + torch.eye(q, dtype=torch.float64, device=_CPU)
        h = h[:, [0] + [1 + (-(b - 1)) % q for b in range(1, k)]]
        h[:, 0] = -h[:, 0]
    else:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64, device=_CPU)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, table
        h = (torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64, device=_CPU))
             + torch.kron(torch.eye(q + 1, dtype=torch.float64, device=_CPU),
                          torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64, device=_CPU)))
    if not torch.equal(h, h.T) or not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64, device=_CPU)):
        raise ValueError(f"Hadamard construction {construction!r} is not a Hadamard matrix (Q must be a prime, "
                         f"3 mod 4 for paley1, 1 mod 4 for paley2)")
    return h


def _package():
    """``linearpatch_kernels.hadamard.hadamard_factors`` when the package is installed (importing it
    registers ``torch.ops.linearpatch.*``), else None. (An import inside try/except, so that
    transformers does not require the package to load this file as remote code.)"""
    try:
        from linearpatch_kernels.hadamard import hadamard_factors
    except ImportError:
        return None
    return hadamard_factors


def kept_slots(cuts: list[dict]) -> list[tuple[int, str]]:
    """``(kept index, position)`` of each cut's patch, from the cuts' original indices (sorted): the
    output of the kept layer that was ``start - 1`` (earlier cuts shift its index), or the input of
    kept layer 0 for a cut at ``start == 0``."""
    removed, slots = 0, []
    for c in cuts:
        slots.append((0, "input") if c["start"] == 0 else (c["start"] - 1 - removed, "output"))
        removed += c["end"] - c["start"]
    return slots


def _where(config) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    return f"{name}/config.json" if name else type(config).__name__


def _is_int(value) -> bool:
    return type(value) is int


def check_record(config, where: str | None = None) -> list[dict]:
    """The cuts of a patched config, ``[{"start", "end", "mode", "kept_index", "position"}, ...]`` sorted
    by ``start``, after checking the whole ``config.linearpatch`` record against the config (module
    docstring); raises ``ValueError`` naming ``where`` (default: the config's folder) and the field.
    Fields other than those checked (later additions to the record) are left alone."""
    where = where or _where(config)
    record = getattr(config, "linearpatch", None)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: the linearpatch record is missing; this config does not describe a checkpoint "
                         "written by linearpatch_kernels.save_pruned")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: linearpatch record format_version {record.get('format_version')!r}; this code "
                         f"reads {FORMAT_VERSION}")
    model_type = str(getattr(config, "model_type", ""))
    family = model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else None
    if record.get("base_model_type") != family:
        raise ValueError(f"{where}: the linearpatch record has base_model_type {record.get('base_model_type')!r} but "
                         f"model_type is {model_type!r}; expected the family after {MODEL_TYPE_PREFIX!r}")
    d = getattr(config, "hidden_size", None)
    if record.get("hidden_size") != d:
        raise ValueError(f"{where}: the linearpatch record has hidden_size {record.get('hidden_size')!r} but the "
                         f"config has {d}; the patch does not belong to this model")
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
        raise ValueError(f"{where}: the config has a quantization_config ({method}); checkpoints of pruned quantized "
                         "models are not supported (quantization settings name layers by their original index, which "
                         "pruning renumbers): prune the unquantized model")
    total = record.get("num_layers_original")
    if not _is_int(total) or total < 1:
        raise ValueError(f"{where}: the linearpatch record has num_layers_original {total!r}; expected a positive int")
    raw = record.get("cuts")
    if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
        raise ValueError(f"{where}: the linearpatch record has cuts {raw!r}; expected a non-empty list of "
                         "{start, end, mode, kept_index, position} objects")
    for c in raw:
        if not (_is_int(c.get("start")) and _is_int(c.get("end")) and 0 <= c["start"] < c["end"] <= total):
            raise ValueError(f"{where}: cut {c!r} is not a block of layers; expected int start < end within the "
                             f"{total} original layers")
    cuts = sorted((dict(c) for c in raw), key=lambda c: c["start"])
    for a, b in zip(cuts, cuts[1:]):
        if b["start"] <= a["end"]:
            raise ValueError(f"{where}: cuts [{a['start']}, {a['end']}) and [{b['start']}, {b['end']}) overlap or "
                             "touch; expected disjoint blocks with a kept layer between them")
    kept = total - sum(c["end"] - c["start"] for c in cuts)
    if kept != getattr(config, "num_hidden_layers", None):
        raise ValueError(f"{where}: the cuts {[(c['start'], c['end']) for c in cuts]} of {total} original layers "
                         f"leave {kept}, but num_hidden_layers is {getattr(config, 'num_hidden_layers', None)}")
    for c, (index, position) in zip(cuts, kept_slots(cuts)):
        if c.get("mode") not in PATCH_MODES:
            raise ValueError(f"{where}: cut [{c['start']}, {c['end']}) has mode {c.get('mode')!r}; accepted: "
                             f"{', '.join(PATCH_MODES)}")
        if (c.get("kept_index"), c.get("position")) != (index, position):
            raise ValueError(f"{where}: cut [{c['start']}, {c['end']}) records kept_index {c.get('kept_index')!r}, "
                             f"position {c.get('position')!r}; its original indices put the patch at kept_index "
                             f"{index}, position {position!r}")
    _check_hadamard_record(record, d, any(c["mode"] == "rotate" for c in cuts), where)
    return cuts


def _check_hadamard_record(record: dict, d: int, rotate: bool, where: str) -> None:
    hadamard = record.get("hadamard")
    if not rotate:
        if hadamard is not None:
            raise ValueError(f"{where}: the linearpatch record names a Hadamard matrix {hadamard!r} but no cut has "
                             "mode 'rotate'; expected hadamard null")
        return
    if not (isinstance(hadamard, dict) and _is_int(hadamard.get("k")) and _is_int(hadamard.get("n"))
            and hadamard["k"] >= 1 and hadamard["n"] >= 1 and hadamard["k"] * hadamard["n"] == d
            and hadamard["n"] & (hadamard["n"] - 1) == 0):
        raise ValueError(f"{where}: a rotate patch needs the record's hadamard {{construction, k, n}} with n a power "
                         f"of two and k * n = hidden_size {d}; got {hadamard!r}")
    factors = _package()
    if factors is not None:  # the package's op applies its own H_d: the record must name that one
        try:
            f = factors(d)
        except ValueError as e:
            raise ValueError(f"{where}: a rotate patch with hidden_size {d}: {e}") from None
        expected = {"construction": f.construction, "k": f.k, "n": f.n}
        if {key: hadamard.get(key) for key in expected} != expected:
            raise ValueError(f"{where}: the patch was calibrated with Hadamard matrix {hadamard!r}; "
                             f"linearpatch_kernels builds {expected!r} for d={d}, so the scales do not apply")
    try:
        hadamard_factor(hadamard.get("construction"), hadamard["k"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def expected_patch_tensors(config, cuts: list[dict]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every patch tensor the checked record's ``cuts`` need (all float32)."""
    d = config.hidden_size
    want = {}
    for c, cut in enumerate(cuts):
        if cut["mode"] == "dense":
            want[f"{PATCH_PREFIX}{c}.weight"] = (d, d)
        else:
            want[f"{PATCH_PREFIX}{c}.scale"] = (d,)
        if cut["mode"] == "rotate":
            k = config.linearpatch["hadamard"]["k"]
            want[f"{PATCH_PREFIX}{c}.hadamard_k"] = (k, k)
    return want


def check_patch_tensors(config, tensors: Mapping[str, torch.Tensor], where: str | None = None,
                        cuts: list[dict] | None = None) -> None:
    """Check the stored patch tensors (``tensors``: name -> tensor as stored; names outside
    ``model.linearpatch.`` are ignored) against the record (module docstring). ``cuts``: the result of
    ``check_record(config)``, which is run here when not given."""
    where = where or _where(config)
    cuts = check_record(config, where) if cuts is None else cuts
    want = expected_patch_tensors(config, cuts)
    found = {name: t for name, t in tensors.items() if name.startswith(PATCH_PREFIX)}
    missing, unexpected = sorted(set(want) - set(found)), sorted(set(found) - set(want))
    if missing or unexpected:
        modes = ", ".join(f"[{c['start']}, {c['end']}) {c['mode']}" for c in cuts)
        raise ValueError(f"{where}: the patch tensors do not match the record: missing {missing}, unexpected "
                         f"{unexpected}; its cut(s) {modes} need exactly {sorted(want)}")
    for c, cut in enumerate(cuts):
        for name, shape in want.items():
            if not name.startswith(f"{PATCH_PREFIX}{c}."):
                continue
            t = found[name]
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                raise ValueError(f"{where}: tensor {name!r} is {t.dtype} of shape {tuple(t.shape)}; the record's cut "
                                 f"[{cut['start']}, {cut['end']}) mode {cut['mode']!r} needs torch.float32 of shape {shape}")
            if name.endswith(".hadamard_k"):
                h = config.linearpatch["hadamard"]
                if not torch.equal(t.detach().to("cpu", torch.float64), hadamard_factor(h["construction"], h["k"])):
                    raise ValueError(f"{where}: tensor {name!r} is not the Hadamard factor {h['construction']} (K={h['k']}) "
                                     "that the record says the scales were calibrated with")


def stored_patch_tensors(pretrained_model_name_or_path, subfolder: str = "", state_dict=None,
                         **hub_kwargs) -> dict[str, torch.Tensor]:
    """The ``model.linearpatch.*`` tensors as stored in a checkpoint's safetensors (a local folder or
    a Hub repository, through transformers' own file cache), before any cast: what
    ``check_patch_tensors`` needs and what ``from_pretrained`` no longer shows once it has cast and
    filtered the weights."""
    from safetensors import safe_open

    if state_dict is not None:
        return {k: v for k, v in state_dict.items() if k.startswith(PATCH_PREFIX)}
    folder = Path(pretrained_model_name_or_path) / (subfolder or "")
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
    else:
        from transformers.utils import cached_file

        def fetch(name, required=True):
            return cached_file(pretrained_model_name_or_path, name, subfolder=subfolder or "",
                               _raise_exceptions_for_missing_entries=required, **hub_kwargs)

        index = fetch("model.safetensors.index.json", required=False)
        if index:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
            files = [fetch(name) for name in shards]
        else:
            files = [fetch("model.safetensors")]
    if not files:
        raise ValueError(f"{pretrained_model_name_or_path}: no *.safetensors weights; a LinearPatch checkpoint stores "
                         "its patch tensors in safetensors")
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(PATCH_PREFIX):
                    found[name] = f.get_tensor(name)
    return found


class LinearPatchCut(nn.Module):
    """The patch of one cut: ``y = h . P`` on the last dim, fp32 inside, ``h``'s dtype out.
    ``P = H diag(scale) H^T`` (rotate), ``diag(scale)`` (diag) or ``weight`` (dense)."""

    def __init__(self, hidden_size: int, mode: str, hadamard: dict | None = None):
        super().__init__()
        if mode not in PATCH_MODES:
            raise ValueError(f"LinearPatchCut: unknown mode {mode!r}; accepted: {', '.join(PATCH_MODES)}")
        self.hidden_size, self.mode = hidden_size, mode
        if mode == "dense":
            self.weight = nn.Parameter(torch.eye(hidden_size, dtype=torch.float32))
        else:
            self.scale = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self._op = None
        if mode == "rotate":
            self.construction, k = hadamard["construction"], hadamard["k"]
            self.register_buffer("hadamard_k", torch.zeros(k, k, dtype=torch.float32))
            if _package() is not None:
                self._op = torch.ops.linearpatch.hadamard_patch
        # Set once the stored hadamard_k has been checked (``from_pretrained`` checks it from the files).
        self.checked = mode != "rotate"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return (h.float() @ self.weight).to(h.dtype)
        if self.mode == "diag":
            return (h.float() * self.scale).to(h.dtype)
        if not self.checked:  # weights loaded some other way than from_pretrained
            if not torch.equal(self.hadamard_k.detach().to("cpu", torch.float64),
                               hadamard_factor(self.construction, self.hadamard_k.shape[0])):
                raise ValueError(f"LinearPatchCut: hadamard_k is not the Hadamard factor {self.construction} that the "
                                 "record says the scales were calibrated with")
            self.checked = True
        if self._op is not None:
            return self._op(h, self.scale)
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


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only")


class _LinearPatchMixin:
    """Builds the family's pruned stack (``num_hidden_layers`` kept layers), one ``LinearPatchCut``
    per cut in ``model.linearpatch``, and routes each to its kept layer with a forward hook (so the
    layers keep the family's weight names). ``linearpatch_kernels.load_pruned`` gives the same model
    with the patch as a module in the stack and the fused cut."""

    _keep_in_fp32_modules = ["linearpatch"]

    def __init__(self, config):
        super().__init__(config)
        cuts = check_record(config)
        d = config.hidden_size
        self.model.linearpatch = nn.ModuleList(
            LinearPatchCut(d, c["mode"], config.linearpatch.get("hadamard")) for c in cuts)
        for patch, c in zip(self.model.linearpatch, cuts):
            layer = self.model.layers[c["kept_index"]]
            if c["position"] == "output":
                layer.register_forward_hook(_patch_output(patch))
            else:
                layer.register_forward_pre_hook(_patch_input(patch), with_kwargs=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` after the record check: the config's record, then the
        stored patch tensors (read from the safetensors as they are, since loading casts them and
        drops unexpected ones), so that a checkpoint whose files disagree with its record is refused
        before any weight is loaded."""
        from transformers import PretrainedConfig

        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder", ""),
                                                      **hub)
        cuts = check_record(config)
        stored = stored_patch_tensors(pretrained_model_name_or_path, kwargs.get("subfolder", ""),
                                      kwargs.get("state_dict"), **hub)
        check_patch_tensors(config, stored, cuts=cuts)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for patch, c in zip(model.model.linearpatch, cuts):
            _check_patch_values(patch, f"{cls.__name__}: cut [{c['start']}, {c['end']})")
            patch.checked = True
        return loaded


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
    # With an Auto class registered, transformers' save_pretrained copies this file next to the saved
    # weights and writes auto_map (``custom_object_save``), whether the class came from the package or
    # from a checkpoint's remote code: a re-saved model then loads with and without the package.
    config_cls.register_for_auto_class("AutoConfig")
    model_cls.register_for_auto_class("AutoModelForCausalLM")
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

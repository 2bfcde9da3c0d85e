"""``LinearPatch``: the linear map ``y = h . P`` applied to the residual stream at a pruning cut.

Three forms of ``P`` (``d`` the hidden size, ``h`` one token's hidden vector):

* ``"rotate"``: ``P = H diag(s) H^T`` with ``H`` the orthonormal Hadamard matrix of
  ``linearpatch_kernels.hadamard_matrix(d)``; applied by the fused ``linearpatch::hadamard_patch`` op in
  ``O(d log d)`` per token, never as a dense matmul.
* ``"diag"``: ``P = diag(s)``, a per-channel scale of the raw residual channels.
* ``"dense"``: a free ``d x d`` matrix ``W`` (the paper's distilled patch), ``y = h . W``.

The parameters (``scale`` of shape ``(d,)`` or ``weight`` of shape ``(d, d)``) are float32 whatever
the model's dtype: the math is fp32 and the result is cast back to ``h``'s dtype. ``model.half()``,
``model.to(torch.bfloat16)`` and friends move the patch between devices but never change its dtype
(see ``_apply``), because a scale rounded to bf16 (8 bits of mantissa) would be a visible error on
every token of every later layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hadamard import hadamard_factors, hadamard_matrix
from .. import ops as _ops  # registers torch.ops.linearpatch.*

__all__ = ["PATCH_MODES", "LinearPatch", "check_cut_patches", "check_patch_values"]

PATCH_MODES = ("rotate", "diag", "dense")


def _check_hidden_size(hidden_size, mode: str) -> int:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise TypeError(f"LinearPatch: hidden_size must be a positive int, got {hidden_size!r}")
    if mode == "rotate":
        # Builds (and caches) the Hadamard factors now, in eager mode: the op's fake kernel looks them up
        # while torch.compile traces, where building them from fake tensors would fail. The ValueError
        # names the nearest supported sizes.
        try:
            hadamard_factors(hidden_size)
        except ValueError as e:
            raise ValueError(f"LinearPatch(mode='rotate'): hidden_size {hidden_size} has no Hadamard matrix: {e}") from None
    return hidden_size


def _as_fp32_param(value, shape: tuple[int, ...], name: str) -> nn.Parameter:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"LinearPatch: {name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"LinearPatch: {name} has dtype {value.dtype}; a floating-point tensor is expected")
    if tuple(value.shape) != shape:
        raise ValueError(f"LinearPatch: {name} has shape {tuple(value.shape)}; expected {shape}")
    return nn.Parameter(value.detach().to(torch.float32).clone())


class LinearPatch(nn.Module):
    """``y = h . P`` on the last dim of ``h`` (see the module docstring for the three modes).

    ``scale=None`` (rotate/diag) and ``weight=None`` (dense) give the identity. ``enabled = False``
    turns the patch into the identity without removing it (``set_patch_enabled`` does that for a
    whole model), so one pruned model can be evaluated with and without its patch.
    """

    def __init__(self, hidden_size: int, mode: str = "rotate", scale: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None):
        super().__init__()
        if mode not in PATCH_MODES:
            raise ValueError(f"LinearPatch: unknown mode {mode!r}; accepted: {', '.join(PATCH_MODES)}")
        self.hidden_size = _check_hidden_size(hidden_size, mode)
        self.mode = mode
        self.enabled = True
        d = hidden_size
        if mode == "dense":
            if scale is not None:
                raise ValueError("LinearPatch(mode='dense') takes weight, not scale")
            w = torch.eye(d, dtype=torch.float32) if weight is None else weight
            self.weight = _as_fp32_param(w, (d, d), "weight")
        else:
            if weight is not None:
                raise ValueError(f"LinearPatch(mode={mode!r}) takes scale, not weight (weight is for mode='dense')")
            s = torch.ones(d, dtype=torch.float32) if scale is None else scale
            self.scale = _as_fp32_param(s, (d,), "scale")

    def _apply(self, fn, recurse=True):
        # Keep the parameters fp32: when ``fn`` changes a floating tensor's dtype (``.half()``,
        # ``.to(torch.bfloat16)``), apply only its device move to the original fp32 tensor instead.
        def device_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(device_only, recurse)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"LinearPatch: input has last dim {h.shape[-1]}; expected hidden size {self.hidden_size}")
        if self.mode == "rotate":
            # The public function: in eager inference it calls the cached kernel directly (a few
            # microseconds of host time per decode step); under torch.compile or autograd it is the
            # op itself, one opaque call whose fake kernel validates.
            return _ops.hadamard_patch(h, self.scale)
        if self.mode == "diag":
            return (h.float() * self.scale).to(h.dtype)
        return (h.float() @ self.weight).to(h.dtype)

    @torch.no_grad()
    def dense_matrix(self) -> torch.Tensor:
        """The ``d x d`` float32 matrix ``P`` this patch applies (``y = h . P``), on the patch's device.

        For "rotate" it is built from the dense fp64 ``H`` (``H diag(s) H^T``), not from the kernel, so
        it can initialize a dense patch or check the kernel.
        """
        if self.mode == "dense":
            return self.weight.detach().clone()
        s = self.scale.detach()
        if self.mode == "diag":
            return torch.diag(s)
        h = hadamard_matrix(self.hidden_size, dtype=torch.float64, device=s.device)
        return ((h * s.double()) @ h.T).to(torch.float32)

    def extra_repr(self) -> str:
        text = f"mode={self.mode}, hidden_size={self.hidden_size}"
        return text if self.enabled else text + ", enabled=False"


def _positions(mask: torch.Tensor, shown: int = 6) -> str:
    """Where ``mask`` is set: ``"channels 3, 17, 40"`` for a scale, ``"flat indices ..."`` for a matrix."""
    index = torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()
    listed = ", ".join(map(str, index[:shown])) + (f" and {len(index) - shown} more" if len(index) > shown else "")
    noun = ("channel", "channels") if mask.dim() == 1 else ("flat index", "flat indices")
    return f"{noun[len(index) > 1]} {listed}"


def check_patch_values(patch: LinearPatch, where: str) -> LinearPatch:
    """``patch`` if its parameters can be applied, else a ``ValueError`` that starts with ``where`` (the
    caller and the cut, e.g. ``"prune_and_patch: cut [14, 19)"``) and says which values and why.

    A NaN or infinite scale or weight turns every later hidden state of every token into NaN, and a
    scale ``s_c <= 0`` cannot come from the calibration ``s = mean|X_end H| / mean|X_start H|`` (a ratio of
    magnitudes): zero erases channel ``c`` of ``x H`` for every later layer, a negative value flips its
    sign. So rotate and diag patches need finite scales > 0, a dense patch a finite matrix. Returns the
    patch, so that a caller can check and use it in one expression."""
    if patch.mode == "dense":
        name, values = "weight", patch.weight.detach()
    else:
        name, values = "scale", patch.scale.detach()
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        nan = int(torch.isnan(values).sum())
        raise ValueError(f"{where}: the {patch.mode} patch's {name} has {int(bad.sum())} non-finite values "
                         f"({nan} NaN, {int(bad.sum()) - nan} infinite) at {_positions(bad)}; a patch needs finite "
                         f"values, or every later hidden state becomes NaN")
    if patch.mode != "dense":
        low = values <= 0
        if bool(low.any()):
            worst = float(values.min())
            raise ValueError(f"{where}: the {patch.mode} patch's scale is <= 0 at {_positions(low)} (smallest "
                             f"{worst:.3g}); scales are ratios of channel magnitudes and must be > 0 (0 erases the "
                             "channel in every later layer, a negative value flips it)")
    return patch


def check_cut_patches(patches, cuts, where: str) -> None:
    """``check_patch_values`` for the patch of every cut (``cuts``: ``(start, end)`` pairs or records with
    ``"start"``/``"end"``, in the order of ``patches``), naming the cut as ``"<where>: cut [start, end)"``."""
    for patch, cut in zip(patches, cuts):
        start, end = (cut["start"], cut["end"]) if isinstance(cut, dict) else cut
        check_patch_values(patch, f"{where}: cut [{start}, {end})")

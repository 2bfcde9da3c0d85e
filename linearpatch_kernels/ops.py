"""The ``linearpatch`` custom ops: schemas, input checks, fake kernels and autograd, in one place.

* ``linearpatch::hadamard_transform(Tensor x, float scale=1.0) -> Tensor``:
  ``y = x . H_u * scale`` along the last dim, ``H_u`` the unnormalized (+-1) symmetric Hadamard
  matrix of ``hadamard_matrix(d, normalized=False)`` (the contract of fast-hadamard-transform's
  ``hadamard_transform``).
* ``linearpatch::hadamard_patch(Tensor x, Tensor scale) -> Tensor``:
  ``y = x . H diag(s) H^T`` with ``H = H_u / sqrt(d)`` orthonormal, i.e. LinearPatch's ``P``.

Both take any leading shape and strides, fp32/fp16/bf16 (fp64 on the torch backend) and return the
input's dtype, computing in fp32. The kernels live in ``linearpatch_kernels.backends``; the op
implementation only validates and dispatches, so ``torch.compile`` sees one opaque op per call.

Autograd (``H`` symmetric, so ``P`` is symmetric):
``grad_x = hadamard_patch(grad_y, s)`` and ``grad_s = sum_tokens (x H) * (grad_y H)``;
``hadamard_transform``'s ``grad_x = hadamard_transform(grad_y, scale)``.
"""

from __future__ import annotations

import torch

from .backends import select_backend
from .hadamard import is_supported_size, unsupported_size_message

__all__ = ["hadamard_transform", "hadamard_patch"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ACCEPTED = "float32, float16 or bfloat16 (float64 on the torch backend)"


def _check_x(x: torch.Tensor, op: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; accepted: {_ACCEPTED}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the hidden dim last), got a 0-d tensor")
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"{op}: the last dim of x (the hidden size) is 0; it must be a supported Hadamard size >= 1")
    if not is_supported_size(int(d)):
        raise ValueError(f"{op}: last dim of x is {d}: {unsupported_size_message(int(d))}")
    return int(d)


def _check_scale(x: torch.Tensor, scale: torch.Tensor, d: int, op: str) -> None:
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{op}: scale must be a torch.Tensor of shape ({d},), got {type(scale).__name__}")
    allowed = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    if scale.dtype not in allowed:
        raise TypeError(
            f"{op}: scale has dtype {scale.dtype}; it must be float32 (float64 also accepted when x is float64)"
        )
    if scale.dim() != 1 or scale.shape[0] != d:
        raise ValueError(f"{op}: scale has shape {tuple(scale.shape)}; expected ({d},) to match the last dim of x")
    if scale.device != x.device:
        raise ValueError(f"{op}: scale is on {scale.device} but x is on {x.device}; put both on the same device")


@torch.library.custom_op("linearpatch::hadamard_transform", mutates_args=())
def _hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    _check_x(x, "hadamard_transform")
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return select_backend(x).hadamard_transform(x, float(scale))


@_hadamard_transform.register_fake
def _hadamard_transform_fake(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    _check_x(x, "hadamard_transform")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _transform_setup(ctx, inputs, output) -> None:
    ctx.scale = inputs[1]


def _transform_backward(ctx, grad_y):
    return torch.ops.linearpatch.hadamard_transform(grad_y, ctx.scale), None


_hadamard_transform.register_autograd(_transform_backward, setup_context=_transform_setup)


@torch.library.custom_op("linearpatch::hadamard_patch", mutates_args=())
def _hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    d = _check_x(x, "hadamard_patch")
    _check_scale(x, scale, d, "hadamard_patch")
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return select_backend(x).hadamard_patch(x, scale.contiguous())


@_hadamard_patch.register_fake
def _hadamard_patch_fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    d = _check_x(x, "hadamard_patch")
    _check_scale(x, scale, d, "hadamard_patch")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _patch_setup(ctx, inputs, output) -> None:
    x, scale = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, scale)


def _patch_backward(ctx, grad_y):
    x, scale = ctx.saved_tensors
    grad_x = grad_s = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.linearpatch.hadamard_patch(grad_y, scale)
    if ctx.needs_input_grad[1]:
        d = x.shape[-1]
        # s multiplies (x H) channel-wise, H = H_u / sqrt(d): dL/ds = sum over tokens of (x H) * (grad_y H).
        wide = torch.float64 if scale.dtype == torch.float64 else torch.float32
        xh = torch.ops.linearpatch.hadamard_transform(x, d**-0.5).to(wide)
        gh = torch.ops.linearpatch.hadamard_transform(grad_y.to(x.dtype), d**-0.5).to(wide)
        grad_s = (xh * gh).reshape(-1, d).sum(0).to(scale.dtype)
    return grad_x, grad_s


_hadamard_patch.register_autograd(_patch_backward, setup_context=_patch_setup)


def hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x . H_u * scale`` along the last dim (``H_u``: the +-1 Hadamard matrix, symmetric).

    For powers of two this equals ``scipy.linalg.hadamard(d) @ row * scale`` for each row;
    ``scale = d ** -0.5`` makes it orthonormal.
    """
    _check_x(x, "hadamard_transform")
    return torch.ops.linearpatch.hadamard_transform(x, float(scale))


def hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LinearPatch: ``x . H diag(scale) H^T`` along the last dim, ``H`` the orthonormal Hadamard matrix."""
    # Checked here too so that a non-tensor argument gets this message, not the dispatcher's.
    _check_scale(x, scale, _check_x(x, "hadamard_patch"), "hadamard_patch")
    return torch.ops.linearpatch.hadamard_patch(x, scale)

"""The ``linearpatch`` custom ops: schemas, input checks, fake kernels and autograd, in one place.

* ``linearpatch::hadamard_transform(Tensor x, float scale=1.0) -> Tensor``:
  ``y = x . H_u * scale`` along the last dim, ``H_u`` the unnormalized (+-1) symmetric Hadamard
  matrix of ``hadamard_matrix(d, normalized=False)`` (the contract of fast-hadamard-transform's
  ``hadamard_transform``).
* ``linearpatch::hadamard_patch(Tensor x, Tensor scale) -> Tensor``:
  ``y = x . H diag(s) H^T`` with ``H = H_u / sqrt(d)`` orthonormal, i.e. LinearPatch's ``P``.
* ``linearpatch::patch_add_rmsnorm(Tensor residual, Tensor update, Tensor scale, Tensor norm_weight,
  float eps) -> (Tensor, Tensor)``: the interface epilogue at the cut, in one pass:
  ``h = (residual + update) . P`` and ``n = h / sqrt(mean(h^2) + eps) * norm_weight``, i.e. the last
  residual add before the cut, the patch, and the next layer's RMSNorm. Returns ``(h, n)``.

Both take any leading shape and strides, fp32/fp16/bf16 (fp64 on the torch backend) and return the
input's dtype, computing in fp32. The kernels live in ``linearpatch_kernels.backends``; the op
implementation only validates and dispatches, so ``torch.compile`` sees one opaque op per call.

Host cost of an eager call: the backend choice and its per-size constants are made once per
(device, dtype, d, op) and cached (``backends.plan_for``; a change of the forced backend or of the
GPU limit tables makes a new one). The public functions below go further when nothing needs the op
machinery: plain tensors (``torch.Tensor`` or ``nn.Parameter``), no autograd to record, no
``torch.compile``/export tracing, no dispatch or function mode, no functorch transform, no autocast.
Then they check the arguments that can change per call and call the cached kernel (a C++ op for the
cpu and cuda backends) directly, a few microseconds in all; anything else takes the
``torch.ops.linearpatch.*`` op, whose results are the same.

Autograd (``H`` symmetric, so ``P`` is symmetric):
``grad_x = hadamard_patch(grad_y, s)`` and ``grad_s = sum_tokens (x H) * (grad_y H)``;
``hadamard_transform``'s ``grad_x = hadamard_transform(grad_y, scale)``.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
from torch._C._functorch import peek_interpreter_stack

from .backends import plan_for
from .hadamard import is_supported_size, unsupported_size_message

__all__ = ["hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"]

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


def _fp32_inside(x: torch.Tensor):
    """Autocast off inside the kernels: the torch backend's matmuls must stay fp32 even when the
    caller runs under ``torch.autocast`` (the ops' contract is fp32 math whatever the context)."""
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("linearpatch::hadamard_transform", mutates_args=())
def _hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    _check_x(x, "hadamard_transform")
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    with _fp32_inside(x):
        return plan_for(x, "hadamard_transform")(x, float(scale))


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
    with _fp32_inside(x):
        return plan_for(x, "hadamard_patch")(x, scale.contiguous())


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
        # Both transforms take the fp32 (fp64) upcast, so that x H and grad_y H are not rounded to
        # bf16/fp16 before the product: the fp32-inside contract holds for the gradient too.
        wide = torch.float64 if torch.float64 in (x.dtype, scale.dtype) else torch.float32
        xh = torch.ops.linearpatch.hadamard_transform(x.to(wide), d**-0.5)
        gh = torch.ops.linearpatch.hadamard_transform(grad_y.to(wide), d**-0.5)
        grad_s = (xh * gh).reshape(-1, d).sum(0).to(scale.dtype)
    return grad_x, grad_s


_hadamard_patch.register_autograd(_patch_backward, setup_context=_patch_setup)


def _check_epilogue(residual, update, scale, norm_weight, eps) -> None:
    op = "patch_add_rmsnorm"
    d = _check_x(residual, op)
    if not isinstance(update, torch.Tensor):
        raise TypeError(f"{op}: update must be a torch.Tensor, got {type(update).__name__}")
    if update.shape != residual.shape or update.dtype != residual.dtype or update.device != residual.device:
        raise ValueError(
            f"{op}: update ({tuple(update.shape)}, {update.dtype}, {update.device}) must match residual "
            f"({tuple(residual.shape)}, {residual.dtype}, {residual.device}) in shape, dtype and device"
        )
    _check_scale(residual, scale, d, op)
    if not isinstance(norm_weight, torch.Tensor):
        raise TypeError(f"{op}: norm_weight must be a torch.Tensor of shape ({d},), got {type(norm_weight).__name__}")
    if norm_weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: norm_weight has dtype {norm_weight.dtype}; accepted: {_ACCEPTED}")
    if norm_weight.dim() != 1 or norm_weight.shape[0] != d:
        raise ValueError(f"{op}: norm_weight has shape {tuple(norm_weight.shape)}; expected ({d},)")
    if norm_weight.device != residual.device:
        raise ValueError(f"{op}: norm_weight is on {norm_weight.device} but residual is on {residual.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")


@torch.library.custom_op("linearpatch::patch_add_rmsnorm", mutates_args=())
def _patch_add_rmsnorm(residual: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                       norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_epilogue(residual, update, scale, norm_weight, eps)
    if residual.numel() == 0:
        empty = torch.empty_like(residual, memory_format=torch.contiguous_format)
        return empty, empty.clone()
    run = plan_for(residual, "patch_add_rmsnorm")
    with _fp32_inside(residual):
        return run(residual, update, scale.contiguous(), norm_weight.contiguous(), float(eps))


@_patch_add_rmsnorm.register_fake
def _patch_add_rmsnorm_fake(residual, update, scale, norm_weight, eps):
    _check_epilogue(residual, update, scale, norm_weight, eps)
    return (torch.empty_like(residual, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format))


def _epilogue_setup(ctx, inputs, output) -> None:
    residual, update, scale, norm_weight, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(residual, update, scale, norm_weight)


def _epilogue_backward(ctx, grad_h, grad_n):
    # h = (r + u) P, n = w * h * rstd with rstd = (mean(h^2) + eps)^-1/2. The forward computes rstd
    # from the unrounded fp32 h, so the backward recomputes that h in fp32 (one more patch) rather
    # than using the output rounded to bf16/fp16.
    residual, update, scale, norm_weight = ctx.saved_tensors
    d = residual.shape[-1]
    wide = torch.float64 if residual.dtype == torch.float64 else torch.float32
    x = residual.to(wide) + update.to(wide)
    hf = torch.ops.linearpatch.hadamard_patch(x, scale)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    xhat = hf * rstd
    g_total = torch.zeros_like(hf) if grad_h is None else grad_h.to(wide)
    grad_w = None
    if grad_n is not None:
        gn = grad_n.to(wide)
        g_xhat = gn * norm_weight.to(wide)
        g_total = g_total + rstd * (g_xhat - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
        if ctx.needs_input_grad[3]:
            grad_w = (gn * xhat).reshape(-1, d).sum(0).to(norm_weight.dtype)
    grad_sum = grad_s = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        # P is symmetric: the gradient of (r + u) is grad_h' P.
        grad_sum = torch.ops.linearpatch.hadamard_patch(g_total, scale).to(residual.dtype)
    if ctx.needs_input_grad[2]:
        xh = torch.ops.linearpatch.hadamard_transform(x, d**-0.5)
        gh = torch.ops.linearpatch.hadamard_transform(g_total, d**-0.5)
        grad_s = (xh * gh).reshape(-1, d).sum(0).to(scale.dtype)
    grad_r = grad_sum if ctx.needs_input_grad[0] else None
    grad_u = grad_sum if ctx.needs_input_grad[1] else None
    return grad_r, grad_u, grad_s, grad_w, None


_patch_add_rmsnorm.register_autograd(_epilogue_backward, setup_context=_epilogue_setup)


# ------------------------------------------------------------------------------------------------
# The public functions: the eager fast path, else the op

_PLAIN = (torch.Tensor, torch.nn.Parameter)

# The state that sends a call to the op, read through module-level names (each attribute lookup on
# ``torch._C`` costs as much as the call it finds).
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled


def _eager() -> bool:
    """Whether an eager call may skip the op machinery and call the cached kernel: see the module
    docstring (each check is a C call of well under a microsecond). The arguments' own part: plain
    tensors (not subclasses) that autograd need not see (``_direct``)."""
    return not (_is_compiling() or _dispatch_modes() or _function_modes() or peek_interpreter_stack() is not None
                or _autocast())


def _direct(*tensors) -> bool:
    """``_eager()``, and every tensor plain (not a subclass) and not needing autograd."""
    if not _eager():
        return False
    for t in tensors:
        if type(t) not in _PLAIN or (t.requires_grad and _grad_enabled()):
            return False
    return True


def _vector_ok(v: torch.Tensor, x: torch.Tensor, d: int) -> bool:
    """``scale`` (and the epilogue's weight) as the kernels take it without the op's checks: fp32, (d,),
    dense, on x's device. Anything else takes the op, which accepts or explains it."""
    return v.dtype is torch.float32 and v.ndim == 1 and v.shape[0] == d and v.is_contiguous() and v.device == x.device


def patch_add_rmsnorm(residual: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The interface epilogue in one pass: ``h = (residual + update) . H diag(scale) H^T`` and
    ``RMSNorm(h) * norm_weight``; returns ``(h, normed)`` in ``residual``'s dtype (fp32 math)."""
    # The fast path's checks written out (this is a decode step's host cost, and each function call
    # costs 0.1 us): the same as _direct and _vector_ok, with the device read once for all four tensors.
    if (type(eps) is float and eps >= 0 and type(residual) in _PLAIN and type(update) in _PLAIN
            and type(scale) in _PLAIN and type(norm_weight) in _PLAIN and _eager()
            and not (_grad_enabled() and (residual.requires_grad or update.requires_grad or scale.requires_grad
                                          or norm_weight.requires_grad))
            and residual.ndim and residual.numel()):
        d = residual.shape[-1]
        device = residual.device
        if (update.shape == residual.shape and update.dtype is residual.dtype
                and scale.dtype is torch.float32 and scale.ndim == 1 and scale.shape[0] == d and scale.is_contiguous()
                and norm_weight.dtype in _FLOAT_DTYPES and norm_weight.ndim == 1 and norm_weight.shape[0] == d
                and norm_weight.is_contiguous()
                and update.device == device and scale.device == device and norm_weight.device == device):
            return plan_for(residual, "patch_add_rmsnorm", _check_x_epilogue)(residual, update, scale, norm_weight, eps)
    if not torch.compiler.is_compiling():
        _check_epilogue(residual, update, scale, norm_weight, eps)
    return torch.ops.linearpatch.patch_add_rmsnorm(residual, update, scale, norm_weight, float(eps))


def _check_transform_scale(scale, op: str) -> None:
    # The op's schema takes a Python float: a real number (a 0-d or one-element float tensor converts too).
    # A string would convert through float() ("2" -> 2.0) or fail with float()'s own message, and True
    # would silently be 1.0: neither is a scale.
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1 and scale.dtype != torch.bool and not scale.is_complex():
            return
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return
    raise TypeError(f"{op}: scale must be a real number (a float or an int, e.g. d ** -0.5 for the orthonormal "
                    f"transform), got {scale!r} of type {type(scale).__name__}")


def hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x . H_u * scale`` along the last dim (``H_u``: the +-1 Hadamard matrix, symmetric).

    For powers of two this equals ``scipy.linalg.hadamard(d) @ row * scale`` for each row;
    ``scale = d ** -0.5`` makes it orthonormal.
    """
    if _direct(x) and x.ndim and x.numel() and type(scale) in (float, int):
        return plan_for(x, "hadamard_transform", _check_x_transform)(x, float(scale))
    if not torch.compiler.is_compiling():
        _check_x(x, "hadamard_transform")
        _check_transform_scale(scale, "hadamard_transform")
    return torch.ops.linearpatch.hadamard_transform(x, float(scale))


def hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LinearPatch: ``x . H diag(scale) H^T`` along the last dim, ``H`` the orthonormal Hadamard matrix."""
    if _direct(x, scale) and x.ndim and x.numel() and _vector_ok(scale, x, x.shape[-1]):
        return plan_for(x, "hadamard_patch", _check_x_patch)(x, scale)
    # Checked here too so that a non-tensor argument gets this message, not the dispatcher's. Under
    # torch.compile the op's fake kernel runs the same checks, so the traced wrapper skips them.
    if not torch.compiler.is_compiling():
        _check_scale(x, scale, _check_x(x, "hadamard_patch"), "hadamard_patch")
    return torch.ops.linearpatch.hadamard_patch(x, scale)


# The checks of x that a cached choice stands for (run once per (device, dtype, d, op)).
def _check_x_transform(x): _check_x(x, "hadamard_transform")  # noqa: E704
def _check_x_patch(x): _check_x(x, "hadamard_patch")  # noqa: E704
def _check_x_epilogue(x): _check_x(x, "patch_add_rmsnorm")  # noqa: E704

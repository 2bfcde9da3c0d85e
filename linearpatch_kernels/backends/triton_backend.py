"""Triton backend: one fused kernel per op, each row read once and written once, fp32 in registers.

A program owns ``BLOCK_M`` rows. Row ``r`` is loaded as a ``(K_PAD, N)`` tile (``d = K * N``,
``N = 2**m``, ``K`` padded to a power of two with zeros), so the whole block is a
``(BLOCK_M, K_PAD, N)`` register tensor. ``x . H_d = vec(H_K X H_N)`` is then computed as:

* ``H_N``: ``m`` radix-2 butterfly stages on the last axis. Each stage pairs the lowest index bit
  (``reshape(.., N/2, 2)`` + ``split``), writes ``(a + b, a - b)`` and moves that bit to the top
  (``join`` + ``permute``), so after ``m`` stages every bit was used once and the order is restored.
* ``H_K`` (only when ``K > 1``): one ``tl.dot`` of the ``(BLOCK_M * N, K_PAD)`` view with the
  zero-padded ``H_K`` in full fp32 (``input_precision="ieee"``: tf32 would cost ~1e-3 accuracy).

The patch is ``transform -> * s / d -> transform`` (``H`` is symmetric) without leaving registers.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (that is how the tests run them).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..hadamard import hadamard_factors

NAME = "triton"
# Set when the kernels below were created: the interpreter is chosen at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_PADDED_D = 1 << 15  # K_PAD * N elements per row held in registers

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_available(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    if device.type == "cpu":
        return INTERPRET
    return False


def _padded_k(k: int) -> int:
    # tl.dot needs every dimension >= 16.
    return 1 if k == 1 else max(16, triton.next_power_of_2(k))


def unsupported_reason(x: torch.Tensor) -> str | None:
    if x.dtype not in _IO_DTYPES:
        return f"it takes float32, float16 or bfloat16 (fp32 math inside), not {x.dtype}; use the torch backend for float64"
    f = hadamard_factors(x.shape[-1])
    if _padded_k(f.k) * f.n > MAX_PADDED_D:
        return f"hidden size {f.d} (= {f.k} x {f.n}) needs more than {MAX_PADDED_D} padded elements per row"
    return None


@triton.jit
def _wht_last_axis(x, R: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform along the last axis of a (R, N) tensor."""
    for _ in tl.static_range(LOG2_N):
        a, b = tl.split(tl.reshape(x, (R, N // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (R, N))
    return x


@triton.jit
def _transform_tile(x, h_k, BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                    N: tl.constexpr, LOG2_N: tl.constexpr):
    """``H_K X H_N`` for each row of a (BLOCK_M, K_PAD, N) fp32 tile (padding rows of X are zero)."""
    if LOG2_N > 0:
        x = tl.reshape(_wht_last_axis(tl.reshape(x, (BLOCK_M * K_PAD, N)), BLOCK_M * K_PAD, N, LOG2_N),
                       (BLOCK_M, K_PAD, N))
    if K > 1:
        # X -> H_K X, as rows of X^T times H_K (symmetric): (BLOCK_M * N, K_PAD) @ (K_PAD, K_PAD).
        xt = tl.reshape(tl.permute(x, (0, 2, 1)), (BLOCK_M * N, K_PAD))
        xt = tl.dot(xt, h_k, input_precision="ieee")
        x = tl.permute(tl.reshape(xt, (BLOCK_M, N, K_PAD)), (0, 2, 1))
    return x


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, h_k_ptr, s_ptr, rows, x_row_stride, out_scale,
                     PATCH: tl.constexpr, BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                     N: tl.constexpr, LOG2_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    nn = tl.arange(0, N)
    col = kk[:, None] * N + nn[None, :]                      # (K_PAD, N) index into the row
    col_ok = (kk < K)[:, None] & (nn < N)[None, :]
    mask = (row < rows)[:, None, None] & col_ok[None, :, :]
    x = tl.load(x_ptr + row[:, None, None] * x_row_stride + col[None, :, :], mask=mask, other=0.0)
    x = x.to(tl.float32)

    h_k = tl.zeros((1, 1), dtype=tl.float32)
    if K > 1:
        hk_mask = (kk < K)[:, None] & (kk < K)[None, :]
        h_k = tl.load(h_k_ptr + kk[:, None] * K + kk[None, :], mask=hk_mask, other=0.0)

    x = _transform_tile(x, h_k, BLOCK_M, K, K_PAD, N, LOG2_N)
    if PATCH:
        s = tl.load(s_ptr + col, mask=col_ok, other=0.0)
        x = x * (s * out_scale)[None, :, :]
        x = _transform_tile(x, h_k, BLOCK_M, K, K_PAD, N, LOG2_N)
    else:
        x = x * out_scale
    tl.store(y_ptr + row[:, None, None] * (K * N) + col[None, :, :], x.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_add_rmsnorm_kernel(r_ptr, u_ptr, h_ptr, n_ptr, h_k_ptr, s_ptr, w_ptr, rows, r_row_stride,
                              u_row_stride, inv_d, eps,
                              BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                              N: tl.constexpr, LOG2_N: tl.constexpr):
    """h = (r + u) H diag(s / d) H, n = h * rsqrt(mean(h^2) + eps) * w: two reads, two writes per row."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    nn = tl.arange(0, N)
    col = kk[:, None] * N + nn[None, :]
    col_ok = (kk < K)[:, None] & (nn < N)[None, :]
    mask = (row < rows)[:, None, None] & col_ok[None, :, :]
    x = tl.load(r_ptr + row[:, None, None] * r_row_stride + col[None, :, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(u_ptr + row[:, None, None] * u_row_stride + col[None, :, :], mask=mask, other=0.0).to(tl.float32)

    h_k = tl.zeros((1, 1), dtype=tl.float32)
    if K > 1:
        hk_mask = (kk < K)[:, None] & (kk < K)[None, :]
        h_k = tl.load(h_k_ptr + kk[:, None] * K + kk[None, :], mask=hk_mask, other=0.0)
    s = tl.load(s_ptr + col, mask=col_ok, other=0.0)
    x = _transform_tile(x, h_k, BLOCK_M, K, K_PAD, N, LOG2_N)
    x = x * (s * inv_d)[None, :, :]
    x = _transform_tile(x, h_k, BLOCK_M, K, K_PAD, N, LOG2_N)   # padding rows stay exactly zero
    out = row[:, None, None] * (K * N) + col[None, :, :]
    tl.store(h_ptr + out, x.to(h_ptr.dtype.element_ty), mask=mask)

    mean_sq = tl.sum(tl.sum(x * x, axis=2), axis=1) * inv_d
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(n_ptr + out, (x * rstd[:, None, None] * w[None, :, :]).to(n_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _h_k(d: int, device: torch.device) -> torch.Tensor:
    return hadamard_factors(d).h_k.to(device=device, dtype=torch.float32).contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a (rows, d) matrix with unit stride along d (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_config(rows: int, d: int) -> dict:
    f = hadamard_factors(d)
    k_pad = _padded_k(f.k)
    padded = k_pad * f.n
    # Rows per program: a few thousand fp32 values in registers on a GPU; the interpreter runs each
    # program as numpy calls, so there a larger block means fewer Python-level iterations.
    target = (1 << 16) if INTERPRET else 4096
    block_m = max(1, min(triton.next_power_of_2(max(rows, 1)), target // padded))
    if f.k > 1 and block_m * f.n < 16:  # tl.dot's M dimension must be >= 16
        block_m = triton.next_power_of_2(-(-16 // f.n))
    num_warps = 4 if block_m * padded <= 4096 else 8 if block_m * padded <= 8192 else 16
    return dict(BLOCK_M=block_m, K=f.k, K_PAD=k_pad, N=f.n, LOG2_N=f.log2_n, num_warps=num_warps)


def _launch(x: torch.Tensor, scale: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    d = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    config = _launch_config(rows, d)
    h_k = _h_k(d, x.device)
    s = scale if scale is not None else h_k  # unused when PATCH is False; any valid pointer
    grid = (triton.cdiv(rows, config["BLOCK_M"]),)
    _hadamard_kernel[grid](x2, y, h_k, s, rows, x2.stride(0), out_scale, PATCH=scale is not None, **config)
    return y.view(x.shape)


def hadamard_transform(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _launch(x, None, float(scale))


def hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _launch(x, scale.to(torch.float32), 1.0 / x.shape[-1])


def patch_add_rmsnorm(residual: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = residual.shape[-1]
    r2, u2 = _rows(residual), _rows(update)
    rows = r2.shape[0]
    h = torch.empty((rows, d), dtype=residual.dtype, device=residual.device)
    n = torch.empty_like(h)
    config = _launch_config(rows, d)
    grid = (triton.cdiv(rows, config["BLOCK_M"]),)
    _patch_add_rmsnorm_kernel[grid](
        r2, u2, h, n, _h_k(d, residual.device), scale.to(torch.float32), norm_weight, rows,
        r2.stride(0), u2.stride(0), 1.0 / d, float(eps), **config,
    )
    return h.view(residual.shape), n.view(residual.shape)

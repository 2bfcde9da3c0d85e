"""Reference backend: plain PyTorch on any device, Kronecker-factored, never a dense d x d matmul.

``x . H_d`` with ``H_d = H_K (x) H_N`` and ``N = 2**m`` is computed on ``x`` viewed as ``(rows, K, N)``:
``H_K`` as one small multiply over the K axis, then ``H_N`` split further by Sylvester's identity
``H_{ab} = H_a (x) H_b`` into factors of at most 64, each a batched multiply over its own axis.
That is ``2 (K + sum of factors)`` flops per element instead of ``2 d`` (d = 4096: 256 vs 8192).

Rows are processed in blocks of about ``_BLOCK_ELEMENTS`` elements so that the intermediates stay in
cache; on a CPU the whole-tensor version is several times slower for large inputs.
"""

from __future__ import annotations

import functools

import torch

from ..hadamard import hadamard_factors

NAME = "torch"
_MAX_FACTOR_LOG2 = 6  # Sylvester factors of at most 64 x 64
_BLOCK_ELEMENTS = 1 << 17


def is_available(device: torch.device) -> bool:
    return True


def unsupported_reason(x: torch.Tensor) -> str | None:
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _sylvester(log2_n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    for _ in range(log2_n):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _plan(d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor], int, int]:
    """``(H_K or None, [Sylvester factors of H_N, most significant first], K, N)``."""
    f = hadamard_factors(d)
    h_k = f.h_k.to(dtype=dtype, device=device) if f.k > 1 else None
    count = max(1, -(-f.log2_n // _MAX_FACTOR_LOG2))
    bits = [f.log2_n // count + (1 if i < f.log2_n % count else 0) for i in range(count)]
    factors = [_sylvester(b, dtype, device) for b in bits if b > 0]
    return h_k, factors, f.k, f.n


def _transform_block(x: torch.Tensor, plan) -> torch.Tensor:
    """Unnormalized ``x . H_d`` for a contiguous 2-D block ``x`` of shape ``(rows, d)``."""
    h_k, factors, k, n = plan
    rows = x.shape[0]
    # Callers scale the result in place: never hand back (a view of) the input, even for d == 1.
    y = x if (h_k is not None or factors) else x.clone()
    if h_k is not None:
        # (K, K) @ (rows, K, N): H_K is symmetric, so this is X -> H_K^T X.
        y = torch.matmul(h_k, y.view(rows, k, n))
    y = y.reshape(rows * k, n)
    prefix = rows * k
    for i, h in enumerate(factors):
        size = h.shape[0]
        if i == len(factors) - 1:
            y = torch.matmul(y.reshape(-1, size), h)
        else:
            suffix = n * rows * k // (prefix * size)
            y = torch.matmul(h, y.reshape(prefix, size, suffix))
            prefix *= size
    return y.reshape(rows, k * n)


def _rows_per_block(d: int) -> int:
    return max(1, _BLOCK_ELEMENTS // d)


def _run(x: torch.Tensor, body) -> torch.Tensor:
    d = x.shape[-1]
    cdt = _compute_dtype(x.dtype)
    x2 = x.reshape(-1, d)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    plan = _plan(d, cdt, x.device)
    step = _rows_per_block(d)
    for r0 in range(0, x2.shape[0], step):
        block = x2[r0:r0 + step].to(cdt).contiguous()
        out[r0:r0 + step] = body(block, plan)
    return out.view(x.shape)


def hadamard_transform(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _run(x, lambda block, plan: _transform_block(block, plan).mul_(scale))


def hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    # P = H diag(s) H^T with orthonormal H = H_u / sqrt(d): fold both 1/sqrt(d) into the scale.
    s = scale.to(device=x.device, dtype=_compute_dtype(x.dtype)) / d
    return _run(x, lambda block, plan: _transform_block(_transform_block(block, plan).mul_(s), plan))


def patch_add_rmsnorm(residual: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = residual.shape[-1]
    cdt = _compute_dtype(residual.dtype)
    s = scale.to(device=residual.device, dtype=cdt) / d
    w = norm_weight.to(cdt)
    r2, u2 = residual.reshape(-1, d), update.reshape(-1, d)
    h_out = torch.empty(r2.shape, dtype=residual.dtype, device=residual.device)
    n_out = torch.empty_like(h_out)
    plan = _plan(d, cdt, residual.device)
    step = _rows_per_block(d)
    for r0 in range(0, r2.shape[0], step):
        block = r2[r0:r0 + step].to(cdt) + u2[r0:r0 + step].to(cdt)
        h = _transform_block(_transform_block(block, plan).mul_(s), plan)
        h_out[r0:r0 + step] = h
        n_out[r0:r0 + step] = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w
    return h_out.view(residual.shape), n_out.view(residual.shape)

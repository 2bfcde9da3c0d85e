"""fp64 references written directly from the definitions (dense matrices), for the tests only."""

import torch

from linearpatch_kernels import hadamard_matrix
from linearpatch_kernels.hadamard import hadamard_factors


def reference_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x . H_u * scale`` in fp64 with the dense +-1 matrix."""
    d = x.shape[-1]
    return x.double() @ hadamard_matrix(d, normalized=False, device=x.device) * scale


def reference_patch_matrix(scale: torch.Tensor) -> torch.Tensor:
    """``P = H diag(s) H^T`` in fp64, ``H`` orthonormal."""
    d = scale.shape[0]
    h = hadamard_matrix(d, device=scale.device)
    return h @ torch.diag(scale.double()) @ h.T


def reference_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x . H diag(s) H^T`` in fp64, associated as ``((x H) * s) H^T`` (rows * d^2 work, not d^3)."""
    h = hadamard_matrix(x.shape[-1], device=x.device)
    return ((x.double() @ h) * scale.double()) @ h.T


def llm_like(rows: int, d: int, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Random activations with a few massive outlier channels, like an LLM's residual stream."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    outliers = torch.randperm(d, generator=g)[: max(1, d // 256)]
    x[:, outliers] *= 100.0
    return x.to(dtype=dtype, device=device)


def positive_scales(d: int, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(d, generator=g, dtype=torch.float64)).to(torch.float32).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def factored_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x . H_d * scale`` in fp64 from the Kronecker form, for sizes too big for a dense matrix:
    butterflies over the N axis of the (rows, K, N) view, then H_K over the K axis."""
    d = x.shape[-1]
    f = hadamard_factors(d)
    y = x.double().reshape(-1, f.k, f.n)
    h = 1
    while h < f.n:
        y = y.reshape(y.shape[0], f.k, f.n // (2 * h), 2, h)
        y = torch.stack((y[:, :, :, 0] + y[:, :, :, 1], y[:, :, :, 0] - y[:, :, :, 1]), dim=3)
        h *= 2
    y = torch.einsum("kj,rjn->rkn", f.h_k.to(y.device), y.reshape(-1, f.k, f.n))
    return (y * scale).reshape(x.shape)


def factored_patch_reference(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return factored_reference(factored_reference(x) * s.double()) / d

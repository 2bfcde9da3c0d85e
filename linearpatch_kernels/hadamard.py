"""Hadamard matrices for every hidden size the package supports.

A size ``d`` is supported when ``d = K * 2**m`` with ``K == 1`` (Sylvester) or ``K`` the order of a
Paley construction from a prime ``q``:

* Paley I:  ``K = q + 1``      for ``q = 3 (mod 4)``
* Paley II: ``K = 2 * (q + 1)`` for ``q = 1 (mod 4)``

and then ``H_d = H_K (x) H_{2^m}`` (Kronecker). Every factor is built *symmetric*, so ``H_d`` is
symmetric too: the transform is its own transpose, which keeps the patch ``P = H diag(s) H^T``,
its gradient and every kernel down to a single transform routine. (Sylvester's matrix is symmetric
as it is; Paley II's is symmetric by construction; Paley I's skew-type matrix is made symmetric by
the column permutation ``b -> -b`` of GF(q) and a sign flip of its first column, both of which keep
the rows orthogonal.)

Applying ``H_d`` to a row ``x`` of length ``d``, viewed row-major as a ``K x N`` matrix ``X``:
``x . H_d  ==  vec(H_K^T X H_N) == vec(H_K X H_N)``: a small dense multiply for the ``K`` part and a
fast Walsh-Hadamard transform for the power-of-two part.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "MAX_K",
    "HadamardFactors",
    "hadamard_factors",
    "hadamard_matrix",
    "is_supported_size",
    "supported_sizes_near",
    "unsupported_size_message",
]


@dataclass(frozen=True)
class HadamardFactors:
    """``H_d = H_K (x) H_N`` with ``N = 2**log2_n`` (Sylvester) and ``K`` the non-power-of-two part."""

    d: int
    k: int
    n: int
    log2_n: int
    construction: str  # "sylvester", "paley1(q=..)" or "paley2(q=..)", for error messages and repr
    h_k: torch.Tensor  # (K, K) float64 with +-1 entries, symmetric; [[1.]] when K == 1


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _paley_kind(k: int) -> tuple[str, int] | None:
    """Which Paley construction gives a Hadamard matrix of order ``k`` (k > 2), if any."""
    q = k - 1
    if k % 4 == 0 and _is_prime(q) and q % 4 == 3:
        return "paley1", q
    if k % 4 == 0 and k // 2 - 1 >= 5:
        q = k // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            return "paley2", q
    return None


def _legendre_table(q: int) -> list[list[int]]:
    """``Q[a][b] = chi(a - b)``, chi the quadratic character of GF(q) (chi(0) = 0)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]
    return [[chi[(a - b) % q] for b in range(q)] for a in range(q)]


def _paley1(q: int) -> list[list[int]]:
    # Skew conference matrix C = [[0, 1^T], [-1, Q]]; H = I + C is Hadamard but not symmetric.
    # Permuting the GF(q) columns by b -> -b turns chi(a - b) into chi(a + b), symmetric; flipping
    # the sign of column 0 then makes the border symmetric as well.
    qm = _legendre_table(q)
    k = q + 1
    h = [[0] * k for _ in range(k)]
    for b in range(k):
        h[0][b] = 1
    for a in range(1, k):
        h[a][0] = -1
        for b in range(1, k):
            h[a][b] = qm[a - 1][b - 1] + (1 if a == b else 0)
    perm = [0] + [1 + ((-(b - 1)) % q) for b in range(1, k)]
    h = [[row[perm[b]] for b in range(k)] for row in h]
    for a in range(k):
        h[a][0] = -h[a][0]
    return h


def _paley2(q: int) -> list[list[int]]:
    # Symmetric conference matrix C = [[0, 1^T], [1, Q]] (q = 1 mod 4);
    # H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], symmetric.
    qm = _legendre_table(q)
    c = [[0] * (q + 1) for _ in range(q + 1)]
    for i in range(1, q + 1):
        c[0][i] = c[i][0] = 1
        for j in range(1, q + 1):
            c[i][j] = qm[i - 1][j - 1]
    k = 2 * (q + 1)
    h = [[0] * k for _ in range(k)]
    for i in range(q + 1):
        for j in range(q + 1):
            if i == j:
                block = ((1, -1), (-1, -1))
            else:
                s = c[i][j]
                block = ((s, s), (s, -s))
            for u in range(2):
                for v in range(2):
                    h[2 * i + u][2 * j + v] = block[u][v]
    return h


# The K factor is applied as a dense K x K multiply inside every kernel: keep it small.
MAX_K = 256


def _split(d: int) -> tuple[int, int] | None:
    """Smallest ``K`` (1 or a Paley order) with ``d = K * 2**m``; returns ``(K, 2**m)``."""
    if d < 1:
        return None
    odd, twos = d, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    if odd == 1:
        return 1, d
    for b in range(twos + 1):
        k = odd << b
        if k <= MAX_K and _paley_kind(k) is not None:
            return k, d // k
    return None


@functools.lru_cache(maxsize=1024)
def is_supported_size(d: int) -> bool:
    """Whether ``hadamard_matrix(d)`` exists in this package."""
    return isinstance(d, int) and _split(d) is not None


def supported_sizes_near(d: int, count: int = 2) -> list[int]:
    """The nearest supported sizes below and above ``d`` (``count`` on each side at most)."""
    below = [c for c in range(max(d - 1, 0), 0, -1) if is_supported_size(c)][:count]
    above = []
    c = max(d + 1, 1)
    while len(above) < count:
        if is_supported_size(c):
            above.append(c)
        c += 1
    return sorted(below) + above


def unsupported_size_message(d: int) -> str:
    near = ", ".join(str(c) for c in supported_sizes_near(d)) if d > 0 else "1, 2, 4, ..."
    return (
        f"no Hadamard matrix of size {d} in this package: supported sizes are K * 2**m with K = 1 "
        f"or a Paley order <= {MAX_K} (12, 20, 28, 36, 44, 60, 84, 108, ...); nearest supported: {near}"
    )


@functools.lru_cache(maxsize=None)
def hadamard_factors(d: int) -> HadamardFactors:
    """The Kronecker factors of ``H_d``; raises ``ValueError`` for an unsupported ``d``."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"Hadamard size must be an int, got {type(d).__name__}")
    split = _split(d)
    if split is None:
        raise ValueError(unsupported_size_message(d))
    k, n = split
    if k == 1:
        rows, construction = [[1]], "sylvester"
    else:
        kind, q = _paley_kind(k)  # type: ignore[misc]
        rows = _paley1(q) if kind == "paley1" else _paley2(q)
        construction = f"{kind}(q={q})"
    # Verify once, exactly, in integers (numpy, so that this never runs as traced tensor code):
    # symmetric and H H^T = K I.
    h = np.array(rows, dtype=np.int64)
    if not (h == h.T).all() or not (h @ h.T == k * np.eye(k, dtype=np.int64)).all():
        raise AssertionError(f"internal error: {construction} construction of order {k} is not a symmetric Hadamard matrix")
    return HadamardFactors(d=d, k=k, n=n, log2_n=n.bit_length() - 1, construction=construction,
                           h_k=torch.from_numpy(h.astype(np.float64)))


@functools.lru_cache(maxsize=None)
def kernel_h_k(d: int, device: torch.device) -> torch.Tensor:
    """``H_K`` of ``d`` as the kernels read it: float32, contiguous, on ``device``, made once per size
    and device. A copy from host memory on every call would be a host-to-device copy from pageable
    memory, which waits for the stream: a GPU sync per op, and an error under CUDA graph capture."""
    return hadamard_factors(d).h_k.to(device=device, dtype=torch.float32).contiguous()


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=8)
def _unnormalized_dense(d: int) -> torch.Tensor:
    f = hadamard_factors(d)
    return torch.kron(f.h_k, _sylvester(f.n))


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                    normalized: bool = True) -> torch.Tensor:
    """The ``d x d`` Hadamard matrix used everywhere in this package (symmetric).

    Orthonormal (entries ``+-1/sqrt(d)``) by default; ``normalized=False`` gives the ``+-1`` matrix
    that ``hadamard_transform`` multiplies by. For powers of two it is Sylvester's matrix, equal to
    ``scipy.linalg.hadamard(d)``. Built in fp64 and cached; a ``d x d`` dense matrix is only for
    reference and small sizes (the ops never form it).
    """
    h = _unnormalized_dense(d)
    if normalized:
        h = h / d**0.5
    return h.to(dtype=dtype, device=device)

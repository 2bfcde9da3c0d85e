"""Triton backend: one fused kernel per op, each row read once and written once, fp32 in registers.

A program owns ``BLOCK_M`` rows at a time and walks over row blocks (persistent rows: ``s``, the
norm weight and ``H_K`` are loaded once per program, not once per row; rows too large to keep ``s``
beside them in registers get one block per program instead). The persistent loop is
software-pipelined where shared memory allows (``STAGES``, see ``launch_config``): the next block's
loads are in flight while the current block is computed. Row ``r`` is loaded as a
``(K_PAD, N)`` tile (``d = K * N``, ``N = 2**m``, ``K_PAD`` the power of two >= 16 above ``K``:
``tl.arange`` and ``tl.dot`` need power-of-two shapes; the padding rows are masked loads of zero
and are never stored), so a block is a ``(BLOCK_M, K_PAD, N)`` register tensor.
``x . H_d = vec(H_K X H_N)`` is then computed as:

* ``H_N``: ``m`` radix-2 butterfly stages on the last axis. Each stage pairs the lowest index bit
  (``reshape(.., N/2, 2)`` + ``split``), writes ``(a + b, a - b)`` and moves that bit to the top
  (``join`` + ``permute``), so after ``m`` stages every bit was used once and the order is restored.
* ``H_K`` (only when ``K > 1``): ``tl.dot`` of the ``(BLOCK_M * N, K_PAD)`` view with the
  zero-padded ``H_K`` on tensor cores, in two tf32 products: ``x = hi + lo`` with ``hi`` the
  top 11 significant bits of ``x`` (exact in tf32) and ``lo = x - hi`` (exact in fp32, then rounded
  to tf32: a relative error below 2**-20 of ``x``). ``H_K`` is +-1, exact in tf32, and the sums
  accumulate in fp32, so the result meets the fp32 contract at two thirds of the cost of
  ``input_precision="tf32x3"`` (whose third product, ``hi * lo(H_K)``, is zero here) and without
  the fp32 FMA path of ``"ieee"`` (hundreds of registers, spills).

Rows whose padded tile is too large for the dot (``K_PAD * N`` over ``MAX_TILE_DOT``, e.g. 9216 =
36 x 256 -> 64 x 256), and those where the padding makes the dot the slower choice on the GPU's
architecture (``NETWORK_PREFERRED``: 576 = 36 x 16 on sm_80 and sm_90, 2304 = 36 x 64 on sm_80), take
a second pair of kernels that never pads: the row is a tuple of its ``K``
parts ``X[k, :]``, each a (BLOCK_M, N) tensor. ``H_N`` runs on groups of parts of the power-of-two
sizes in K's binary digits (36 = 32 + 4), each group stacked into one tile by a tree of ``join``s, so
the butterfly is unrolled once per group; ``H_K`` is then fp32 adds and subtractions unrolled from the
sign table of ``H_K`` (a constexpr string), with no multiplications: per group of four parts the 8 sums
``a +- b +- c +- d`` are formed once and every output adds one of them per group, ``K/4 + 2`` adds per
element instead of the ``K - 1`` of a row-by-row sum (11 instead of 35 at K = 36).

The patch is ``transform -> * s / d -> transform`` (``H`` is symmetric) without leaving registers.

What a configuration needs on a GPU (shared memory for the layout conversions and the dot
operands, registers) is known before launching: ``resource_estimate`` gives it and
``unsupported_reason`` refuses inputs whose configuration would not fit the device, so the
automatic choice moves them to another backend instead of failing in the launch.
``scripts/triton_aot.py`` compiles every configuration the launcher chooses for sm_80 and sm_90
and checks that estimate, the absence of spills and the per-architecture limits.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (that is how the tests run them).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..hadamard import hadamard_factors, kernel_h_k
from .gpu_limits import resident_blocks, shared_memory_limit

NAME = "triton"
# Set when the kernels below were created: the interpreter is chosen at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# GPUs the kernels are compiled and checked for (tf32 tensor-core dot, opt-in shared memory).
MIN_CAPABILITY = (8, 0)

# fp32 values of the row tile per program in a prefill launch: 32 per thread at 4 warps. Larger
# tiles only raise the shared memory of the layout conversions (which scale with the tile).
PREFILL_TILE = 4096
PREFILL_TILE_DOT = 2048  # K > 1: the dot's operands and accumulators need registers of their own
INTERPRET_TILE = 1 << 16  # the interpreter runs numpy per program: fewer, larger programs
# Largest padded row a program holds on a GPU: 16384 fp32 = 32 per thread at 16 warps. A 32768-wide
# row spills at 16 and at 32 warps (128 and 64 registers per thread), so such rows go elsewhere.
MAX_TILE = 1 << 14
# With K > 1 each warp also holds the dot's H_K operand (up to 128 registers per thread at K_PAD = 64),
# so a row keeps to 32 values per thread at 8 warps: 16 warps cap a thread at 128 registers (spills).
MAX_TILE_DOT = 1 << 13
MAX_K_PAD = 64  # H_K up to 64 x 64 on tensor cores; larger K go to another backend
# The add network unrolls K/4 * (12 + K) adds per column and transform (grouped by four inputs). Measured
# compile times (2 shared cores, sm_90): the 9216 = 36 x 256 patch kernel 15 s, its epilogue 47 s
# (benchmarks/results/triton-aot); H_84 would unroll 4.7 times H_36's adds, H_252 39 times. Larger K go
# to another backend.
MAX_K_NETWORK = 64
MAX_NETWORK_WARPS = 8
# (K, N) pairs where the add network is used although the padded dot fits, per architecture family
# (compute capability major): K = 36 pads to 64, so the dot does 1.78 times the arithmetic and moves
# 1.78 times the tile through shared memory for its layout conversions. From the prefill model of
# scripts/triton_aot.py (benchmarks/results/triton-aot; bf16, 16,384 rows, time as a multiple of a
# copy, dot -> network): sm_90 576 = 36 x 16: transform 1.76 -> 1.07, patch 3.41 -> 2.33, epilogue
# 3.81 -> 3.00 (at 2304 = 36 x 64 the dot stays ahead: patch 1.99 against 2.77); sm_80 576: 1.41 ->
# 1.00, 2.88 -> 1.61, 3.18 -> 2.08; sm_80 2304: 1.92 -> 1.00, 3.79 -> 1.97, 4.21 -> 2.62. Other
# architectures keep the dot (no model for them). A model, not a GPU measurement.
NETWORK_PREFERRED = {8: frozenset({(36, 16), (36, 64)}), 9: frozenset({(36, 16)})}
MAX_PREFILL_ROWS = 64
PROGRAMS_PER_SM = 4  # programs per multiprocessor in a persistent launch until the compiled kernel's occupancy is known


@dataclass(frozen=True)
class LaunchConfig:
    BLOCK_M: int
    K: int
    K_PAD: int
    N: int
    LOG2_N: int
    num_warps: int
    RESIDENT: bool  # persistent: s (and the norm weight) held in registers across row blocks; else one block per program
    # H_K as a +-1 add network over the K unpadded (BLOCK_M, N) parts of the row (K_PAD == K) instead
    # of the tensor-core dot on the row padded to K_PAD rows.
    NETWORK: bool = False
    # Stages of the row-block loop (``tl.range(num_stages=...)``): at 2 the compiler issues the next
    # row block's loads (cp.async into shared memory) before the current block is computed.
    STAGES: int = 2

    @property
    def tile(self) -> int:
        """fp32 values per program: ``BLOCK_M * K_PAD * N``."""
        return self.BLOCK_M * self.K_PAD * self.N

    def constexprs(self) -> dict:
        if self.NETWORK:
            return dict(BLOCK_M=self.BLOCK_M, K=self.K, N=self.N, LOG2_N=self.LOG2_N, RESIDENT=self.RESIDENT,
                        STAGES=self.STAGES, SIGNS=_sign_table(self.K * self.N))
        return dict(BLOCK_M=self.BLOCK_M, K=self.K, K_PAD=self.K_PAD, N=self.N, LOG2_N=self.LOG2_N,
                    RESIDENT=self.RESIDENT, STAGES=self.STAGES)


@functools.lru_cache(maxsize=None)
def _sign_table(d: int) -> str:
    """``H_K`` row-major as a string of ``+``/``-``: one hashable constexpr from which the add network
    is unrolled at compile time (a tuple of K * K ints would be hashed element by element per launch)."""
    return "".join("+" if v > 0 else "-" for v in hadamard_factors(d).h_k.flatten().tolist())


def is_available(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    if device.type == "cpu":
        return INTERPRET
    return False


def _padded_k(k: int) -> int:
    # tl.dot needs every dimension >= 16. (Plain Python: triton.next_power_of_2 is a jit-wrapped
    # function that costs ~7 us per call on the host, and this runs on every launch.)
    return 1 if k == 1 else max(16, 1 << (k - 1).bit_length())


def _num_warps(tile: int, k_pad: int) -> int:
    # 32 tile values per thread. More warps do not help K_PAD = 32/64: each warp holds its own copy
    # of the dot's H_K operand (measured: spills at 8 and 16 warps for 2304 = 36 x 64). With
    # K_PAD = 16 that operand is small, and 4 warps for 4096 values spilled (3072 = 12 x 256, fp32,
    # sm_80), so those rows spread over twice the threads (at most 8 warps: 255 registers each).
    if k_pad == 16 and tile >= 4096:
        return min(8, tile // 512)
    if tile <= 4096:
        return max(1, min(4, tile // 256))
    return 8 if tile <= 8192 else 16


def launch_config(d: int, rows: int, sm_count: int | None = None, dtype: torch.dtype = torch.float32,
                  op: str = "hadamard_patch", shared_limit: int | None = None,
                  capability: tuple[int, int] | None = None) -> LaunchConfig:
    """The configuration the launcher uses for ``rows`` rows of ``d`` (``dtype``, ``op``) on a GPU with
    ``sm_count`` multiprocessors, ``shared_limit`` bytes of shared memory per block (``None``: no
    limit; ``sm_count=None``: the interpreter) and compute capability ``capability`` (``None``:
    unknown; it only selects ``NETWORK_PREFERRED``).

    Two row-block sizes per ``d``, so that a new batch size never compiles a new kernel: one row
    per block (or the least ``tl.dot`` takes when ``K > 1``) for decode, and the prefill block of
    ``PREFILL_TILE`` values (at most ``MAX_PREFILL_ROWS`` rows) once there are enough rows for one
    such block per multiprocessor.

    Latency: a program holds 4-8 warps and few programs fit on a multiprocessor (1 at d = 5120, 163-255
    registers per thread), so a program that loads a block, computes it and stores it leaves HBM idle
    while it computes. Where ``s`` (and the norm weight) stay in registers across blocks, the
    row-block loop is software-pipelined (``STAGES = 2``): the compiler issues the next block's loads
    as cp.async copies into shared memory before computing the current block, at the price of one
    tile of the input dtype per loaded tensor in shared memory. Where that does not fit
    ``shared_limit``, the unpipelined configuration of the same size is used.
    """
    f = hadamard_factors(d)
    if _uses_network(f, capability):
        return _network_launch_config(f, rows, sm_count)
    k_pad = _padded_k(f.k)
    padded = k_pad * f.n
    min_m = 1 if f.k == 1 else max(1, 16 // f.n)  # tl.dot's M dimension (BLOCK_M * N) must be >= 16
    if sm_count is None:
        block_m = max(min_m, INTERPRET_TILE // padded)
    else:
        big = max(min_m, min(MAX_PREFILL_ROWS, (PREFILL_TILE if f.k == 1 else PREFILL_TILE_DOT) // padded))
        block_m = big if rows >= big * sm_count else min_m
    num_warps = _num_warps(block_m * padded, k_pad)
    # Persistent programs hold s (and the norm weight) beside the tile across row blocks while both
    # fit in 64 values per thread; 32 where the dot's H_K operand is 64 x 64 (K_PAD = 64 holds up to
    # 128 registers per thread of its own: 2304 = 36 x 64 spills on sm_80 at 64).
    # (Under the interpreter registers do not matter: always persistent, so the tests walk blocks.)
    fits = (block_m + 1) * padded <= (32 if k_pad == 64 else 64) * 32 * num_warps
    pipelined = LaunchConfig(block_m, f.k, k_pad, f.n, f.log2_n, num_warps, True, STAGES=2)
    if sm_count is None or (fits and (shared_limit is None or
                                      resource_estimate(pipelined, dtype, op)["shared_bytes"] <= shared_limit)):
        return pipelined
    # Unpipelined: s in registers across blocks only within 32 values per thread with K > 1 (the
    # dot's operands need registers too), else re-read from the cache for every block.
    resident = (block_m + 1) * padded <= (64 if f.k == 1 else 32) * 32 * num_warps
    return LaunchConfig(block_m, f.k, k_pad, f.n, f.log2_n, num_warps, resident, STAGES=1)


def _uses_network(f, capability: tuple[int, int] | None = None) -> bool:
    """H_K as an add network where the padded dot cannot run: K_PAD over the dot's limit, or the
    padded row over what a program holds beside the dot's operand (9216 = 36 x 256 pads to 16384);
    and where it is the faster of the two on ``capability``'s architecture (``NETWORK_PREFERRED``)."""
    k_pad = _padded_k(f.k)
    if not 1 < f.k <= MAX_K_NETWORK:
        return False
    preferred = capability is not None and (f.k, f.n) in NETWORK_PREFERRED.get(capability[0], ())
    return preferred or k_pad > MAX_K_PAD or k_pad * f.n > MAX_TILE_DOT


def _power_of_two_below(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _network_launch_config(f, rows: int, sm_count: int | None) -> LaunchConfig:
    # The row is K parts of (BLOCK_M, N): one warp per 32 values of a part, so that no part is
    # replicated across threads and each thread holds K values of the row per row of the block.
    real = f.k * f.n
    if sm_count is None:
        block_m = _power_of_two_below(max(1, INTERPRET_TILE // real))
    else:
        big = _power_of_two_below(max(1, min(MAX_PREFILL_ROWS, PREFILL_TILE_DOT // real)))
        block_m = big if rows >= big * sm_count else 1
    num_warps = max(1, min(MAX_NETWORK_WARPS, block_m * f.n // 32))
    resident = sm_count is None or (block_m + 1) * real <= 32 * 32 * num_warps
    return LaunchConfig(block_m, f.k, f.k, f.n, f.log2_n, num_warps, resident, NETWORK=True, STAGES=1)


def resource_estimate(config: LaunchConfig, dtype: torch.dtype, op: str = "hadamard_patch") -> dict:
    """Shared memory (bytes) and fp32 tile values per thread that a configuration needs on a GPU.

    Shared memory holds tile-sized fp32 buffers (``4 * BLOCK_M * K_PAD * N`` bytes each), as many as
    Triton keeps live at once: one layout-conversion scratch, plus ``H_K`` (``4 * K_PAD**2``) when
    ``K > 1``. A pipelined loop (``STAGES = 2``) adds, per tensor loaded per block (``x``; the
    epilogue's ``residual`` and ``update``), one tile in the input dtype: the next block's cp.async
    target. Unpipelined with ``K > 1`` in the persistent loop, the dot's operand tile stays live too,
    one more buffer for fp32 input (the loaded tile in its own layout) and two more in the epilogue
    (its two loads and the norm's reduction). The counts are what Triton 3.6-3.8 allocates;
    ``scripts/triton_aot.py`` checks that this bounds the compiler's allocation for every
    configuration the backend accepts.
    """
    tile_bytes = 4 * config.tile
    if config.NETWORK:
        # The add network runs in registers; shared memory holds the butterfly's layout conversion of
        # the largest group of parts, (BLOCK_M, G, N) fp32 with G the largest power of two <= K.
        group = 1 << (config.K.bit_length() - 1)
        return dict(shared_bytes=4 * config.BLOCK_M * group * config.N,
                    values_per_thread=config.tile // (32 * config.num_warps))
    h_k = 4 * config.K_PAD**2 if config.K > 1 else 0
    if config.STAGES > 1:
        loads = 2 if op == "patch_add_rmsnorm" else 1
        shared = tile_bytes + h_k + (config.STAGES - 1) * loads * config.tile * dtype.itemsize
    elif config.K == 1 or not config.RESIDENT:
        shared = tile_bytes + h_k
    else:
        buffers = 2 + (dtype == torch.float32) + 2 * (op == "patch_add_rmsnorm")
        shared = buffers * tile_bytes + h_k
    return dict(shared_bytes=shared, values_per_thread=config.tile // (32 * config.num_warps))


def unsupported_reason_for(dtype: torch.dtype, d: int, capability: tuple[int, int] | None,
                           op: str = "hadamard_patch") -> str | None:
    """Why the ``op`` kernel cannot take rows of ``d`` elements of ``dtype`` on a GPU of compute
    capability ``capability`` (``None``: under the interpreter, no GPU limits). ``None`` when it can."""
    if dtype not in _IO_DTYPES:
        return f"it takes float32, float16 or bfloat16 (fp32 math inside), not {dtype}; use the torch backend for float64"
    f = hadamard_factors(d)
    k_pad = _padded_k(f.k)
    if capability is None:
        return None
    capability = tuple(capability)
    arch = f"sm_{capability[0]}{capability[1]}"
    if capability < MIN_CAPABILITY:
        return f"the Triton kernels need compute capability 8.0 or newer (tf32 tensor cores), not {arch}"
    if k_pad > MAX_K_PAD:
        return (f"hidden size {d} = {f.k} x {f.n}: H_{f.k} is padded to {k_pad} x {k_pad} for the tensor-core "
                f"dot, more than the {MAX_K_PAD} x {MAX_K_PAD} the kernels hold on chip, and as an add network "
                f"of {f.k // 4 * (12 + f.k)} adds per column it is over the "
                f"{MAX_K_NETWORK // 4 * (12 + MAX_K_NETWORK)} that compile in reasonable time")
    if _uses_network(f, capability):
        if f.k * f.n > MAX_TILE:
            return (f"hidden size {d} = {f.k} x {f.n} is {d} values per row, more than the {MAX_TILE} a program "
                    f"holds in registers without spilling")
    elif k_pad * f.n > MAX_TILE:
        return (f"hidden size {d} = {f.k} x {f.n} is padded to {k_pad * f.n} values per row, more than the "
                f"{MAX_TILE} a program holds in registers without spilling")
    elif f.k > 1 and k_pad * f.n > MAX_TILE_DOT:
        return (f"hidden size {d} = {f.k} x {f.n} is padded to {k_pad * f.n} values per row, more than the "
                f"{MAX_TILE_DOT} a program holds beside the H_{f.k} operand of its tensor-core dot without spilling")
    limit = shared_memory_limit(capability)
    for rows in (1, 1 << 30):  # the decode and the prefill configuration
        config = launch_config(d, rows, 1, dtype, op, limit, capability)
        need = resource_estimate(config, dtype, op)["shared_bytes"]
        if need > limit:
            return (f"hidden size {d} = {f.k} x {f.n} needs {need} bytes of shared memory per block, more than "
                    f"the {limit} of {arch}")
    return None


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def unsupported_reason(x: torch.Tensor, op: str = "hadamard_patch") -> str | None:
    capability = device_capability(_index(x.device)) if x.device.type == "cuda" else None
    return unsupported_reason_for(x.dtype, int(x.shape[-1]), capability, op)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current device and its current
    stream, so a tensor on ``cuda:1`` while ``cuda:0`` is current needs the switch (and then runs
    on ``cuda:1``'s current stream). A no-op in the common case where it is already current."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


@triton.jit
def _wht_last_axis(x, R: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform along the last axis of a (R, N) tensor."""
    for _ in tl.static_range(LOG2_N):
        a, b = tl.split(tl.reshape(x, (R, N // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (R, N))
    return x


@triton.jit
def _dot_h_k(xt, h_k):
    """``xt @ h_k`` for fp32 ``xt`` and a +-1 ``h_k``, to fp32 accuracy in two tf32 products."""
    hi = (xt.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    acc = tl.dot(hi, h_k, input_precision="tf32")
    return tl.dot(xt - hi, h_k, acc, input_precision="tf32")


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
        xt = _dot_h_k(xt, h_k)
        x = tl.permute(tl.reshape(xt, (BLOCK_M, N, K_PAD)), (0, 2, 1))
    return x


@triton.jit
def _load_h_k(h_k_ptr, K: tl.constexpr, K_PAD: tl.constexpr):
    kk = tl.arange(0, K_PAD)
    h_k = tl.zeros((1, 1), dtype=tl.float32)
    if K > 1:
        h_k = tl.load(h_k_ptr + kk[:, None] * K + kk[None, :], mask=(kk < K)[:, None] & (kk < K)[None, :], other=0.0)
    return h_k


@triton.jit
def _row_tile(block, rows, K: tl.constexpr, K_PAD: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row indices (int64) of row block ``block``, the (K_PAD, N) column index and the tile's mask."""
    kk = tl.arange(0, K_PAD)
    nn = tl.arange(0, N)
    col = kk[:, None] * N + nn[None, :]
    row = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M  # block * BLOCK_M <= rows + BLOCK_M < 2**31
    mask = (row < rows)[:, None, None] & ((kk < K)[:, None] & (nn < N)[None, :])[None, :, :]
    return row, col, mask


@triton.jit
def _load_row_vector(ptr, K: tl.constexpr, K_PAD: tl.constexpr, N: tl.constexpr):
    """A length-d vector (s, the norm weight) as a (K_PAD, N) fp32 tile, zero in the padding."""
    kk = tl.arange(0, K_PAD)
    nn = tl.arange(0, N)
    mask = (kk < K)[:, None] & (nn < N)[None, :]
    return tl.load(ptr + kk[:, None] * N + nn[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _hadamard_block(block, x_ptr, y_ptr, h_k, s, rows, x_row_stride, out_scale, PATCH: tl.constexpr,
                    BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, N: tl.constexpr,
                    LOG2_N: tl.constexpr):
    row, col, mask = _row_tile(block, rows, K, K_PAD, N, BLOCK_M)
    x = tl.load(x_ptr + row[:, None, None] * x_row_stride + col[None, :, :], mask=mask, other=0.0)
    x = _transform_tile(x.to(tl.float32), h_k, BLOCK_M, K, K_PAD, N, LOG2_N)
    if PATCH:
        x = _transform_tile(x * (s * out_scale)[None, :, :], h_k, BLOCK_M, K, K_PAD, N, LOG2_N)
    else:
        x = x * out_scale
    tl.store(y_ptr + row[:, None, None] * (K * N) + col[None, :, :], x.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows"])
def _hadamard_kernel(x_ptr, y_ptr, h_k_ptr, s_ptr, rows, x_row_stride, out_scale,
                     PATCH: tl.constexpr, BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                     N: tl.constexpr, LOG2_N: tl.constexpr, RESIDENT: tl.constexpr, STAGES: tl.constexpr):
    h_k = _load_h_k(h_k_ptr, K, K_PAD)
    s = tl.zeros((1, 1), dtype=tl.float32)
    if PATCH:
        s = _load_row_vector(s_ptr, K, K_PAD, N)
    if RESIDENT:  # persistent: s and H_K loaded once, the program walks row blocks (pipelined: STAGES)
        for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _hadamard_block(block, x_ptr, y_ptr, h_k, s, rows, x_row_stride, out_scale, PATCH, BLOCK_M, K, K_PAD,
                            N, LOG2_N)
    else:  # rows too large to keep s beside them for a loop: one block per program
        _hadamard_block(tl.program_id(0), x_ptr, y_ptr, h_k, s, rows, x_row_stride, out_scale, PATCH, BLOCK_M, K,
                        K_PAD, N, LOG2_N)


@triton.jit
def _patch_add_rmsnorm_block(block, r_ptr, u_ptr, h_ptr, n_ptr, h_k, s, w, rows, r_row_stride, u_row_stride,
                             inv_d, eps, BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                             N: tl.constexpr, LOG2_N: tl.constexpr):
    row, col, mask = _row_tile(block, rows, K, K_PAD, N, BLOCK_M)
    x = tl.load(r_ptr + row[:, None, None] * r_row_stride + col[None, :, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(u_ptr + row[:, None, None] * u_row_stride + col[None, :, :], mask=mask, other=0.0).to(tl.float32)
    x = _transform_tile(x, h_k, BLOCK_M, K, K_PAD, N, LOG2_N) * (s * inv_d)[None, :, :]
    x = _transform_tile(x, h_k, BLOCK_M, K, K_PAD, N, LOG2_N)   # padding rows stay exactly zero
    out = row[:, None, None] * (K * N) + col[None, :, :]
    tl.store(h_ptr + out, x.to(h_ptr.dtype.element_ty), mask=mask)
    rstd = tl.math.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) * inv_d + eps)
    tl.store(n_ptr + out, (x * rstd[:, None, None] * w[None, :, :]).to(n_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows"])
def _patch_add_rmsnorm_kernel(r_ptr, u_ptr, h_ptr, n_ptr, h_k_ptr, s_ptr, w_ptr, rows, r_row_stride,
                              u_row_stride, inv_d, eps,
                              BLOCK_M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                              N: tl.constexpr, LOG2_N: tl.constexpr, RESIDENT: tl.constexpr,
                              STAGES: tl.constexpr):
    """h = (r + u) H diag(s / d) H, n = h * rsqrt(mean(h^2) + eps) * w: two reads, two writes per row."""
    h_k = _load_h_k(h_k_ptr, K, K_PAD)
    s = _load_row_vector(s_ptr, K, K_PAD, N)
    w = _load_row_vector(w_ptr, K, K_PAD, N)
    if RESIDENT:  # persistent: s, w and H_K loaded once, the program walks row blocks (pipelined: STAGES)
        for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _patch_add_rmsnorm_block(block, r_ptr, u_ptr, h_ptr, n_ptr, h_k, s, w, rows, r_row_stride,
                                     u_row_stride, inv_d, eps, BLOCK_M, K, K_PAD, N, LOG2_N)
    else:  # rows too large to keep s and w beside them for a loop: one block per program
        _patch_add_rmsnorm_block(tl.program_id(0), r_ptr, u_ptr, h_ptr, n_ptr, h_k, s, w, rows, r_row_stride,
                                 u_row_stride, inv_d, eps, BLOCK_M, K, K_PAD, N, LOG2_N)


# ---------------------------------------------------------------------------------------------
# K > 1 without padding: the row as a tuple of K parts X[k, :] of shape (BLOCK_M, N), H_K as +-1 adds.


@triton.jit
def _signed_sums_of_four(a, b, c, d):
    """The 8 sums ``a +- b +- c +- d`` with ``+a``, at index ``4 [b negated] + 2 [c negated] + [d negated]``:
    ``a +- b`` and ``c +- d`` first (4 adds), then their 8 combinations (8 adds)."""
    ab_p = a + b
    ab_m = a - b
    cd_p = c + d
    cd_m = c - d
    return (ab_p + cd_p, ab_p + cd_m, ab_p - cd_m, ab_p - cd_p, ab_m + cd_p, ab_m + cd_m, ab_m - cd_m, ab_m - cd_p)


@triton.jit
def _h_k_network(parts, K: tl.constexpr, SIGNS: tl.constexpr):
    """``(H_K X)[i] = sum_j H_K[i, j] X[j]`` on the K parts, grouped by four inputs (K is a multiple of
    4 for every Hadamard order > 2). Row i restricted to group g, ``H_K[i, 4g:4g+4]``, is one of 16 sign
    patterns, i.e. ``e * (1, +-1, +-1, +-1)`` with ``e = H_K[i, 4g]``: so
    ``(H_K X)[i] = sum_g e_ig * S_g[p_ig]``, with ``S_g`` the 8 sums ``X[4g] +- X[4g+1] +- X[4g+2] +- X[4g+3]``
    (12 adds per group) and ``p_ig`` the pattern index, both read from the sign table at compile time.
    Adds per column: 12 K/4 + K (K/4 - 1), i.e. K/4 + 2 per element instead of K - 1 (36: 11 instead of
    35). Every output is still a sum of the K inputs with +-1 coefficients in fp32, only in another
    order (errors O(K eps |x|) as before). The groups are the outer loop, so that at any time only the K
    running sums, one group's 8 sums and the parts not yet consumed are live."""
    tl.static_assert(K % 4 == 0, "H_K has an order divisible by 4")
    out = ()
    for g in tl.static_range(K // 4):
        sums = _signed_sums_of_four(parts[4 * g], parts[4 * g + 1], parts[4 * g + 2], parts[4 * g + 3])
        acc = ()
        for i in tl.static_range(K):
            # (constexpr temporaries would become tensors in the frontend: the indices are spelled out)
            term = sums[(SIGNS[i * K + 4 * g + 1] != SIGNS[i * K + 4 * g]) * 4
                        + (SIGNS[i * K + 4 * g + 2] != SIGNS[i * K + 4 * g]) * 2
                        + (SIGNS[i * K + 4 * g + 3] != SIGNS[i * K + 4 * g])]
            if g == 0:
                if SIGNS[i * K] == "-":
                    term = -term
                acc = acc + (term,)
            elif SIGNS[i * K + 4 * g] == "+":
                acc = acc + (out[i] + term,)
            else:
                acc = acc + (out[i] - term,)
        out = acc
    return out


@triton.jit
def _wht_part_group(parts, LO: tl.constexpr, LOG2_G: tl.constexpr, BLOCK_M: tl.constexpr, N: tl.constexpr,
                    LOG2_N: tl.constexpr):
    """``H_N`` on the ``2**LOG2_G`` parts ``LO, LO + 1, ...``, stacked into one (BLOCK_M, N, G) tile by a
    tree of joins (flat index ``2 * i + half`` at every level) so that the butterfly is unrolled once
    per group, not once per part; split back by the inverse tree."""
    G: tl.constexpr = 1 << LOG2_G
    level = ()
    for i in tl.static_range(G):
        level = level + (parts[LO + i],)
    for lvl in tl.static_range(LOG2_G):
        joined = ()
        for i in tl.static_range(G >> (lvl + 1)):
            joined = joined + (tl.reshape(tl.join(level[2 * i], level[2 * i + 1]), (BLOCK_M, N, 2 << lvl)),)
        level = joined
    x = level[0]
    if LOG2_G > 0:
        x = tl.reshape(tl.permute(x, (0, 2, 1)), (BLOCK_M * G, N))
        x = tl.permute(tl.reshape(_wht_last_axis(x, BLOCK_M * G, N, LOG2_N), (BLOCK_M, G, N)), (0, 2, 1))
        level = (x,)
        for lvl in tl.static_range(LOG2_G):
            split = ()
            for i in tl.static_range(1 << lvl):
                if (G >> lvl) == 2:
                    a, b = tl.split(level[i])
                else:
                    a, b = tl.split(tl.reshape(level[i], (BLOCK_M, N, G >> (lvl + 1), 2)))
                split = split + (a, b)
            level = split
    else:
        level = (_wht_last_axis(x, BLOCK_M, N, LOG2_N),)
    return level


@triton.jit
def _transform_parts(parts, BLOCK_M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr,
                     SIGNS: tl.constexpr):
    """``H_K X H_N`` on the K parts (rows of X) of every row of the block. ``H_N`` runs on groups of
    parts of power-of-two sizes from the binary digits of K (36 = 32 + 4): no padding rows."""
    if LOG2_N > 0:
        out = ()
        for b in tl.static_range(7, -1, -1):  # K <= MAX_K_NETWORK < 256
            if (K >> b) & 1:
                out = out + _wht_part_group(parts, (K >> (b + 1)) << (b + 1), b, BLOCK_M, N, LOG2_N)
        parts = out
    return _h_k_network(parts, K, SIGNS)


@triton.jit
def _load_parts(ptr, row, row_stride, row_mask, K: tl.constexpr, N: tl.constexpr):
    nn = tl.arange(0, N)
    parts = ()
    for k in tl.static_range(K):
        x = tl.load(ptr + row[:, None] * row_stride + (k * N + nn)[None, :], mask=row_mask[:, None], other=0.0)
        parts = parts + (x.to(tl.float32),)
    return parts


@triton.jit
def _load_vector_parts(ptr, K: tl.constexpr, N: tl.constexpr):
    """A length-d vector (s, the norm weight) as K fp32 (1, N) parts."""
    nn = tl.arange(0, N)
    parts = ()
    for k in tl.static_range(K):
        parts = parts + (tl.load(ptr + k * N + nn).to(tl.float32)[None, :],)
    return parts


@triton.jit
def _store_parts(ptr, parts, row, row_mask, K: tl.constexpr, N: tl.constexpr):
    nn = tl.arange(0, N)
    for k in tl.static_range(K):
        tl.store(ptr + row[:, None] * (K * N) + (k * N + nn)[None, :], parts[k].to(ptr.dtype.element_ty),
                 mask=row_mask[:, None])


@triton.jit
def _scale_parts(parts, s, factor, K: tl.constexpr):
    out = ()
    for k in tl.static_range(K):
        out = out + (parts[k] * (s[k] * factor),)
    return out


@triton.jit
def _hadamard_parts_block(block, x_ptr, y_ptr, s, rows, x_row_stride, out_scale, PATCH: tl.constexpr,
                          BLOCK_M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr,
                          SIGNS: tl.constexpr):
    row = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M
    row_mask = row < rows
    x = _transform_parts(_load_parts(x_ptr, row, x_row_stride, row_mask, K, N), BLOCK_M, K, N, LOG2_N, SIGNS)
    if PATCH:
        x = _transform_parts(_scale_parts(x, s, out_scale, K), BLOCK_M, K, N, LOG2_N, SIGNS)
    else:
        out = ()
        for k in tl.static_range(K):
            out = out + (x[k] * out_scale,)
        x = out
    _store_parts(y_ptr, x, row, row_mask, K, N)


@triton.jit(do_not_specialize=["rows"])
def _hadamard_parts_kernel(x_ptr, y_ptr, s_ptr, rows, x_row_stride, out_scale, PATCH: tl.constexpr,
                           BLOCK_M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr,
                           RESIDENT: tl.constexpr, STAGES: tl.constexpr, SIGNS: tl.constexpr):
    s = ()
    if PATCH:
        s = _load_vector_parts(s_ptr, K, N)
    if RESIDENT:  # persistent: s loaded once, the program walks row blocks
        for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _hadamard_parts_block(block, x_ptr, y_ptr, s, rows, x_row_stride, out_scale, PATCH, BLOCK_M, K, N,
                                  LOG2_N, SIGNS)
    else:
        _hadamard_parts_block(tl.program_id(0), x_ptr, y_ptr, s, rows, x_row_stride, out_scale, PATCH, BLOCK_M, K,
                              N, LOG2_N, SIGNS)


@triton.jit
def _patch_add_rmsnorm_parts_block(block, r_ptr, u_ptr, h_ptr, n_ptr, s, w, rows, r_row_stride, u_row_stride,
                                   inv_d, eps, BLOCK_M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                                   LOG2_N: tl.constexpr, SIGNS: tl.constexpr):
    row = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M
    row_mask = row < rows
    r = _load_parts(r_ptr, row, r_row_stride, row_mask, K, N)
    u = _load_parts(u_ptr, row, u_row_stride, row_mask, K, N)
    x = ()
    for k in tl.static_range(K):
        x = x + (r[k] + u[k],)
    x = _transform_parts(_scale_parts(_transform_parts(x, BLOCK_M, K, N, LOG2_N, SIGNS), s, inv_d, K),
                         BLOCK_M, K, N, LOG2_N, SIGNS)
    _store_parts(h_ptr, x, row, row_mask, K, N)
    sq = tl.sum(x[0] * x[0], axis=1)
    for k in tl.static_range(1, K):
        sq += tl.sum(x[k] * x[k], axis=1)
    rstd = tl.math.rsqrt(sq * inv_d + eps)[:, None]
    out = ()
    for k in tl.static_range(K):
        out = out + (x[k] * rstd * w[k],)
    _store_parts(n_ptr, out, row, row_mask, K, N)


@triton.jit(do_not_specialize=["rows"])
def _patch_add_rmsnorm_parts_kernel(r_ptr, u_ptr, h_ptr, n_ptr, s_ptr, w_ptr, rows, r_row_stride, u_row_stride,
                                    inv_d, eps, BLOCK_M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                                    LOG2_N: tl.constexpr, RESIDENT: tl.constexpr, STAGES: tl.constexpr,
                                    SIGNS: tl.constexpr):
    s = _load_vector_parts(s_ptr, K, N)
    w = _load_vector_parts(w_ptr, K, N)
    if RESIDENT:  # persistent: s and w loaded once, the program walks row blocks
        for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _patch_add_rmsnorm_parts_block(block, r_ptr, u_ptr, h_ptr, n_ptr, s, w, rows, r_row_stride, u_row_stride,
                                           inv_d, eps, BLOCK_M, K, N, LOG2_N, SIGNS)
    else:
        _patch_add_rmsnorm_parts_block(tl.program_id(0), r_ptr, u_ptr, h_ptr, n_ptr, s, w, rows, r_row_stride,
                                       u_row_stride, inv_d, eps, BLOCK_M, K, N, LOG2_N, SIGNS)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a (rows, d) matrix with unit stride along d (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# Programs per multiprocessor of each compiled persistent kernel on each device, from its registers
# and shared memory (known after its first launch): (kernel name, launch constexprs, dtypes, device index).
_programs_per_sm: dict[tuple, int] = {}


def _grid(x: torch.Tensor, rows: int, d: int, op: str,
          dtypes: tuple = ()) -> tuple[tuple[int], LaunchConfig, tuple | None]:
    """Persistent launch: as many programs as the device holds at once, each walking row blocks (the
    compiled kernel's occupancy, ``PROGRAMS_PER_SM`` per multiprocessor until its first launch has
    told it; under the interpreter, 4 programs: few, and the row-block loop is exercised). Returns
    the grid, the configuration and the key under which the occupancy is recorded (``None``: none to
    record; ``dtypes``: those of the kernel's other tensors, part of the key)."""
    if x.device.type != "cuda":
        config = launch_config(d, rows, None, x.dtype, op)
        return (min(-(-rows // config.BLOCK_M), 4),), config, None
    index = _index(x.device)
    sm_count = _sm_count(index)
    capability = device_capability(index)
    config = launch_config(d, rows, sm_count, x.dtype, op, shared_memory_limit(capability), capability)
    blocks = -(-rows // config.BLOCK_M)
    if not config.RESIDENT:
        return (blocks,), config, None
    key = (op, config, x.dtype, *dtypes, index)
    return (min(blocks, sm_count * _programs_per_sm.get(key, PROGRAMS_PER_SM)),), config, key


def _record_occupancy(key: tuple | None, compiled, config: LaunchConfig) -> None:
    """Remember how many programs of this compiled kernel a multiprocessor holds, for the next launches."""
    if key is None or key in _programs_per_sm:
        return
    registers = getattr(compiled, "n_regs", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    if registers is None or shared is None:  # an older Triton, or no compiled kernel returned
        return
    blocks = resident_blocks(device_capability(key[-1]), int(registers), 32 * config.num_warps, int(shared))
    _programs_per_sm[key] = max(1, blocks)


def _launch(x: torch.Tensor, scale: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    d = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    grid, config, key = _grid(x, rows, d, "hadamard_transform" if scale is None else "hadamard_patch")
    h_k = kernel_h_k(d, x.device)
    s = scale if scale is not None else h_k  # unused when PATCH is False; any valid pointer
    with device_guard(x.device):
        if config.NETWORK:
            compiled = _hadamard_parts_kernel[grid](x2, y, s, rows, x2.stride(0), out_scale, PATCH=scale is not None,
                                                    num_warps=config.num_warps, **config.constexprs())
        else:
            compiled = _hadamard_kernel[grid](x2, y, h_k, s, rows, x2.stride(0), out_scale, PATCH=scale is not None,
                                              num_warps=config.num_warps, **config.constexprs())
    _record_occupancy(key, compiled, config)
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
    grid, config, key = _grid(residual, rows, d, "patch_add_rmsnorm", (norm_weight.dtype,))
    with device_guard(residual.device):
        if config.NETWORK:
            compiled = _patch_add_rmsnorm_parts_kernel[grid](
                r2, u2, h, n, scale.to(torch.float32), norm_weight, rows, r2.stride(0), u2.stride(0), 1.0 / d,
                float(eps), num_warps=config.num_warps, **config.constexprs(),
            )
        else:
            compiled = _patch_add_rmsnorm_kernel[grid](
                r2, u2, h, n, kernel_h_k(d, residual.device), scale.to(torch.float32), norm_weight, rows,
                r2.stride(0), u2.stride(0), 1.0 / d, float(eps), num_warps=config.num_warps, **config.constexprs(),
            )
    _record_occupancy(key, compiled, config)
    return h.view(residual.shape), n.view(residual.shape)

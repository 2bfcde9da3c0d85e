"""CUDA backend: the C++/CUDA kernels of ``csrc/``, registered as ``torch.ops.linearpatch_cuda.*``.

The compiled library registers three low-level operators for the CUDA dispatch key only:

* ``linearpatch_cuda::hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor``
* ``linearpatch_cuda::hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor``
* ``linearpatch_cuda::patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, Tensor scale,
  Tensor norm_weight, float eps) -> (Tensor, Tensor)``: the fused interface epilogue, one pass
  (``norm_weight`` float32: converted here, so that the kernel reads one weight layout)

``h_k`` is the symmetric +-1 factor ``H_K`` of ``H_d = H_K (x) H_N`` as a float32 ``(K, K)`` tensor
on the input's device (``[[1.]]`` for powers of two), made once per size and device
(``hadamard.kernel_h_k``). ``scale`` is the patch scale as the kernels read it (``prepare_scale``):
for powers of two ``s / d`` (in row_kernel's register order up to 8192), otherwise ``s``; this module prepares it
once per scale tensor and keeps it until the tensor's version counter changes (``prepared_scale``).
The public ``linearpatch::*`` ops (``ops.py``) validate, handle autograd
and fake tensors, and call this module.

Where the library comes from, first that works:

1. the prebuilt extension ``linearpatch_kernels/_C*.so`` of a wheel built with a CUDA toolkit
   (``torch.ops.load_library``; it uses only the libtorch stable ABI, so it loads under torch >= 2.10);
2. a JIT build of the same sources with ``torch.utils.cpp_extension.load`` (ninja, the CUDA
   toolkit of ``CUDA_HOME`` or of the ``nvcc`` on ``PATH``), once, into ``LINEARPATCH_CUDA_CACHE``
   (default ``~/.cache/linearpatch_kernels``); ``LINEARPATCH_CUDA_JIT=0`` turns this off;
3. otherwise the backend is unavailable (one warning) and CUDA tensors go to triton.

Coverage: ``d = K * 2**m <= 32768`` with ``2**m >= 8`` (a 16-byte vector never straddles two rows
of the ``K x 2**m`` view), fp32/fp16/bf16, GPUs of compute capability 8.0 or newer whose per-block
shared memory holds the launch (``launch_plan`` mirrors the launchers' choice; ``d = 32768`` needs
129 KiB in fp32 and 145 KiB in fp16/bf16: not on sm_86/89/120, whose 99 KiB send it to another backend).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
import warnings
import weakref
from pathlib import Path

import torch

from ..hadamard import hadamard_factors, kernel_h_k
from .cuda_toolkit import find_cuda_home
from .gpu_limits import arch_name, shared_memory_limit

NAME = "cuda"
MAX_D = 32768
MIN_POW2_FACTOR = 8
MIN_CAPABILITY = (8, 0)
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# libtorch stable ABI level of the sources (the same value as in setup.py).
TORCH_TARGET_VERSION = "0x020a000000000000"
JIT_ENV = "LINEARPATCH_CUDA_JIT"
CACHE_ENV = "LINEARPATCH_CUDA_CACHE"
_SOURCE_SUFFIXES = (".cpp", ".cu")

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded_from: str | None = None  # "prebuilt <path>" or "jit <folder>" once loaded
_load_error: str | None = None  # why it cannot be loaded, once that is known
_prebuilt_error: str | None = None  # why the prebuilt library did not load, also when the JIT may still run


# ------------------------------------------------------------------------------------------------
# Coverage


OPS = ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")


# The launchers' choice of kernel and shared memory (csrc/hadamard_kernels.cuh, launch_op and the
# launch_* functions below it), mirrored here so that the automatic choice knows, without a GPU and
# before loading the library, whether a launch fits a device. tests/test_cuda_emulation.py checks it
# against the emulated launchers' own launch records for every op, dtype and size.

_ROW_THREADS = 128  # row_kernel: 128 threads per block (a row's 256 at N = 32768), 64 where that does not fit
_ROW_PARTIALS = 8  # kRowPartials
_FAST_THREADS = 256  # kfast_kernel
# (K, log2 N) of the kfast_kernel instances (kfast_size); other K > 1 sizes run kron_kernel.
_FAST_SIZES = {(12, 7), (12, 8), (12, 9), (12, 10), (20, 7), (20, 8), (28, 5), (28, 7), (28, 8), (36, 4), (36, 6), (36, 7), (36, 9), (60, 4), (84, 6)}
_FAST_EPILOGUE_MAX_K = 36  # kFastEpilogueMaxK
_FAST_SMEM_BUDGET = 101376  # kFastSmemBudget: raw tiles and s in shared memory where the block stays within it
_FAST_TENSOR_CORE_MAX_K = 36  # kFastTensorCoreMaxK
_KRON_WARPS = 8


def _vector_log2(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float32 else 3  # 16-byte vectors: 4 fp32 or 8 fp16/bf16


def _round_up4(n: int) -> int:
    return (n + 3) // 4 * 4


def _row_log2_threads(log_v: int, log_n: int) -> int:
    """RowLayout::kLogT: threads per row (at most 128 values per thread)."""
    return log_n - min(7, max(log_v, (log_n + 1) // 2))


def _row_kernel_floats(op: str, log_v: int, log_n: int, threads: int) -> int:
    # RowLayout: the transpose buffer's padded word of the last column, per row of the block.
    n = 1 << log_n
    log_t = _row_log2_threads(log_v, log_n)
    log_r = log_n - log_t
    s2 = log_v + min(log_t, log_r)  # kS2 (the split layout at N = 32768 keeps one bit of B a thread bit)
    s1, c1 = log_v + 2, (4 if log_v == 3 else 0)

    def word_c1(i: int) -> int:
        return i + c1 * (i >> s1)

    c2 = ((1 << log_v) - word_c1(1 << s2)) & 31
    buffer = (word_c1(n - 1) + c2 * ((n - 1) >> s2) + 4) // 4 * 4
    epilogue = op == "patch_add_rmsnorm"
    # s/d staged up to N = 8192 (row_stages_s), the norm weight up to 4096 (row_stages_weight)
    return ((n if op != "hadamard_transform" and log_n <= 13 else 0) + (n if epilogue and log_n <= 12 else 0)
            + (_ROW_PARTIALS if epilogue else 0) + threads // (1 << log_t) * buffer)


def _fast_kernel_floats(op: str, k: int, log_n: int, log_v: int) -> int:
    """kfast_shared_floats: the fp32 tile (segments padded to 8 mod 32 words where the tensor cores may
    run), (epilogue) one rstd per row, (tensor cores) the raw fp16/bf16 tiles, (where it fits) s."""
    n = 1 << log_n
    columns = 4 if k <= 12 else (2 if k <= 28 else 1)
    rows = 1  # of the tile: enough column items for every thread
    while rows * n // columns < _FAST_THREADS:
        rows *= 2
    epilogue = op == "patch_add_rmsnorm"

    def word(m):
        return m + 4 * (m >> 5)

    raw_words = (rows * k * (n + 8) * 2 + 3) // 4 // 4 * 4 + 4  # FastLayout::kRawWords
    hk_words = ((k + 15) // 16) ** 2 * 128  # HkTiles::kWords
    padded = word(n) + ((8 - word(n)) & 15)
    tc_layout = (log_v == 3 and k <= _FAST_TENSOR_CORE_MAX_K
                 and 4 * (rows * k * padded + raw_words + hk_words) <= _FAST_SMEM_BUDGET)
    tile = rows * k * (padded if tc_layout else word(n))
    rstd = _round_up4(rows) if epilogue else 0
    tc_floats = (2 if epilogue else 1) * raw_words + hk_words
    tensor_cores = (tc_layout and (op == "hadamard_transform" or log_n > 4)
                    and 4 * (tile + rstd + tc_floats) <= _FAST_SMEM_BUDGET)
    before_s = tile + rstd + (tc_floats if tensor_cores else 0)
    stages_s = op != "hadamard_transform" and 4 * (before_s + k * n) <= _FAST_SMEM_BUDGET
    return before_s + (k * n if stages_s else 0)


def _kron_kernel_floats(op: str, d: int, rows: int) -> int:
    per_block = min(max(8192 // d, 1), rows)
    extra = _round_up4(max(per_block, _KRON_WARPS)) + _round_up4(per_block) if op == "patch_add_rmsnorm" else 0
    return per_block * d + extra


def launch_plan(op: str, dtype: torch.dtype, d: int, rows: int, smem_limit: int,
                sms: int | None = None) -> tuple[str, int, int]:
    """(kernel, threads per block, dynamic shared memory in bytes) of the launch the C++ launcher makes
    for ``rows`` rows of ``d`` elements on a device allowing ``smem_limit`` bytes per block and having
    ``sms`` multiprocessors (None: the many-row shape, which needs the most shared memory). Where no
    block shape fits, the last candidate (the launcher then reports the shortfall)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    f = hadamard_factors(d)
    log_v = _vector_log2(dtype)
    if f.k == 1:
        row_threads = 1 << _row_log2_threads(log_v, f.log2_n)  # RowLayout::T
        candidates = ((_ROW_THREADS, _ROW_THREADS // 2) if row_threads <= _ROW_THREADS // 2
                      else (max(_ROW_THREADS, row_threads),))
        for threads in candidates:
            smem = 4 * _row_kernel_floats(op, log_v, f.log2_n, threads)
            if smem <= smem_limit:
                break
        # launch_rows' few-row grid: one row per block (at least a warp) where that needs at most `sms` blocks
        one_row = max(32, row_threads)
        if sms is not None and -(-rows // (one_row // row_threads)) <= sms and one_row < threads:
            threads, smem = one_row, 4 * _row_kernel_floats(op, log_v, f.log2_n, one_row)
        return "row_kernel", threads, smem
    if (f.k, f.log2_n) in _FAST_SIZES and (op != "patch_add_rmsnorm" or f.k <= _FAST_EPILOGUE_MAX_K):
        return "kfast_kernel", _FAST_THREADS, 4 * _fast_kernel_floats(op, f.k, f.log2_n, log_v)
    return "kron_kernel", 256, 4 * _kron_kernel_floats(op, d, max(rows, 1))


def unsupported_reason_for(dtype: torch.dtype, d: int, capability: tuple[int, int] | None = None,
                           op: str = "hadamard_patch", rows: int = 1 << 30) -> str | None:
    """Why the CUDA kernels cannot run ``op`` on ``rows`` rows of ``d`` elements of ``dtype`` on a GPU
    of compute capability ``capability`` (``None``: the sizes and dtypes only). ``None`` if they can."""
    if dtype not in IO_DTYPES:
        return f"it takes float32, float16 or bfloat16 (fp32 math inside), not {dtype}; use the torch backend for float64"
    if d > MAX_D:
        return f"hidden size {d} is larger than the {MAX_D} the CUDA kernels are compiled for"
    f = hadamard_factors(d)
    if f.n < MIN_POW2_FACTOR:
        return (f"hidden size {d} = {f.k} x {f.n}: the CUDA kernels need the power-of-two factor to be at least "
                f"{MIN_POW2_FACTOR} (16-byte vectors along each row of the {f.k} x 2**m view)")
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        return f"the CUDA kernels need compute capability 8.0 or newer, not {arch_name(capability)}"
    limit = shared_memory_limit(capability) if capability is not None else None
    kernel, _, smem = launch_plan(op, dtype, d, rows, limit or 0)
    if limit is not None and smem > limit:
        return (f"hidden size {d} = {f.k} x {f.n}: {op} ({kernel}) needs {smem} bytes of shared memory per block, "
                f"more than the {limit} of {arch_name(capability)}")
    return None


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(x: torch.Tensor, op: str = "hadamard_patch") -> str | None:
    if x.device.type != "cuda":
        return f"it runs on CUDA tensors only, not {x.device.type}"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    rows = 1
    for size in x.shape[:-1]:
        rows *= int(size)
    return unsupported_reason_for(x.dtype, int(x.shape[-1]), device_capability(index), op, rows=max(rows, 1))


# ------------------------------------------------------------------------------------------------
# Finding and loading the library


def prebuilt_library() -> str | None:
    """Path of the compiled extension installed with the package, if any."""
    try:
        spec = importlib.util.find_spec("linearpatch_kernels._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def source_dir() -> Path | None:
    """The kernel sources: ``csrc/`` of a source checkout, else the copy shipped in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "csrc", here.parent / "_csrc"):
        if (candidate / "hadamard_ops.cpp").is_file():
            return candidate
    return None


def _jit_cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "linearpatch_kernels")
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}"
    return Path(base) / tag


def _jit_build() -> str:
    """Compile ``csrc/`` for the visible GPU with torch's JIT loader; returns the build folder."""
    src = source_dir()
    if src is None:
        raise RuntimeError("the kernel sources (csrc/) are not installed with the package")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    # The module reads CUDA_HOME once, at import, possibly before we set it.
    cpp_extension.CUDA_HOME = cuda_home
    build_dir = _jit_cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.warning("linearpatch_kernels: compiling the CUDA kernels for this GPU into %s (once, about a minute)",
                   build_dir)
    defines = ["-DUSE_CUDA", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    cpp_extension.load(
        name="linearpatch_cuda_jit",
        sources=[str(p) for p in sorted(src.iterdir()) if p.suffix in _SOURCE_SUFFIXES],
        extra_cflags=["-O3", *defines],
        extra_cuda_cflags=["-O3", "-lineinfo", *defines],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return str(build_dir)


OPS = ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")


def _missing_ops() -> list[str]:
    """The ``linearpatch_cuda::*`` operators without a CUDA kernel (e.g. a library built before one existed)."""
    return [f"linearpatch_cuda::{op}" for op in OPS
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"linearpatch_cuda::{op}", "CUDA")]


def load_extension(allow_jit: bool = True) -> bool:
    """Load the kernels (prebuilt, else JIT when ``allow_jit``); True when the ops are registered.

    Works without a GPU for the prebuilt library (registration only); the JIT build needs one.
    A failure is remembered and warned about once; later calls return False at once.
    """
    global _loaded_from, _load_error, _prebuilt_error
    if _loaded_from is not None:  # the common case, on every op call: no lock
        return True
    with _lock:
        if _loaded_from is not None:
            return True
        if _load_error is not None:
            return False
        errors = []
        path = prebuilt_library()
        if path is not None:
            try:
                torch.ops.load_library(path)
                _loaded_from = f"prebuilt {path}"
            except OSError as e:  # e.g. a torch older than 2.10, or another CUDA major version
                errors.append(f"the prebuilt extension {path} does not load: {e}")
                _prebuilt_error = errors[-1]
        if _loaded_from is None and allow_jit:
            if os.environ.get(JIT_ENV, "1") == "0":
                errors.append(f"the JIT build is off ({JIT_ENV}=0)")
            else:
                try:
                    _loaded_from = f"jit {_jit_build()}"
                except Exception as e:  # no toolkit, no ninja, a compiler error ...
                    errors.append(f"the JIT build failed: {type(e).__name__}: {e}")
        if _loaded_from is None:
            if not allow_jit:
                return False  # a later call may still build it
            _load_error = "; ".join(errors) or "no compiled extension is installed"
            warnings.warn(f"linearpatch_kernels: the CUDA backend is unavailable ({_load_error}); "
                          f"CUDA tensors use the triton backend", RuntimeWarning, stacklevel=3)
            return False
        missing = _missing_ops()
        if missing:
            _load_error = f"{_loaded_from} loaded but did not register {', '.join(missing)} for CUDA"
            _loaded_from = None
            warnings.warn(f"linearpatch_kernels: {_load_error}", RuntimeWarning, stacklevel=3)
            return False
        return True


def load_error() -> str | None:
    """Why the library is not loaded (None when it is, or before a load was tried)."""
    return _load_error or _prebuilt_error


def loaded_from() -> str | None:
    """``"prebuilt <path>"`` or ``"jit <folder>"`` once the library is loaded, else None."""
    return _loaded_from


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def is_available(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capable(index) and load_extension()


# ------------------------------------------------------------------------------------------------
# The prepared scale: s / d in row_kernel's register order, once per scale tensor
#
# row_kernel (K = 1) multiplies the values a thread holds in layout L1 (csrc/row_kernel.cuh) by s/d:
# float4 plane q of thread t (t < T, the threads of a row) holds s/d at the columns
# l1_thread(t) | l1_reg(4q + c), c = 0..3, and sits at float4 q * T + t. The kernels read that array
# as it is: a block stages it with 16-byte copies (no gather, no rescale). From N = 16384, where each
# thread reads s/d per row through the cache in L1 order, it is s/d in column order. The permutation is made here, once per
# scale tensor, dtype and d (the layout depends on the vector width: 4 fp32 or 8 fp16/bf16 values),
# instead of in every block of every launch. kfast_kernel and kron_kernel (K > 1) read s in column
# order (a plain copy) and apply 1/d at their store: they take s itself.
#
# The cache is kept per scale tensor (a table keyed by the tensor's identity, holding a weak reference:
# the entry goes when the tensor goes, and never into its pickles or deep copies) and holds the
# tensor's version counter (every in-place op bumps it, as autograd needs) and its data pointer, so
# `s.mul_(2)`, an optimizer step or `copy_` are seen on the next call. Writes through `s.data` bypass the version counter, as they bypass autograd's checks:
# after one, call `invalidate_prepared_scale(s)` (or write through `with torch.no_grad(): s.copy_(...)`).
# Inference tensors have no version counter: their prepared scale is made on every call. During CUDA
# graph capture the preparation is always recorded into the graph (never taken from the cache, never
# put in it: its memory belongs to the graph), so each replay prepares from s as it is at that replay
# and an in-place update of s between replays is seen, as with the unprepared s before.

_prepared: dict[int, tuple] = {}  # id(scale) -> (weak reference to it, {(dtype, d): (version, data_ptr, prepared)})


def _row_scale_columns(log_v: int, log_n: int, device: torch.device) -> torch.Tensor:
    """The column of s that each word of the prepared array holds (RowLayout of csrc/row_kernel.cuh:
    word i = float4 plane q = i >> (2 + log T) of thread t = (i >> 2) mod T, its value c = i mod 4,
    i.e. register j = 4 q + c of layout L1)."""
    log_r = min(7, max(log_v, (log_n + 1) // 2))  # kLogR: at most 128 values per thread
    log_t = log_n - log_r                          # kLogT
    split = log_t == log_r + 1                     # kSplit (N = 32768): one bit of B stays a thread bit
    high = log_v + log_t                           # kHigh: the lowest bit of A above B
    log_e = 0 if split else log_r - log_t          # kLogE
    l1b = log_r if split else log_t                # kL1B
    vmask = (1 << log_v) - 1

    def deposit_a(v, first):  # bits of v on A's bits from its `first`-lowest one up
        shifted = v << first
        return (shifted & vmask) | ((shifted >> log_v) << high)

    i = torch.arange(1 << log_n, device=device, dtype=torch.int64)
    q, t, c = i >> (2 + log_t), (i >> 2) & ((1 << log_t) - 1), i & 3
    j = 4 * q + c
    l1_reg = deposit_a(j & ((1 << log_e) - 1), 0) | (((j >> log_e) & ((1 << l1b) - 1)) << log_v)
    l1_thread = (((t & 1) << (log_v + l1b)) | deposit_a(t >> 1, 0)) if split else deposit_a(t, log_e)
    return l1_thread | l1_reg


_columns_cache: dict = {}
_ROW_STAGED_MAX_LOG2_N = 13  # row_stages_s: row_kernel stages s/d in shared memory up to N = 8192


def prepare_scale(scale: torch.Tensor, dtype: torch.dtype, d: int) -> torch.Tensor:
    """What the CUDA kernels read as ``scale`` for rows of ``d`` elements of ``dtype``: for K = 1 a new
    float32 tensor of s/d in row_kernel's register order (above); for K > 1, ``scale`` itself."""
    f = hadamard_factors(d)
    if f.k > 1:
        return scale
    if f.log2_n > _ROW_STAGED_MAX_LOG2_N:
        # From N = 16384 row_kernel reads s/d per row in its L1 order through the cache (whole sectors
        # per warp load): column order, 1/d folded in.
        with torch.no_grad():
            return (scale.detach().to(torch.float32) * (1.0 / d)).contiguous()
    key = (_vector_log2(dtype), f.log2_n, scale.device)
    columns = _columns_cache.get(key)
    if columns is None:
        columns = _row_scale_columns(*key)
        capturing = scale.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:  # made inside a capture it would be the graph's memory, filled only at replay
            _columns_cache[key] = columns
    with torch.no_grad():
        # 1/d is a power of two here: s * (1/d) is exact (the value the kernel's own fold gave).
        return (scale.detach().to(torch.float32)[columns] * (1.0 / d)).contiguous()


def _row_weight_columns(log_v: int, log_n: int, device: torch.device) -> torch.Tensor:
    """The column of the norm weight that each word of the epilogue's prepared weight holds (RowLayout:
    word i = float4 plane q = i >> (2 + log T) of thread t = (i >> 2) mod T, value c = i mod 4, i.e.
    register j = 4 q + c of layout L0: column t << log V | l0_reg(j))."""
    log_r = min(7, max(log_v, (log_n + 1) // 2))
    log_t = log_n - log_r
    high = log_v + log_t
    i = torch.arange(1 << log_n, device=device, dtype=torch.int64)
    q, t, c = i >> (2 + log_t), (i >> 2) & ((1 << log_t) - 1), i & 3
    j = 4 * q + c
    return (t << log_v) | (j & ((1 << log_v) - 1)) | ((j >> log_v) << high)


_ROW_STAGED_WEIGHT_MAX_LOG2_N = 12  # row_stages_weight: the epilogue stages the norm weight up to N = 4096


def prepare_norm_weight(weight: torch.Tensor, dtype: torch.dtype, d: int) -> torch.Tensor:
    """What the fused epilogue reads as ``norm_weight`` for rows of ``d`` elements of ``dtype``: float32,
    in row_kernel's L0 register order where it stages the weight (K = 1, up to d = 4096), otherwise in
    column order (``weight`` itself when it is float32 and contiguous)."""
    f = hadamard_factors(d)
    if f.k > 1 or f.log2_n > _ROW_STAGED_WEIGHT_MAX_LOG2_N:
        if weight.dtype == torch.float32 and weight.is_contiguous():
            return weight
        with torch.no_grad():
            return weight.detach().to(torch.float32).contiguous()
    key = ("weight", _vector_log2(dtype), f.log2_n, weight.device)
    columns = _columns_cache.get(key)
    if columns is None:
        columns = _row_weight_columns(*key[1:])
        if not (weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _columns_cache[key] = columns
    with torch.no_grad():
        return weight.detach().to(torch.float32)[columns].contiguous()


def _capturing(tensor: torch.Tensor) -> bool:
    # tensor.is_cuda, not tensor.device.type: building the device object alone costs 0.3 us per call
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _kept(tensor: torch.Tensor, key: tuple, capturing: bool | None, make, dtype: torch.dtype, d: int) -> torch.Tensor:
    """``make(tensor, dtype, d)``, made once per tensor and ``key`` and reused while the tensor's version counter
    and data pointer stay as they were (the cache goes with the tensor). ``capturing``: whether a CUDA
    graph is being captured, when the caller already asked (``_capturing``; None: ask here).

    During CUDA graph capture it is always made inside the graph and never taken from or put in the
    cache: a replay then prepares from the tensor as it is at that replay (a few microseconds per cut
    and step), so an in-place update of ``s`` between replays is seen, as it was before the cache."""
    # (The hit path is a decode step's host cost, once per prepared tensor: no closure is built per call.)
    if _capturing(tensor) if capturing is None else capturing:
        return make(tensor, dtype, d)
    entry = _prepared.get(id(tensor))
    if entry is not None and entry[0]() is tensor:
        hit = entry[1].get(key)
        if hit is not None and hit[0] == tensor._version and hit[1] == tensor.data_ptr():
            return hit[2]
    prepared = make(tensor, dtype, d)
    if prepared is tensor or tensor.is_inference():
        return prepared  # taken as it is: nothing to keep; inference tensors: no version counter to key on
    if entry is None or entry[0]() is not tensor:
        ident = id(tensor)
        entry = (weakref.ref(tensor, lambda _ref, ident=ident: _prepared.pop(ident, None)), {})
        _prepared[ident] = entry
    entry[1][key] = (tensor._version, tensor.data_ptr(), prepared)
    return prepared


def prepared_scale(scale: torch.Tensor, dtype: torch.dtype, d: int, capturing: bool | None = None) -> torch.Tensor:
    """``prepare_scale``, made once per scale tensor, dtype and ``d`` (kept while the tensor is unchanged)."""
    return _kept(scale, (dtype, d), capturing, prepare_scale, dtype, d)


def prepared_norm_weight(weight: torch.Tensor, dtype: torch.dtype, d: int,
                         capturing: bool | None = None) -> torch.Tensor:
    """``prepare_norm_weight``, made once per weight tensor, dtype and ``d`` (kept while it is unchanged):
    a weight in another dtype is no longer cast to float32 on every call."""
    return _kept(weight, ("norm_weight", dtype, d), capturing, prepare_norm_weight, dtype, d)


# The fused epilogue's two prepared operands, kept together per (scale, norm weight) pair: a decode step's
# hit is one table lookup and four compares instead of two per-tensor lookups (0.3 us per call). The
# entry is valid while both tensors are the ones it was made for, with the same version counters and
# data pointers (as for `_kept`); either tensor going drops it.
_prepared_pairs: dict[tuple, tuple] = {}  # (id(scale), id(weight), dtype, d) -> (refs, versions, pointers, operands)


def prepared_epilogue_operands(scale: torch.Tensor, norm_weight: torch.Tensor, dtype: torch.dtype,
                               d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused epilogue's prepared scale and norm weight (``prepared_scale``, ``prepared_norm_weight``),
    kept per pair, asking once whether a graph is being captured (then both are made inside it)."""
    if _capturing(scale):
        return prepare_scale(scale, dtype, d), prepare_norm_weight(norm_weight, dtype, d)
    key = (id(scale), id(norm_weight), dtype, d)
    e = _prepared_pairs.get(key)
    if (e is not None and e[0]() is scale and e[1]() is norm_weight and e[2] == scale._version
            and e[3] == norm_weight._version and e[4] == scale.data_ptr() and e[5] == norm_weight.data_ptr()):
        return (scale if e[6] is None else e[6]), (norm_weight if e[7] is None else e[7])
    prepared_s = prepared_scale(scale, dtype, d, False)
    prepared_w = prepared_norm_weight(norm_weight, dtype, d, False)
    if not (scale.is_inference() or norm_weight.is_inference()):  # no version counter to key on
        def drop(_ref, key=key):
            _prepared_pairs.pop(key, None)
        # An operand that is the tensor itself (taken as it is) is kept as None: the table holds no
        # strong reference to either tensor, so the weak references can die.
        _prepared_pairs[key] = (weakref.ref(scale, drop), weakref.ref(norm_weight, drop), scale._version,
                                norm_weight._version, scale.data_ptr(), norm_weight.data_ptr(),
                                None if prepared_s is scale else prepared_s,
                                None if prepared_w is norm_weight else prepared_w)
    return prepared_s, prepared_w


def invalidate_prepared_scale(scale: torch.Tensor) -> None:
    """Drop what ``prepared_scale``, ``prepared_norm_weight`` and ``prepared_epilogue_operands`` keep for
    ``scale`` (a scale or a norm weight; after a write the version counter does not see)."""
    entry = _prepared.get(id(scale))
    if entry is not None and entry[0]() is scale:
        del _prepared[id(scale)]
    ident = id(scale)
    for key in [k for k in _prepared_pairs if ident in (k[0], k[1])]:
        _prepared_pairs.pop(key, None)


# ------------------------------------------------------------------------------------------------
# The ops


def runner(op: str, device: torch.device, d: int):
    """``op``'s kernel for rows of ``d`` on ``device`` with ``H_K`` bound there: one C++ op call per
    use (``backends.plan_for``), no per-call lookups; the patch scales go in prepared
    (``prepared_scale``: a cache hit costs an attribute lookup and two integer compares)."""
    h_k = kernel_h_k(d, device)
    if op == "hadamard_transform":
        kernel = torch.ops.linearpatch_cuda.hadamard_transform.default
        return lambda x, scale: kernel(x, h_k, float(scale))
    if op == "hadamard_patch":
        kernel = torch.ops.linearpatch_cuda.hadamard_patch.default
        return lambda x, scale: kernel(x, h_k, prepared_scale(scale, x.dtype, d))
    kernel = torch.ops.linearpatch_cuda.patch_add_rmsnorm.default

    def epilogue(residual, update, scale, norm_weight, eps):
        # The kernel reads the weight as fp32 (in its register order up to 4096): prepared once per weight.
        return kernel(residual, update, h_k, *prepared_epilogue_operands(scale, norm_weight, residual.dtype, d),
                      float(eps))
    return epilogue


def hadamard_transform(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.ops.linearpatch_cuda.hadamard_transform(x, kernel_h_k(int(x.shape[-1]), x.device), float(scale))


def hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    d = int(x.shape[-1])
    return torch.ops.linearpatch_cuda.hadamard_patch(x, kernel_h_k(d, x.device), prepared_scale(scale, x.dtype, d))


def patch_add_rmsnorm(residual: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = int(residual.shape[-1])
    return torch.ops.linearpatch_cuda.patch_add_rmsnorm(
        residual, update, kernel_h_k(d, residual.device),
        *prepared_epilogue_operands(scale, norm_weight, residual.dtype, d), float(eps))

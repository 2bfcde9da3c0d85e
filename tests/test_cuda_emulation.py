"""The real CUDA kernels and launchers of csrc/, compiled by the host C++ compiler against emulated
CUDA built-ins (csrc/emulation/) and run on the CPU: every op x dtype x code path against fp64
references, with the GPU tests' tolerances. Also the emulator's own checks: known-buggy toy kernels
must be caught, and its shuffles and fp16/bf16 conversions must be exact."""

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linearpatch_kernels.hadamard import hadamard_factors, hadamard_matrix
from reference import llm_like, positive_scales, rel_err

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "csrc" / "emulation"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # as the GPU tests
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-5

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="needs a C++17 host compiler (g++, or $CXX) to build the emulated kernels")


def load_emulate():
    spec = importlib.util.spec_from_file_location("linearpatch_emulate", EMULATION / "emulate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


emulate = load_emulate()


@pytest.fixture(scope="session")
def kernels():
    return emulate.EmulatedKernels.build()


@pytest.fixture()
def fresh(kernels):
    """The kernels with the default emulated device (sm_90 limits, 4 SMs, seed 1), restored after."""
    kernels.configure()
    yield kernels
    kernels.configure()


# ------------------------------------------------------------------------------------------------
# fp64 references from hadamard_matrix, Kronecker-factored so that d = 32768 stays small:
# H_d = H_K (x) H_A (x) H_B with N = A * B (Sylvester's matrix of 2^(a+b) is H_A (x) H_B).

def transform_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    d = x.shape[-1]
    f = hadamard_factors(d)
    a = 1 << (f.log2_n // 2)
    b = f.n // a
    h_a, h_b = hadamard_matrix(a, normalized=False), hadamard_matrix(b, normalized=False)
    y = torch.einsum("kj,ia,rjab->rkib", f.h_k, h_a, x.double().reshape(-1, f.k, a, b))
    y = torch.einsum("rkib,bc->rkic", y, h_b)
    return (y * scale).reshape(x.shape)


def patch_reference(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return transform_reference(transform_reference(x) * s.double()) / x.shape[-1]


def epilogue_reference(x, u, s, w, eps):
    h = patch_reference(x.double() + u.double(), s)
    return h, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("d", (8, 96, 576, 1024, 3072))
def test_factored_reference_is_the_dense_matrix(d):
    x = torch.randn(3, d, dtype=torch.float64)
    assert rel_err(transform_reference(x, 0.5), x @ hadamard_matrix(d, normalized=False) * 0.5) < 1e-13
    s = positive_scales(d)
    h = hadamard_matrix(d)
    assert rel_err(patch_reference(x, s), ((x @ h) * s.double()) @ h.T) < 1e-13


# ------------------------------------------------------------------------------------------------
# Sizes: every power of two 8..32768 (K = 1), and K > 1 from the smallest to the largest K the
# kernels cover, with N from 8 to the largest (2048). Rows: several blocks with a partial last one
# where rows are cheap; big d gets few rows (each still a multi-block grid where a block owns a row).

def k_gt_1_sizes():
    sizes = {}
    for d in range(8, 32769, 4):
        try:
            f = hadamard_factors(d)
        except ValueError:
            continue
        if f.k > 1 and f.n >= 8 and f.k <= 256:
            sizes.setdefault(f.k, []).append(d)
    return sizes


K_SIZES = k_gt_1_sizes()
LARGEST_K = max(K_SIZES)
KRON_SIZES = sorted({96, 576, 896, 960, 1536, 2304, 2560, 3072, 3584, 4608, 5120, 5376, 6144, 7168, 12288, 18432,  # model sizes
                     12 * 2048,  # N = 8 .. 2048
                     K_SIZES[LARGEST_K][0], K_SIZES[LARGEST_K][-1]})  # the largest K, smallest and largest d
POW2_SIZES = tuple(1 << m for m in range(3, 16))


def rows_for(d):
    if d <= 1024:
        return (1, 37, 300)
    if d <= 8192:
        return (3, 37)
    return (1, 3)


def case_inputs(rows, d, dtype, seed):
    x = llm_like(rows, d, dtype=dtype, seed=seed)
    u = (0.1 * llm_like(rows, d, dtype=torch.float64, seed=seed + 1)).to(dtype)
    s = positive_scales(d, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    w = (0.5 + torch.rand(d, generator=g, dtype=torch.float64)).to(torch.float32)
    return x, u, s, w


def check_all_ops(kernels, d, dtype, rows_list):
    h_k = hadamard_factors(d).h_k
    tol = TOLERANCE[dtype]
    for rows in rows_list:
        x, u, s, w = case_inputs(rows, d, dtype, seed=d + rows)
        ctx = f"d={d} rows={rows} {dtype}"
        y = kernels.hadamard_transform(x, h_k, 0.5)
        assert y.dtype == dtype and y.shape == x.shape
        assert rel_err(y, transform_reference(x, 0.5)) <= tol, f"hadamard_transform {ctx}"
        assert rel_err(kernels.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= tol, f"hadamard_patch {ctx}"
        h, n = kernels.patch_add_rmsnorm(x, u, h_k, s, w, EPS)
        h_ref, n_ref = epilogue_reference(x, u, s, w, EPS)
        assert rel_err(h, h_ref) <= tol and rel_err(n, n_ref) <= tol, f"patch_add_rmsnorm {ctx}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", POW2_SIZES)
def test_powers_of_two(fresh, d, dtype):
    check_all_ops(fresh, d, dtype, rows_for(d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", KRON_SIZES)
def test_kronecker_sizes(fresh, d, dtype):
    check_all_ops(fresh, d, dtype, rows_for(d))


@pytest.mark.parametrize("d", (576, 4096, 5120, 16384, 32768))
def test_results_do_not_depend_on_the_schedule(fresh, d):
    """Another random thread and block order, another SM count: bit-identical outputs (a race or an
    order-dependent reduction would change bits)."""
    dtype = torch.bfloat16
    h_k = hadamard_factors(d).h_k
    x, u, s, w = case_inputs(37 if d <= 8192 else 3, d, dtype, seed=7)
    runs = []
    for seed, sms in ((1, 4), (12345, 1), (987, 7)):
        fresh.configure(seed=seed, sm_count=sms)
        runs.append((fresh.hadamard_patch(x, h_k, s), *fresh.patch_add_rmsnorm(x, u, h_k, s, w, EPS)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", (2048, 4096))
def test_next_row_prefetch_across_many_row_groups(fresh, d, dtype):
    """One SM: each block of row_kernel walks many row groups, so the prefetched next row (patch at
    2048/4096, epilogue at 4096) is used across iterations, and the last group is partial."""
    fresh.configure(seed=3, sm_count=1)
    check_all_ops(fresh, d, dtype, (41,))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", (16384, 32768))
def test_row_kernel_one_row_per_block_walks_rows(fresh, d, dtype):
    """d = 16384 and 32768 run row_kernel with a whole block (4 or 8 warps) per row and s read
    through the L1 cache, not staged; 32768 adds the lane-shuffle stage of the split bit and (fp16/
    bf16) the next row's prefetch. On one SM each block walks several rows of the persistent loop."""
    fresh.configure(seed=5, sm_count=1)
    (launch,) = fresh.launches_of("hadamard_patch", str(dtype).removeprefix("torch."), d, 5, 1)
    threads = 128 if d == 16384 else 256
    assert "row_kernel" in launch["symbol"] and launch["block"] == (threads, 1, 1) and launch["grid"][0] < 5, launch
    check_all_ops(fresh, d, dtype, (5,))


@pytest.mark.parametrize("d", (4096, 5120, 16384, 32768))
def test_sm80_shared_memory_limit(fresh, d):
    """With sm_80's opt-in limit (166,912 B per block) the launchers still fit and stay correct."""
    fresh.configure(arch=emulate.SM80)
    x, u, s, w = case_inputs(3, d, torch.bfloat16, seed=3)
    h_k = hadamard_factors(d).h_k
    assert rel_err(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= 1e-2
    h, _ = fresh.patch_add_rmsnorm(x, u, h_k, s, w, EPS)
    assert rel_err(h, epilogue_reference(x, u, s, w, EPS)[0]) <= 1e-2


@pytest.mark.parametrize("op", ("hadamard_patch", "patch_add_rmsnorm"))
def test_one_kernel_instance_for_growing_sizes(fresh, op):
    """Sizes that share a kernel instance (same N, growing K) in one process: a launcher that caches
    its setup (shared-memory opt-in) from the first, smaller size must still launch the larger one."""
    for d in (1536, 3584, 32256):  # K = 12, 28, 252 with N = 128
        x, u, s, w = case_inputs(2, d, torch.float32, seed=d)
        h_k = hadamard_factors(d).h_k
        if op == "hadamard_patch":
            assert rel_err(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= 1e-5, d
        else:
            h, n = fresh.patch_add_rmsnorm(x, u, h_k, s, w, EPS)
            h_ref, n_ref = epilogue_reference(x, u, s, w, EPS)
            assert rel_err(h, h_ref) <= 1e-5 and rel_err(n, n_ref) <= 1e-5, d


SM86 = dict(smem_optin=101_376, cc=(8, 6))


@pytest.mark.parametrize("arch", (emulate.SM90, emulate.SM80, SM86), ids=("sm90", "sm80", "sm86"))
def test_backend_launch_plan_is_the_launchers(fresh, arch):
    """cuda_backend.launch_plan (what the automatic choice checks against the device's shared memory)
    is the choice the C++ launchers make: kernel, block size and shared memory of every op, dtype and
    size, and a refusal exactly where it says the launch does not fit."""
    from linearpatch_kernels.backends import cuda_backend

    fresh.configure(arch=arch)
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    for d in sorted(set(POW2_SIZES) | set(KRON_SIZES) | {1536, 2016, 3584, 32256}):
        k = hadamard_factors(d).k
        for op in cuda_backend.OPS:
            for dtype in DTYPES:
                for rows in (1, 3, 4, 5, 16384):  # the emulated device has 4 SMs: 1-4 rows take the few-row grid
                    kernel, threads, smem = cuda_backend.launch_plan(op, dtype, d, rows, arch["smem_optin"], sms=4)
                    where = (op, dtype, d, rows)
                    if smem > arch["smem_optin"]:
                        with pytest.raises(emulate.EmulationError, match="shared memory"):
                            fresh.launches_of(op, names[dtype], d, rows, k)
                        continue
                    (launch,) = fresh.launches_of(op, names[dtype], d, rows, k)
                    assert f"{len(kernel)}{kernel}" in launch["symbol"], (where, launch)
                    assert launch["block"] == (threads, 1, 1) and launch["smem"] == smem, (where, launch)


# ------------------------------------------------------------------------------------------------
# Decode: few rows. The emulated device has 4 SMs, so 1-3 rows take row_kernel's few-row grid (one row
# per block of T threads), 64 rows the persistent one; 576 and 5120 run kfast_kernel (one tile).

DECODE_ROWS = (1, 2, 3, 64)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", (576, 4096, 5120, 8192))
def test_decode_rows_every_op(fresh, d, dtype):
    check_all_ops(fresh, d, dtype, DECODE_ROWS)


@pytest.mark.parametrize("d", (256, 4096, 8192))
def test_few_rows_take_one_row_per_block(fresh, d):
    """row_kernel's grid for few rows: as many blocks as rows, each one row's threads (at least a warp),
    where that needs no more blocks than the device has SMs; the persistent grid of full blocks beyond."""
    log_n = d.bit_length() - 1
    for dtype, log_v in (("bfloat16", 3), ("float32", 2)):
        row_threads = 1 << (log_n - min(7, max(log_v, (log_n + 1) // 2)))  # RowLayout::T
        one_row = max(32, row_threads)
        for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
            for rows in (1, 2, 3, 4):
                (launch,) = fresh.launches_of(op, dtype, d, rows, 1)
                per_block = one_row // row_threads
                assert launch["block"] == (one_row, 1, 1), (op, dtype, rows, launch)
                assert launch["grid"][0] == -(-rows // per_block), (op, dtype, rows, launch)
            (launch,) = fresh.launches_of(op, dtype, d, 64, 1)
            assert launch["block"] == (128, 1, 1), (op, dtype, launch)


@pytest.mark.parametrize("rows", (1, 64))
def test_programmatic_dependent_launch_on_sm90(fresh, rows):
    """On sm_90 row_kernel launches with programmatic stream serialization (cudaLaunchKernelEx) and every
    thread passes the grid-dependency wait once (a no-op here, where launches run one after another:
    counted); on sm_80 it launches plainly. The results are the same."""
    d = 4096
    h_k = hadamard_factors(d).h_k
    x, u, s, w = case_inputs(rows, d, torch.bfloat16, seed=21)
    for arch, programmatic in ((emulate.SM90, True), (emulate.SM80, False)):
        fresh.configure(arch=arch)
        fresh.clear_launch_records()
        y = fresh.hadamard_patch(x, h_k, s)
        h, n = fresh.patch_add_rmsnorm(x, u, h_k, s, w, EPS)
        for record in fresh.launch_records():
            assert "row_kernel" in record["symbol"] and record["programmatic"] == programmatic, record
            assert record["dependency_waits"] == record["grid"][0] * record["block"][0], record
        assert rel_err(y, patch_reference(x, s)) <= 1e-2
        h_ref, n_ref = epilogue_reference(x, u, s, w, EPS)
        assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


def test_prepared_scale_follows_in_place_updates(fresh):
    """The prepared s/d is cached on the scale tensor; an in-place update (version counter) is seen on
    the next call, by the patch and by the epilogue."""
    from linearpatch_kernels.backends import cuda_backend

    d, dtype = 4096, torch.bfloat16
    h_k = hadamard_factors(d).h_k
    x, u, s, w = case_inputs(2, d, dtype, seed=11)
    assert rel_err(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= 1e-2
    first = cuda_backend.prepared_scale(s, dtype, d)
    assert cuda_backend.prepared_scale(s, dtype, d) is first  # cached: no new preparation
    s[::3] *= 4.0  # in place: the version counter moves
    assert cuda_backend.prepared_scale(s, dtype, d) is not first
    assert rel_err(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= 1e-2
    with torch.no_grad():
        s.copy_(positive_scales(d, seed=99))
    h, n = fresh.patch_add_rmsnorm(x, u, h_k, s, w, EPS)
    h_ref, n_ref = epilogue_reference(x, u, s, w, EPS)
    assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2
    # A write through .data bypasses the version counter; invalidate_prepared_scale drops the copy.
    s.data.mul_(0.5)
    cuda_backend.invalidate_prepared_scale(s)
    assert rel_err(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= 1e-2


def test_prepared_scale_per_dtype_and_size(fresh):
    """One scale tensor used with fp32 rows (4 values per 16-byte vector) and bf16 rows (8): two layouts,
    two cached copies, both right; resized in place to another d, the new size is prepared afresh."""
    d = 4096
    h_k = hadamard_factors(d).h_k
    s = positive_scales(d, seed=5)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        x = llm_like(3, d, dtype=dtype, seed=6)
        assert rel_err(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s)) <= TOLERANCE[dtype], dtype
    d2 = 8192
    s.resize_(d2)
    s.copy_(positive_scales(d2, seed=8))
    x = llm_like(2, d2, dtype=torch.bfloat16, seed=9)
    assert rel_err(fresh.hadamard_patch(x, hadamard_factors(d2).h_k, s), patch_reference(x, s)) <= 1e-2


def test_nan_and_inf_propagate(fresh):
    d = 4096
    x = llm_like(3, d, dtype=torch.float32)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    y = fresh.hadamard_patch(x, hadamard_factors(d).h_k, positive_scales(d))
    assert bool(y[0].isnan().all()) and not bool(y[1].isfinite().any()) and bool(y[2].isfinite().all())


# ------------------------------------------------------------------------------------------------
# The accuracy contract (csrc/README.md, "Accuracy"): against fp64, a bf16/fp16 output is no worse than
# computing in fp32 and rounding once, to a stated bound:
#     rel_err(kernel) <= CONTRACT_FACTOR * rel_err(round(fp64 result)) + CONTRACT_FLOOR
# (relative Frobenius error of each row; rounding the exact result once is what a perfect fp32
# computation followed by the output cast gives, to within the fp32 error); fp32 outputs: rel_err <=
# FP32_CONTRACT (design notes, section 5). For inputs whose values and sums of squares stay within the
# fp32 range and scales s within a factor 256 of each other (P = H diag(s) H / d then has condition
# number <= 256, which bounds how much a rounding error can grow relative to the result). Checked on
# inputs built to break weaker arithmetic: a large dynamic range (|x| from 2**-40 to 2**40 in one row;
# fp16: 2**-14 to 2**2), cancellation (a constant row: all its energy lands in one output of H and
# the others are exact zeros; a row of H; a near-constant row), massive outliers, and scales spanning
# 2**-4 .. 2**4.

CONTRACT_FACTOR = 1.25
CONTRACT_FLOOR = 2.0**-20
FP32_CONTRACT = 1e-5


def adversarial_rows(d: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(d)
    lo, hi = (-14, 2) if dtype == torch.float16 else (-40, 40)
    rows = []
    sign = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double()
    rows.append(sign * torch.exp2(torch.randint(lo, hi + 1, (d,), generator=g).double()))  # dynamic range
    rows.append(torch.full((d,), 3.0, dtype=torch.float64))                                # constant: cancellation
    f = hadamard_factors(d)
    r = d // 3
    n = torch.arange(f.n)
    sylvester = 1.0 - 2.0 * (torch.tensor([bin(int(v)).count("1") for v in (n & (r % f.n))]) % 2).double()
    rows.append(7.0 * torch.kron(f.h_k[r // f.n].double(), sylvester))                     # a row of H
    rows.append(1.0 + 2.0**-7 * torch.randn(d, generator=g).double())                      # near-constant
    out = torch.randn(d, generator=g).double()
    out[torch.randperm(d, generator=g)[:4]] = 3e4                                           # outliers
    rows.append(out)
    x = torch.stack(rows)
    if dtype == torch.float16:  # |P x| <= 16 ||x||: keep every output below 2**14
        x = x * torch.clamp(2.0**10 / x.norm(dim=1, keepdim=True), max=1.0)
    return x.to(dtype)


def wide_scales(d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(d + seed)
    return torch.exp2(8 * torch.rand(d, generator=g, dtype=torch.float64) - 4).to(torch.float32)


def assert_contract(y, ref, dtype, what):
    for i in range(ref.shape[0]):
        if float(ref[i].norm()) == 0.0:
            assert bool((y[i] == 0).all()), (what, i)
            continue
        err = rel_err(y[i:i + 1], ref[i:i + 1])
        if dtype == torch.float32:
            assert err <= FP32_CONTRACT, (what, i, err)
        else:
            floor = rel_err(ref[i:i + 1].to(dtype), ref[i:i + 1])
            assert err <= CONTRACT_FACTOR * floor + CONTRACT_FLOOR, (what, i, err, floor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (32, 256, 576, 2048, 2304, 4096, 5120, 8192, 16384))
def test_accuracy_contract_on_adversarial_inputs(fresh, d, dtype):
    """Every op against the contract; fp16/bf16 run four butterfly stages on the tensor cores in
    row_kernel from d = 32 (4 threads, 8 rows per warp: the smallest case; not the patch at 16384) and
    the first H_K in kfast_kernel (the transform at 576, every op at 2304 and 5120). The emulated
    tensor cores truncate as the hardware does (never more accurate than it)."""
    x = adversarial_rows(d, dtype)
    s = wide_scales(d)
    h_k = hadamard_factors(d).h_k
    assert_contract(fresh.hadamard_transform(x, h_k, d ** -0.5), transform_reference(x, d ** -0.5), dtype,
                    f"transform d={d}")
    assert_contract(fresh.hadamard_patch(x, h_k, s), patch_reference(x, s), dtype, f"patch d={d}")
    u = torch.flip(x, (0,))
    w = wide_scales(d, seed=7)
    h, n = fresh.patch_add_rmsnorm(x, u, h_k, s, w, EPS)
    h_ref, n_ref = epilogue_reference(x, u, s, w, EPS)
    assert_contract(h, h_ref, dtype, f"epilogue h d={d}")
    assert_contract(n, n_ref, dtype, f"epilogue normed d={d}")


# ------------------------------------------------------------------------------------------------
# The emulator itself.

@pytest.fixture(scope="session")
def selftest():
    lib = ctypes.CDLL(str(emulate.build_selftest_library()))
    lib.selftest_run.restype = ctypes.c_char_p
    lib.selftest_run.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.emu_configure.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def run(which, n, inp=None, out_size=None, seed=1):
        lib.emu_configure(seed, 4, 232448, 9, 0)
        inp = torch.arange(4 * n, dtype=torch.float32) if inp is None else inp
        out = torch.zeros(out_size or 4 * n, dtype=torch.float32)
        err = lib.selftest_run(which.encode(), inp.data_ptr(), out.data_ptr(), n)
        return (err.decode() if err else None), out

    return run


def test_selftest_correct_kernel_passes(selftest):
    err, out = selftest("reverse", 64)
    assert err is None and torch.equal(out[:64], torch.arange(63, -1, -1, dtype=torch.float32))


def test_a_missing_barrier_is_caught(selftest):
    """Without the barrier, some threads read shared memory before it is written: the NaN fill
    shows, in every schedule tried."""
    for seed in range(1, 6):
        err, out = selftest("reverse_racy", 64, seed=seed)
        assert err is None and bool(out[:64].isnan().any()), seed


@pytest.mark.parametrize("which, message", [
    ("divergent_barrier", "divergent __syncthreads"),
    ("split_barrier", "divergent __syncthreads"),
    ("divergent_shuffle", "deadlock"),
    ("split_shuffle", "divergent warp collective"),
    ("shared_overflow", "outside the 256 bytes of dynamic shared memory"),
    ("too_much_shared", "cudaErrorInvalidValue"),
])
def test_divergence_and_overflow_stop_the_launch(selftest, which, message):
    err, _ = selftest(which, 64)
    assert err is not None and message in err, err
    assert selftest("reverse", 64)[0] is None  # the emulator recovers for the next launch


def test_shuffles_and_votes_are_exact(selftest):
    n = 64
    err, out = selftest("shuffle", n, out_size=8 * n)
    assert err is None
    out = out.reshape(n, 8)
    for t in range(n):
        lane, base = t % 32, t - t % 32
        seg = lane - lane % 8
        expected = [base + (lane ^ 5), base + (lane * 7) % 32, t - 3 if lane >= 3 else t,
                    t + 3 if lane + 3 < 32 else t, base + (lane ^ 2), t + 3 if (lane + 3) < seg + 8 else t, 1.0, 1.0]
        assert out[t].tolist() == [float(e) for e in expected], t


def test_half_warp_masks_run_side_by_side(selftest):
    err, out = selftest("half_warp", 64)
    assert err is None and out[:64].tolist() == [float(t ^ 1) for t in range(64)]


def test_async_copies_land_at_the_wait(selftest):
    err, out = selftest("async_copy", 64)
    assert err is None and torch.equal(out[:256], torch.arange(256, dtype=torch.float32))
    err, out = selftest("async_copy_early", 64)
    assert err is None and bool(out[:256].isnan().all())  # read before the wait: the NaN fill


def test_async_copies_zero_fill(selftest):
    """cp.async with src-size < cp-size (__pipeline_memcpy_async's zero fill): the tail of the 16 bytes
    is zeros and the source is not read there (a null source for a copy that is all zero fill)."""
    inp = torch.arange(256, dtype=torch.float32) + 1
    err, out = selftest("async_zfill", 64, inp=inp)
    assert err is None
    out = out[:256].reshape(64, 4)
    for t in range(64):
        keep = 4 - t % 5
        assert out[t, :keep].tolist() == inp.reshape(64, 4)[t, :keep].tolist() and out[t, keep:].eq(0).all(), t


@pytest.mark.parametrize("kind", ("bf16", "f16"))
def test_mma_m16n8k16_against_its_definition(selftest, kind):
    """mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: fragments built in the kernel from the PTX ISA's
    layout formulas, D = A B + C against fp64, to the tensor cores' accumulation as the emulator models
    it (products exact, each of the 17 terms truncated to 24 bits below the largest one's leading bit,
    the sum truncated to fp32): exactly that model, and within 18 units of 2**(e_max - 23) of the
    exact sum, e_max the largest term's exponent."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    g = torch.Generator().manual_seed(11)
    a = torch.randn(16, 16, generator=g).to(dtype).float()
    b = torch.randn(16, 8, generator=g).to(dtype).float()
    c = torch.randn(16, 8, generator=g)
    # +-1 patterns and a large dynamic range, as the Hadamard stages use them
    b[:, 0] = torch.tensor([1.0, -1.0] * 8)
    a[0] = torch.tensor([2.0**k for k in range(-8, 8)]).to(dtype).float()
    err, out = selftest(f"mma_{kind}", 32, inp=torch.cat([a.reshape(-1), b.reshape(-1), c.reshape(-1)]), out_size=128)
    assert err is None
    ref = a.double() @ b.double() + c.double()
    got = out.reshape(16, 8).double()
    terms = torch.cat([a.double()[:, :, None] * b.double()[None, :, :], c.double()[:, None, :]], dim=1)
    largest = terms.abs().amax(dim=1)
    grid = torch.exp2(torch.floor(torch.log2(largest)) - 23)
    assert bool(((got - ref).abs() <= 18 * grid).all()), ((got - ref).abs() / grid).max()
    # The model, not just a bound: the hardware's sum of the truncated terms, rounded toward zero.
    truncated = (torch.trunc(terms / grid[:, None, :]) * grid[:, None, :]).sum(dim=1)
    toward_zero = truncated.float().double()
    toward_zero = torch.where(toward_zero.abs() > truncated.abs(),
                              torch.nextafter(toward_zero.float(), torch.zeros(())).double(), toward_zero)
    assert torch.equal(got, toward_zero)


def test_mma_reached_on_two_lines_stops_the_launch(selftest):
    err, _ = selftest("mma_divergent", 32, inp=torch.zeros(512), out_size=128)
    assert err is not None and "divergent warp collective" in err and "mma.sync" in err, err


@pytest.mark.parametrize("trans", (False, True), ids=("ldmatrix", "ldmatrix.trans"))
def test_ldmatrix_against_its_definition(selftest, trans):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l receives, of matrix j, the 16-bit
    elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1), or with .trans (2 (l % 4), l / 4) and
    (2 (l % 4) + 1, l / 4), low then high half."""
    inp = torch.arange(256, dtype=torch.float32)  # exact in bf16
    err, out = selftest("ldmatrix_trans" if trans else "ldmatrix", 32, inp=inp, out_size=128)
    assert err is None
    words = out.view(torch.int32).reshape(32, 4)
    bits = inp.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    m = bits.reshape(4, 8, 8)
    for lane in range(32):
        for j in range(4):
            r, q = lane // 4, lane % 4
            lo, hi = (m[j, 2 * q, r], m[j, 2 * q + 1, r]) if trans else (m[j, r, 2 * q], m[j, r, 2 * q + 1])
            assert int(words[lane, j]) & 0xFFFFFFFF == int(lo) | int(hi) << 16, (lane, j)


def test_grid_sized_from_the_sm_count_loops(selftest):
    err, out = selftest("grid_stride", 1000, inp=torch.arange(1000, dtype=torch.float32), out_size=1000)
    assert err is None and torch.equal(out, 2 * torch.arange(1000, dtype=torch.float32))


def test_a_fault_names_the_emulated_thread(selftest):
    """A wild pointer kills the process (as it kills the context on a GPU), after a line that says
    which thread of which block it was."""
    code = ("import ctypes, sys; sys.path.insert(0, sys.argv[1]); import emulate; "
            "lib = ctypes.CDLL(str(emulate.build_selftest_library())); "
            "lib.selftest_run.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]; "
            "import torch; out = torch.zeros(64); lib.selftest_run(b'wild_write', None, out.data_ptr(), 64)")
    done = subprocess.run([sys.executable, "-c", code, str(EMULATION)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "emulation: signal 11 in thread (5,0,0) of block (0,0,0)" in done.stderr, done.stderr[-2000:]


def test_half_and_bfloat16_conversions_match_torch(kernels):
    """Round to nearest even, subnormals, overflow to Inf, NaN: bit-identical to torch's casts."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24,
                                                           2.0**-25, 3 * 2.0**-26, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                                                           float("inf"), -float("inf")])])
    for kind, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        mine = kernels.convert(x, kind)
        ref = x.to(dtype)
        same = mine.view(torch.int16) == ref.view(torch.int16)
        both_nan = mine.isnan() & ref.isnan()
        assert bool((same | both_nan).all()), (kind, x[~(same | both_nan)][:5])


def test_bad_launches_give_the_launchers_message(fresh):
    x = torch.zeros(2, 12, dtype=torch.float32)  # K = 12 with N = 1 is below the compiled range
    with pytest.raises(emulate.EmulationError, match="power-of-two factor"):
        fresh.hadamard_transform(x, hadamard_factors(12).h_k)

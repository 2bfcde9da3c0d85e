"""The C++ CPU kernels (csrc/cpu/, the ``cpu`` backend) against fp64 references.

Every instruction set this CPU supports (AVX-512, AVX2, scalar here; NEON on ARM) is forced in turn,
and each op runs every dtype on a size of every code path of the kernels (K = 1 with no hi pass and
with hi passes of 1, 2 and 3 stages, rows shorter than a vector, K > 1 with one vector per sub-row and
with many, K = 252) for 1, 3, 37 and 300 rows, besides non-contiguous and misaligned inputs, the
parallel chunked path and the errors. The op-level suite (tests/test_ops.py, tests/test_epilogue.py:
opcheck, fake kernels, autograd, NaN/Inf) runs on this backend too, as one of ``available_backends``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearpatch_kernels as lp
from linearpatch_kernels.backends import cpu_backend, select_backend
from reference import factored_patch_reference, factored_reference, llm_like, positive_scales, rel_err

REPO = Path(__file__).resolve().parents[1]


def _find_compiler():
    sys.path.insert(0, str(REPO / "build_support"))
    try:
        from build_backend import find_cxx_compiler
    finally:
        sys.path.pop(0)
    return find_cxx_compiler()


def test_the_kernels_are_built_and_chosen_wherever_a_compiler_exists():
    if _find_compiler() is None:
        pytest.skip("no C++ compiler here: the package is pure Python on the CPU")
    assert cpu_backend.load_library(), (
        f"{cpu_backend.load_error()} (an install with a compiler must build them: pip install -e . , "
        f"or python setup.py build_ext --inplace in a checkout)")
    assert lp.available_backends("cpu")[0] == "cpu"
    assert select_backend(torch.randn(2, 64)).NAME == "cpu"
    assert lp.build_info()["cpu_backend"].startswith("available")


needs_kernels = pytest.mark.skipif(not cpu_backend.load_library(), reason="C++ CPU kernels not built")


def _supported() -> list[str]:
    return cpu_backend.isa_info()["supported"] if cpu_backend.load_library() else []


@pytest.fixture(params=_supported() or ["none"])
def isa(request):
    """Run the test under each instruction set the CPU supports (restored to auto afterwards)."""
    if request.param == "none":
        pytest.skip("C++ CPU kernels not built")
    assert cpu_backend.set_isa(request.param) == request.param
    try:
        with lp.use_backend("cpu"):
            yield request.param
    finally:
        cpu_backend.set_isa("auto")


# d -> the code path it takes (for AVX-512 with 16 lanes; AVX2 has 8, scalar 1).
SIZES = {
    1: "K = 1, one value",
    4: "K = 1, shorter than every vector: scalar",
    64: "K = 1, lane stages + 2 vector stages, no hi pass (the patch's middle in the lo pass)",
    128: "K = 1, one hi pass of 1 stage",
    256: "K = 1, one hi pass of 2 stages",
    512: "K = 1, one hi pass of 3 stages (the middle of the patch in it)",
    4096: "K = 1, hi passes 3 + 3",
    12: "K = 12, N = 1: scalar",
    288: "K = 36, N = 8: AVX2 under AVX-512",
    576: "K = 36, N = 16: one vector per sub-row (SmolLM2)",
    5120: "K = 20, N = 256: hi passes per sub-row",
    4032: "K = 252 (the largest), N = 16",
}
ROWS = (1, 3, 37, 300)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _rows_for(d: int) -> tuple[int, ...]:
    return ROWS if d <= 576 else ROWS[:3]  # 300 rows at the large sizes: the parallel test below


def _check_all_ops(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, w: torch.Tensor, tol: float) -> None:
    y = lp.hadamard_transform(x, 0.25)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert rel_err(y, factored_reference(x, 0.25)) <= tol
    p = lp.hadamard_patch(x, s)
    assert rel_err(p, factored_patch_reference(x, s)) <= tol
    h, n = lp.patch_add_rmsnorm(x, u, s, w, eps=1e-5)
    h_ref = factored_patch_reference(x.double() + u.double(), s)
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(h, h_ref) <= tol and rel_err(n, n_ref) <= tol
    if x.dtype != torch.float32:
        # fp32 inside, one rounding at the end: as close to fp64 as the fp64 result rounded once.
        ref = factored_patch_reference(x, s)
        assert rel_err(p, ref) <= 1.05 * rel_err(ref.to(x.dtype), ref) + 1e-6


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d", list(SIZES))
def test_every_code_path_matches_fp64(isa, d, dtype):
    for rows in _rows_for(d):
        x = llm_like(rows, d, dtype=dtype, seed=rows)
        u = llm_like(rows, d, dtype=dtype, seed=rows + 1)
        s = positive_scales(d)
        w = (0.5 + torch.rand(d)).to(dtype)
        _check_all_ops(x, u, s, w, TOL[dtype])


@needs_kernels
def test_large_rows_and_the_parallel_chunked_path(isa):
    # 300 rows of 4096 fp32 (4.9 MB) are cut into chunks taken by torch's threads; the answer does
    # not depend on how many threads ran (rows are independent) and matches fp64.
    x = llm_like(300, 4096)
    s = positive_scales(4096)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lp.hadamard_patch(x, s)
        torch.set_num_threads(2)
        two = lp.hadamard_patch(x, s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert rel_err(two, factored_patch_reference(x, s)) <= 1e-5
    big = llm_like(3, 32768)  # a row of 128 KiB: the passes run in L2
    assert rel_err(lp.hadamard_transform(big), factored_reference(big)) <= 1e-5


@needs_kernels
def test_outputs_of_32_mib_are_written_whole():
    # 2048 x 4096 fp32: each output is 32 MiB, a fresh mapping that the binding asks the OS to back
    # with 2 MiB pages, and the kernels prefetch the next row of every chunk. Sampled rows (both ends,
    # both halves) match fp64; every element equals the same op on the two halves (16 MiB outputs:
    # heap memory, no madvise), so no part of the output was left unwritten or disturbed. The default
    # instruction set only: the binding's part does not depend on it, and every set runs the prefetch
    # in test_large_rows_and_the_parallel_chunked_path (4.9 MB of input) and the driver.
    x = llm_like(2048, 4096, seed=3)
    u = llm_like(2048, 4096, seed=4)
    s = positive_scales(4096)
    w = 0.5 + torch.rand(4096)
    rows = torch.tensor([0, 1, 2, 1023, 1024, 2046, 2047, *range(5, 2048, 97)])
    halves = (slice(0, 1024), slice(1024, 2048))
    y = lp.hadamard_transform(x, 0.25)
    assert rel_err(y[rows], factored_reference(x[rows], 0.25)) <= 1e-5
    assert torch.equal(y, torch.cat([lp.hadamard_transform(x[h], 0.25) for h in halves]))
    p = lp.hadamard_patch(x, s)
    assert rel_err(p[rows], factored_patch_reference(x[rows], s)) <= 1e-5
    assert torch.equal(p, torch.cat([lp.hadamard_patch(x[h], s) for h in halves]))
    h, n = lp.patch_add_rmsnorm(x, u, s, w, eps=1e-5)
    h_ref = factored_patch_reference(x[rows].double() + u[rows].double(), s)
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(h[rows], h_ref) <= 1e-5 and rel_err(n[rows], n_ref) <= 1e-5
    parts = [lp.patch_add_rmsnorm(x[i], u[i], s, w, eps=1e-5) for i in halves]
    assert torch.equal(h, torch.cat([a for a, _ in parts])) and torch.equal(n, torch.cat([b for _, b in parts]))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_non_contiguous_and_misaligned_inputs(isa, dtype):
    d = 576
    s = positive_scales(d)
    w = torch.ones(d)
    base = llm_like(2 * 3 * 37, d, dtype=dtype).reshape(2, 3, 37, d)
    cases = {
        "rows strided (in place)": base[:, :, ::2],
        "leading dims transposed (copied)": base.transpose(0, 2),
        "hidden dim strided (copied)": llm_like(37, 2 * d, dtype=dtype)[:, ::2],
        # One element past a 64-byte boundary: every vector load is unaligned.
        "misaligned": llm_like(38, d, dtype=dtype).view(-1)[1:1 + 37 * d].view(37, d),
        "misaligned rows strided": llm_like(80, d, dtype=dtype).view(-1)[3:3 + 74 * d].view(37, 2 * d)[:, :d],
    }
    for name, x in cases.items():
        assert not x.is_contiguous() or x.data_ptr() % 16 != 0, name
        u = torch.flip(x, dims=(-1,))
        before = x.clone()
        _check_all_ops(x, u, s, w, TOL[dtype])
        assert torch.equal(x, before), f"{name}: the input was modified"


@needs_kernels
def test_zero_rows_and_one_dimensional_input(isa):
    s = positive_scales(576)
    assert lp.hadamard_patch(torch.empty(0, 576), s).shape == (0, 576)
    x = llm_like(1, 576)[0]
    assert rel_err(lp.hadamard_patch(x, s), factored_patch_reference(x, s)) <= 1e-5


@needs_kernels
def test_instruction_sets_follow_the_cpu():
    info = cpu_backend.isa_info()
    assert info["selected"] == info["supported"][0] and info["supported"][-1] == "scalar"
    if re.match(r"x86_64|amd64", os.uname().machine, re.I):
        # Both vector sets are always compiled in, whatever this CPU has; used only where CPUID (and
        # the OS) say so, the same as the kernel's view in /proc/cpuinfo.
        assert info["compiled"] == ["avx512", "avx2", "scalar"]
        flags = set()
        if os.path.exists("/proc/cpuinfo"):
            for line in open("/proc/cpuinfo"):
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        if flags:
            expect = [name for name, need in (("avx512", {"avx512f", "avx2", "fma", "f16c"}), ("avx2", {"avx2", "fma", "f16c"}))
                      if need <= flags] + ["scalar"]
            assert info["supported"] == expect
        with pytest.raises(RuntimeError, match=r"instruction set 'neon' is not compiled for this architecture; supported here: "):
            cpu_backend.set_isa("neon")
    with pytest.raises(RuntimeError, match=r"unknown instruction set 'sse9'; choose one of auto, avx512, avx2, neon, scalar"):
        cpu_backend.set_isa("sse9")
    assert cpu_backend.isa_info()["selected"] == info["selected"]  # a refused name changes nothing


@needs_kernels
def test_environment_variable_picks_the_instruction_set():
    code = ("import torch, linearpatch_kernels as lp; from linearpatch_kernels.backends import cpu_backend;"
            "x = torch.randn(3, 576); lp.hadamard_patch(x, torch.ones(576)); print(cpu_backend.isa_info()['selected'])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               LINEARPATCH_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "scalar", out.stderr[-2000:]
    env["LINEARPATCH_CPU_ISA"] = "avx1024"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "LINEARPATCH_CPU_ISA=avx1024: unknown instruction set 'avx1024'" in out.stderr


@pytest.fixture
def fresh_plans():
    """Cached backend choices made afresh before and after (they would remember the cpu backend)."""
    from linearpatch_kernels import backends

    backends.clear_plans()
    yield
    backends.clear_plans()


def test_without_the_library_cpu_tensors_use_the_torch_backend_with_one_warning(monkeypatch, fresh_plans):
    monkeypatch.setattr(cpu_backend, "library_path", lambda: None)
    monkeypatch.setattr(cpu_backend, "_state", {"loaded": None, "error": None})
    monkeypatch.delenv("LINEARPATCH_BACKEND", raising=False)
    x, s = llm_like(3, 576), positive_scales(576)
    with pytest.warns(RuntimeWarning, match=r"the C\+\+ CPU kernels are not built .*; CPU tensors use the torch backend"):
        assert select_backend(x).NAME == "torch"
    import warnings

    from linearpatch_kernels.backends import torch_backend

    calls = []
    monkeypatch.setattr(torch_backend, "hadamard_patch", lambda *a: calls.append(1) or torch_backend._run(
        a[0], lambda block, plan: torch_backend._transform_block(torch_backend._transform_block(block, plan).mul_(
            a[1] / a[0].shape[-1]), plan)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        with torch.no_grad():
            assert rel_err(lp.hadamard_patch(x, s), factored_patch_reference(x, s)) <= 1e-5
    assert calls == [1]  # the public function's direct path took the torch backend
    assert "not built" in lp.build_info()["cpu_backend"]
    with lp.use_backend("cpu"):
        with pytest.raises(RuntimeError, match=r"backend 'cpu' was requested but is not available for cpu tensors"):
            lp.hadamard_patch(x, s)


@needs_kernels
def test_forced_cpu_backend_refuses_float64_and_cuda():
    with lp.use_backend("cpu"):
        with pytest.raises(ValueError, match=r"backend 'cpu' cannot run this input: .*float64"):
            lp.hadamard_patch(torch.randn(2, 64, dtype=torch.float64), torch.ones(64, dtype=torch.float64))
    from types import SimpleNamespace

    fake_cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, shape=(2, 64))
    assert "CPU tensors only" in cpu_backend.unsupported_reason(fake_cuda)


@needs_kernels
def test_low_level_ops_check_their_arguments():
    h = torch.ones(1, 1)
    with pytest.raises(RuntimeError, match=r"d / K = 6 must be a power of two"):
        torch.ops.linearpatch_cpu.hadamard_transform(torch.randn(2, 6), h, 1.0)
    with pytest.raises(RuntimeError, match=r"scale must be a float32 CPU vector of length 64"):
        torch.ops.linearpatch_cpu.hadamard_patch(torch.randn(2, 64), h, torch.ones(63))
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16"):
        torch.ops.linearpatch_cpu.hadamard_transform(torch.randn(2, 64, dtype=torch.float64), h, 1.0)
    with pytest.raises(RuntimeError, match=r"eps must be a finite non-negative number"):
        torch.ops.linearpatch_cpu.patch_add_rmsnorm(torch.randn(2, 64), torch.randn(2, 64), h, torch.ones(64),
                                                    torch.ones(64), -1.0)


def _child_patch(queue):
    # torch's own OpenMP threads do not survive a fork either: everything but our op on one thread.
    torch.set_num_threads(1)
    x = llm_like(300, 4096, seed=5)
    s = positive_scales(4096)
    ref = factored_patch_reference(x, s)
    torch.set_num_threads(2)  # our pool: the caller and one worker
    y = lp.hadamard_patch(x, s)
    torch.set_num_threads(1)
    queue.put(rel_err(y, ref))


@needs_kernels
def test_worker_pool_survives_fork():
    # The parent's pool threads do not exist in a forked child: the child makes its own pool.
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, s = llm_like(300, 4096), positive_scales(4096)
        lp.hadamard_patch(x, s)  # the parent's pool is started
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_patch, args=(queue,))
        child.start()
        child.join(120)
        assert child.exitcode == 0
        assert queue.get(timeout=10) <= 1e-5
    finally:
        torch.set_num_threads(threads)

"""The CUDA backend: coverage rules, build logic and registration (on any machine), kernels vs fp64
references and the fused epilogue vs the unfused ops (on a CUDA GPU only)."""

import importlib.util
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

import linearpatch_kernels as lp
from linearpatch_kernels.backends import cuda_backend, cuda_toolkit, select_backend
from linearpatch_kernels.hadamard import hadamard_factors, is_supported_size
from reference import (factored_patch_reference, factored_reference, llm_like, positive_scales, reference_patch,
                       reference_transform, rel_err)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


def load_setup_script():
    """setup.py as a module (its ``setup()`` call only runs as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("linearpatch_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epilogue_reference(residual, update, scale, weight, eps):
    """``h = (residual + update) P`` and ``h * rsqrt(mean(h^2) + eps) * weight``, all in fp64."""
    h = factored_patch_reference(residual.double() + update.double(), scale)
    return h, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


# ------------------------------------------------------------------------------------------------
# Any machine


def test_factored_reference_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    for d in (8, 24, 576, 1024, 5120):
        x = torch.randn(3, d, generator=g, dtype=torch.float64)
        s = positive_scales(d)
        assert rel_err(factored_reference(x, 0.5), reference_transform(x, 0.5)) < 1e-12
        assert rel_err(factored_patch_reference(x, s), reference_patch(x, s)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_covers_io_dtypes_and_model_sizes(dtype):
    for d in (8, 64, 576, 896, 960, 1536, 2048, 3072, 3584, 4096, 5120, 5376, 8192, 16384, 32768):
        assert cuda_backend.unsupported_reason_for(dtype, d) is None, d


def test_float64_goes_elsewhere_with_a_reason():
    reason = cuda_backend.unsupported_reason_for(torch.float64, 4096)
    assert reason is not None and "float64" in reason and "torch backend" in reason


def test_every_supported_size_is_covered_or_explained():
    """Every d <= 32768 that hadamard_matrix supports: kernels iff the power-of-two factor is >= 8."""
    uncovered = []
    for d in range(1, cuda_backend.MAX_D + 1):
        if not is_supported_size(d):
            continue
        reason = cuda_backend.unsupported_reason_for(torch.bfloat16, d)
        f = hadamard_factors(d)
        if f.n >= 8:
            assert reason is None, (d, reason)
        else:
            assert reason is not None and f"{f.k} x {f.n}" in reason and "at least 8" in reason, (d, reason)
            uncovered.append(d)
    # Only small sizes fall outside (1..4 and K * {1, 2, 4}, K <= 256).
    assert uncovered and max(uncovered) <= 4 * 256
    assert 12 in uncovered and 576 not in uncovered


def test_sizes_beyond_the_compiled_range_are_explained():
    assert is_supported_size(65536)
    reason = cuda_backend.unsupported_reason_for(torch.float32, 65536)
    assert reason is not None and "32768" in reason


SM80, SM86, SM90 = (8, 0), (8, 6), (9, 0)


@pytest.mark.parametrize("op", cuda_backend.OPS)
def test_every_launch_fits_sm80_and_sm90(op):
    for capability in (SM80, SM90):
        for d in (8, 64, 576, 896, 960, 1536, 2016, 3072, 3584, 4096, 5120, 5376, 8192, 16384, 24576, 32256, 32768):
            for rows in (1, 7, 1 << 20):
                assert cuda_backend.unsupported_reason_for(torch.bfloat16, d, capability, op, rows) is None, (capability, d)


def test_sm86_refuses_only_what_exceeds_its_shared_memory():
    """sm_86/89 allow 99 KiB per block: d = 32768 (row_kernel, one row of 256 threads: 145 KiB in
    bf16) goes elsewhere, with the numbers; 16384 (one row of 128 threads, 72 KiB) fits; 8192 fits by dropping row_kernel to 64-thread blocks; 24576 and 32256 (kron_kernel, one
    row of fp32 per block: 96 and 126 KiB) fit with one row, not with the 126 KiB the last one needs."""
    reason = cuda_backend.unsupported_reason_for(torch.bfloat16, 32768, SM86)
    assert reason is not None and "148432 bytes of shared memory" in reason and "101376 of sm_86" in reason
    assert cuda_backend.launch_plan("hadamard_patch", torch.bfloat16, 8192, 100, 101_376)[1] == 64
    assert cuda_backend.launch_plan("hadamard_patch", torch.bfloat16, 8192, 100, 232_448)[1] == 128
    assert cuda_backend.unsupported_reason_for(torch.bfloat16, 16384, SM86) is None
    assert cuda_backend.unsupported_reason_for(torch.bfloat16, 24576, SM86) is None
    assert "shared memory" in cuda_backend.unsupported_reason_for(torch.bfloat16, 32256, SM86)
    # An unlisted architecture gets the smallest limit of the table.
    assert cuda_backend.unsupported_reason_for(torch.bfloat16, 32768, (8, 8)) is not None


def test_old_gpus_are_refused():
    reason = cuda_backend.unsupported_reason_for(torch.float16, 4096, (7, 5))
    assert reason is not None and "8.0 or newer" in reason and "sm_75" in reason


def test_automatic_choice_uses_the_device_capability(monkeypatch):
    """A CUDA tensor stand-in (device, dtype, shape) and a fake capability: the backend asks the
    device, and its answer depends on it."""
    from types import SimpleNamespace

    capability = {"value": SM90}
    monkeypatch.setattr(cuda_backend, "device_capability", lambda index: capability["value"])
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(2, 3, 32768))
    assert cuda_backend.unsupported_reason(x) is None
    assert cuda_backend.unsupported_reason(x, op="patch_add_rmsnorm") is None
    capability["value"] = SM86
    assert "shared memory" in cuda_backend.unsupported_reason(x)
    assert cuda_backend.unsupported_reason(SimpleNamespace(device=x.device, dtype=x.dtype, shape=(5, 5120))) is None


def test_launch_plan_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown op"):
        cuda_backend.launch_plan("hadamard", torch.float32, 4096, 1, 232_448)


@pytest.mark.parametrize("d", (8, 256, 4096, 16384, 32768))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_prepared_scale_is_s_over_d_permuted(d, dtype):
    """For K = 1 up to d = 8192 the kernels stage s/d in row_kernel's register order: every column once,
    each value s[column] / d exactly (the order itself is proven by the emulated kernels against fp64);
    from 16384 they read s/d in column order."""
    s = positive_scales(d, seed=d)
    columns = cuda_backend._row_scale_columns(2 if dtype == torch.float32 else 3, d.bit_length() - 1, s.device)
    assert torch.equal(torch.sort(columns).values, torch.arange(d))
    prepared = cuda_backend.prepare_scale(s, dtype, d)
    assert prepared.dtype == torch.float32 and prepared.is_contiguous()
    if d <= 8192:  # staged in shared memory: register order
        assert torch.equal(prepared, s[columns] / d)
    else:  # read per row through the cache: column order
        assert torch.equal(prepared, s / d)


@pytest.mark.parametrize("d", (8, 256, 4096, 8192, 5120))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_prepared_norm_weight(d, dtype):
    """The epilogue stages the norm weight in row_kernel's L0 register order up to d = 4096 (every
    column once); beyond, and for K > 1, it reads float32 in column order: the weight itself when it is
    float32 and contiguous, else one cast, kept while the weight is unchanged."""
    w = positive_scales(d, seed=d + 1)
    prepared = cuda_backend.prepare_norm_weight(w, dtype, d)
    f = hadamard_factors(d)
    if f.k == 1 and d <= 4096:
        columns = cuda_backend._row_weight_columns(2 if dtype == torch.float32 else 3, f.log2_n, w.device)
        assert torch.equal(torch.sort(columns).values, torch.arange(d))
        assert torch.equal(prepared, w[columns])
    else:
        assert prepared is w
    w16 = w.to(torch.bfloat16)
    kept = cuda_backend.prepared_norm_weight(w16, dtype, d)
    assert kept.dtype == torch.float32 and cuda_backend.prepared_norm_weight(w16, dtype, d) is kept
    assert torch.equal(torch.sort(kept).values, torch.sort(w16.float()).values)


def test_prepared_scale_cache_keys():
    """Cached on the tensor per (dtype, d) and its version; K > 1 takes s itself (nothing kept);
    inference tensors, which have no version counter, are prepared on every call."""
    s = positive_scales(4096)
    a = cuda_backend.prepared_scale(s, torch.bfloat16, 4096)
    assert cuda_backend.prepared_scale(s, torch.bfloat16, 4096) is a
    assert cuda_backend.prepared_scale(s, torch.float16, 4096) is not a  # another dtype key (same layout)
    assert not torch.equal(cuda_backend.prepared_scale(s, torch.float32, 4096), a)  # 4-value vectors: another order
    s.add_(1.0)
    b = cuda_backend.prepared_scale(s, torch.bfloat16, 4096)
    assert b is not a and torch.equal(torch.sort(b).values, torch.sort(s / 4096).values)
    s5120 = positive_scales(5120)
    assert cuda_backend.prepared_scale(s5120, torch.bfloat16, 5120) is s5120
    assert id(s5120) not in cuda_backend._prepared
    ident = id(s)
    del s, a, b
    assert ident not in cuda_backend._prepared  # the entry goes with its tensor
    with torch.inference_mode():
        frozen = positive_scales(4096)
        one = cuda_backend.prepared_scale(frozen, torch.bfloat16, 4096)
        assert cuda_backend.prepared_scale(frozen, torch.bfloat16, 4096) is not one
        assert torch.equal(one, cuda_backend.prepared_scale(frozen, torch.bfloat16, 4096))


def test_prepared_epilogue_operands_kept_per_pair():
    """The epilogue's two prepared operands are kept together per (scale, weight) pair: equal to the
    per-tensor preparations, renewed when either tensor changes in place or is invalidated, made inside
    a graph capture, and gone with either tensor (the table holds no strong reference to them, even
    where an operand is the tensor itself)."""
    d, dtype = 4096, torch.bfloat16
    s, w = positive_scales(d), torch.rand(d) + 0.5
    ps, pw = cuda_backend.prepared_epilogue_operands(s, w, dtype, d)
    assert torch.equal(ps, cuda_backend.prepare_scale(s, dtype, d))
    assert torch.equal(pw, cuda_backend.prepare_norm_weight(w, dtype, d))
    again = cuda_backend.prepared_epilogue_operands(s, w, dtype, d)
    assert again[0] is ps and again[1] is pw  # a hit: nothing made again
    w.mul_(2.0)  # the weight changes in place: its operand is made again, the scale's is kept
    ps2, pw2 = cuda_backend.prepared_epilogue_operands(s, w, dtype, d)
    assert ps2 is ps and torch.equal(pw2, cuda_backend.prepare_norm_weight(w, dtype, d)) and pw2 is not pw
    s.data.mul_(0.5)  # bypasses the version counter: invalidating the scale drops the pair too
    cuda_backend.invalidate_prepared_scale(s)
    ps3, _ = cuda_backend.prepared_epilogue_operands(s, w, dtype, d)
    assert ps3 is not ps and torch.equal(ps3, cuda_backend.prepare_scale(s, dtype, d))
    # K > 1: both operands are the tensors themselves (fp32, contiguous), kept as such without a reference.
    s5, w5 = positive_scales(5120), torch.rand(5120) + 0.5
    assert cuda_backend.prepared_epilogue_operands(s5, w5, dtype, 5120) == (s5, w5)
    assert cuda_backend.prepared_epilogue_operands(s5, w5, dtype, 5120)[0] is s5
    pairs = [(id(s), id(w)), (id(s5), id(w5))]
    assert all(any(k[:2] == p for k in cuda_backend._prepared_pairs) for p in pairs)
    del s5
    assert not any(k[:2] == pairs[1] for k in cuda_backend._prepared_pairs)
    del w, ps, pw, again, ps2, pw2, ps3
    assert not any(k[:2] == pairs[0] for k in cuda_backend._prepared_pairs)


def test_prepared_epilogue_operands_during_capture(monkeypatch):
    """During a capture both operands are made inside the graph, neither taken from the pair's entry."""
    s, w = positive_scales(4096), torch.rand(4096) + 0.5
    cached = cuda_backend.prepared_epilogue_operands(s, w, torch.bfloat16, 4096)
    monkeypatch.setattr(cuda_backend, "_capturing", lambda tensor: True)
    during = cuda_backend.prepared_epilogue_operands(s, w, torch.bfloat16, 4096)
    assert during[0] is not cached[0] and during[1] is not cached[1]
    assert torch.equal(during[0], cached[0]) and torch.equal(during[1], cached[1])


def test_prepared_scale_is_made_inside_a_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is being captured the prepared scale is made inside the graph, never taken from
    the cache (a replay would read a copy that an in-place update of s no longer changes) nor put in it
    (graph memory is filled only at replay). Capture is simulated: the test machine may have no GPU."""
    s = positive_scales(4096)
    cached = cuda_backend.prepared_scale(s, torch.bfloat16, 4096)
    monkeypatch.setattr(cuda_backend, "_capturing", lambda tensor: True)
    during = cuda_backend.prepared_scale(s, torch.bfloat16, 4096)
    assert during is not cached and torch.equal(during, cached)
    assert cuda_backend.prepared_scale(s, torch.bfloat16, 4096) is not during  # made again at every call
    w = torch.rand(4096) + 0.5
    assert cuda_backend.prepared_norm_weight(w, torch.bfloat16, 4096) is not cuda_backend.prepared_norm_weight(
        w, torch.bfloat16, 4096)
    assert id(w) not in cuda_backend._prepared
    monkeypatch.setattr(cuda_backend, "_capturing", lambda tensor: False)
    assert cuda_backend.prepared_scale(s, torch.bfloat16, 4096) is cached  # the eager cache is left as it was


def test_cpu_tensors_are_refused_and_never_chosen():
    x = llm_like(4, 64)
    assert not cuda_backend.is_available("cpu")
    assert "CUDA tensors only" in cuda_backend.unsupported_reason(x)
    assert select_backend(x).NAME != "cuda"


def test_cuda_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: availability is checked by the GPU tests")
    assert not cuda_backend.is_available("cuda")
    assert "cuda" not in lp.available_backends("cuda")


def test_cpu_calls_of_the_public_ops_stay_correct():
    x = llm_like(5, 576)
    s = positive_scales(576)
    assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) < 1e-5
    assert rel_err(lp.hadamard_transform(x, 0.25), reference_transform(x, 0.25)) < 1e-5


def test_sources_are_found_for_the_build_and_the_jit():
    setup_script = load_setup_script()
    sources = setup_script.cuda_sources()
    assert "csrc/hadamard_ops.cpp" in sources
    assert {"csrc/hadamard_f32.cu", "csrc/hadamard_f16.cu", "csrc/hadamard_bf16.cu"} <= set(sources)
    assert {"csrc/patch_add_rmsnorm_f32.cu", "csrc/patch_add_rmsnorm_f16.cu",
            "csrc/patch_add_rmsnorm_bf16.cu"} <= set(sources)
    src = cuda_backend.source_dir()
    assert src is not None and (src / "hadamard_kernels.cuh").is_file()


def test_build_flag_logic():
    decide = load_setup_script().cuda_build_decision
    ok = dict(torch_cuda="13.0", cuda_home="/opt/cuda", has_target=True)
    assert decide(None, **ok)[0] is True
    assert decide("", **ok)[0] is True
    assert decide("0", **ok) == (False, "LINEARPATCH_BUILD_CUDA=0")
    assert decide("1", **ok)[0] is True
    # Auto: anything missing means a pure-Python package, with the reason.
    build, why = decide(None, torch_cuda=None, cuda_home="/opt/cuda", has_target=True)
    assert not build and "CUDA build of torch" in why
    build, why = decide(None, torch_cuda="13.0", cuda_home=None, has_target=True)
    assert not build and "toolkit" in why
    build, why = decide(None, torch_cuda="13.0", cuda_home="/opt/cuda", has_target=False)
    assert not build and "TORCH_CUDA_ARCH_LIST" in why
    # Forced: building for the default arch list needs no GPU, but a toolkit and a CUDA torch.
    assert decide("1", torch_cuda="13.0", cuda_home="/opt/cuda", has_target=False)[0] is True
    with pytest.raises(RuntimeError, match="toolkit"):
        decide("1", torch_cuda="13.0", cuda_home=None, has_target=True)
    with pytest.raises(RuntimeError, match="CUDA build of torch"):
        decide("1", torch_cuda=None, cuda_home="/opt/cuda", has_target=True)
    with pytest.raises(RuntimeError, match="use 1"):
        decide("yes", **ok)


def test_local_version_tag():
    local_version = load_setup_script().local_version
    assert local_version("13.0") == "cu130"
    assert local_version("12.8") == "cu128"


def test_toolkit_is_found_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-99.9"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("")
    wrapper = tmp_path / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    # What `nvcc --dryrun` of a real toolkit prints, then nothing is compiled.
    wrapper.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    setup_script = load_setup_script()
    for module in (setup_script, cuda_toolkit):
        assert module.toolkit_from_nvcc(str(wrapper)) == os.path.realpath(toolkit)
        monkeypatch.delenv("CUDA_HOME", raising=False)
        monkeypatch.delenv("CUDA_PATH", raising=False)
        monkeypatch.setenv("PATH", str(wrapper.parent))
        assert module.find_cuda_home() == os.path.realpath(toolkit)
        monkeypatch.setenv("CUDA_HOME", "/somewhere/else")
        assert module.find_cuda_home() == "/somewhere/else"
    assert setup_script.TORCH_TARGET_VERSION == cuda_backend.TORCH_TARGET_VERSION


def test_no_toolkit_found_from_a_broken_nvcc(tmp_path):
    broken = tmp_path / "nvcc"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    assert cuda_toolkit.toolkit_from_nvcc(str(broken)) is None
    assert cuda_toolkit.toolkit_from_nvcc(str(tmp_path / "missing")) is None


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as if nothing had been loaded yet, with no prebuilt library (restored afterwards)."""
    monkeypatch.setattr(cuda_backend, "_loaded_from", None)
    monkeypatch.setattr(cuda_backend, "_load_error", None)
    monkeypatch.setattr(cuda_backend, "prebuilt_library", lambda: None)
    monkeypatch.delenv(cuda_backend.JIT_ENV, raising=False)
    return monkeypatch


def test_without_a_toolkit_the_jit_warns_once_and_gives_way(fresh_loader):
    fresh_loader.setattr(cuda_backend, "find_cuda_home", lambda: None)
    with pytest.warns(RuntimeWarning, match="no CUDA toolkit found.*triton backend"):
        assert not cuda_backend.load_extension()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        assert not cuda_backend.load_extension()
    assert cuda_backend.loaded_from() is None


def test_jit_can_be_turned_off(fresh_loader):
    fresh_loader.setenv(cuda_backend.JIT_ENV, "0")
    fresh_loader.setattr(cuda_backend, "_jit_build", lambda: pytest.fail("the JIT build ran although it is off"))
    with pytest.warns(RuntimeWarning, match="JIT build is off"):
        assert not cuda_backend.load_extension()


def test_without_jit_nothing_is_remembered(fresh_loader):
    assert not cuda_backend.load_extension(allow_jit=False)
    assert cuda_backend._load_error is None  # a later call may still build


def test_a_library_without_the_epilogue_op_is_refused(fresh_loader, tmp_path):
    """A library built before patch_add_rmsnorm existed registers only the other two ops: the backend
    then stays off (and says which op is missing) instead of failing on the first epilogue call."""
    old_library = tmp_path / "_C.abi3.so"
    old_library.write_bytes(b"")
    fresh_loader.setattr(cuda_backend, "prebuilt_library", lambda: str(old_library))
    fresh_loader.setattr(torch.ops, "load_library", lambda path: None)
    fresh_loader.setenv(cuda_backend.JIT_ENV, "0")
    registered = {"linearpatch_cuda::hadamard_transform", "linearpatch_cuda::hadamard_patch"}
    fresh_loader.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                         lambda name, key: key == "CUDA" and name in registered)
    with pytest.warns(RuntimeWarning, match=r"did not register linearpatch_cuda::patch_add_rmsnorm for CUDA"):
        assert not cuda_backend.load_extension()
    assert cuda_backend.loaded_from() is None
    assert "patch_add_rmsnorm" in cuda_backend._load_error


@pytest.mark.skipif(cuda_backend.prebuilt_library() is None,
                    reason="the compiled extension is not installed here (pip install . with a CUDA toolkit; "
                           ".ci/cuda_check.sh builds a wheel and runs this test against it)")
def test_prebuilt_extension_registers_cuda_kernels_only():
    assert cuda_backend.load_extension(allow_jit=False)
    assert cuda_backend.loaded_from().startswith("prebuilt ")
    for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
        name = f"linearpatch_cuda::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    schema = str(torch.ops.linearpatch_cuda.hadamard_patch.default._schema)
    assert schema == "linearpatch_cuda::hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor"
    schema = str(torch.ops.linearpatch_cuda.hadamard_transform.default._schema)
    assert schema == "linearpatch_cuda::hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor"
    schema = str(torch.ops.linearpatch_cuda.patch_add_rmsnorm.default._schema)
    assert schema == ("linearpatch_cuda::patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, "
                      "Tensor scale, Tensor norm_weight, float eps) -> (Tensor, Tensor)")
    with pytest.raises(NotImplementedError):
        torch.ops.linearpatch_cuda.hadamard_patch(torch.zeros(2, 8), torch.ones(1, 1), torch.ones(8))
    with pytest.raises(NotImplementedError):
        torch.ops.linearpatch_cuda.patch_add_rmsnorm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(1, 1),
                                                     torch.ones(8), torch.ones(8), 1e-6)
    # The public ops on CPU tensors go to the C++ CPU kernels (in every wheel), else the torch backend.
    x, s = llm_like(3, 4096), positive_scales(4096)
    cpu_choice = "cpu" if "cpu" in lp.available_backends("cpu") else "torch"
    assert select_backend(x).NAME == cpu_choice
    assert select_backend(x, "patch_add_rmsnorm").NAME == cpu_choice
    assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) < 1e-5
    u, w = 0.1 * llm_like(3, 4096, seed=1), torch.rand(4096) + 0.5
    h, n = lp.patch_add_rmsnorm(x, u, s, w, 1e-6)
    h_ref, n_ref = epilogue_reference(x, u, s, w, 1e-6)
    assert rel_err(h, h_ref) < 1e-5 and rel_err(n, n_ref) < 1e-5


# ------------------------------------------------------------------------------------------------
# GPU only

GPU_SIZES = (576, 1024, 2048, 4096, 5120, 8192)
GPU_BACKENDS = ("cuda", "triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def gpu_inputs():
    """Inputs and fp64 references per (d, rows), shared by every backend and dtype."""
    cache = {}

    def get(d, rows, dtype):
        key = (d, rows, dtype)
        if key not in cache:
            x = llm_like(rows, d, dtype=dtype, device="cuda")
            s = positive_scales(d, device="cuda")
            # References from the rounded input, so only the kernel's own error is measured.
            cache[key] = (x, s, reference_transform(x, 0.5), reference_patch(x, s))
        return cache[key]

    return get


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("d", GPU_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", (1, 7, 4096))
def test_gpu_backend_vs_fp64(backend, d, dtype, rows, gpu_inputs):
    assert backend in lp.available_backends("cuda"), f"{backend} is not available on this GPU"
    x, s, ref_t, ref_p = gpu_inputs(d, rows, dtype)
    with lp.use_backend(backend):
        y_t = lp.hadamard_transform(x, 0.5)
        y_p = lp.hadamard_patch(x, s)
    assert y_t.dtype == dtype and y_t.shape == x.shape and y_p.dtype == dtype and y_p.shape == x.shape
    assert rel_err(y_t, ref_t) <= TOLERANCE[dtype]
    assert rel_err(y_p, ref_p) <= TOLERANCE[dtype]


@needs_gpu
def test_gpu_cuda_is_the_automatic_choice():
    x = llm_like(4, 4096, dtype=torch.bfloat16, device="cuda")
    assert cuda_backend.is_available(x.device), cuda_backend._load_error
    assert select_backend(x).NAME == "cuda"
    odd = llm_like(4, 24, dtype=torch.bfloat16, device="cuda")  # 12 x 2: not covered by the CUDA kernels
    assert select_backend(odd).NAME != "cuda"
    with lp.use_backend("cuda"), pytest.raises(ValueError, match="power-of-two factor"):
        lp.hadamard_patch(odd, positive_scales(24, device="cuda"))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_every_covered_size(dtype):
    """Every covered d up to 32768 (each power of two, each K with its smallest and largest N)."""
    by_k = {}
    for d in range(8, cuda_backend.MAX_D + 1):
        if is_supported_size(d) and cuda_backend.unsupported_reason_for(dtype, d) is None:
            by_k.setdefault(hadamard_factors(d).k, []).append(d)
    sizes = sorted(set(by_k.pop(1)) | {ds[0] for ds in by_k.values()} | {ds[-1] for ds in by_k.values()})
    with lp.use_backend("cuda"):
        for d in sizes:
            x = llm_like(3, d, dtype=dtype, device="cuda")
            s = positive_scales(d, device="cuda")
            assert rel_err(lp.hadamard_transform(x, 0.5), factored_reference(x, 0.5)) <= TOLERANCE[dtype], d
            assert rel_err(lp.hadamard_patch(x, s), factored_patch_reference(x, s)) <= TOLERANCE[dtype], d


@needs_gpu
@pytest.mark.parametrize("d", (4096, 5120))
def test_gpu_non_contiguous_and_misaligned_inputs(d):
    s = positive_scales(d, device="cuda")
    base = llm_like(2 * d, 6, dtype=torch.bfloat16, device="cuda")
    transposed = base.t()[:, ::2]  # (6, d) with strides (1, 12)
    flat = llm_like(1, 6 * d + 1, dtype=torch.bfloat16, device="cuda").reshape(-1)
    misaligned = flat[1:].view(6, d)  # contiguous, 2 bytes off a 16-byte boundary
    with lp.use_backend("cuda"):
        every_other_row = llm_like(6, 2 * d, dtype=torch.bfloat16, device="cuda").view(6, 2, d)[:, 1]
        for x in (transposed, misaligned, every_other_row):
            assert not x.is_contiguous() or x.data_ptr() % 16 != 0
            assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) <= 1e-2
            assert rel_err(lp.hadamard_transform(x, 0.5), reference_transform(x, 0.5)) <= 1e-2


@needs_gpu
def test_gpu_runs_on_the_current_stream():
    x = llm_like(4096, 4096, dtype=torch.bfloat16, device="cuda")
    s = positive_scales(4096, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with lp.use_backend("cuda"), torch.cuda.stream(stream):
        y = lp.hadamard_patch(x, s)
    stream.synchronize()
    assert rel_err(y, reference_patch(x, s)) <= 1e-2


@needs_gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("d", (4096, 5120))
def test_gpu_ops_replay_in_a_cuda_graph(backend, d):
    """Decode steps run under CUDA graphs (vLLM): no op may sync or copy from the host per call."""
    x = llm_like(8, d, dtype=torch.bfloat16, device="cuda")
    s = positive_scales(d, device="cuda")
    w = torch.rand(d, device="cuda") + 0.5
    with lp.use_backend(backend):
        lp.hadamard_patch(x, s), lp.patch_add_rmsnorm(x, x, s, w, 1e-6)  # compile / load outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lp.hadamard_patch(x, s)
            h, n = lp.patch_add_rmsnorm(x, x, s, w, 1e-6)
    x.copy_(llm_like(8, d, dtype=torch.bfloat16, seed=5, device="cuda"))  # new input, same buffer
    graph.replay()
    torch.cuda.synchronize()
    h_ref = reference_patch(x.double() * 2, s)
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_err(y, reference_patch(x, s)) <= 1e-2
    assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


@needs_gpu
@pytest.mark.parametrize("d", (256, 4096, 8192))
def test_gpu_persistent_blocks_loop_over_many_row_groups(d):
    # The K = 1 kernel runs one grid of resident blocks that loops over groups of rows: many more
    # rows than the grid holds at once, and an odd count, so the last group is partial.
    rows = 40001
    x = llm_like(rows, d, dtype=torch.bfloat16, device="cuda")
    s = positive_scales(d, device="cuda")
    with lp.use_backend("cuda"):
        y = lp.hadamard_patch(x, s)
        t = lp.hadamard_transform(x, 0.5)
    check = torch.tensor([0, 1, 2, 127, 128, rows // 2, rows - 2, rows - 1], device="cuda")
    assert rel_err(y[check], factored_patch_reference(x[check], s)) <= 1e-2
    assert rel_err(t[check], factored_reference(x[check], 0.5)) <= 1e-2


@needs_gpu
@pytest.mark.parametrize("d", (4096, 5120))
def test_gpu_more_than_2_31_elements(d):
    rows = (1 << 31) // d + 3
    x = torch.empty(rows, d, dtype=torch.bfloat16, device="cuda")
    x.normal_()
    s = positive_scales(d, device="cuda")
    with lp.use_backend("cuda"):
        y = lp.hadamard_patch(x, s)
    check = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1], device="cuda")
    assert rel_err(y[check], factored_patch_reference(x[check], s)) <= 1e-2
    del y
    with lp.use_backend("cuda"):
        y = lp.hadamard_transform(x, 0.5)
    assert rel_err(y[check], factored_reference(x[check], 0.5)) <= 1e-2


# ------------------------------------------------------------------------------------------------
# The fused interface epilogue on the GPU: linearpatch::patch_add_rmsnorm with the cuda backend

EPILOGUE_SIZES = (576, 1024, 2048, 4096, 5120, 8192)
EPS = 1e-5


def epilogue_inputs(rows, d, dtype, weight_dtype=None, seed=0):
    """Residual stream with outliers, a smaller update, patch scales and a positive norm weight."""
    residual = llm_like(rows, d, dtype=dtype, seed=seed, device="cuda")
    update = (0.1 * llm_like(rows, d, dtype=torch.float64, seed=seed + 1)).to(dtype=dtype, device="cuda")
    scale = positive_scales(d, seed=seed + 2, device="cuda")
    g = torch.Generator().manual_seed(seed + 3)
    weight = (0.5 + torch.rand(d, generator=g, dtype=torch.float64)).to(weight_dtype or dtype).to("cuda")
    return residual, update, scale, weight


def hf_rmsnorm(h, weight, eps):
    """Hugging Face's LlamaRMSNorm: fp32 statistics, the normalized state cast back, times the weight."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


@pytest.fixture(scope="module")
def epilogue_case():
    """Inputs and fp64 references per (d, rows, dtype), shared by the tests below."""
    cache = {}

    def get(d, rows, dtype):
        key = (d, rows, dtype)
        if key not in cache:
            r, u, s, w = epilogue_inputs(rows, d, dtype, seed=d + rows)
            cache[key] = (r, u, s, w, *epilogue_reference(r, u, s, w, EPS))
        return cache[key]

    return get


@needs_gpu
@pytest.mark.parametrize("d", EPILOGUE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", (1, 7, 4096))
def test_gpu_epilogue_vs_fp64(d, dtype, rows, epilogue_case):
    r, u, s, w, h_ref, n_ref = epilogue_case(d, rows, dtype)
    with lp.use_backend("cuda"):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    assert h.dtype == n.dtype == dtype and h.shape == n.shape == r.shape
    assert rel_err(h, h_ref) <= TOLERANCE[dtype]
    assert rel_err(n, n_ref) <= TOLERANCE[dtype]
    # Every row on its own too (a row that went through the wrong reduction would hide in the total).
    row_err = ((n.double() - n_ref).norm(dim=-1) / n_ref.norm(dim=-1)).max().item()
    assert row_err <= 2 * TOLERANCE[dtype]


@needs_gpu
@pytest.mark.parametrize("d", EPILOGUE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", (1, 7, 4096))
def test_gpu_epilogue_vs_unfused_ops(d, dtype, rows, epilogue_case):
    """What a patched model runs without fusion: the add in the model dtype, the patch (cuda backend),
    then Hugging Face's RMSNorm."""
    r, u, s, w = epilogue_case(d, rows, dtype)[:4]
    with lp.use_backend("cuda"):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
        h_unfused = lp.hadamard_patch(r + u, s)
    n_unfused = hf_rmsnorm(h_unfused, w, EPS)
    assert rel_err(h, h_unfused.double()) <= TOLERANCE[dtype]
    assert rel_err(n, n_unfused.double()) <= TOLERANCE[dtype]


@needs_gpu
@pytest.mark.parametrize("weight_dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64), ids=str)
def test_gpu_epilogue_norm_weight_dtypes(weight_dtype):
    r, u, s, w = epilogue_inputs(9, 4096, torch.bfloat16, weight_dtype=weight_dtype, seed=4)
    with lp.use_backend("cuda"):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    h_ref, n_ref = epilogue_reference(r, u, s, w, EPS)
    assert n.dtype == torch.bfloat16
    assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_epilogue_every_covered_size(dtype):
    """Each kernel path of the epilogue: every power of two (one to several rows per block, the
    reduction across two warps at 4096 and 8192, four at 16384 and eight at 32768), each K with its smallest and
    largest N (several rows per block to one row, one to several H_K tile rounds)."""
    by_k = {}
    for d in range(8, cuda_backend.MAX_D + 1):
        if is_supported_size(d) and cuda_backend.unsupported_reason_for(dtype, d) is None:
            by_k.setdefault(hadamard_factors(d).k, []).append(d)
    sizes = sorted(set(by_k.pop(1)) | {ds[0] for ds in by_k.values()} | {ds[-1] for ds in by_k.values()})
    with lp.use_backend("cuda"):
        for d in sizes:
            for rows in (3, 8192 // d + 5):  # one partial block; several blocks with a partial last one
                r, u, s, w = epilogue_inputs(rows, d, dtype, seed=d)
                h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
                h_ref, n_ref = epilogue_reference(r, u, s, w, EPS)
                assert rel_err(h, h_ref) <= TOLERANCE[dtype], (d, rows)
                assert rel_err(n, n_ref) <= TOLERANCE[dtype], (d, rows)


@needs_gpu
@pytest.mark.parametrize("d", (64, 576, 4096, 16384))
def test_gpu_epilogue_rows_stay_apart(d):
    """A NaN row (or an all-zero one) affects only itself, also when a block holds several rows."""
    rows = 40
    r, u, s, w = epilogue_inputs(rows, d, torch.float32, seed=7)
    r[5] = float("nan")
    r[6], u[6] = 0.0, 0.0
    with lp.use_backend("cuda"):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    assert torch.isnan(h[5]).all() and torch.isnan(n[5]).all()
    assert (h[6] == 0).all() and (n[6] == 0).all()  # 0 * rsqrt(0 + eps)
    keep = [i for i in range(rows) if i not in (5, 6)]
    h_ref, n_ref = epilogue_reference(r[keep], u[keep], s, w, EPS)
    assert rel_err(h[keep], h_ref) <= 1e-5 and rel_err(n[keep], n_ref) <= 1e-5


@needs_gpu
@pytest.mark.parametrize("d", (4096, 5120))
def test_gpu_epilogue_non_contiguous_and_misaligned(d):
    r, u, s, w = epilogue_inputs(6, d, torch.bfloat16, seed=3)
    transposed = llm_like(2 * d, 6, dtype=torch.bfloat16, device="cuda").t()[:, ::2]  # (6, d), strides (1, 12)
    flat = llm_like(1, 6 * d + 1, dtype=torch.bfloat16, device="cuda").reshape(-1)
    misaligned = flat[1:].view(6, d)  # contiguous, 2 bytes off a 16-byte boundary
    every_other_row = llm_like(6, 2 * d, dtype=torch.bfloat16, device="cuda").view(6, 2, d)[:, 1]
    w_strided = torch.stack((w, w), dim=1)[:, 0]  # stride 2
    with lp.use_backend("cuda"):
        for residual, update in ((transposed, u), (r, misaligned), (every_other_row, transposed)):
            h, n = lp.patch_add_rmsnorm(residual, update, s, w_strided, EPS)
            h_ref, n_ref = epilogue_reference(residual, update, s, w, EPS)
            assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


@needs_gpu
def test_gpu_epilogue_is_the_automatic_choice_and_differentiable():
    r, u, s, w = epilogue_inputs(5, 576, torch.float32, seed=11)
    assert select_backend(r, "patch_add_rmsnorm").NAME == "cuda"
    leaves = [t.clone().requires_grad_() for t in (r, u, s, w)]
    gh = torch.randn(5, 576, dtype=torch.float64, device="cuda")
    gn = torch.randn(5, 576, dtype=torch.float64, device="cuda")
    h, n = lp.patch_add_rmsnorm(*leaves, EPS)
    ((h.double() * gh).sum() + (n.double() * gn).sum()).backward()
    # The same function in fp64 from the dense orthonormal matrix, differentiated by autograd.
    ref = [t.detach().double().requires_grad_() for t in (r, u, s, w)]
    hm = lp.hadamard_matrix(576, device="cuda")
    h_ref = ((ref[0] + ref[1]) @ hm * ref[2]) @ hm.T
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + EPS) * ref[3]
    ((h_ref * gh).sum() + (n_ref * gn).sum()).backward()
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) <= 1e-4


@needs_gpu
def test_gpu_epilogue_runs_on_the_current_stream():
    r, u, s, w = epilogue_inputs(4096, 4096, torch.bfloat16, seed=12)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with lp.use_backend("cuda"), torch.cuda.stream(stream):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    stream.synchronize()
    h_ref, n_ref = epilogue_reference(r, u, s, w, EPS)
    assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


@needs_gpu
@pytest.mark.parametrize("d", (4096, 5120))
def test_gpu_epilogue_more_than_2_31_elements(d):
    rows = (1 << 31) // d + 3
    r = torch.empty(rows, d, dtype=torch.bfloat16, device="cuda").normal_()
    u = torch.empty_like(r).normal_()
    s = positive_scales(d, device="cuda")
    w = torch.rand(d, device="cuda") + 0.5
    with lp.use_backend("cuda"):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    check = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1], device="cuda")
    h_ref, n_ref = epilogue_reference(r[check], u[check], s, w, EPS)
    assert rel_err(h[check], h_ref) <= 1e-2 and rel_err(n[check], n_ref) <= 1e-2

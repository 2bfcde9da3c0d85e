"""The Triton backend's launch plan and its limits per GPU architecture, checked on the CPU.

The automatic choice must never pick a configuration that cannot launch: these tests give the
backends a CUDA tensor stand-in and a fake compute capability and check where each size goes. That
the resource estimate bounds what the compiler really allocates is checked by
``scripts/triton_aot.py`` (and ``test_triton_aot.py``); the kernels' numbers by ``test_ops.py``.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

import linearpatch_kernels as lp
from linearpatch_kernels import backends
from linearpatch_kernels.backends import cuda_backend, gpu_limits, select_backend
from linearpatch_kernels.backends import triton_backend as tb
from linearpatch_kernels.hadamard import hadamard_factors
from reference import (factored_patch_reference, llm_like, positive_scales, reference_patch, reference_transform,
                       rel_err)

SM80, SM86, SM90 = (8, 0), (8, 6), (9, 0)
# Where the Triton kernels really run here: a GPU, else the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cuda_input(d: int, dtype=torch.bfloat16):
    """What the backends look at of a (rows, d) CUDA tensor: device, dtype and shape."""
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(4, d))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every backend available on CUDA tensors, on a GPU of the capability the test sets."""
    state = {"capability": SM90, "cuda_built": True}
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(tb, "device_capability", lambda index: state["capability"])
    monkeypatch.setattr(cuda_backend, "device_capability", lambda index: state["capability"])
    monkeypatch.setattr(tb, "is_available", lambda device: torch.device(device).type == "cuda")
    monkeypatch.setattr(cuda_backend, "is_available", lambda device: state["cuda_built"])
    return state


# ---------------------------------------------------------------------------------------------
# Launch configurations


@pytest.mark.parametrize("d", [8, 576, 960, 4096, 5120, 32768])
def test_two_row_blocks_per_size_so_batch_sizes_do_not_recompile(d):
    configs = {tb.launch_config(d, rows, sm_count=132) for rows in [1, 2, 3, 7, 8, 100, 129, 1000, 4097, 16384, 10**6]}
    assert len(configs) <= 2
    decode, prefill = tb.launch_config(d, 1, 132), tb.launch_config(d, 16384, 132)
    assert decode.BLOCK_M * decode.N >= (16 if decode.K > 1 else 1)
    assert decode.BLOCK_M <= prefill.BLOCK_M <= tb.MAX_PREFILL_ROWS
    assert prefill.tile <= max(tb.PREFILL_TILE, decode.tile)


def test_launch_config_pads_k_for_the_tensor_core_dot():
    c = tb.launch_config(576, 1, 132)  # 36 x 16
    assert (c.K, c.K_PAD, c.N, c.LOG2_N) == (36, 64, 16, 4)
    assert c.BLOCK_M * c.N >= 16
    c = tb.launch_config(1536, 1, 132)  # 12 x 128
    assert (c.K, c.K_PAD) == (12, 16)
    assert tb.launch_config(4096, 1, 132).K_PAD == 1


def test_rows_the_padded_dot_cannot_hold_run_unpadded_with_an_add_network():
    decode, prefill = tb.launch_config(9216, 1, 132), tb.launch_config(9216, 16384, 132)  # 36 x 256
    for c in (decode, prefill):
        assert c.NETWORK and (c.K, c.K_PAD, c.N) == (36, 36, 256) and c.tile == c.BLOCK_M * 9216
        assert c.num_warps * 32 <= c.BLOCK_M * c.N  # no part replicated across threads
    signs = decode.constexprs()["SIGNS"]
    h_36 = torch.tensor([1.0 if c == "+" else -1.0 for c in signs]).view(36, 36)
    assert torch.equal(h_36, hadamard_factors(9216).h_k.float())
    assert not tb.launch_config(576, 1, 132).NETWORK  # 36 x 16, architecture unknown: the dot (padded to 64)
    assert not tb.launch_config(4096, 1, 132).NETWORK


SM100 = (10, 0)


@pytest.mark.parametrize("rows", [1, 16384])
def test_network_is_chosen_where_it_models_faster_than_the_padded_dot(rows):
    def network(d, capability):
        limit = gpu_limits.shared_memory_limit(capability)
        c = tb.launch_config(d, rows, 132, torch.bfloat16, "hadamard_patch", limit, capability)
        assert c.NETWORK == (c.K_PAD == c.K)  # the network never pads, the dot always does (K > 1)
        return c.NETWORK

    # 36 x 16 on sm_80/86 and sm_90, 36 x 64 on sm_80/86 only (NETWORK_PREFERRED).
    assert network(576, SM80) and network(576, SM86) and network(576, SM90)
    assert network(2304, SM80) and network(2304, SM86) and not network(2304, SM90)
    # An architecture without a model keeps the dot; other sizes keep the dot everywhere.
    assert not network(576, SM100) and not network(2304, SM100)
    for d in (896, 960, 1536, 3072, 5120):
        for cap in (SM80, SM90, SM100):
            assert not network(d, cap), (d, cap)
    # 9216 takes the network on every architecture (the padded dot cannot hold it).
    assert all(network(9216, cap) for cap in (SM80, SM90, SM100))
    # The backend's own refusal logic sees the same choice: the preferred network fits every limit.
    for cap in (SM80, SM86, SM90):
        for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
            assert tb.unsupported_reason_for(torch.bfloat16, 576, cap, op) is None
            assert tb.unsupported_reason_for(torch.float32, 2304, cap, op) is None


def test_shared_memory_estimate_grows_with_the_tile():
    # Pipelined persistent loop: the fp32 conversion scratch, plus the next block's cp.async target in
    # the input dtype, one per tensor loaded per block.
    small, large = tb.launch_config(4096, 1, 132), tb.launch_config(16384, 1, 132)
    assert small.STAGES == large.STAGES == 2
    assert tb.resource_estimate(small, torch.bfloat16)["shared_bytes"] == 4 * 4096 + 2 * 4096
    assert tb.resource_estimate(large, torch.float32, "patch_add_rmsnorm")["shared_bytes"] == 4 * 16384 + 2 * 4 * 16384
    # K > 1 (576 prefill): plus H_36, padded to 64 x 64.
    k36 = tb.launch_config(576, 16384, 132)
    assert k36.RESIDENT and k36.STAGES == 2 and k36.BLOCK_M == 2
    assert tb.resource_estimate(k36, torch.bfloat16)["shared_bytes"] == 4 * k36.tile + 2 * k36.tile + 4 * 64 * 64
    assert tb.resource_estimate(k36, torch.float32, "patch_add_rmsnorm")["shared_bytes"] == (
        4 * k36.tile + 2 * 4 * k36.tile + 4 * 64 * 64)
    # Unpipelined and persistent with K > 1: the dot's operand tile, fp32's own load layout and the
    # epilogue's buffers stay live beside the conversion scratch and H_K.
    unpiped = dataclasses.replace(k36, STAGES=1)
    assert tb.resource_estimate(unpiped, torch.bfloat16)["shared_bytes"] == 2 * 4 * k36.tile + 4 * 64 * 64
    assert tb.resource_estimate(unpiped, torch.float32)["shared_bytes"] == 3 * 4 * k36.tile + 4 * 64 * 64
    assert tb.resource_estimate(unpiped, torch.bfloat16, "patch_add_rmsnorm")["shared_bytes"] == (
        4 * 4 * k36.tile + 4 * 64 * 64)
    # One row per program (2304 = 36 x 64: H_64's operand leaves no registers for s): the conversion
    # scratch and H_36 only, no loop to pipeline.
    row = tb.launch_config(2304, 1, 132)
    assert not row.RESIDENT and row.STAGES == 1
    assert tb.resource_estimate(row, torch.float32)["shared_bytes"] == 4 * 4096 + 4 * 64 * 64


def test_row_block_loop_is_pipelined_where_its_buffers_fit_the_device():
    sm80, sm86 = gpu_limits.shared_memory_limit(SM80), gpu_limits.shared_memory_limit(SM86)
    # d = 5120 (20 x 256, padded to 32 x 256): s stays in registers and the loop is pipelined (before,
    # one block per program: load, compute and store in sequence, one program per multiprocessor).
    for dtype in (torch.bfloat16, torch.float32):
        for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
            c = tb.launch_config(5120, 16384, 132, dtype, op, sm80)
            assert c.RESIDENT and c.STAGES == 2
            assert tb.resource_estimate(c, dtype, op)["shared_bytes"] <= sm80
    # Where the pipeline's buffers would not fit, the same row block without them.
    for d, dtype, op in ((16384, torch.float32, "hadamard_patch"), (16384, torch.bfloat16, "patch_add_rmsnorm"),
                         (5120, torch.float32, "patch_add_rmsnorm")):
        piped = tb.launch_config(d, 16384, 84, dtype, op)
        assert piped.STAGES == 2 and tb.resource_estimate(piped, dtype, op)["shared_bytes"] > sm86
        c = tb.launch_config(d, 16384, 84, dtype, op, sm86)
        assert c.STAGES == 1 and c.BLOCK_M == piped.BLOCK_M and c.num_warps == piped.num_warps
        assert tb.resource_estimate(c, dtype, op)["shared_bytes"] <= sm86
        assert tb.unsupported_reason_for(dtype, d, SM86, op) is None
    # The add network (9216) is not pipelined.
    assert tb.launch_config(9216, 16384, 132).STAGES == 1


def test_resident_blocks_per_architecture():
    blocks = gpu_limits.resident_blocks
    assert blocks(SM90, 206, 256, 53_248) == 1      # 5120 patch: 206 registers -> 6,656 per warp, 9 warps
    assert blocks(SM90, 96, 128, 24_576) == 5       # 4096 patch: registers (3,072 per warp: 21 warps)
    assert blocks(SM90, 32, 128, 0) == 16           # 64 resident warps
    assert blocks(SM86, 32, 128, 0) == 12           # 48 resident warps on sm_86
    assert blocks(SM86, 16, 32, 0) == 16            # 16 resident blocks on sm_86
    assert blocks(SM90, 40, 128, 100_000) == 2      # shared memory: 233,472 // (100,000 + 1,024)
    assert blocks(SM86, 40, 128, 100_000) == 1      # 102,400 per SM
    assert blocks(SM80, 255, 512, 0) == 0           # 16 warps of 255 registers do not fit
    assert blocks((7, 5), 32, 128, 0) == 12         # unlisted: the smallest limits of the tables


def test_persistent_grid_follows_the_compiled_kernels_occupancy(fake_gpu, monkeypatch):
    monkeypatch.setattr(tb, "_sm_count", lambda index: 132)
    monkeypatch.setattr(tb, "_programs_per_sm", {})
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(16384, 5120))
    grid, config, key = tb._grid(x, 16384, 5120, "hadamard_patch")
    assert config.RESIDENT and grid == (132 * tb.PROGRAMS_PER_SM,)  # before the first launch
    # What the compiler made of this kernel for sm_90 (the AOT report): 206 registers, 53,248 B.
    tb._record_occupancy(key, SimpleNamespace(n_regs=206, metadata=SimpleNamespace(shared=53_248)), config)
    assert tb._grid(x, 16384, 5120, "hadamard_patch")[0] == (132,)
    # Recorded once per kernel: a later report does not change it.
    tb._record_occupancy(key, SimpleNamespace(n_regs=32, metadata=SimpleNamespace(shared=0)), config)
    assert tb._grid(x, 16384, 5120, "hadamard_patch")[0] == (132,)
    # Another op, another norm-weight dtype, another device: kernels of their own.
    assert tb._grid(x, 16384, 5120, "hadamard_transform")[0] == (132 * tb.PROGRAMS_PER_SM,)
    grid, config, key = tb._grid(x, 16384, 5120, "patch_add_rmsnorm", (torch.float32,))
    assert grid == (132 * tb.PROGRAMS_PER_SM,)
    tb._record_occupancy(key, SimpleNamespace(n_regs=96, metadata=SimpleNamespace(shared=24_576)), config)
    assert tb._grid(x, 16384, 5120, "patch_add_rmsnorm", (torch.float32,))[0] == (132 * 2,)  # 8 warps of 96
    assert tb._grid(x, 16384, 5120, "patch_add_rmsnorm", (torch.bfloat16,))[0] == (132 * tb.PROGRAMS_PER_SM,)
    other = SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.bfloat16, shape=(16384, 5120))
    assert tb._grid(other, 16384, 5120, "hadamard_patch")[0] == (132 * tb.PROGRAMS_PER_SM,)
    # Never more programs than row blocks; no record without the compiled kernel's numbers.
    assert tb._grid(x, 3, 5120, "hadamard_patch")[0] == (3,)
    grid, config, key = tb._grid(x, 16384, 4096, "hadamard_patch")
    tb._record_occupancy(key, None, config)
    assert key not in tb._programs_per_sm
    # The launch follows the device's architecture: 2304 = 36 x 64 is the add network on sm_80, the dot on sm_90.
    wide = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(16384, 2304))
    assert not tb._grid(wide, 16384, 2304, "hadamard_patch")[1].NETWORK
    fake_gpu["capability"] = SM80
    assert tb._grid(wide, 16384, 2304, "hadamard_patch")[1].NETWORK


# ---------------------------------------------------------------------------------------------
# What the backend accepts per architecture


@pytest.mark.parametrize("d", [8, 252, 576, 4096, 18432, 32256, 32768])
def test_interpreter_has_no_gpu_limits(d):
    assert tb.unsupported_reason_for(torch.float32, d, None) is None


def test_limits_per_architecture(monkeypatch):
    reason = tb.unsupported_reason_for
    for cap in (SM80, SM86, SM90):
        for d in (576, 2304, 4096, 5120, 6144, 16384):
            for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
                assert reason(torch.bfloat16, d, cap, op) is None
        assert "252 x 1: H_252 is padded to 256 x 256" in reason(torch.bfloat16, 252, cap)
        assert "H_252" in reason(torch.bfloat16, 32256, cap)
        # 36 x 512 and 20 x 1024: unpadded rows still over what a program holds in registers.
        assert "is 18432 values per row, more than the 16384" in reason(torch.bfloat16, 18432, cap)
        assert "is 20480 values per row, more than the 16384" in reason(torch.bfloat16, 20480, cap)
        # 36 x 256 (padded: 64 x 256, over the dot's 8192) runs unpadded with H_36 as an add network.
        for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
            assert reason(torch.bfloat16, 9216, cap, op) is None and reason(torch.float32, 9216, cap, op) is None
        assert "add network of 2016 adds per column" in reason(torch.bfloat16, 5376, cap)  # 84 x 64: 21 x 96
        assert "without spilling" in reason(torch.bfloat16, 32768, cap)
    assert "compute capability 8.0 or newer" in reason(torch.float16, 4096, (7, 5))
    assert "float64" in reason(torch.float64, 4096, SM90)
    # Shared memory per block is checked against the architecture's limit (here a made-up small one).
    monkeypatch.setitem(gpu_limits.SHARED_MEMORY_PER_BLOCK, SM86, 32768)
    assert reason(torch.bfloat16, 16384, SM86) == (
        "hidden size 16384 = 1 x 16384 needs 65536 bytes of shared memory per block, more than the 32768 of sm_86")
    assert reason(torch.bfloat16, 16384, SM80) is None


# ---------------------------------------------------------------------------------------------
# The automatic choice on GPU tensors (fake capability)


@pytest.mark.parametrize("capability", [SM80, SM86, SM90])
@pytest.mark.parametrize("d", [252, 18432, 32256, 32768])
def test_sizes_no_gpu_kernel_can_launch_route_to_a_backend_that_runs_them(fake_gpu, capability, d):
    fake_gpu["capability"] = capability
    x = cuda_input(d)
    for cuda_built in (True, False):
        fake_gpu["cuda_built"] = cuda_built
        name = select_backend(x).NAME
        assert name != "triton"
        chosen = backends.get_backend(name)
        assert chosen.unsupported_reason(x) is None
        # 252 = 252 x 1 is below the CUDA kernels' 8-wide rows, and 32256 and 32768 need 126 and 145 KiB
        # of shared memory per block, more than sm_86 has: the torch backend takes those.
        too_big = capability == SM86 and d in (32256, 32768)
        assert name == ("cuda" if cuda_built and d != 252 and not too_big else "torch")


def test_automatic_choice_follows_the_architecture(fake_gpu, monkeypatch):
    fake_gpu["cuda_built"] = False
    x = cuda_input(16384)
    assert select_backend(x).NAME == "triton"
    fake_gpu["capability"] = (7, 5)
    assert select_backend(x).NAME == "torch"
    fake_gpu["capability"] = SM86
    # One table for both backends (gpu_limits): 40 KiB still holds the CUDA kernels at 4096 (37,280 B).
    monkeypatch.setitem(gpu_limits.SHARED_MEMORY_PER_BLOCK, SM86, 40_960)
    assert select_backend(x).NAME == "torch"
    assert select_backend(cuda_input(4096)).NAME == "triton"
    fake_gpu["cuda_built"] = True
    assert select_backend(cuda_input(4096)).NAME == "cuda"


def test_forced_triton_says_why_before_launching(fake_gpu):
    with lp.use_backend("triton"):
        with pytest.raises(ValueError, match=r"backend 'triton' cannot run this input: hidden size 32768 = 1 x 32768 "
                                             r"is padded to 32768 values per row, more than the 16384"):
            select_backend(cuda_input(32768))
        with pytest.raises(ValueError, match=r"H_252 is padded to 256 x 256"):
            select_backend(cuda_input(252))
        assert select_backend(cuda_input(5120)).NAME == "triton"


# ---------------------------------------------------------------------------------------------
# The add network on the unpadded row (H_N on power-of-two groups of parts, H_K as +-1 adds)


def _all_ops_match_fp64(d, dtype, tol, rows=3):
    x = llm_like(rows, d, dtype, seed=3, device=DEVICE)
    s = positive_scales(d, device=DEVICE)
    w = (torch.rand(d, device=DEVICE) + 0.5).to(dtype)
    with lp.use_backend("triton"):
        y = lp.hadamard_patch(x, s)
        t = lp.hadamard_transform(x, 0.5)
        h, n = lp.patch_add_rmsnorm(x, x, s, w, eps=1e-6)
    h_ref = reference_patch(x.double() * 2, s)
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_err(y, reference_patch(x, s)) <= tol
    assert rel_err(t, reference_transform(x, 0.5)) <= tol
    assert rel_err(h, h_ref) <= tol and rel_err(n, n_ref) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_add_network_matches_fp64(dtype, tol):
    assert tb.launch_config(9216, 3).NETWORK  # 36 x 256 = 32 + 4 parts
    _all_ops_match_fp64(9216, dtype, tol)


# Every K the add network takes: the Paley orders up to MAX_K_NETWORK that are the K of some size
# (24 = 12 x 2 is never one), i.e. 12, 20, 28, 36, 44, 60.
NETWORK_KS = [k for k in range(4, tb.MAX_K_NETWORK + 1, 4) if hadamard_factors(k * 1024).k == k]


@triton.jit
def _h_k_network_kernel(x_ptr, y_ptr, K: tl.constexpr, N: tl.constexpr, SIGNS: tl.constexpr):
    nn = tl.arange(0, N)
    parts = ()
    for k in tl.static_range(K):
        parts = parts + (tl.load(x_ptr + k * N + nn)[None, :],)
    out = tb._h_k_network(parts, K, SIGNS)
    for k in tl.static_range(K):
        tl.store(y_ptr + k * N + nn[None, :], out[k])


def _h_k_times_by_network(x: torch.Tensor) -> torch.Tensor:
    """``H_K X`` of a (K, N) fp32 matrix by the add network alone."""
    y = torch.empty_like(x)
    _h_k_network_kernel[(1,)](x, y, K=x.shape[0], N=x.shape[1], SIGNS=tb._sign_table(x.shape[0]))
    return y


def test_network_takes_every_paley_order_up_to_its_limit():
    assert NETWORK_KS == [12, 20, 28, 36, 44, 60]


@pytest.mark.parametrize("k", NETWORK_KS)
def test_h_k_network_is_h_k_times_x(k):
    h_k = hadamard_factors(k).h_k
    # Integers: every sum is exact in fp32, so any wrong sign or sign pattern shows as a difference.
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-1000, 1001, (k, 8), generator=g, dtype=torch.float64)
    assert torch.equal(_h_k_times_by_network(x.float().to(DEVICE)).double().cpu(), h_k @ x)
    # Floats with outliers: each output is a sum of K rounded fp32 terms in some order, within the
    # bound of any such sum, (K - 1) u sum_j |X[j]| (u = 2**-24 the unit roundoff).
    x = llm_like(k, 8, torch.float32, seed=k) * torch.logspace(-3, 3, 8)
    err = (_h_k_times_by_network(x.to(DEVICE)).double().cpu() - h_k @ x.double()).abs()
    assert (err <= (k - 1) * 2.0**-24 * x.double().abs().sum(0)).all()


# K = 12, 20, 28, 36, 44, 60 (8+4, 16+4, 16+8+4, 32+4, 32+8+4, 32+16+8+4 parts), N from 1 to 16.
@pytest.mark.parametrize("d", [12, 24, 160, 112, 576, 176, 960])
def test_add_network_for_every_group_decomposition_of_k(monkeypatch, d):
    monkeypatch.setattr(tb, "MAX_TILE_DOT", 1)  # every K > 1 takes the add network
    assert tb.launch_config(d, 3).NETWORK
    _all_ops_match_fp64(d, torch.float32, 1e-5, rows=5)


# ---------------------------------------------------------------------------------------------
# Device guard


def test_device_guard_switches_only_to_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = tb.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(tb.device_guard(torch.device("cuda", 0)), torch.cuda.device)
    assert not isinstance(tb.device_guard(torch.device("cpu")), torch.cuda.device)


def test_launches_run_under_the_device_guard(monkeypatch):
    seen = []

    def recording_guard(device):
        seen.append(device)
        return tb.contextlib.nullcontext()

    monkeypatch.setattr(tb, "device_guard", recording_guard)
    x = llm_like(3, 64, device=DEVICE)
    s = positive_scales(64, device=DEVICE)
    with lp.use_backend("triton"):
        lp.hadamard_patch(x, s)
        lp.patch_add_rmsnorm(x, x, s, torch.ones(64, device=DEVICE))
    assert seen == [x.device, x.device]


def test_strided_input_is_read_afresh_on_every_call():
    """A transposed input is copied to unit stride per call; an in-place update between two calls
    must show in the second result (no input or copy of it may be cached)."""
    x = llm_like(64, 5, device=DEVICE).t()  # (5, 64) with stride (1, 5)
    s = positive_scales(64, device=DEVICE)
    with lp.use_backend("triton"):
        first = lp.hadamard_patch(x, s)
        x.mul_(-2.0)
        second = lp.hadamard_patch(x, s)
    assert rel_err(first, reference_patch(x / -2.0, s)) <= 1e-5
    assert rel_err(second, reference_patch(x, s)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Persistent rows: each program walks several row blocks (interpreter: 4 programs)


@pytest.mark.parametrize("d", [576, 4096])
def test_programs_walk_many_row_blocks(d):
    rows = 5 * tb.launch_config(d, 10**6).BLOCK_M + 3  # 6 blocks over 4 programs, the last one partial
    x = llm_like(rows, d, torch.bfloat16, seed=2, device=DEVICE)
    s = positive_scales(d, device=DEVICE)
    w = torch.rand(d, dtype=torch.bfloat16, device=DEVICE) + 0.5
    with lp.use_backend("triton"):
        y = lp.hadamard_patch(x, s)
        t = lp.hadamard_transform(x, 0.5)
        h, n = lp.patch_add_rmsnorm(x, x, s, w, eps=1e-6)
    assert rel_err(y, reference_patch(x, s)) <= 1e-2
    assert rel_err(t, reference_transform(x, 0.5)) <= 1e-2
    h_ref = reference_patch(x.double() * 2, s)
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


# ---------------------------------------------------------------------------------------------
# On a real GPU: the sizes no Triton kernel launches run elsewhere, and the backward keeps fp32 inside

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("d", [252, 5376, 18432, 20480, 32256, 32768])
def test_gpu_sizes_triton_refuses_run_on_the_automatic_choice(d):
    x = llm_like(3, d, torch.bfloat16, seed=d, device="cuda")
    s = positive_scales(d, device="cuda")
    w = torch.rand(d, device="cuda") + 0.5
    chosen = select_backend(x)
    assert chosen.NAME != "triton" and chosen.unsupported_reason(x) is None
    assert tb.unsupported_reason(x) is not None
    y = lp.hadamard_patch(x, s)
    h, n = lp.patch_add_rmsnorm(x, x, s, w, eps=1e-6)
    # The Kronecker-form fp64 reference: a dense H of 32768 would take gigabytes per call.
    h_ref = factored_patch_reference(x.double() * 2, s)
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_err(y, factored_patch_reference(x, s)) <= 1e-2
    assert rel_err(h, h_ref) <= 1e-2 and rel_err(n, n_ref) <= 1e-2


# 9216's add-network kernels take minutes to compile for a GPU; the add network's numbers are checked
# above (test_add_network_matches_fp64), the backward's fp32 contract here on the dot and K = 1 paths.
@needs_gpu
@pytest.mark.parametrize("d", [576, 4096, 5120])
def test_gpu_triton_backward_matches_fp64(d):
    x = llm_like(5, d, torch.bfloat16, seed=3, device="cuda").requires_grad_()
    s = positive_scales(d, device="cuda").requires_grad_()
    g = llm_like(5, d, torch.bfloat16, seed=4, device="cuda")
    with lp.use_backend("triton"):
        (lp.hadamard_patch(x, s).float() * g.float()).sum().backward()
    x64 = x.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    (reference_patch(x64, s64) * g.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and s.grad.dtype == torch.float32
    assert rel_err(x.grad, x64.grad) <= 1e-2
    assert rel_err(s.grad, s64.grad) <= 1e-3  # fp32 inside: no bf16 rounding before the product

"""benchmarks/sass_budget.py: parsing of ptxas logs and SASS, the executed-path counting and the
model, on small hand-written fixtures (the real build runs in CI: .ci/cuda_proofs.sh)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sass_budget", ROOT / "benchmarks" / "sass_budget.py")
sb = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sb
spec.loader.exec_module(sb)

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4rowsPKfPf' for 'sm_90'
ptxas info    : Function properties for _Z4rowsPKfPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5spillv' for 'sm_90'
ptxas info    : Function properties for _Z5spillv
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 0 barriers, 360 bytes cmem[0]
"""

# A persistent kernel: a prologue, then a row loop (0x0060 .. 0x0120) whose body loads one 16-byte
# vector per lane, shuffles once, goes through shared memory and stores one 16-byte vector per lane
# (bf16: 8 elements per lane, 256 per warp and iteration); the end-of-code trap loop is not a loop.
SASS = """\
	code for sm_90
		Function : _Z4rowsPKfPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                         /* 0x0000000000007919 */
        /*0020*/                   LDG.E.CONSTANT R2, desc[UR4][R2.64] ;      /* 0x0000000402027981 */
        /*0030*/                   STS [R0], R2 ;                             /* 0x0000000200007388 */
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;              /* 0x0000000000007b1d */
        /*0050*/               @P0 EXIT ;                                     /* 0x000000000000094d */
        /*0060*/                   LDG.E.128 R4, desc[UR4][R8.64] ;           /* 0x0000000408047981 */
        /*0070*/                   SHFL.BFLY PT, R12, R4, 0x1, 0x1f ;         /* 0x0c201f0004 */
        /*0080*/                   STS.128 [R0], R4 ;                         /* 0x0000000400007388 */
        /*0090*/                   LDS.64 R4, [R0+0x8] ;                      /* 0x0000080000047984 */
        /*00a0*/                   FADD R4, R4, R12 ;                         /* 0x0000000c04047221 */
        /*00b0*/              @!P1 BRA 0x90 ;                                 /* 0x0000000000008947 */
        /*00c0*/                   FMUL R5, R5, R12 ;                         /* 0x0000000c05057220 */
        /*00d0*/                   STG.E.128 desc[UR4][R10.64], R4 ;          /* 0x0000000410007986 */
        /*00e0*/                   NOP ;                                      /* 0x0000000000007918 */
        /*0120*/               @P2 BRA 0x60 ;                                 /* 0xfffffffc00cc2947 */
        /*0130*/                   EXIT ;                                     /* 0x000000000000794d */
        /*0140*/                   BRA 0x140;                                 /* 0xfffffffc00fc7947 */
		Function : _Z5spillv
        /*0000*/                   EXIT ;                                     /* 0x000000000000794d */
"""


def test_ptxas_log():
    res = sb.parse_ptxas(PTXAS_LOG)
    assert res["_Z4rowsPKfPf"] == sb.Resources(registers=40, spill_stores=0, spill_loads=0, stack=0, static_smem=1024)
    assert res["_Z5spillv"] == sb.Resources(registers=168, spill_stores=8, spill_loads=12, stack=16, static_smem=0)


def test_sass_parsing_and_widths():
    code = sb.parse_sass(SASS)
    assert set(code) == {"_Z4rowsPKfPf", "_Z5spillv"}
    rows = code["_Z4rowsPKfPf"]
    assert [i.address for i in rows][:3] == [0, 0x10, 0x20]
    assert rows[6].opcode == "LDG.E.128" and sb.access_width(rows[6].opcode) == 16
    assert sb.access_width("LDS.64") == 8 and sb.access_width("STS") == 4 and sb.access_width("LDG.E.U16") == 2
    assert [i.target for i in rows if i.base == "BRA"] == [0x90, 0x60, 0x140]
    # the inner loop and the row loop; the trap (a branch to itself) is not a loop
    assert sb.loops_of(rows) == [(0x60, 0x120), (0x90, 0xB0)]


def test_executed_path_splits_prologue_and_row_loop():
    path = sb.executed_path(sb.parse_sass(SASS)["_Z4rowsPKfPf"])
    assert path.has_row_loop and path.inner_loops == 1  # the inner loop is counted once: a lower bound
    # outside the loop: the 6 before it and the EXIT and trap after it, once per warp
    assert path.prologue.instructions == 8 and path.prologue.barriers == 1 and path.prologue.bytes("ldg") == 4
    body = path.body
    assert body.instructions == 9  # 0x60..0x120 without the NOP
    assert body.shuffles == 1 and body.memory["ldg"] == {16: 1} and body.memory["stg"] == {16: 1}
    assert body.memory["sts"] == {16: 1} and body.memory["lds"] == {8: 1}


def test_a_kernel_without_a_row_loop_is_all_body():
    text = SASS.replace("@P2 BRA 0x60", "@P2 BRA 0x130")  # forward: no row loop any more
    path = sb.executed_path(sb.parse_sass(text)["_Z4rowsPKfPf"])
    assert not path.has_row_loop and path.prologue.instructions == 0 and path.body.instructions == 17


def test_model_per_element_and_ratio():
    path = sb.executed_path(sb.parse_sass(SASS)["_Z4rowsPKfPf"])
    gpu = sb.GPUS["H200"]
    launch = dict(symbol="_Z4rowsPKfPf", grid=(264, 1, 1), block=(128, 1, 1), smem=4096)
    res = sb.Resources(registers=40, static_smem=1024)
    row = sb.model_row("hadamard_patch", "bfloat16", 4096, launch, res, path, gpu)
    pe = row["per_element"]
    # one 16-byte store per lane per iteration: 32 * 16 / 2 = 256 bf16 elements per warp iteration
    assert pe["instructions"] == pytest.approx(9 / 256, abs=1e-3)
    assert pe["ldg_bytes"] == 2 and pe["stg_bytes"] == 2 and pe["sts_bytes"] == 2 and pe["lds_bytes"] == 1
    elements = sb.ROWS * 4096
    copy = elements * 2 * 2 / gpu["copy_bytes_per_s"]
    assert row["copy_us"] == pytest.approx(copy * 1e6, rel=1e-3)
    assert row["bound"] == "hbm" and row["ratio"] == pytest.approx(1.0)  # read + write once = a copy
    assert row["smem"] == 5120 and row["lower_bound"]


def test_issue_bound_ratio():
    """Many instructions per element: the issue pipe sets the time."""
    path = sb.executed_path(sb.parse_sass(SASS)["_Z4rowsPKfPf"])
    path.body.instructions = 256 * 2  # 2 warp instructions per element
    row = sb.model_row("hadamard_patch", "bfloat16", 4096, dict(symbol="s", grid=(132, 1, 1), block=(128, 1, 1), smem=0),
                       sb.Resources(registers=32), path, sb.GPUS["H200"])
    gpu = sb.GPUS["H200"]
    issue = (sb.ROWS * 4096 * 2 + 132 * 4 * path.prologue.instructions) / (4 * gpu["sms"] * gpu["clock_hz"])
    copy = sb.ROWS * 4096 * 4 / gpu["copy_bytes_per_s"]
    assert row["bound"] == "issue" and row["ratio"] == pytest.approx(issue / copy, rel=1e-3)


def test_occupancy():
    gpu = sb.GPUS["H200"]
    assert sb.occupancy(32, 128, 0, gpu) == (16, 1.0)           # warps limit: 64 / 4
    assert sb.occupancy(168, 128, 0, gpu) == (3, 0.1875)        # 168 regs -> 5376 per warp -> 12 warps
    assert sb.occupancy(40, 128, 100_000, gpu)[0] == 2          # shared memory: 233472 // 101024


def test_check_gates():
    base = dict(gpu="H200", arch=90, op="hadamard_patch", dtype="bfloat16", d=4096, kernel="k", spill_bytes=0,
                smem=1000, ratio=1.05)
    assert sb.check([base], 1.10) == []
    assert "modelled 1.2" in sb.check([{**base, "ratio": 1.2}], 1.10)[0]
    assert sb.check([{**base, "ratio": 1.2}], 0) == []  # gate off
    assert sb.check([{**base, "ratio": 1.2, "d": 5120}], 1.10) == []  # only d = 4096, 8192
    assert "spills" in sb.check([{**base, "spill_bytes": 4}], 1.10)[0]
    assert "shared memory" in sb.check([{**base, "arch": 80, "gpu": "A100", "smem": 170_000}], 1.10)[0]
    assert "launch failed" not in sb.check([{**base, "error": "x"}], 1.10)[0] and sb.check([{**base, "error": "x"}], 1.10)
    # Global stores: 16-byte vectors only (nvcc once split kfast_kernel's into 4-byte STG.E).
    wide = {**base, "per_element": {"widths": {"ldg": [4, 16], "stg": [16]}}}
    assert sb.check([wide], 1.10) == []
    narrow = sb.check([{**wide, "per_element": {"widths": {"ldg": [16], "stg": [4, 16]}}}], 1.10)
    assert narrow == ["H200 hadamard_patch bfloat16 d=4096 k: global stores of 4 bytes (16-byte vectors expected)"]
    # K > 1: d = 576 and 5120 against the second threshold; a lower bound (inner loops counted once) fails.
    k_row = {**base, "d": 5120, "ratio": 1.4, "lower_bound": False}
    assert sb.check([k_row], 1.10, 1.50) == [] and sb.check([{**k_row, "d": 576}], 1.10, 1.50) == []
    assert "modelled 1.6" in sb.check([{**k_row, "ratio": 1.6}], 1.10, 1.50)[0]
    assert "modelled >=1.4" in sb.check([{**k_row, "lower_bound": True}], 1.10, 1.50)[0]
    assert sb.check([{**k_row, "ratio": 1.6}], 1.10, 0) == []  # gate off
    assert sb.check([{**k_row, "ratio": 1.6, "d": 960}], 1.10, 1.50) == []  # only d = 576, 5120


def test_short_kernel_names():
    text = ("void linearpatch_cuda::row_kernel<__nv_bfloat16, 12, (linearpatch_cuda::Op)1>"
            "(__nv_bfloat16 const*, __nv_bfloat16*, float const*, long, float, linearpatch_cuda::EpilogueOperands<__nv_bfloat16>)")
    assert sb.short_kernel_name(text) == "row_kernel<bf16,12,1>"

"""benchmarks/sass_sim.py: the SASS interpreter behind the speed model. Each integer instruction is
checked against its arithmetic written out in Python (64-bit pairs, carries, funnel shifts, LUTs),
control flow against hand-counted SIMT issue counts (reconvergence, per-lane loop trip counts, partial
warps), memory against hand-computed bytes, sectors, bank-conflict wavefronts and waits. The real
kernels are checked in CI (sass_budget --check: every simulated block stores its rows exactly once)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("linearpatch_sass_sim", ROOT / "benchmarks" / "sass_sim.py")
ss = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ss
spec.loader.exec_module(ss)

M32 = 0xFFFFFFFF


def program(*lines: str) -> list:
    """cuobjdump-style lines from instruction texts, at addresses 0x00, 0x10, ..."""
    text = "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))
    return ss.parse_function(text.splitlines())


def run(lines, threads=32, bank=None, row_loop=None, iterations=2, stream=(0,)):
    code = program(*lines)
    sim = ss.BlockSim(code, threads, 0, 1, bank or {}, row_loop, iterations=iterations, stream_tensors=stream,
                      record_stores=True)
    res = sim.run()
    return sim, res


def reg(sim, n):
    assert sim.Rk[n].all(), f"R{n} is not known on every lane"
    return sim.R[n].copy()


def test_operand_parsing():
    o = ss.parse_operand("desc[UR10][R24.64+0x400]")
    assert o.kind == "mem" and o.regs == (("r", 24, True, 1),) and o.offset == 0x400
    o = ss.parse_operand("[R6+UR4+-0x10]")
    assert o.regs == (("r", 6, False, 1), ("ur", 4, False, 1)) and o.offset == -0x10
    assert ss.parse_operand("c[0x0][0x228]").offset == 0x228 and ss.parse_operand("c[0x0][0x228]").kind == "c"
    assert ss.parse_operand("-0x33333333").n == (-0x33333333) & M32
    o = ss.parse_operand("-R34.reuse")
    assert o.kind == "r" and o.n == 34 and o.neg
    assert ss.parse_operand("!PT").kind == "p" and ss.parse_operand("!PT").neg
    assert ss.parse_operand("~R12").inv and ss.parse_operand("RZ").n == ss.RZ
    (ins,) = program("@!P0 LDG.E.128.CONSTANT R36, desc[UR10][R24.64+0x400]")
    assert ins.guard == ("p", 0, True) and ins.base == "LDG" and ins.ops[0].n == 36


def test_integer_arithmetic_matches_its_definition():
    sim, _ = run([
        "S2R R0, SR_TID.X",
        "IMAD R1, R0, 0x3, 0x7",                    # 3 t + 7
        "IADD3 R2, P0, R1, -0x5, RZ",               # 3 t + 2, carry out of a + (2**32 - 5)
        "MOV R3, 0xffffffff",
        "IADD3 R4, P1, R3, R0, RZ",                 # 2**32 - 1 + t: carry for t > 0
        "IADD3.X R5, RZ, RZ, RZ, P1, !PT",          # the carry
        "IMAD.WIDE.U32 R6, R3, R3, RZ",             # (2**32 - 1)**2 as a pair
        "IMAD.WIDE R8, R0, -0x2, RZ",               # -2 t sign-extended to 64 bits
        "IMAD.HI.U32 R10, R3, R0, RZ",              # high word of (2**32 - 1) t = t - 1 (t > 0)
        "IMAD.HI R11, R0, -0x33333333, R0",         # signed: hi(t * -858993459) + t
        "LEA R12, P2, R0, R3, 0x4",                 # (t << 4) + 2**32 - 1, carry
        "LEA.HI.X R13, R0, RZ, RZ, 0x4, P2",        # hi of t << 4 (0) + carry
        "SHF.L.U64.HI R14, R3, 0x4, R0",            # hi word of (t:2**32-1) << 4
        "SHF.R.U32.HI R15, RZ, 0x3, R0",            # t >> 3
        "MOV R16, 0x80000000",
        "SHF.R.S32.HI R17, RZ, 0x4, R16",           # arithmetic shift: 0xf8000000
        "LOP3.LUT R18, R0, 0x6, R1, 0x96, !PT",     # t ^ 6 ^ (3 t + 7)
        "LOP3.LUT P3, RZ, R0, 0x1, RZ, 0xc0, !PT",  # P3 = t & 1 != 0
        "SEL R19, R0, R1, P3",
        "HFMA2.MMA R20, -RZ, RZ, 0, 5.9604644775390625e-08",  # the constant 1 (fp16 bits 0x0001)
        "HFMA2.MMA R21, -RZ, RZ, 1.875, 0",          # 0x3f800000 (fp16 1.875 = 0x3f80)
        "PRMT R22, R0, 0x7632, R1",                 # high halves: (R1 >> 16) << 16 | t >> 16
        "VIADD R23, R0, 0x10",
        "EXIT",
    ])
    t = np.arange(32, dtype=np.int64)
    assert (reg(sim, 1) == 3 * t + 7).all()
    assert (reg(sim, 2) == 3 * t + 2).all() and sim.P[0].all()
    assert (reg(sim, 4) == (t - 1) & M32).all() and (reg(sim, 5) == (t > 0)).all()
    assert (reg(sim, 6) == 1).all() and (reg(sim, 7) == 0xFFFFFFFE).all()
    wide = [(-2 * int(x)) % (1 << 64) for x in t]
    assert reg(sim, 8).tolist() == [w & M32 for w in wide] and reg(sim, 9).tolist() == [w >> 32 for w in wide]
    assert (reg(sim, 10) == np.where(t > 0, t - 1, 0)).all()
    assert (reg(sim, 11) == (((t * -858993459) >> 32) + t) & M32).all()
    assert (reg(sim, 12) == ((t << 4) + M32) & M32).all() and (reg(sim, 13) == ((t << 4) + M32 > M32)).all()
    assert (reg(sim, 14) == ((t << 4) | (M32 >> 28)) & M32).all()
    assert (reg(sim, 15) == t >> 3).all() and (reg(sim, 17) == 0xF8000000).all()
    assert (reg(sim, 18) == t ^ 6 ^ (3 * t + 7)).all() and (sim.P[3] == (t & 1 == 1)).all()
    assert (reg(sim, 19) == np.where(t & 1, t, 3 * t + 7)).all()
    assert (reg(sim, 20) == 1).all() and (reg(sim, 21) == 0x3F800000).all()
    assert (reg(sim, 22) == (((3 * t + 7) >> 16) << 16) | (t >> 16)).all()
    assert (reg(sim, 23) == t + 16).all()


def test_64bit_compare_and_constants():
    # rows (int64 parameter at 0x228 on sm_90) compared with a 64-bit row index
    bank = {0x228: 5, 0x22C: 1, 0x0: 32, 0xC: 1}
    sim, _ = run([
        "S2R R0, SR_TID.X",
        "LDC.64 R2, c[0x0][0x228]",
        "MOV R4, RZ",                                   # hi word of t: 0
        "ISETP.GE.U32.AND P0, PT, R0, R2, PT",
        "ISETP.GE.AND.EX P0, PT, R4, R3, PT, P0",       # (0:t) >= (1:5): never
        "MOV R5, 0x1",
        "ISETP.GE.U32.AND P1, PT, R0, R2, PT",
        "ISETP.GE.AND.EX P1, PT, R5, R3, PT, P1",       # (1:t) >= (1:5): t >= 5
        "ULDC UR4, c[0x0][0x0]",
        "EXIT",
    ], bank=bank)
    t = np.arange(32)
    assert not sim.P[0].any() and (sim.P[1] == (t >= 5)).all()
    assert (sim.U[4] == 32).all() and sim.Uk[4].all()


def test_indexed_constant_bank():
    # LDC R2, c[0x0][RZ] is blockDim.x; c[0x0][R0+0x4] with R0 = 8 reads word 0xc (gridDim.x)
    sim, _ = run(["LDC R2, c[0x0][RZ]", "MOV R0, 0x8", "LDC R3, c[0x0][R0+0x4]", "EXIT"], bank={0x0: 128, 0xC: 528})
    assert (reg(sim, 2) == 128).all() and (reg(sim, 3) == 528).all()


def test_simt_issue_counts_if_else_and_loops():
    # if (t < 8) {2 instructions} else {3 instructions}; then a loop of t % 4 + 1 trips (3 instructions each)
    sim, res = run([
        "S2R R0, SR_TID.X",                        # 0x00
        "ISETP.GE.AND P0, PT, R0, 0x8, PT",        # 0x10
        "@P0 BRA 0x50",                            # 0x20
        "IADD3 R1, R0, 0x1, RZ",                   # 0x30 then-side
        "BRA 0x80",                                # 0x40
        "IADD3 R1, R0, 0x2, RZ",                   # 0x50 else-side
        "IADD3 R1, R1, 0x2, RZ",                   # 0x60
        "NOP",                                     # 0x70 (issued like any other)
        "LOP3.LUT R2, R0, 0x3, RZ, 0xc0, !PT",     # 0x80 join: trips - 1
        "IADD3 R2, R2, -0x1, RZ",                  # 0x90 loop body
        "ISETP.GE.AND P1, PT, R2, RZ, PT",         # 0xa0
        "@P1 BRA 0x90",                            # 0xb0
        "EXIT",                                    # 0xc0
    ], threads=64)
    # warp 0 (t = 0..31) and warp 1 (32..63): both take both sides of the if (8 lanes of warp 0 only!)
    counts = res.instructions[0]
    # warp 0: 3 + then-side (2) + else-side with the NOP (3) + the join (1) + 4 trips x 3 (the lanes
    # with t % 4 = 3 keep the warp in the loop) + EXIT
    assert counts[0] == 3 + 2 + 3 + 1 + 12 + 1
    # warp 1: no lane is < 8, so only the else-side
    assert counts[1] == 3 + 3 + 1 + 12 + 1
    assert res.unresolved == 0


def test_partial_round_guard_counts_only_the_warps_with_work():
    # kfast_kernel's partial rounds: item = t + 64 for t < 16 only (a guard on a compile-time count)
    sim, res = run([
        "S2R R0, SR_TID.X",
        "ISETP.GT.AND P0, PT, R0, 0xf, PT",
        "@P0 EXIT",
        "IADD3 R1, R0, 0x40, RZ",
        "IADD3 R1, R1, 0x40, RZ",
        "EXIT",
    ], threads=64)
    assert res.instructions[0].tolist() == [6, 3]


def test_global_bytes_sectors_stores_and_waits():
    bank = {0x210: 0, 0x214: 0x10, 0x218: 0, 0x21C: 0x20}  # x = 1 << 36, y = 2 << 36 (pointer bases)
    sim, res = run([
        "S2R R0, SR_TID.X",
        "LDC.64 R2, c[0x0][0x210]",
        "LDC.64 R4, c[0x0][0x218]",
        "IMAD.WIDE.U32 R6, R0, 0x10, R2",          # x + 16 t
        "IMAD.WIDE.U32 R8, R0, 0x10, R4",          # y + 16 t
        "LDG.E.128 R12, desc[UR4][R6.64]",
        "LDG.E.128 R16, desc[UR4][R6.64+0x200]",
        "FADD R20, R12, R13",                      # waits for the first load: 1 KiB in flight
        "FADD R21, R16, R20",                      # the second
        "STG.E.128 desc[UR4][R8.64], R12",
        "EXIT",
    ], bank=bank)
    assert res.global_bytes[(0, 0, "ld")] == 2 * 32 * 16 and res.global_sectors[(0, 0, "ld")] == 2 * 16
    assert res.global_bytes[(0, 1, "st")] == 512 and res.global_sectors[(0, 1, "st")] == 16
    assert res.store_widths == {16: 1}
    (a, b) = res.waits
    assert (a.pos, a.stream, a.reused, a.inflight) == (7, 5, -1, 1024)
    assert (b.pos, b.stream, b.inflight) == (8, 6, 512)
    stored = np.concatenate(res.stored[(0, 1)])
    assert sorted(stored.tolist()) == list(range(512))


def test_cp_async_groups_wait_at_depbar():
    # two groups of 16-byte cp.async copies; DEPBAR.LE SB0, 0x1 waits for the first group only, 0x0 for both
    bank = {0x210: 0, 0x214: 0x10}
    sim, res = run([
        "S2R R0, SR_TID.X",
        "LDC.64 R2, c[0x0][0x210]",
        "IMAD.WIDE.U32 R4, R0, 0x10, R2",
        "IMAD.SHL.U32 R6, R0, 0x10, RZ",
        "LDGSTS.E.BYPASS.128 [R6], desc[UR4][R4.64]",
        "LDGDEPBAR",
        "LDGSTS.E.BYPASS.128 [R6+0x200], desc[UR4][R4.64+0x200]",
        "LDGDEPBAR",
        "DEPBAR.LE SB0, 0x1",
        "DEPBAR.LE SB0, 0x0",
        "EXIT",
    ], bank=bank)
    assert res.global_bytes[(0, 0, "ld")] == 2 * 512 and res.smem_bytes[0, 0] == 2 * 512
    first, second = res.waits
    assert (first.pos, first.stream, first.inflight) == (8, 4, 1024) and (second.pos, second.stream) == (9, 6)


def test_shared_memory_bank_conflicts():
    # 4-byte accesses at stride 32 words: all 32 lanes in bank 0 -> 32 wavefronts; stride 1: one;
    # 16-byte accesses at stride 16 B: 4 wavefronts (quarter warps); at stride 32 B: 8.
    sim, res = run([
        "S2R R0, SR_TID.X",
        "IMAD.SHL.U32 R1, R0, 0x80, RZ",
        "STS [R1], R0",
        "IMAD.SHL.U32 R2, R0, 0x4, RZ",
        "STS [R2], R0",
        "IMAD.SHL.U32 R3, R0, 0x10, RZ",
        "LDS.128 R4, [R3]",
        "IMAD.SHL.U32 R8, R0, 0x20, RZ",
        "LDS.128 R4, [R8]",
        "EXIT",
    ])
    assert res.smem_wavefronts[0, 0] == 32 + 1 + 4 + 8
    assert res.smem_bytes[0, 0] == 32 * (4 + 4 + 16 + 16)


def test_row_loop_phases_and_prefetched_loads():
    # prologue (2 instructions), a row loop of 3 iterations (0x20..0x60); the load of the next row is
    # issued before the work and waited for at the top of the next iteration: a negative position
    bank = {0x210: 0, 0x214: 0x10}
    sim, res = run([
        "MOV R9, 0x3",                             # 0x00 prologue
        "LDG.E R10, desc[UR4][R2.64]",             # 0x10 first row's load (address unknown: streamed)
        "FADD R11, R10, R10",                      # 0x20 loop: uses the prefetched row
        "LDG.E R10, desc[UR4][R2.64]",             # 0x30 next row's
        "IADD3 R9, R9, -0x1, RZ",                  # 0x40
        "ISETP.NE.AND P0, PT, R9, RZ, PT",         # 0x50
        "@P0 BRA 0x20",                            # 0x60
        "EXIT",
    ], row_loop=(0x20, 0x60), iterations=2)
    assert res.instructions[0, 0] == 2 and res.instructions[1, 0] == 5 and res.instructions[2, 0] == 5
    first, second = [w for w in res.waits if w.phase in (1, 2)]
    assert (first.phase, first.pos, first.stream) == (1, 0, -1)   # issued 1 instruction before iteration 1
    assert (second.phase, second.pos, second.stream) == (2, 0, -4)  # issued at position 1 of iteration 1
    assert res.iterations == 2 and not res.finished or res.iterations == 2


def test_unknown_predicates_are_counted_not_guessed_wrong():
    sim, res = run([
        "FSETP.GT.AND P0, PT, R4, RZ, PT",   # a float compare: unknown
        "@P0 BRA 0x30",
        "NOP",
        "EXIT",
    ])
    assert res.unresolved == 1


def test_write_under_an_unknown_guard_makes_only_its_destination_unknown():
    # @P0 FMUL R31 with P0 unknown: R31 is unknown afterwards, R32 (a live address word) is not; an
    # unknown-guarded 128-bit load makes its 4 registers unknown, a guarded ISETP its predicate
    sim, _ = run([
        "S2R R0, SR_TID.X",
        "IADD3 R32, R0, 0x5, RZ",
        "IADD3 R40, R0, 0x6, RZ",
        "FSETP.GT.AND P0, PT, R4, RZ, PT",     # a float compare: unknown
        "@!P0 FMUL R31, R31, 4096",
        "@P0 LDS.128 R36, [R0]",
        "@P0 ISETP.GE.AND P1, PT, R0, 0x3, PT",
        "LDS R44, [0x10]",                     # an address that is an immediate alone
        "S2UR UR7, SR_SWINHI",                 # a generic shared pointer compared with null: known
        "ISETP.NE.AND P2, PT, RZ, UR7, PT",
        "EXIT",
    ])
    assert sim.Pk[2].all() and sim.P[2].all()
    t = np.arange(32)
    assert (reg(sim, 32) == t + 5).all() and (reg(sim, 40) == t + 6).all()
    assert not sim.Rk[31].any() and not sim.Rk[36:40].any() and not sim.Pk[1].any()
    assert not sim.Rk[44].any()


def test_sm80_generic_shared_pointer_compared_with_null_is_known():
    # sm_80 code of kfast_kernel's epilogue: (shared window + 0xf320) != null, the window's 64 bits read
    # from c[0x0][0x18]; the branch on it must resolve (it did not: 2-4 unresolved branches at 2304/5120)
    bank = ss.constant_bank_args(80, (256, 1, 1), (1, 1, 1), [], [])
    sim, res = run([
        "MOV R48, c[0x0][0x18]",
        "MOV R49, c[0x0][0x1c]",
        "ISETP.NE.U32.AND P0, PT, R48, -0xf320, PT",
        "ISETP.NE.AND.EX P0, PT, R49, -0x1, PT, P0",
        "@!P0 BRA 0x60",
        "MOV R2, 0x1",
        "EXIT",
    ], bank=bank)
    assert res.unresolved == 0 and not res.unresolved_at
    assert sim.Pk[0].all() and sim.P[0].all() and (reg(sim, 2) == 1).all()


def test_param_layout_and_constant_bank():
    types = ["__nv_bfloat16 const*", "__nv_bfloat16*", "float const*", "long", "float",
             "linearpatch_cuda::EpilogueOperands<__nv_bfloat16>"]
    layout = ss.param_layout(types)
    assert [p.offset for p in layout] == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    bank = ss.constant_bank_args(90, (128, 1, 1), (528, 1, 1), types, [None, None, None, 16384, None, None])
    assert bank[0x210 + 24] == 16384 and bank[0x210 + 28] == 0 and bank[0xC] == 528
    assert bank[0x210] | bank[0x214] << 32 == 1 << ss.POINTER_SHIFT
    assert bank[0x210 + 40] | bank[0x210 + 44] << 32 == 4 << ss.POINTER_SHIFT  # update: pointer 3
    assert ss.stream_tensor_indices(types) == (0, 3) and ss.output_tensor_indices(types) == (1, 4)
    assert ss.signature_types("void ns::k<float, 3>(float const*, long, ns::E<float>)") == ["float const*", "long", "ns::E<float>"]

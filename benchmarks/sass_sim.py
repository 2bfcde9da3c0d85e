"""Run the SASS of one thread block on concrete thread indices and kernel parameters, to count what
each warp executes on its own path.

The static count of ``sass_budget.py`` charges every instruction of a loop body to every warp. The
kernels are not like that: guards skip work items past the end of a partial round (kfast_kernel at
5120 gives 320 items to 256 threads), inactive rows skip their stores, loops have runtime trip counts
(a staging loop over blockDim.x). So this module executes the block:

* every thread's integer state (registers, uniform registers, predicates) is computed exactly from
  the special registers (thread and block index), the constant bank (launch shape and kernel
  parameters, pointers at distinct bases) and the instructions themselves; floating-point results
  and loaded data are *unknown* (they never decide control flow or addresses in these kernels: a
  branch on an unknown predicate is counted, taken as not taken and reported);
* SIMT: threads with the same program counter form a group; the group with the lowest program
  counter runs next (the usual reconvergence heuristic: the two sides of an if/else, and the lanes
  that leave a loop early, meet again at the higher address). One step of a group is one warp
  instruction issued by every warp that has a lane in it;
* memory: every global access is charged to the tensor its concrete address falls in (bytes and
  32-byte sectors), every shared-memory access is split into bank-conflict wavefronts from its
  concrete addresses; a read of a register whose global load has not been waited for yet is a
  memory *wait* (the scoreboard stall), recorded with the bytes that warp had in flight at the time.

The row loop (the outermost loop that stores to global memory, as in ``sass_budget``) splits the
counts into the prologue and its iterations; execution stops after ``iterations`` of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

M32 = 0xFFFFFFFF
RZ, URZ, PT = 255, 63, 7
SHARED_WINDOW_HI = 0x7FFF  # SR_SWINHI (see S2R below)
SECTOR = 32
POINTER_SHIFT = 36  # pointer parameter i points to (i + 1) << 36: the tensor of an address is addr >> 36
PARAM_BASE = {90: 0x210, 80: 0x160, 86: 0x160, 89: 0x160}  # kernel parameters in constant bank 0


class SimError(RuntimeError):
    """An instruction or operand the interpreter does not know, or an inconsistent state."""


# ------------------------------------------------------------------------------------------------
# Parsing

@dataclass
class Operand:
    kind: str            # r ur p up imm fimm c mem sr pr srz b
    n: int = 0           # register / predicate number, or immediate value
    neg: bool = False    # -x (integer or float negation) / !P
    inv: bool = False    # ~x (bitwise not)
    wide: bool = False   # R2.64 (a register pair)
    text: str = ""
    # memory: terms of the address
    regs: tuple = ()     # (kind, n, wide, scale)
    offset: int = 0
    bank: int = 0        # constant bank
    creg: tuple | None = None  # c[0x0][R+imm]: the register


@dataclass
class Ins:
    address: int
    opcode: str
    guard: tuple | None   # (kind 'p'|'up', n, negated)
    ops: list
    text: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def mods(self) -> list:
        return self.opcode.split(".")[1:]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9])\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")


def _reg(tok: str):
    """('r'|'ur'|'p'|'up', n) of a register or predicate name, else None."""
    if tok in ("RZ",):
        return "r", RZ
    if tok == "URZ":
        return "ur", URZ
    if tok == "PT":
        return "p", PT
    if tok == "UPT":
        return "up", PT
    m = re.fullmatch(r"(UR|R|UP|P)(\d+)", tok)
    if not m:
        return None
    return {"UR": "ur", "R": "r", "UP": "up", "P": "p"}[m.group(1)], int(m.group(2))


def _int(tok: str) -> int:
    neg = tok.startswith("-")
    v = int(tok.lstrip("-"), 16 if "0x" in tok else 10)
    return -v if neg else v


def parse_operand(text: str) -> Operand:
    t = text.strip().replace(".reuse", "")
    if t.startswith("desc[") or t.startswith("["):
        addr = t[t.rindex("[") + 1:-1] if t.startswith("desc[") else t[1:-1]
        regs, off = [], 0
        for term in [x.strip() for x in addr.split("+") if x.strip()]:
            neg = term.startswith("-")
            term = term.lstrip("-")
            parts = term.split(".")
            r = _reg(parts[0])
            if r:
                wide = "64" in parts[1:]
                scale = next((int(p[1:]) for p in parts[1:] if re.fullmatch(r"X\d+", p)), 1)
                regs.append((r[0], r[1], wide, scale))
            else:
                off += -_int(term) if neg else _int(term)
        return Operand("mem", regs=tuple(regs), offset=off, text=t)
    m = re.fullmatch(r"c\[(0x[0-9a-f]+)\]\[(.+)\]", t)
    if m:
        inner = m.group(2)
        creg, off = None, 0
        for term in inner.split("+"):
            r = _reg(term.strip().split(".")[0])
            if r:
                creg = r
            else:
                off += _int(term.strip())
        return Operand("c", bank=int(m.group(1), 16), offset=off, creg=creg, text=t)
    neg = inv = False
    absval = False
    if t.startswith("|") and t.endswith("|"):
        t, absval = t[1:-1], True
    while t and t[0] in "-!~":
        if t[0] == "~":
            inv = True
        else:
            neg = not neg
        t = t[1:]
    if t.startswith("|") and t.endswith("|"):
        t, absval = t[1:-1], True
    parts = t.split(".")
    r = _reg(parts[0])
    if r:
        return Operand(r[0], n=r[1], neg=neg, inv=inv, wide="64" in parts[1:], text=text.strip())
    if t.startswith("SR_") or t in ("SRZ",):
        return Operand("srz" if t == "SRZ" else "sr", text=t)
    if t == "PR":
        return Operand("pr", text=t)
    if re.fullmatch(r"B\d+", t):
        return Operand("b", n=int(t[1:]), text=t)
    if re.fullmatch(r"0x[0-9a-f]+|\d+", t) and not ("e" in t and "0x" not in t):
        v = _int(t)
        return Operand("imm", n=(-v if neg else v) & M32, inv=inv, text=text.strip())
    try:
        f = float(t.replace("+INF", "inf").replace("INF", "inf").replace("QNAN", "nan"))
        return Operand("fimm", n=0, text=("-" if neg else "") + t, neg=neg)
    except ValueError:
        return Operand("other", text=t)


def split_operands(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [o.strip() for o in out]


def parse_function(lines: list[str]) -> list[Ins]:
    code = []
    for line in lines:
        m = _LINE.search(line)
        if not m:
            continue
        guard = None
        if m.group(2):
            g = m.group(2)[1:]
            negated = g.startswith("!")
            r = _reg(g.lstrip("!"))
            guard = (r[0], r[1], negated)
        ops = [parse_operand(o) for o in split_operands(m.group(4))] if m.group(4).strip() else []
        code.append(Ins(int(m.group(1), 16), m.group(3), guard, ops, m.group(0)))
    return code


def parse_sass_functions(text: str) -> dict[str, list[Ins]]:
    out, current = {}, None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            current = out.setdefault(m.group(1), [])
            continue
        if current is not None and "/*" in line:
            current.extend(parse_function([line]))
    return out


# ------------------------------------------------------------------------------------------------
# Kernel parameters: the constant-bank layout of the C++ signature

_PARAM_SIZES = {"pointer": (8, 8), "long": (8, 8), "unsigned long": (8, 8), "long long": (8, 8), "int": (4, 4),
                "unsigned int": (4, 4), "float": (4, 4), "double": (8, 8), "bool": (1, 1)}


@dataclass
class Param:
    offset: int     # from the first parameter
    kind: str       # pointer, long, int, float, ...
    top: int        # index of the C++ parameter it belongs to
    const: bool     # a pointer to const (an input)
    field: int      # field index inside a struct parameter (0 otherwise)


def param_layout(types: list[str]) -> list[Param]:
    """Constant-bank layout of a kernel signature (C ABI alignment); ``EpilogueOperands<T>``
    (const T* update, T* normed, const float* weight, float eps) is expanded into its fields."""
    out, off = [], 0
    for top, t in enumerate(types):
        t = t.strip()
        if "EpilogueOperands" in t:
            fields = [("pointer", True), ("pointer", False), ("pointer", True), ("float", False)]
            off = (off + 7) // 8 * 8
        elif t.endswith("*"):
            fields = [("pointer", "const" in t)]
        else:
            fields = [(t, False)]
        for i, (kind, const) in enumerate(fields):
            if kind not in _PARAM_SIZES:
                raise SimError(f"parameter type {t!r} unknown")
            size, align = _PARAM_SIZES[kind]
            off = (off + align - 1) // align * align
            out.append(Param(off, kind, top, const, i))
            off += size
    return out


def signature_types(demangled: str) -> list[str]:
    """The parameter types of ``void ns::kernel<...>(A, B, C)``."""
    depth, start = 0, None
    for i, ch in enumerate(demangled):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            start = i
            break
    inner = demangled[start + 1:demangled.rindex(")")]
    out, depth, cur = [], 0, ""
    for ch in inner:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [o.strip() for o in out]


def constant_bank_args(arch: int, block: tuple, grid: tuple, types: list[str], args: list) -> dict[int, int]:
    """Constant bank 0 as 32-bit words: the launch shape (ntid at 0x0, nctaid at 0xc), on sm_80 the
    shared-memory window (0x18), then the parameters: pointer i (in layout order) = (i + 1) << POINTER_SHIFT, integers from ``args`` (one
    value per C++ parameter, None where unknown), floats unknown."""
    bank = {0x0: block[0], 0x4: block[1], 0x8: block[2], 0xC: grid[0], 0x10: grid[1], 0x14: grid[2]}
    if arch < 90:
        # the generic address of shared memory's window (sm_90 reads its high word from SR_SWINHI): the
        # kernels only compare generic shared-memory pointers with null, so any nonzero window does
        bank[0x18], bank[0x1C] = 0, SHARED_WINDOW_HI
    base = PARAM_BASE[arch]
    pointer = 0
    for p in param_layout(types):
        if p.kind == "pointer":
            v = (pointer + 1) << POINTER_SHIFT
            pointer += 1
        elif p.kind in ("float", "double"):
            continue
        else:
            v = args[p.top] if p.top < len(args) else None
            if v is None:
                continue
        bank[base + p.offset] = v & M32
        if _PARAM_SIZES[p.kind][0] == 8:
            bank[base + p.offset + 4] = (v >> 32) & M32
    return bank


def stream_tensor_indices(types: list[str]) -> tuple:
    """Pointer indices of the streamed inputs, read once per row: the kernel's first parameter (x) and
    the first field of EpilogueOperands (update). The other inputs (s, the norm weight, h_k) are read by
    every block: after the first touch they come from L2/L1."""
    pointers = [p for p in param_layout(types) if p.kind == "pointer"]
    return tuple(i for i, p in enumerate(pointers) if (p.top == 0) or (p.field == 0 and "EpilogueOperands" in types[p.top]))


def output_tensor_indices(types: list[str]) -> tuple:
    pointers = [p for p in param_layout(types) if p.kind == "pointer"]
    return tuple(i for i, p in enumerate(pointers) if not p.const)


# ------------------------------------------------------------------------------------------------
# Execution

def _sx(v):
    """Signed 32-bit view of uint32 values (int64 arrays)."""
    return np.where(v & 0x80000000, v - (1 << 32), v)


def _half_bits(text: str) -> int:
    f = float(text.replace("+INF", "inf").replace("INF", "inf").replace("QNAN", "nan"))
    return int(np.array([f], dtype=np.float16).view(np.uint16)[0])


@dataclass
class Wait:
    """A warp stalls at ``pos`` (its instruction count in the phase) until the global loads it waits
    for have arrived: the latest of them issued at ``stream`` (a streamed tensor, from DRAM) and at
    ``reused`` (a tensor every block reads: s, the norm weight; from L2/L1), -1 where none; the
    positions count from the phase's start and are negative for loads issued in an earlier phase
    (a prefetch). ``inflight``: the global bytes the warp had in flight then."""
    phase: int
    warp: int
    pos: int
    stream: int
    reused: int
    inflight: int
    address: int


@dataclass
class SimResult:
    warps: int
    phases: int                               # 0 = prologue, 1..: row-loop iterations, last: after the loop
    instructions: np.ndarray                  # [phase, warp]
    shuffles: np.ndarray
    barriers: np.ndarray
    smem_wavefronts: np.ndarray               # [phase, warp]
    smem_bytes: np.ndarray
    global_bytes: dict = field(default_factory=dict)    # (phase, tensor index, 'ld'|'st') -> bytes (active lanes x width)
    global_sectors: dict = field(default_factory=dict)  # same keys -> 32-byte sectors touched
    store_widths: dict = field(default_factory=dict)    # width -> count of warp store instructions
    waits: list = field(default_factory=list)
    barriers_at: list = field(default_factory=list)   # (phase, warp, pos) of every barrier
    first_store: dict = field(default_factory=dict)   # (phase, warp) -> pos of its first global store
    opcodes: dict = field(default_factory=dict)       # (phase, base opcode) -> instructions issued by warp 0
    mma: np.ndarray | None = None                     # [phase, warp] tensor-core instructions (HMMA)
    unresolved: int = 0                        # branches on unknown predicates (taken as not taken)
    unresolved_at: list = field(default_factory=list)  # their instructions, "address: text" (first 8)
    stored: dict = field(default_factory=dict)  # (phase, tensor) -> sorted unique byte offsets stored (for checks)
    iterations: int = 0                        # row-loop iterations executed (complete)
    finished: bool = False                     # the block ran to its end (not stopped after `iterations`)


class BlockSim:
    """One thread block of ``threads`` threads executing ``code`` (see the module docstring)."""

    INT_OPS = None

    def __init__(self, code: list[Ins], threads: int, block_idx: int, grid: int, bank: dict[int, int],
                 row_loop: tuple[int, int] | None, iterations: int = 2, record_stores: bool = False,
                 max_steps: int = 2_000_000, stream_tensors: tuple = (0,)):
        self.code = code
        self.index = {ins.address: i for i, ins in enumerate(code)}
        self.n = threads
        self.nw = (threads + 31) // 32
        self.block_idx, self.grid = block_idx, grid
        self.bank = bank
        self.row_loop = row_loop
        self.max_iterations = iterations
        self.record_stores = record_stores
        self.max_steps = max_steps
        n = threads
        self.R = np.zeros((256, n), dtype=np.int64)
        self.Rk = np.zeros((256, n), dtype=bool)
        self.Rk[RZ] = True
        self.U = np.zeros((64, n), dtype=np.int64)
        self.Uk = np.zeros((64, n), dtype=bool)
        self.Uk[URZ] = True
        self.P = np.zeros((8, n), dtype=bool)
        self.Pk = np.ones((8, n), dtype=bool)
        self.P[PT] = True
        self.UP = np.zeros((8, n), dtype=bool)
        self.UPk = np.ones((8, n), dtype=bool)
        self.UP[PT] = True
        self.tid = np.arange(n, dtype=np.int64)
        self.warp_of = self.tid // 32
        self.stream_tensors = set(stream_tensors)
        self.pending = [dict() for _ in range(self.nw)]   # register -> load sequence number
        self.pending_loads = [dict() for _ in range(self.nw)]  # sequence -> (bytes, absolute position, streamed)
        self.seq = 0
        self.async_open = [[] for _ in range(self.nw)]     # cp.async (LDGSTS) not yet committed: (bytes, pos, streamed)
        self.async_groups = [[] for _ in range(self.nw)]   # committed groups (LDGDEPBAR), oldest first
        self.pos = np.zeros(self.nw, dtype=np.int64)       # instructions issued so far, per warp
        self.phase_start = {}                              # (phase, warp) -> pos at the phase's first instruction
        self.exited = np.zeros(n, dtype=bool)

    # -- operand access ---------------------------------------------------------------------------
    def _get(self, o: Operand, wide: bool = False):
        """(values, known) of an operand, 32-bit (or 64-bit when ``wide`` / the operand is R.64)."""
        n = self.n
        if o.kind == "r":
            if o.wide or wide:
                hi = self.R[o.n + 1] if o.n != RZ else self.R[RZ]
                k = self.Rk[o.n] & (self.Rk[o.n + 1] if o.n != RZ else True)
                v = self.R[o.n].astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))
            else:
                v, k = self.R[o.n], self.Rk[o.n]
        elif o.kind == "ur":
            if o.wide or wide:
                hi = self.U[o.n + 1] if o.n != URZ else self.U[URZ]
                k = self.Uk[o.n] & (self.Uk[o.n + 1] if o.n != URZ else True)
                v = self.U[o.n].astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))
            else:
                v, k = self.U[o.n], self.Uk[o.n]
        elif o.kind == "imm":
            v, k = np.full(n, o.n, dtype=np.int64), np.ones(n, dtype=bool)
        elif o.kind == "c":
            if o.creg is not None and o.creg[1] not in (RZ, URZ):
                # c[bank][R + imm]: an indexed constant, lane by lane
                rv, rk = self._get(Operand(o.creg[0], n=o.creg[1]))
                words = [self.bank.get(int(o.offset + a)) for a in rv]
                ok = np.array([w is not None for w in words]) & rk
                v = np.array([w or 0 for w in words], dtype=np.int64)
                if wide:
                    hi = [self.bank.get(int(o.offset + a + 4)) for a in rv]
                    ok &= np.array([w is not None for w in hi])
                    v = v.astype(np.uint64) | (np.array([w or 0 for w in hi], dtype=np.uint64) << np.uint64(32))
                return v, ok
            lo = self.bank.get(o.offset)
            if wide:
                hi = self.bank.get(o.offset + 4)
                if lo is None or hi is None:
                    return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
                return np.full(n, lo | (hi << 32), dtype=np.uint64), np.ones(n, dtype=bool)
            if lo is None:
                return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
            v, k = np.full(n, lo, dtype=np.int64), np.ones(n, dtype=bool)
        elif o.kind == "srz":
            v, k = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
        else:
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        if v.dtype == np.uint64:
            if o.inv:
                v = ~v
            if o.neg and o.kind in ("r", "ur"):
                v = ~v + np.uint64(1)
            return v, k
        if o.inv:
            v = (~v) & M32
        if o.neg and o.kind in ("r", "ur"):
            v = (-v) & M32
        return v, k

    def _pred(self, o: Operand):
        if o.kind == "p":
            v, k = self.P[o.n], self.Pk[o.n]
        elif o.kind == "up":
            v, k = self.UP[o.n], self.UPk[o.n]
        else:
            raise SimError(f"predicate operand expected, got {o.text}")
        return (~v if o.neg else v), k

    def _set(self, o: Operand, v, k, m):
        """Write values ``v`` (known ``k``) to register operand ``o`` on the lanes ``m``."""
        if o.kind == "r":
            if o.n == RZ:
                return
            self.R[o.n][m] = v[m] & M32
            self.Rk[o.n][m] = k[m]
        elif o.kind == "ur":
            if o.n == URZ:
                return
            self.U[o.n][m] = v[m] & M32
            self.Uk[o.n][m] = k[m]
        else:
            raise SimError(f"register destination expected, got {o.text}")

    def _set64(self, o: Operand, v, k, m):
        v = v.astype(np.uint64)
        self._set(Operand(o.kind, n=o.n), (v & np.uint64(M32)).astype(np.int64), k, m)
        if o.n not in (RZ, URZ):
            self._set(Operand(o.kind, n=o.n + 1), (v >> np.uint64(32)).astype(np.int64), k, m)

    def _setp(self, o: Operand, v, k, m):
        if o.n == PT:
            return
        if o.kind == "p":
            self.P[o.n][m] = v[m]
            self.Pk[o.n][m] = k[m]
        elif o.kind == "up":
            self.UP[o.n][m] = v[m]
            self.UPk[o.n][m] = k[m]
        else:
            raise SimError(f"predicate destination expected, got {o.text}")

    def _unknown(self, o: Operand, m, count: int = 1):
        if o.kind in ("p", "up"):
            if o.n != PT:
                (self.Pk if o.kind == "p" else self.UPk)[o.n][m] = False
            return
        if o.kind not in ("r", "ur") or o.n in (RZ, URZ):
            return
        arr = self.Rk if o.kind == "r" else self.Uk
        for i in range(count):
            if o.n + i < (255 if o.kind == "r" else 63):
                arr[o.n + i][m] = False

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        nw = self.nw
        max_phase = self.max_iterations + 2
        res = SimResult(nw, max_phase, *(np.zeros((max_phase, nw), dtype=np.int64) for _ in range(3)),
                        np.zeros((max_phase, nw), dtype=np.int64), np.zeros((max_phase, nw), dtype=np.int64))
        res.mma = np.zeros((max_phase, nw), dtype=np.int64)
        self.res = res
        lo, hi = self.row_loop if self.row_loop else (None, None)
        # groups: [pc index, mask, phase, call stack]
        groups = [[0, np.ones(self.n, dtype=bool), 0, ()]]
        steps = 0
        while groups:
            steps += 1
            if steps > self.max_steps:
                raise SimError(f"more than {self.max_steps} steps (an endless loop?)")
            gi = min(range(len(groups)), key=lambda i: (groups[i][0], groups[i][2]))
            pc, mask, phase, stack = groups[gi]
            if pc >= len(self.code):
                raise SimError("ran past the end of the code")
            ins = self.code[pc]
            if lo is not None and phase == 0 and lo <= ins.address <= hi:
                phase = 1
            elif lo is not None and 1 <= phase <= self.max_iterations and ins.address > hi:
                phase = max_phase - 1
            warps = np.unique(self.warp_of[mask])
            for w in warps:
                self.phase_start.setdefault((phase, int(w)), int(self.pos[w]))
            res.instructions[phase, warps] += 1
            if ins.base in ("HMMA", "HGMMA", "IMMA"):
                res.mma[phase, warps] += 1
            if warps[0] == 0:
                key = (phase, ins.base)
                res.opcodes[key] = res.opcodes.get(key, 0) + 1
            self.phase = phase
            m = mask
            if ins.guard is not None:
                g = ins.guard
                pv, pk = (self.P if g[0] == "p" else self.UP)[g[1]], (self.Pk if g[0] == "p" else self.UPk)[g[1]]
                pv = ~pv if g[2] else pv
                if not pk[mask].all():
                    if ins.base in ("BRA", "EXIT"):
                        res.unresolved += 1
                        if len(res.unresolved_at) < 8:
                            res.unresolved_at.append(f"{ins.address:#06x}: {ins.text}")
                        pv = pv & pk  # unknown -> not taken / not executed
                    else:
                        # the write happens on unknown lanes or not: the result is unknown there
                        self._exec(ins, mask & pv & pk, phase, warps)
                        self.pos[warps] += 1
                        for o in self._dests(ins):
                            self._unknown(o, mask & ~pk, written_registers(ins, o))
                        groups[gi] = [pc + 1, mask, phase, stack]
                        self._merge(groups)
                        continue
                m = mask & pv
            base = ins.base
            if base in ("BRA", "JMP"):
                if ins.opcode.startswith("BRA.DIV"):
                    # taken when the warp is diverged: some live lane of a warp is not in this group
                    taken = np.zeros(self.n, dtype=bool)
                    live = self._live()
                    for w in warps:
                        sl = slice(32 * w, 32 * w + 32)
                        if (live[sl] & ~mask[sl]).any():
                            taken[sl] = mask[sl]
                    m = m & taken
                target = self.index.get(ins.ops[-1].n if ins.ops[-1].kind == "imm" else -1)
                if target is None:
                    raise SimError(f"branch target of {ins.text} not found")
                new_phase = phase
                if lo is not None and ins.address == hi and self.code[target].address == lo and m.any():
                    new_phase = phase + 1
                    if phase >= 1:
                        res.iterations = max(res.iterations, phase)
                rest = mask & ~m
                self.pos[warps] += 1
                groups.pop(gi)
                if m.any():
                    if new_phase <= self.max_iterations or new_phase == phase:
                        groups.append([target, m, new_phase, stack])
                if rest.any():
                    groups.append([pc + 1, rest, phase, stack])
                self._merge(groups)
                continue
            if base == "EXIT":
                self.pos[warps] += 1
                groups.pop(gi)
                self.exited = self.exited | m
                rest = mask & ~m
                if rest.any():
                    groups.append([pc + 1, rest, phase, stack])
                self._merge(groups)
                continue
            if base in ("CALL", "RET"):
                self.pos[warps] += 1
            if base == "CALL":
                target = self.index[ins.ops[-1].n]
                groups[gi] = [target, mask, phase, stack + (pc + 1,)]
                self._merge(groups)
                continue
            if base == "RET":
                groups[gi] = [stack[-1], mask, phase, stack[:-1]]
                self._merge(groups)
                continue
            self._exec(ins, m, phase, warps)
            self.pos[warps] += 1
            groups[gi] = [pc + 1, mask, phase, stack]
            self._merge(groups)
        res.finished = True
        return res

    def _live(self):
        return ~self.exited

    @staticmethod
    def _merge(groups):
        if len(groups) < 2:
            return
        seen = {}
        out = []
        for g in groups:
            key = (g[0], g[2], g[3])
            if key in seen:
                out[seen[key]][1] = out[seen[key]][1] | g[1]
            else:
                seen[key] = len(out)
                out.append([g[0], g[1].copy() if isinstance(g[1], np.ndarray) else g[1], g[2], g[3]])
        groups[:] = out

    def _dests(self, ins: Ins) -> list[Operand]:
        b = ins.base
        if b in ("STG", "STS", "ST", "STL", "BAR", "BRA", "EXIT", "BSSY", "BSYNC", "NOP", "WARPSYNC", "RED", "MEMBAR",
                 "DEPBAR", "LDGDEPBAR", "ENDCOLLECTIVE", "CCTL", "ERRBAR", "FENCE", "ATOMS") or not ins.ops:
            return []
        return [o for o in ins.ops[:1] if o.kind in ("r", "ur", "p", "up")]

    # -- memory waits ---------------------------------------------------------------------------------
    def _wait_check(self, ins: Ins, warps, phase):
        srcs = set()
        for o in ins.ops:
            if o.kind in ("r",) and o.n != RZ:
                srcs.add(o.n)
                if o.wide:
                    srcs.add(o.n + 1)
            elif o.kind == "mem":
                for kind, n, wide, _ in o.regs:
                    if kind == "r" and n != RZ:
                        srcs.add(n)
                        if wide:
                            srcs.add(n + 1)
        for w in warps:
            pend = self.pending[w]
            if not pend:
                continue
            hit = [pend[r] for r in srcs if r in pend]
            if not hit:
                continue
            upto = max(hit)
            loads = self.pending_loads[w]
            start = self.phase_start.get((phase, int(w)), int(self.pos[w]))
            awaited = [loads[q] for q in loads if q <= upto]
            stream = max((p for _, p, st in awaited if st), default=None)
            reused = max((p for _, p, st in awaited if not st), default=None)
            self.res.waits.append(Wait(phase, int(w), int(self.pos[w]) - start,
                                       -1 if stream is None else stream - start, -1 if reused is None else reused - start,
                                       int(sum(b for b, _, _ in loads.values())), ins.address))
            for r in [r for r, q in pend.items() if q <= upto]:
                del pend[r]
            for q in [q for q in loads if q <= upto]:
                del loads[q]

    def _address(self, o: Operand):
        """(addresses, known) of a memory operand."""
        v = np.full(self.n, o.offset & ((1 << 64) - 1), dtype=np.uint64)
        k = np.ones(self.n, dtype=bool)
        for kind, n, wide, scale in o.regs:
            rv, rk = self._get(Operand(kind, n=n, wide=wide))
            v = v + rv.astype(np.uint64) * np.uint64(scale)
            k = k & rk
        if not any(w for _, _, w, _ in o.regs):
            v = v & np.uint64(M32)  # a 32-bit (shared-memory) address
        return v.astype(np.int64), k

    @staticmethod
    def _global_operand(ins: Ins) -> Operand:
        """The global-memory operand (LDGSTS has a shared one first): desc[..][..] or a 64-bit address."""
        mems = [o for o in ins.ops if o.kind == "mem"]
        return next((o for o in mems if o.text.startswith("desc[") or any(w for _, _, w, _ in o.regs)), mems[-1])

    def _global(self, ins: Ins, m, phase, warps, store: bool):
        width = access_width(ins.opcode)
        mem = self._global_operand(ins)
        addr, known = self._address(mem)
        res = self.res
        lanes = m
        if not lanes.any():
            return
        if not known[lanes].all():
            tensor = -1
            nbytes = int(lanes.sum()) * width
            key = (phase, tensor, "st" if store else "ld")
            res.global_bytes[key] = res.global_bytes.get(key, 0) + nbytes
            res.global_sectors[key] = res.global_sectors.get(key, 0) + (nbytes + SECTOR - 1) // SECTOR
        else:
            a = addr[lanes]
            tensors = a >> POINTER_SHIFT
            for t in np.unique(tensors):
                sel = a[tensors == t]
                key = (phase, int(t) - 1, "st" if store else "ld")
                res.global_bytes[key] = res.global_bytes.get(key, 0) + int(sel.size) * width
                # sectors per warp instruction: distinct 32-byte sectors of each warp's lanes
                wl = self.warp_of[lanes][tensors == t]
                sectors = 0
                for w in np.unique(wl):
                    s = sel[wl == w]
                    first, last = s // SECTOR, (s + width - 1) // SECTOR
                    sectors += len(np.unique(np.concatenate([first, last])))
                res.global_sectors[key] = res.global_sectors.get(key, 0) + sectors
                if store and self.record_stores:
                    offs = (sel - (int(t) << POINTER_SHIFT))
                    rec = res.stored.setdefault((phase, int(t) - 1), [])
                    rec.append((offs[:, None] + np.arange(width)[None, :]).ravel())
        if store:
            res.store_widths[width] = res.store_widths.get(width, 0) + len(np.unique(self.warp_of[lanes]))
            for w in np.unique(self.warp_of[lanes]):
                res.first_store.setdefault((phase, int(w)), int(self.pos[w]) - self.phase_start.get((phase, int(w)), 0))

    def _shared(self, ins: Ins, m, phase, warps):
        width = access_width(ins.opcode)
        mem = next(o for o in ins.ops if o.kind == "mem")
        addr, known = self._address(mem)
        res = self.res
        for w in np.unique(self.warp_of[m]):
            sl = slice(32 * w, 32 * w + 32)
            lanes = np.nonzero(m[sl])[0]
            res.smem_bytes[phase, w] += len(lanes) * width
            if not known[sl][lanes].all():
                res.smem_wavefronts[phase, w] += max(1, (len(lanes) * width + 127) // 128)
                continue
            a = addr[sl][lanes]
            res.smem_wavefronts[phase, w] += bank_wavefronts(a, lanes, width)

    def _exec(self, ins: Ins, m, phase, warps):
        """Execute a non-control instruction on the lanes ``m`` (the group's, under its guard)."""
        res = self.res
        b = ins.base
        mods = ins.mods
        ops = ins.ops
        self._wait_check(ins, warps, phase)
        if b == "LDGDEPBAR":  # commit the open cp.async group
            for w in np.unique(self.warp_of[m]):
                self.async_groups[w].append(self.async_open[w])
                self.async_open[w] = []
            return
        if b == "DEPBAR":  # DEPBAR.LE SB0, n: wait until at most n committed cp.async groups are pending
            n = ins.ops[1].n if len(ins.ops) > 1 and ins.ops[1].kind == "imm" else 0
            for w in np.unique(self.warp_of[m]):
                groups = self.async_groups[w]
                done, self.async_groups[w] = groups[:max(0, len(groups) - n)], groups[max(0, len(groups) - n):]
                copies = [c for g in done for c in g]
                if copies:
                    start = self.phase_start.get((phase, int(w)), int(self.pos[w]))
                    stream = max((p for _, p, st in copies if st), default=None)
                    reused = max((p for _, p, st in copies if not st), default=None)
                    inflight = sum(c[0] for g in groups for c in g) + sum(b_ for b_, _, _ in self.pending_loads[w].values())
                    self.res.waits.append(Wait(phase, int(w), int(self.pos[w]) - start,
                                               -1 if stream is None else stream - start,
                                               -1 if reused is None else reused - start, int(inflight), ins.address))
            return
        if b in ("NOP", "BSSY", "BSYNC", "WARPSYNC", "ENDCOLLECTIVE", "MEMBAR", "ERRBAR", "CCTL", "FENCE",
                 "YIELD", "NANOSLEEP", "ARRIVES", "SYNCS", "BPT", "UCGABAR_ARV", "UCGABAR_WAIT", "ACQBULK"):
            return
        if b in ("BAR", "BARRIER"):
            for w in np.unique(self.warp_of[m]):
                res.barriers[phase, w] += 1
                res.barriers_at.append((phase, int(w), int(self.pos[w]) - self.phase_start.get((phase, int(w)), 0)))
            return
        if b == "SHFL":
            res.shuffles[phase, np.unique(self.warp_of[m])] += 1
            if ops[0].kind == "p":
                self._setp(ops[0], np.ones(self.n, dtype=bool), np.zeros(self.n, dtype=bool), m)
            self._unknown(ops[1], m)
            return
        if b in ("LDG", "LD", "LDGSTS"):
            self._global(ins, m, phase, warps, store=False)
            if b != "LDGSTS":
                regs = max(1, access_width(ins.opcode) // 4)
                self._unknown(ops[0], m, regs)
                mem = next(o for o in ops if o.kind == "mem")
                addr, known = self._address(mem)
                self.seq += 1
                for w in np.unique(self.warp_of[m]):
                    lanes = m & (self.warp_of == w)
                    streamed = (not known[lanes].all()) or bool(np.isin((addr[lanes] >> POINTER_SHIFT) - 1,
                                                                       list(self.stream_tensors)).any())
                    for i in range(regs):
                        if ops[0].n + i != RZ:
                            self.pending[w][ops[0].n + i] = self.seq
                    self.pending_loads[w][self.seq] = (int(lanes.sum()) * access_width(ins.opcode), int(self.pos[w]), streamed)
            else:  # cp.async: into shared memory, waited for by DEPBAR after its group is committed
                self._shared(ins, m, phase, warps)
                addr, known = self._address(self._global_operand(ins))
                for w in np.unique(self.warp_of[m]):
                    lanes = m & (self.warp_of == w)
                    streamed = (not known[lanes].all()) or bool(np.isin((addr[lanes] >> POINTER_SHIFT) - 1,
                                                                       list(self.stream_tensors)).any())
                    self.async_open[w].append((int(lanes.sum()) * access_width(ins.opcode), int(self.pos[w]), streamed))
            return
        if b in ("STG", "ST", "RED", "ATOMG"):
            self._global(ins, m, phase, warps, store=True)
            return
        if b in ("LDS", "STS", "LDSM", "ATOMS"):
            self._shared(ins, m, phase, warps)
            if b in ("LDS", "LDSM"):
                self._unknown(ops[0], m, written_registers(ins, ops[0]))
            return
        if b in ("LDC", "ULDC"):
            wide = "64" in mods
            v, k = self._get(ops[1], wide=wide)
            (self._set64 if wide else self._set)(ops[0], v, k, m)
            return
        if b in ("S2R", "S2UR", "CS2R"):
            sr = ops[1].text
            n = self.n
            if ops[1].kind == "srz":
                v, k = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
                if b == "CS2R" and "32" not in mods:
                    self._set64(ops[0], v, k, m)
                    return
            elif sr == "SR_TID.X":
                v, k = self.tid.copy(), np.ones(n, dtype=bool)
            elif sr in ("SR_TID.Y", "SR_TID.Z", "SR_CTAID.Y", "SR_CTAID.Z", "SR_CgaCtaId"):
                v, k = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
            elif sr == "SR_CTAID.X":
                v, k = np.full(n, self.block_idx, dtype=np.int64), np.ones(n, dtype=bool)
            elif sr == "SR_LANEID":
                v, k = self.tid % 32, np.ones(n, dtype=bool)
            elif sr == "SR_SWINHI":
                # the high word of the generic address of shared memory: any value but 0 and -1 does,
                # the kernels only compare generic shared-memory pointers with null
                v, k = np.full(n, SHARED_WINDOW_HI, dtype=np.int64), np.ones(n, dtype=bool)
            else:
                v, k = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
            self._set(ops[0], v, k, m)
            return
        if b in ("MOV", "UMOV"):
            v, k = self._get(ops[1])
            self._set(ops[0], v, k, m)
            return
        if b == "HFMA2" and len(ops) == 5 and ops[1].kind == "r" and ops[1].n == RZ and ops[2].kind == "r" and ops[2].n == RZ:
            # HFMA2.MMA Rd, -RZ, RZ, hi, lo: a constant (two fp16 halves)
            try:
                val = (_half_bits(ops[3].text) << 16) | _half_bits(ops[4].text)
            except ValueError:
                self._unknown(ops[0], m)
                return
            self._set(ops[0], np.full(self.n, val, dtype=np.int64), np.ones(self.n, dtype=bool), m)
            return
        fn = getattr(self, "_op_" + b, None)
        if fn is None:
            # floating point and everything else: the destination becomes unknown
            for o in self._dests(ins):
                if o.kind in ("p", "up"):
                    self._setp(o, np.zeros(self.n, dtype=bool), np.zeros(self.n, dtype=bool), m)
                else:
                    self._unknown(o, m, dest_registers(ins))
            # a second predicate destination (FSETP P0, P1, ...)
            if b.endswith("SETP") and len(ops) > 1 and ops[1].kind in ("p", "up"):
                self._setp(ops[1], np.zeros(self.n, dtype=bool), np.zeros(self.n, dtype=bool), m)
            return
        fn(ins, m)

    # -- integer instructions -------------------------------------------------------------------------
    def _srcs(self, ins, start):
        return [self._get(o) for o in ins.ops[start:]]

    def _op_IADD3(self, ins, m):
        ops = ins.ops
        dest = ops[0]
        i = 1
        carries = []
        while i < len(ops) and ops[i].kind in ("p", "up"):
            carries.append(ops[i])
            i += 1
        vals = ops[i:i + 3]
        extra = ops[i + 3:]
        (a, ka), (b_, kb), (c, kc) = (self._get(o) for o in vals)
        s = a + b_ + c
        k = ka & kb & kc
        if "X" in ins.mods:
            for p in extra:
                pv, pk = self._pred(p)
                s = s + pv.astype(np.int64)
                k = k & pk
            self._set(dest, s, k, m)
            return
        self._set(dest, s, k, m)
        # carry out: P = (a + b + c) >> 32 (up to 2, in two predicates)
        if carries:
            carry = s >> 32
            self._setp(carries[0], (carry & 1).astype(bool) | (carry >= 2), k, m)
            if len(carries) > 1:
                self._setp(carries[1], carry >= 2, k, m)

    _op_UIADD3 = _op_IADD3

    def _op_VIADD(self, ins, m):
        (a, ka), (b_, kb) = self._get(ins.ops[1]), self._get(ins.ops[2])
        self._set(ins.ops[0], a + b_, ka & kb, m)

    def _op_IABS(self, ins, m):
        a, k = self._get(ins.ops[1])
        self._set(ins.ops[0], np.abs(_sx(a)), k, m)

    def _minmax(self, ins, m):
        ops = ins.ops
        (a, ka), (b_, kb) = self._get(ops[1]), self._get(ops[2])
        p, pk = self._pred(ops[3]) if len(ops) > 3 and ops[3].kind in ("p", "up") else (None, None)
        unsigned = "U32" in ins.mods
        x, y = (a, b_) if unsigned else (_sx(a), _sx(b_))
        if "MAX" in ins.opcode or (p is not None and False):
            r = np.maximum(x, y)
        else:
            r = np.minimum(x, y)
        if p is not None and ins.base in ("IMNMX", "UIMNMX"):
            r = np.where(p, np.minimum(x, y), np.maximum(x, y))
            ka = ka & pk
        self._set(ops[0], r, ka & kb, m)

    _op_IMNMX = _op_VIMNMX = _op_UIMNMX = _minmax

    def _op_IMAD(self, ins, m):
        ops, mods = ins.ops, ins.mods
        dest = ops[0]
        i = 1
        carry_out = None
        if ops[i].kind in ("p", "up"):
            carry_out = ops[i]
            i += 1
        a_o, b_o, c_o = ops[i], ops[i + 1], ops[i + 2]
        extra = ops[i + 3:]
        unsigned = "U32" in mods
        if "WIDE" in mods:
            (a, ka), (b_, kb) = self._get(a_o), self._get(b_o)
            c, kc = self._get(c_o, wide=True)
            if unsigned:
                prod = a.astype(np.uint64) * b_.astype(np.uint64)
            else:
                prod = (_sx(a) * _sx(b_)).view(np.uint64)
            self._set64(dest, prod + c.astype(np.uint64), ka & kb & kc, m)
            return
        (a, ka), (b_, kb), (c, kc) = self._get(a_o), self._get(b_o), self._get(c_o)
        k = ka & kb & kc
        r = _mul_hi(a, b_, not unsigned) + c if "HI" in mods else ((a * b_) & M32) + c
        self._store_sum(dest, r, k, m, extra if "X" in mods else (), carry_out)

    def _store_sum(self, dest, r, k, m, carries_in, carry_out) -> None:
        """The tail of the integer adds (IMAD, LEA): ``r`` plus the carry-in predicates (``.X``) into
        ``dest``, the carry out of bit 31 into ``carry_out`` (a predicate, or None)."""
        for p in carries_in:
            pv, pk = self._pred(p)
            r = r + pv.astype(np.int64)
            k = k & pk
        self._set(dest, r, k, m)
        if carry_out is not None:
            self._setp(carry_out, (r >> 32) > 0, k, m)

    _op_UIMAD = _op_IMAD

    def _op_LEA(self, ins, m):
        ops, mods = ins.ops, ins.mods
        dest = ops[0]
        i = 1
        carry_out = None
        if ops[i].kind in ("p", "up"):
            carry_out = ops[i]
            i += 1
        rest = ops[i:]
        preds = [o for o in rest if o.kind in ("p", "up")]
        vals = [o for o in rest if o.kind not in ("p", "up")]
        shift = vals[-1].n
        if "HI" in mods:
            if "SX32" in mods:
                (a, ka), (b_, kb) = self._get(vals[0]), self._get(vals[1])
                hi = (_sx(a) >> (32 - shift)) & M32 if shift else (np.where(a & 0x80000000, M32, 0))
                r = hi + b_
                k = ka & kb
            else:
                (a, ka), (b_, kb), (c, kc) = self._get(vals[0]), self._get(vals[1]), self._get(vals[2])
                hi = ((a >> (32 - shift)) | (c << shift)) & M32 if shift else c
                r = hi + b_
                k = ka & kb & kc
        else:
            (a, ka), (b_, kb) = self._get(vals[0]), self._get(vals[1])
            r = ((a << shift) & M32) + b_
            k = ka & kb
        self._store_sum(dest, r, k, m, preds if "X" in mods else (), carry_out)

    _op_ULEA = _op_LEA

    def _op_LOP3(self, ins, m):
        ops = ins.ops
        i = 0
        pout = None
        if ops[0].kind in ("p", "up"):
            pout = ops[0]
            i = 1
        dest = ops[i]
        (a, ka), (b_, kb), (c, kc) = (self._get(o) for o in ops[i + 1:i + 4])
        lut = ops[i + 4].n
        r = np.zeros(self.n, dtype=np.int64)
        for bit in range(8):
            if lut >> bit & 1:
                term = (a if bit & 4 else ~a) & (b_ if bit & 2 else ~b_) & (c if bit & 1 else ~c)
                r |= term
        r &= M32
        k = ka & kb & kc
        self._set(dest, r, k, m)
        if pout is not None:
            self._setp(pout, r != 0, k, m)

    _op_ULOP3 = _op_LOP3

    def _op_PLOP3(self, ins, m):
        ops = ins.ops
        d1, d2 = ops[0], ops[1]
        (a, ka), (b_, kb), (c, kc) = (self._pred(o) for o in ops[2:5])
        lut1, lut2 = ops[5].n, ops[6].n
        k = ka & kb & kc
        for d, lut in ((d1, lut1), (d2, lut2)):
            r = np.zeros(self.n, dtype=bool)
            for bit in range(8):
                if lut >> bit & 1:
                    r |= (a if bit & 4 else ~a) & (b_ if bit & 2 else ~b_) & (c if bit & 1 else ~c)
            self._setp(d, r, k, m)

    _op_UPLOP3 = _op_PLOP3

    def _op_SHF(self, ins, m):
        ops, mods = ins.ops, ins.mods
        (lo, kl), (s, ks), (hi, kh) = self._get(ops[1]), self._get(ops[2]), self._get(ops[3])
        k = kl & ks & kh
        wrap = "W" in mods
        s = (s & 31) if wrap else np.minimum(s & M32, 32 if ("U32" in mods or "S32" in mods) else 64)
        full = lo.astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))
        if "L" in mods:
            sh = _shift64(full, s, np.left_shift)
        elif "S32" in mods or "S64" in mods:
            sh = _sar64(full, s)
        else:
            sh = _shift64(full, s, np.right_shift)
        r = (sh >> np.uint64(32)) if "HI" in mods else (sh & np.uint64(M32))
        self._set(ops[0], r.astype(np.int64), k, m)

    _op_USHF = _op_SHF

    def _op_SEL(self, ins, m):
        ops = ins.ops
        (a, ka), (b_, kb) = self._get(ops[1]), self._get(ops[2])
        p, pk = self._pred(ops[3])
        self._set(ops[0], np.where(p, a, b_), np.where(p, ka, kb) & pk, m)

    _op_USEL = _op_SEL

    def _op_ISETP(self, ins, m):
        ops, mods = ins.ops, ins.mods
        d1, d2 = ops[0], ops[1]
        (a, ka), (b_, kb) = self._get(ops[2]), self._get(ops[3])
        c, kc = self._pred(ops[4])
        k = ka & kb & kc
        unsigned = "U32" in mods
        x, y = (a, b_) if unsigned else (_sx(a), _sx(b_))
        cmp = next(c_ for c_ in ("LT", "LE", "GT", "GE", "EQ", "NE") if c_ in mods)
        if "EX" in mods:
            ex, kex = self._pred(ops[5])
            k = k & kex
            r = {"LT": (x < y) | ((x == y) & ex), "LE": (x < y) | ((x == y) & ex), "GT": (x > y) | ((x == y) & ex),
                 "GE": (x > y) | ((x == y) & ex), "EQ": (x == y) & ex, "NE": (x != y) | ex}[cmp]
        else:
            r = {"LT": x < y, "LE": x <= y, "GT": x > y, "GE": x >= y, "EQ": x == y, "NE": x != y}[cmp]
        op = next(o for o in ("AND", "OR", "XOR") if o in mods)
        comb = {"AND": lambda p, q: p & q, "OR": lambda p, q: p | q, "XOR": lambda p, q: p ^ q}[op]
        self._setp(d1, comb(r, c), k, m)
        self._setp(d2, comb(~r, c), k, m)

    _op_UISETP = _op_ISETP

    def _op_PRMT(self, ins, m):
        ops = ins.ops
        (a, ka), (sel, ks), (b_, kb) = self._get(ops[1]), self._get(ops[2]), self._get(ops[3])
        k = ka & kb & ks
        if not k[m].all():
            self._set(ops[0], a, k, m)
            return
        r = np.zeros(self.n, dtype=np.int64)
        both = (b_ << 32) | a
        for i in range(4):
            nib = (sel >> (4 * i)) & 0xF
            byte = (both >> (8 * (nib & 7))) & 0xFF
            byte = np.where(nib & 8, np.where(byte & 0x80, 0xFF, 0), byte)
            r |= byte << (8 * i)
        self._set(ops[0], r, k, m)

    _op_UPRMT = _op_PRMT

    def _op_P2R(self, ins, m):
        ops = ins.ops
        (a, ka), mask_ = self._get(ops[2]), ops[3].n
        r = a.copy()
        k = ka.copy()
        for i in range(7):
            if mask_ >> i & 1:
                r = (r & ~(1 << i)) | (self.P[i].astype(np.int64) << i)
                k = k & self.Pk[i]
        self._set(ops[0], r, k, m)

    def _op_R2P(self, ins, m):
        ops = ins.ops
        a, ka = self._get(ops[1])
        mask_ = ops[2].n
        for i in range(7):
            if mask_ >> i & 1:
                self._setp(Operand("p", n=i), (a >> i & 1).astype(bool), ka, m)

    def _op_VOTEU(self, ins, m):
        # VOTEU.ANY URd, Pin  /  VOTEU.ANY UPd, Pin: the ballot of the active lanes, per warp
        ops = ins.ops
        p, pk = self._pred(ops[-1])
        res = np.zeros(self.n, dtype=np.int64)
        anyv = np.zeros(self.n, dtype=bool)
        for w in np.unique(self.warp_of[m]):
            sl = slice(32 * w, 32 * w + 32)
            bits = (m[sl] & p[sl]).astype(np.int64) << np.arange(len(m[sl]))
            res[sl] = bits.sum()
            anyv[sl] = (m[sl] & p[sl]).any()
        if ops[0].kind in ("up", "p"):
            self._setp(ops[0], anyv, np.ones(self.n, dtype=bool), m)
        else:
            self._set(ops[0], res, np.ones(self.n, dtype=bool), m)

    _op_VOTE = _op_VOTEU

    def _op_FLO(self, ins, m):
        a, k = self._get(ins.ops[-1])
        r = np.array([(int(x).bit_length() - 1) & M32 for x in a], dtype=np.int64)
        self._set(ins.ops[0], r, k, m)

    _op_UFLO = _op_FLO

    def _op_POPC(self, ins, m):
        a, k = self._get(ins.ops[-1])
        r = np.array([bin(int(x)).count("1") for x in a], dtype=np.int64)
        self._set(ins.ops[0], r, k, m)

    _op_UPOPC = _op_POPC

    def _op_R2UR(self, ins, m):
        v, k = self._get(ins.ops[1])
        # uniform: every lane takes the value of the first active lane
        self._set(ins.ops[0], v, k, m)


def _mul_hi(a, b, signed):
    """High 32 bits of the 64-bit product of 32-bit values (uint32 held in int64 arrays)."""
    if signed:
        return ((_sx(a) * _sx(b)) >> 32) & M32  # |product| < 2**62: exact in int64
    return ((a.astype(np.uint64) * b.astype(np.uint64)) >> np.uint64(32)).astype(np.int64)


def _shift64(full, s, shift):
    """(uint64 full) shifted by s (``np.left_shift`` or ``np.right_shift``), 0 for s >= 64."""
    out = np.zeros(len(full), dtype=np.uint64)
    ok = s < 64
    if ok.any():
        out[ok] = shift(full[ok], s[ok].astype(np.uint64))
    return out


def _sar64(full, s):
    return (full.view(np.int64) >> np.minimum(s, 63)).view(np.uint64)


def access_width(opcode: str) -> int:
    """Bytes per thread of a load/store: .128/.64 vectors, .U16/.S16, .U8/.S8, else 32 bits."""
    mods = opcode.split(".")[1:]
    for mo, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mo in mods:
            return width
    return 4


def written_registers(ins: Ins, o: Operand) -> int:
    """Consecutive registers from ``o`` (a destination of ``ins``) that ``ins`` writes."""
    if ins.base == "LDSM":  # ldmatrix .x1/.x2/.x4: one register per 8 x 8 matrix
        return int(ins.mods[-1]) if ins.mods and ins.mods[-1] in ("2", "4") else 1
    if ins.base in ("LDG", "LDS", "LD", "LDL", "LDC", "ULDC"):
        return max(1, access_width(ins.opcode) // 4)
    if o.wide:
        return 2
    return dest_registers(ins)


def dest_registers(ins: Ins) -> int:
    """Registers written by an instruction the interpreter does not evaluate (its destination is unknown)."""
    b, mods = ins.base, ins.mods
    if b in ("HMMA", "IMMA", "DMMA", "HGMMA"):
        return 4
    if "64" in mods or b in ("DADD", "DMUL", "DFMA", "F2F") and "F64" in ins.opcode:
        return 2
    if "128" in mods:
        return 4
    return 1


def bank_wavefronts(addr: np.ndarray, lanes: np.ndarray, width: int) -> int:
    """Shared-memory wavefronts of one warp access: the warp is served in phases of 32 / (width / 4)
    lanes (quarter warps for 16 bytes, half warps for 8); in each phase, the most distinct 4-byte
    words any of the 32 banks must deliver (the same word to several lanes is one broadcast)."""
    words_per_lane = max(1, width // 4)
    lanes_per_phase = 32 // words_per_lane
    total = 0
    for ph in range(words_per_lane):
        sel = (lanes >= ph * lanes_per_phase) & (lanes < (ph + 1) * lanes_per_phase)
        if not sel.any():
            continue
        a = addr[sel]
        words = np.unique(((a[:, None] // 4) + np.arange(words_per_lane)[None, :]).ravel())
        banks = words % 32
        total += int(np.bincount(banks, minlength=32).max())
    return total

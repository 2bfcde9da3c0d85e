"""Static performance budget of the CUDA kernels, from the compiled code (no GPU needed).

1. Build every kernel file of csrc/ for sm_90 and sm_80 with nvcc (``-cubin``, the extension's
   flags), keep the ``ptxas -v`` log (registers, spill bytes, stack, static shared memory) and the
   SASS (``cuobjdump -sass``; cuobjdump ships in the triton wheel when the toolkit lacks it).
2. Ask the launchers which kernel, grid, block and dynamic shared memory each (op, dtype, d) gets:
   the real launch code runs in the CUDA emulator (csrc/emulation/) in a dry run, which records
   the launches without executing them.
3. Count, on the path a row actually executes, warp instructions, shuffles, shared-memory and global
   loads/stores with their widths, per element. How loops are counted: a backward branch marks a
   loop (its address range). The outermost loop that stores to global memory is the row loop of a
   persistent kernel; its body is one iteration, the code outside it (staging s, setup) runs once per
   warp. A kernel without such a loop runs its whole body once per warp. Elements per iteration =
   global store bytes of the body x 32 lanes / (element size x outputs): the stores of each output
   element happen exactly once, so this normalisation also holds when the compiler duplicates a path.
   Loops nested inside the counted body have trip counts the SASS does not state; they are counted
   once and the row is marked as a lower bound (">=").
4. A simple model per GPU (constants below, with sources): the time of a 16,384-row tensor on each
   pipe (issue, shuffle, shared memory, HBM), the modelled time is the largest, given as a multiple
   of a device-to-device copy of the tensor (read + write). Latency is not modelled: the occupancy
   column says whether enough warps are resident to hide it. Bank conflicts are not modelled.

``--check`` exits 1 if the bf16 or fp16 patch at d = 4096 or 8192 models above ``--max-ratio``
(default 1.10) x copy on H200, or at the K > 1 sizes d = 576 and 5120 above ``--max-ratio-k``
(default 1.50; a lower bound there fails too), if any kernel spills, if a launch's shared memory
exceeds its architecture's per-block limit (sm_80 166,912 B, sm_90 232,448 B), or if a row's path
stores to global memory in anything narrower than 16-byte vectors. ``--max-ratio 0`` /
``--max-ratio-k 0`` turn a ratio gate off (the spill and shared-memory gates stay).

    python benchmarks/sass_budget.py [--arch 90 --arch 80] [--json PATH] [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ROWS = 16384  # the modelled tensor: 16,384 rows (a prefill batch)
# The extension's nvcc flags (setup.py / torch's cpp_extension), for sm_XX only.
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DUSE_CUDA", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

# ------------------------------------------------------------------------------------------------
# Machine constants and their sources.
#  * issue: 4 warp schedulers per SM, each issues one warp instruction per clock (NVIDIA A100 and
#    H100 architecture whitepapers: 4 processing blocks per SM, one dispatch per clock each).
#  * shuffle: 32 results per clock per SM for warp shuffle (CUDA C++ Programming Guide, table
#    "Throughput of Native Arithmetic Instructions", compute capability 8.0 and 9.0).
#  * shared memory: 32 banks x 4 bytes per clock per SM = 128 B/clk (CUDA C++ Programming Guide,
#    "Shared Memory" for compute capability 8.x/9.0).
#  * H200: 132 SMs, boost clock 1.98 GHz (H100/H200 SXM spec sheets); HBM 4.3 TB/s as measured by a
#    device-to-device copy on an H200 (project design notes, section 8; spec 4.8 TB/s).
#  * A100 (SXM4 80 GB): 108 SMs, boost 1.41 GHz; HBM spec 2.039 TB/s, copy taken as 1.75 TB/s, an
#    assumed 86 % of spec (the H200's copy/spec ratio is 90 %): a model number, not a measurement.
#  * Per-SM limits (occupancy, linearpatch_kernels/backends/gpu_limits.py): 65,536 registers, 64 resident
#    warps, 32 resident blocks; shared memory per SM
#    228 KiB (sm_90) / 164 KiB (sm_80), per block (opt-in) 232,448 / 166,912 B, 1 KiB reserved
#    per block (CUDA C++ Programming Guide, "Compute Capabilities").
GPUS = {
    "H200": dict(arch=90, sms=132, clock_hz=1.98e9, copy_bytes_per_s=4.3e12, issue_per_clk=4, shfl_lanes_per_clk=32,
                 smem_bytes_per_clk=128, smem_per_block=232448),
    "A100": dict(arch=80, sms=108, clock_hz=1.41e9, copy_bytes_per_s=1.75e12, issue_per_clk=4, shfl_lanes_per_clk=32,
                 smem_bytes_per_clk=128, smem_per_block=166912),
}
SMEM_LIMIT = {90: 232448, 80: 166912}
MAX_WARPS = 64  # resident warps per SM on sm_80 and sm_90 (occupancy: gpu_limits.resident_blocks)

OPS = ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
STREAMS = {"hadamard_transform": (1, 1), "hadamard_patch": (1, 1), "patch_add_rmsnorm": (2, 2)}  # (inputs, outputs)
GATE_SIZES = (4096, 8192)
K_GATE_SIZES = (576, 5120)  # K > 1 (K = 36, N = 16 and K = 20, N = 256), gated at --max-ratio-k


# ------------------------------------------------------------------------------------------------
# Tools

def find_tool(name: str) -> str:
    """``name`` from the CUDA toolkit, else from the triton wheel (cuobjdump, nvdisasm, ptxas)."""
    from linearpatch_kernels.backends.cuda_toolkit import find_cuda_home

    home = find_cuda_home()
    if home and (Path(home) / "bin" / name).exists():
        return str(Path(home) / "bin" / name)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"{name} not found: set CUDA_HOME to a CUDA toolkit (or install triton, which ships it)")


def load_by_path(name: str, path: Path):
    """A module of this repository loaded from its file (no package import, so no torch)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def load_emulate():
    return load_by_path("linearpatch_emulate", CSRC / "emulation" / "emulate.py")


# ------------------------------------------------------------------------------------------------
# Build (cached by the hash of the sources, flags and nvcc version)

def kernel_units() -> list[Path]:
    return sorted(p for p in CSRC.glob("*.cu"))


def build(arch: int, cache_dir: Path, jobs: int) -> list[tuple[str, str]]:
    """(ptxas log, SASS text) per kernel file for sm_<arch>."""
    nvcc = find_tool("nvcc")
    h = hashlib.sha256()
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(NVCC_FLAGS).encode())
    for p in sorted(CSRC.iterdir()):
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h"):
            h.update(p.name.encode() + p.read_bytes())
    out = cache_dir / f"sm{arch}-{h.hexdigest()[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    cuobjdump = find_tool("cuobjdump")

    def one(unit: Path) -> tuple[str, str]:
        log, sass = out / f"{unit.stem}.ptxas.txt", out / f"{unit.stem}.sass.txt"
        if not (log.exists() and sass.exists()):
            # Per-process names, renamed into place: concurrent runs sharing the cache never collide.
            tag = f"{unit.stem}.{os.getpid()}"
            cubin = out / f"{tag}.cubin"
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "-Xptxas", "-v", "-I", str(CSRC), str(unit), "-o", str(cubin)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed for {unit.name} (sm_{arch}):\n{done.stderr[-4000:]}")
            dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
            cubin.unlink()
            (out / f"{tag}.sass").write_text(dump)
            os.replace(out / f"{tag}.sass", sass)
            (out / f"{tag}.log").write_text(done.stderr)
            os.replace(out / f"{tag}.log", log)  # last: its presence means the pair is complete
        return log.read_text(), sass.read_text()

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, kernel_units()))


# ------------------------------------------------------------------------------------------------
# ptxas -v

@dataclass
class Resources:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Resources per kernel symbol from a ``ptxas -v`` log."""
    out: dict[str, Resources] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), Resources())
            continue
        if current is None:
            continue
        if m := _FRAME.search(line):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        if m := _USED.search(line):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.static_smem = int(s.group(1))
    return out


# ------------------------------------------------------------------------------------------------
# SASS

@dataclass
class Instruction:
    address: int
    opcode: str        # with modifiers, e.g. LDG.E.128.CONSTANT
    operands: str
    target: int | None = None  # branch target

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Instructions per kernel symbol from ``cuobjdump -sass`` output."""
    out: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            current = out.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        if m := _INSTR.search(line):
            address, opcode, operands = int(m.group(1), 16), m.group(2), m.group(3).strip()
            target = None
            if opcode.split(".")[0] in ("BRA", "BRX", "JMP", "BSSY", "CALL") and (t := _TARGET.search(operands)):
                target = int(t.group(1), 16)
            current.append(Instruction(address, opcode, operands, target))
    return out


def access_width(opcode: str) -> int:
    """Bytes per thread of a load/store: .128/.64 vectors, .U16/.S16, .U8/.S8, else 32 bits."""
    mods = opcode.split(".")[1:]
    for m, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return width
    return 4


MEMORY_CLASSES = {"LDG": "ldg", "STG": "stg", "LDS": "lds", "STS": "sts", "LDGSTS": "ldgsts", "LDSM": "lds"}


@dataclass
class Counts:
    instructions: int = 0
    shuffles: int = 0
    barriers: int = 0
    # per class: {width in bytes: count}
    memory: dict = field(default_factory=lambda: {c: {} for c in ("ldg", "stg", "lds", "sts", "ldgsts")})

    def add(self, ins: Instruction) -> None:
        if ins.base == "NOP":
            return
        self.instructions += 1
        if ins.base == "SHFL":
            self.shuffles += 1
        elif ins.base in ("BAR", "BARRIER", "SYNCS"):
            self.barriers += 1
        cls = MEMORY_CLASSES.get(ins.base)
        if cls:
            w = access_width(ins.opcode)
            self.memory[cls][w] = self.memory[cls].get(w, 0) + 1

    def bytes(self, cls: str) -> int:
        return sum(w * n for w, n in self.memory[cls].items())

    def smem_bytes(self) -> int:
        """Shared-memory bytes one lane moves (loads, stores and the shared side of cp.async)."""
        return self.bytes("lds") + self.bytes("sts") + self.bytes("ldgsts")

    def count(self, cls: str) -> int:
        return sum(self.memory[cls].values())


@dataclass
class Path_:
    body: Counts          # one iteration of the row loop (or the whole kernel without one)
    prologue: Counts      # once per warp, outside the row loop
    has_row_loop: bool
    inner_loops: int      # loops inside the counted body, counted once (a lower bound if > 0)


def loops_of(code: list[Instruction]) -> list[tuple[int, int]]:
    """Address ranges [target, branch] of backward branches (self-loops, the end-of-code trap, excluded)."""
    return sorted({(i.target, i.address) for i in code
                   if i.base == "BRA" and i.target is not None and i.target < i.address})


def executed_path(code: list[Instruction]) -> Path_:
    loops = loops_of(code)
    stores = [i.address for i in code if i.base == "STG"]
    candidates = [(a, b) for a, b in loops if any(a <= s <= b for s in stores)]
    # the outermost: no other candidate contains it
    row_loop = next((l for l in candidates if not any(o != l and o[0] <= l[0] and l[1] <= o[1] for o in candidates)), None)
    body, prologue = Counts(), Counts()
    lo, hi = row_loop if row_loop else (-1, 1 << 62)
    for ins in code:
        (body if lo <= ins.address <= hi else prologue).add(ins)
    # Without a row loop everything fell into the body (lo, hi span all addresses).
    inner = sum(1 for a, b in loops if lo <= a and b <= hi and (a, b) != row_loop)
    return Path_(body, prologue, row_loop is not None, inner)


# ------------------------------------------------------------------------------------------------
# Model

# The package's per-SM limits (occupancy), shared with the Triton backend's persistent grid.
GPU_LIMITS = load_by_path("linearpatch_gpu_limits", ROOT / "linearpatch_kernels" / "backends" / "gpu_limits.py")


def occupancy(registers: int, threads: int, smem: int, gpu: dict) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) from registers, threads and shared memory."""
    blocks = GPU_LIMITS.resident_blocks((gpu["arch"] // 10, gpu["arch"] % 10), registers, threads, smem)
    return blocks, blocks * math.ceil(threads / 32) / MAX_WARPS


def pipe_times(instructions: float, shuffles: float, smem_bytes: float, hbm_bytes: float, gpu: dict) -> dict:
    """Seconds on each pipe of ``gpu`` for the given totals (warp instructions, warp shuffles, shared-memory
    bytes, HBM bytes); the slowest is the modelled time."""
    clk = gpu["clock_hz"] * gpu["sms"]
    return dict(issue=instructions / (gpu["issue_per_clk"] * clk),
                shuffle=shuffles * 32 / (gpu["shfl_lanes_per_clk"] * clk),
                shared=smem_bytes / (gpu["smem_bytes_per_clk"] * clk),
                hbm=hbm_bytes / gpu["copy_bytes_per_s"])


def versus_copy(times: dict, elements: int, esize: int, gpu: dict) -> tuple[float, str, float]:
    """(modelled time / copy time, the bound pipe, copy seconds) for ``pipe_times`` of ``elements``
    elements of ``esize`` bytes; the copy reads and writes them once."""
    copy = elements * esize * 2 / gpu["copy_bytes_per_s"]
    bound = max(times, key=times.get)
    return times[bound] / copy, bound, copy


def model_row(op: str, dtype: str, d: int, launch: dict, res: Resources, path: Path_, gpu: dict) -> dict:
    esize = DTYPES[dtype]
    n_in, n_out = STREAMS[op]
    threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
    warps_launched = launch["grid"][0] * launch["grid"][1] * launch["grid"][2] * math.ceil(threads / 32)
    smem = res.static_smem + launch["smem"]
    blocks, occ = occupancy(res.registers, threads, smem, gpu)
    elements = ROWS * d
    stored = path.body.bytes("stg")
    row = dict(op=op, dtype=dtype, d=d, kernel=demangle(launch["symbol"]), grid=launch["grid"][0], threads=threads,
               registers=res.registers, spill_bytes=res.spill_stores + res.spill_loads, stack=res.stack, smem=smem,
               blocks_per_sm=blocks, occupancy=round(occ, 3), lower_bound=path.inner_loops > 0,
               row_loop=path.has_row_loop)
    if stored == 0:
        row.update(per_element=None, ratio=None, bound="no global stores found")
        return row
    per_iter = stored * 32 / (esize * n_out)  # elements per warp per iteration
    b = path.body
    # Warp instructions per element, and bytes moved per element (32 lanes x the access width).
    per_el = dict(instructions=b.instructions / per_iter, shuffles=b.shuffles / per_iter,
                  **{f"{c}_bytes": 32 * b.bytes(c) / per_iter for c in ("lds", "sts", "ldg", "stg", "ldgsts")},
                  smem_bytes=32 * b.smem_bytes() / per_iter,
                  widths={c: sorted(b.memory[c]) for c in ("ldg", "stg", "lds", "sts", "ldgsts") if b.memory[c]})
    times = pipe_times(elements * per_el["instructions"] + warps_launched * path.prologue.instructions,
                       elements * per_el["shuffles"] + warps_launched * path.prologue.shuffles,
                       elements * per_el["smem_bytes"], elements * esize * (n_in + n_out), gpu)
    ratio, bound, copy = versus_copy(times, elements, esize, gpu)
    row.update(per_element={k: (round(v, 3) if isinstance(v, float) else v) for k, v in per_el.items()},
               times_us={k: round(v * 1e6, 2) for k, v in times.items()}, copy_us=round(copy * 1e6, 2),
               ratio=round(ratio, 3), bound=bound)
    return row


def demangle(symbol: str) -> str:
    """``row_kernel<bf16,12,1>`` from the mangled symbol (c++filt; the symbol itself without it)."""
    tool = shutil.which("c++filt")
    if not tool:
        return symbol
    text = subprocess.run([tool, symbol], capture_output=True, text=True).stdout.strip()
    return short_kernel_name(text)


def short_kernel_name(text: str) -> str:
    # void linearpatch_cuda::row_kernel<__nv_bfloat16, 12, (linearpatch_cuda::Op)1>(...) -> row_kernel<bf16,12,1>
    text = text.removeprefix("void ").replace("linearpatch_cuda::", "").replace("(Op)", "")
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            text = text[:i]
            break
    return text.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32").replace(" ", "")


# ------------------------------------------------------------------------------------------------
# Sizes and the table

def sizes() -> list[tuple[int, int]]:
    """(d, K): every power of two 8..32768 and the K > 1 sizes of real models plus the extremes."""
    from linearpatch_kernels.hadamard import hadamard_factors

    ds = [1 << m for m in range(3, 16)] + [96, 576, 896, 960, 1536, 2016, 2304, 2560, 3072, 3584, 4608, 5120, 5376, 6144,
                                           7168, 12288, 18432, 24576, 32256]
    return [(d, hadamard_factors(d).k) for d in sorted(set(ds))]


def budget(archs: list[int], cache_dir: Path, jobs: int) -> list[dict]:
    emulate = load_emulate()
    kernels = emulate.EmulatedKernels.build()
    rows = []
    for gpu_name, gpu in GPUS.items():
        if gpu["arch"] not in archs:
            continue
        resources, code = {}, {}
        for log, sass in build(gpu["arch"], cache_dir, jobs):
            resources.update(parse_ptxas(log))
            code.update(parse_sass(sass))
        kernels.configure(sm_count=gpu["sms"], arch=emulate.SM90 if gpu["arch"] == 90 else emulate.SM80)
        for op in OPS:
            for dtype in DTYPES:
                for d, k in sizes():
                    try:
                        launches = kernels.launches_of(op, dtype, d, ROWS, k)
                    except emulate.EmulationError as e:  # a launcher that refuses is a finding, not a crash
                        rows.append(dict(gpu=gpu_name, arch=gpu["arch"], op=op, dtype=dtype, d=d, kernel="(launch failed)",
                                         error=str(e)))
                        continue
                    for launch in launches:
                        sym = launch["symbol"]
                        if sym not in code:
                            raise RuntimeError(f"{sym} launched by the emulated launcher is not in the sm_{gpu['arch']} SASS")
                        row = model_row(op, dtype, d, launch, resources[sym], executed_path(code[sym]), gpu)
                        row.update(gpu=gpu_name, arch=gpu["arch"])
                        rows.append(row)
        for sym, res in resources.items():  # every compiled kernel, launched in the table or not
            if res.spill_stores or res.spill_loads:
                rows.append(dict(gpu=gpu_name, arch=gpu["arch"], op="(compiled)", dtype="", d=0, kernel=demangle(sym),
                                 spill_bytes=res.spill_stores + res.spill_loads, registers=res.registers))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("gpu", "op", "dtype", "d", "kernel", "regs", "spill", "smem", "occ", "instr/el", "shfl/el", "lds B/el",
            "sts B/el", "ldg B/el", "stg B/el", "widths (B)", "bound", "model x copy")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        pe = r.get("per_element")
        if r["op"] == "(compiled)" or "error" in r:
            continue
        widths = ", ".join(f"{c}:{'/'.join(map(str, w))}" for c, w in pe["widths"].items()) if pe else ""
        ratio = "" if r.get("ratio") is None else (">=" if r["lower_bound"] else "") + f"{r['ratio']:.2f}"
        counts = [f"{pe[k]:.2f}" for k in ("instructions", "shuffles", "lds_bytes", "sts_bytes", "ldg_bytes", "stg_bytes")] if pe else [""] * 6
        cells = (r["gpu"], r["op"], r["dtype"], r["d"], r["kernel"], r["registers"], r["spill_bytes"], r["smem"],
                 f"{r['occupancy']:.2f}", *counts, widths, r.get("bound", ""), ratio)
        lines.append(" | ".join(map(str, cells)))
    return "\n".join(lines)


def check(rows: list[dict], max_ratio: float, max_ratio_k: float = 0.0) -> list[str]:
    failures = []
    for r in rows:
        where = f"{r['gpu']} {r['op']} {r['dtype']} d={r['d']} {r['kernel']}"
        if "error" in r:
            failures.append(f"{where}: {r['error']}")
            continue
        if r.get("spill_bytes"):
            failures.append(f"{where}: spills {r['spill_bytes']} bytes")
        if r["op"] != "(compiled)" and r["smem"] > SMEM_LIMIT[r["arch"]]:
            failures.append(f"{where}: {r['smem']} B of shared memory > the sm_{r['arch']} limit {SMEM_LIMIT[r['arch']]}")
        narrow = [w for w in ((r.get("per_element") or {}).get("widths") or {}).get("stg", []) if w < 16]
        if narrow:
            failures.append(f"{where}: global stores of {'/'.join(map(str, narrow))} bytes (16-byte vectors expected)")
        if (max_ratio > 0 and r["gpu"] == "H200" and r["op"] == "hadamard_patch" and r["dtype"] in ("bfloat16", "float16")
                and r["d"] in GATE_SIZES and (r.get("ratio") is None or r["ratio"] > max_ratio)):
            failures.append(f"{where}: modelled {r.get('ratio')} x copy > {max_ratio}")
        if (max_ratio_k > 0 and r["gpu"] == "H200" and r["op"] == "hadamard_patch" and r["dtype"] in ("bfloat16", "float16")
                and r["d"] in K_GATE_SIZES and (r.get("ratio") is None or r["ratio"] > max_ratio_k or r.get("lower_bound"))):
            failures.append(f"{where}: modelled {'>=' if r.get('lower_bound') else ''}{r.get('ratio')} x copy > {max_ratio_k}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=(90, 80), help="sm_90 and/or sm_80 (default both)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--out", type=Path, help="write table.md and budget.json into this folder")
    parser.add_argument("--check", action="store_true", help="exit 1 on a modelled ratio, spill or shared-memory failure")
    parser.add_argument("--max-ratio", type=float, default=1.10, help="ratio gate for --check (0: off)")
    parser.add_argument("--max-ratio-k", type=float, default=1.50,
                        help=f"ratio gate for --check on the K > 1 patch at d = {K_GATE_SIZES} (0: off)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                        / "linearpatch_kernels" / "sass")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    args = parser.parse_args(argv)
    rows = budget(args.arch or [90, 80], args.cache, args.jobs)
    table = format_table(rows)
    print(table)
    if not args.check:  # with --check, failed launches are among the failures below
        for r in rows:
            if "error" in r:
                print(f"sass_budget: {r['gpu']} {r['op']} {r['dtype']} d={r['d']}: launch failed: {r['error']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        (args.out / "budget.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.check:
        failures = check(rows, args.max_ratio, args.max_ratio_k)
        for f in failures:
            print(f"sass_budget: FAIL {f}")
        if failures:
            return 1
        print(f"sass_budget: OK (no spills, shared memory within limits"
              + (f", bf16/fp16 patch at d = {GATE_SIZES} <= {args.max_ratio} x copy on H200" if args.max_ratio > 0 else "")
              + (f", at d = {K_GATE_SIZES} <= {args.max_ratio_k} x copy" if args.max_ratio_k > 0 else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

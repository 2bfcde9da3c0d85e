"""Compile the Triton kernels ahead of time for real GPUs and check what the compiler made.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline down to a cubin, and the ``cuobjdump`` shipped in the triton wheel reads its resource usage
and SASS. For every op x dtype x hidden size x {decode (1 row), prefill (16,384 rows)} this takes the
configuration the launcher would use on an A100 (sm_80, 108 SMs) and an H100/H200 (sm_90, 132 SMs),
and for those the backend accepts on that architecture it fails on

* a compile error,
* spills (local memory per thread, or spill loads/stores in the SASS),
* shared memory over the architecture's opt-in limit per block, or over the backend's own
  estimate (``resource_estimate``, which is what its automatic choice trusts).

sm_86/sm_89 (101,376 bytes per block) use the sm_80 compilation (same Triton lowering, mma.sync) with
their own limit. Inputs the backend refuses are listed with its reason (they go to another backend).

Writes ``report.json`` and ``report.md`` (registers, spills, shared memory, SASS counts per kernel).
For prefill on sm_90 and sm_80 it also models the time of 16,384 rows on an H200 / A100 from the
SASS of one iteration of the row-block loop, the way ``benchmarks/sass_budget.py`` models the CUDA
kernels (its parser, loop finder and machine constants): warp instructions, shuffles and shared-memory
bytes per element (one iteration covers BLOCK_M rows over the program's warps), the slowest of
issue, shuffle, shared memory and HBM, as a multiple of a copy. A model, not a measurement: no
latency, no bank conflicts, tensor-core throughput not modelled (HMMA/HGMMA count as issue slots).
Compiled kernels stay in Triton's cache (``TRITON_CACHE_DIR``), and their measurements in
``<cache>/linearpatch-aot.json``, so reruns take seconds.

    python scripts/triton_aot.py --out benchmarks/results/triton-aot [--sizes 576,4096] [--dtypes bf16]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from linearpatch_kernels.backends import triton_backend as tb  # noqa: E402

README_SIZES = (576, 896, 960, 1536, 2304, 3072, 3584, 5120, 5376)
EXTREMES = (8, 252, 4096, 18432, 20480, 32256, 32768)
# Every K x 2**m launch shape class in between: the largest rows the backend accepts with K > 1 (6144 =
# 12 x 512) and K = 1 (16384), and the first it refuses with K > 1 (9216 = 36 x 256).
SIZES = tuple(sorted(set(README_SIZES + EXTREMES + (2048, 6144, 8192, 9216, 16384))))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")
REGIMES = {"decode": 1, "prefill": 16384}
# (architecture compiled, capability checked, SM count of the GPU the launch is planned for)
TARGETS = (
    ("sm_80", 80, (8, 0), 108),
    ("sm_86", 80, (8, 6), 84),
    ("sm_90", 90, (9, 0), 132),
)
# LDGSTS: cp.async copies global -> shared, how the pipelined row-block loop issues the next block's loads.
SASS_OPS = ("HMMA", "HGMMA", "FADD", "FFMA", "FMUL", "SHFL", "LDS", "STS", "LDG", "LDGSTS", "STG", "BAR", "MUFU", "LDL",
            "STL")
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ROOT = Path(__file__).resolve().parents[1]


def _load_sass_budget():
    """benchmarks/sass_budget.py (SASS parser, loop finder, GPU constants), loaded from its file."""
    spec = importlib.util.spec_from_file_location("linearpatch_sass_budget", ROOT / "benchmarks" / "sass_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


SB = _load_sass_budget()
MODEL_GPUS = {90: "H200", 80: "A100"}  # targets compiled for that architecture and modelled on that GPU
SB_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _kernel_and_signature(op: str, dtype: str, d: int, network: bool):
    """The JIT function, its argument types and the values the launcher passes as specialization
    (the add-network kernels take no H_K pointer: H_K is their constexpr sign table)."""
    io = "*" + dtype
    h_k = {} if network else {"h_k_ptr": "*fp32"}
    if op == "patch_add_rmsnorm":
        fn = tb._patch_add_rmsnorm_parts_kernel if network else tb._patch_add_rmsnorm_kernel
        sig = {"r_ptr": io, "u_ptr": io, "h_ptr": io, "n_ptr": io, **h_k, "s_ptr": "*fp32",
               "w_ptr": io, "rows": "i32", "r_row_stride": "i32", "u_row_stride": "i32", "inv_d": "fp32",
               "eps": "fp32"}
        extra = {}
    else:
        fn = tb._hadamard_parts_kernel if network else tb._hadamard_kernel
        sig = {"x_ptr": io, "y_ptr": io, **h_k, "s_ptr": "*fp32", "rows": "i32",
               "x_row_stride": "i32", "out_scale": "fp32"}
        extra = {"PATCH": op == "hadamard_patch"}
    # What the launcher's specialization sees for contiguous rows: 16-byte aligned pointers, and a
    # row stride of d (divisible by 16 unless d is small).
    aligned = [k for k, v in sig.items() if v.startswith("*")]
    if d % 16 == 0:
        aligned += [k for k in sig if k.endswith("row_stride")]
    return fn, sig, extra, aligned


def compile_kernel(op: str, dtype: str, d: int, config: tb.LaunchConfig, arch: int):
    fn, sig, extra, aligned = _kernel_and_signature(op, dtype, d, config.NETWORK)
    constexprs = {**extra, **config.constexprs()}
    for name in constexprs:
        sig[name] = "constexpr"
    names = fn.arg_names
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})


def measure(kernel) -> dict:
    """Registers, local memory, shared memory and SASS opcode counts of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    opcodes = collections.Counter(m.split(".")[0] for m in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    (code,) = SB.parse_sass(sass).values()  # one kernel per cubin
    path = SB.executed_path(code)
    body = path.body
    return {
        # one iteration of the row-block loop (the whole kernel when there is no loop), per warp
        "body": {"instructions": body.instructions, "shuffles": body.shuffles,
                 "smem_bytes": 32 * body.smem_bytes(),
                 "row_loop": path.has_row_loop, "inner_loops": path.inner_loops},
        "registers": int(usage.get("REG", 0)),
        "local_bytes": int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
        "shared_bytes": int(kernel.metadata.shared),
        "num_warps": int(kernel.metadata.num_warps),
        "sass_total": sum(opcodes.values()),
        "sass": {k: opcodes.get(k, 0) for k in SASS_OPS},
    }


def _cache_path() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(base) / "linearpatch-aot.json"


MEASURE_VERSION = "2"  # bump when measure() returns something new, so that cached rows are redone


def _source_hash() -> str:
    text = Path(tb.__file__).read_text() + triton.__version__ + ",".join(SASS_OPS) + MEASURE_VERSION
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile_and_measure(task) -> dict:
    op, dtype, d, config, arch = task
    try:
        return measure(compile_kernel(op, dtype, d, config, arch))
    except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported with the rest
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def plan(sizes, dtypes, ops) -> list[dict]:
    """One row per target x op x dtype x d x regime: the launcher's configuration and the verdict
    of the backend's choice (refused, with its reason, or to be compiled)."""
    rows = []
    for target, arch, capability, sm_count in TARGETS:
        for op in ops:
            for dtype in dtypes:
                for d in sizes:
                    reason = tb.unsupported_reason_for(DTYPES[dtype], d, capability)
                    for regime, n_rows in REGIMES.items():
                        config = tb.launch_config(d, n_rows, sm_count, DTYPES[dtype], op,
                                                  tb.shared_memory_limit(capability), capability)
                        row = {"target": target, "arch": arch, "limit": tb.shared_memory_limit(capability),
                               "op": op, "dtype": dtype, "d": d, "regime": regime, "launch": config,
                               "config": {**dataclasses.asdict(config), "num_warps": config.num_warps},
                               "estimate_shared_bytes": tb.resource_estimate(config, DTYPES[dtype], op)["shared_bytes"]}
                        if reason is not None:
                            row["refused"] = reason
                        rows.append(row)
    return rows


def network_sizes(sizes=SIZES) -> list[int]:
    """The sizes whose rows take the add network on some target (their kernels take the longest to
    compile: 3-47 s each on 2 cores, against 1-5 s for the dot and K = 1 kernels)."""
    return [d for d in sizes
            if any(r["config"]["NETWORK"] for r in plan([d], ["bf16"], ["hadamard_patch"]) if "refused" not in r)]


def _problems(row: dict) -> list[str]:
    m, limit = row, row["limit"]
    if "error" in m:
        return [f"compile error {m['error']}"]
    problems = []
    if m["local_bytes"] or m["sass"]["LDL"] or m["sass"]["STL"]:
        problems.append(f"spills ({m['local_bytes']} B local, {m['sass']['STL']} STL, {m['sass']['LDL']} LDL)")
    if m["shared_bytes"] > limit:
        problems.append(f"shared memory {m['shared_bytes']} B over the {limit} B of {row['target']}")
    if m["shared_bytes"] > row["estimate_shared_bytes"]:
        problems.append(f"shared memory {m['shared_bytes']} B over the backend's estimate {row['estimate_shared_bytes']} B")
    return problems


def run(sizes, dtypes, ops, out: Path, jobs: int) -> int:
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except ValueError:
        cache = {}
    tag = _source_hash()
    start = time.time()
    rows = plan(sizes, dtypes, ops)
    tasks = {}
    for row in rows:
        if "refused" not in row:
            row["key"] = f"{tag}|{row['arch']}|{row['op']}|{row['dtype']}|{row['d']}|{sorted(row['config'].items())}"
            if row["key"] not in cache:
                tasks[row["key"]] = (row["op"], row["dtype"], row["d"], row["launch"], row["arch"])
    # Independent compilations, one process per core; results saved as they come.
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_compile_and_measure, task): key for key, task in tasks.items()}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            cache[futures[future]] = future.result()
            if i % 20 == 0 or i == len(futures):
                print(f"  compiled {i}/{len(futures)} ({time.time() - start:.0f} s)", flush=True)
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cache_file.write_text(json.dumps(cache))
    failures = []
    for row in rows:
        del row["launch"]
        if "refused" in row:
            continue
        row.update(cache[row.pop("key")])
        if "error" not in row:
            row["model"] = model(row)
        problems = _problems(row)
        if problems:
            row["problems"] = problems
            failures.append(f"{row['target']} {row['op']} {row['dtype']} d={row['d']} {row['regime']}: " + "; ".join(problems))
    elapsed = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    meta = {"triton": triton.__version__, "torch": torch.__version__, "compiled_now": len(tasks),
            "seconds": round(elapsed, 1), "failures": failures}
    (out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "report.md").write_text(_markdown(meta, rows))
    print(f"{len(rows)} configurations ({len(tasks)} compiled now, the rest cached or refused) in {elapsed:.0f} s; "
          f"report in {out}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def model(row: dict) -> dict | None:
    """The modelled time of 16,384 rows (prefill on sm_90/sm_80) as a multiple of a copy, with the
    per-element counts it comes from; None for decode, sm_86 and kernels without a counted body."""
    gpu_name = MODEL_GPUS.get(row["arch"]) if row["target"] in ("sm_80", "sm_90") else None
    if gpu_name is None or row["regime"] != "prefill" or "body" not in row or row["body"]["inner_loops"]:
        return None
    gpu, c, b = SB.GPUS[gpu_name], row["config"], row["body"]
    per_warp = c["BLOCK_M"] * row["d"] / c["num_warps"]  # elements one warp covers per iteration
    per_el = {"instructions": b["instructions"] / per_warp, "shuffles": b["shuffles"] / per_warp,
              "smem_bytes": b["smem_bytes"] / per_warp}
    esize = SB.DTYPES[SB_DTYPES[row["dtype"]]]
    n_in, n_out = SB.STREAMS[row["op"]]
    elements = SB.ROWS * row["d"]
    times = SB.pipe_times(elements * per_el["instructions"], elements * per_el["shuffles"],
                          elements * per_el["smem_bytes"], elements * esize * (n_in + n_out), gpu)
    ratio, bound, _ = SB.versus_copy(times, elements, esize, gpu)
    return {"gpu": gpu_name, "ratio": round(ratio, 3), "bound": bound,
            "per_element": {k: round(v, 3) for k, v in per_el.items()}}


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Triton kernels compiled ahead of time (triton {meta['triton']})", "",
             "Written by `python scripts/triton_aot.py`. Decode = 1 row, prefill = 16,384 rows; the launch",
             "configuration is the one the backend picks; `refused` = the backend sends the input elsewhere.",
             "K_PAD = K and `H_K: adds`: the unpadded row with H_K as a +-1 add network, else H_K is a",
             "tensor-core dot on the row padded to K_PAD rows. Stages 2: the row-block loop is software-pipelined",
             "(the next block's loads issued as cp.async copies, LDGSTS, before the current block is computed).",
             "SASS columns: static counts of the whole kernel. `instr/el` and `model x copy`: prefill on sm_90",
             "(H200) and sm_80 (A100) only, warp instructions per element of one row-block iteration and the",
             "modelled time of 16,384 rows as a multiple of a copy with its bound (issue, shuffle, shared, hbm;",
             "the fused epilogue moves two tensors each way, so its floor is 2). A model, not a measurement.", "",
             "| target | op | dtype | d | regime | BLOCK_M x K_PAD x N / warps | stages | regs | local B | smem B (est.) | SASS | HMMA+HGMMA | SHFL | LDS+STS | LDGSTS | BAR | instr/el | model x copy | verdict |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        c = r["config"]
        h_k = " (H_K: adds)" if c["NETWORK"] else ""
        shape = f"{c['BLOCK_M']}x{c['K_PAD']}x{c['N']} / {c['num_warps']}{h_k}"
        head = f"| {r['target']} | {r['op']} | {r['dtype']} | {r['d']} | {r['regime']} | {shape} | {c['STAGES']} |"
        if "refused" in r:
            lines.append(f"{head} | | | | | | | | | | | refused: {r['refused']} |")
        elif "error" in r:
            lines.append(f"{head} | | | | | | | | | | | **{r['error']}** |")
        else:
            s = r["sass"]
            verdict = "**" + "; ".join(r["problems"]) + "**" if "problems" in r else "ok"
            lines.append(f"{head} {r['registers']} | {r['local_bytes']} | {r['shared_bytes']} ({r['estimate_shared_bytes']}) | "
                         f"{r['sass_total']} | {s['HMMA'] + s['HGMMA']} | {s['SHFL']} | {s['LDS'] + s['STS']} | {s['LDGSTS']} | "
                         f"{s['BAR']} | {_model_cells(r.get('model'))} | {verdict} |")
    lines += ["", f"Failures: {len(meta['failures'])}."]
    return "\n".join(lines) + "\n"


def _model_cells(m: dict | None) -> str:
    if not m:
        return " | "
    return f"{m['per_element']['instructions']:.2f} | {m['ratio']:.2f} ({m['bound']})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/triton-aot"))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    a = p.parse_args(argv)
    return run([int(s) for s in a.sizes.split(",")], a.dtypes.split(","), a.ops.split(","), a.out, a.jobs)


if __name__ == "__main__":
    sys.exit(main())

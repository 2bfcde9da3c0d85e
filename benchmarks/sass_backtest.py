"""Backtest of the speed model (benchmarks/sass_budget.py) against the H200 measurements.

The run in ``benchmarks/results/h200-2026-12-01/`` timed the CUDA kernels of commit 9974255 (bf16:
patch, transform and fused epilogue at d = 4096 with 16,384 / 4,096 / 64 / 1 rows, patch and
transform at d = 5120 with 16,384 rows; a copy of the same tensor beside each). This script builds
*those* kernels again (their sources from git, nvcc for sm_90), asks *their* launchers for the launch
of each measured case (the CUDA emulator, dry run), runs block 0 of each launch through the SASS
interpreter (benchmarks/sass_sim.py) and models every measured number with the constants in
``benchmarks/speed_model.json``.

    python benchmarks/sass_backtest.py                 # the table, model vs measured
    python benchmarks/sass_backtest.py --check         # exit 1 if any number is off by more than 15 %
    python benchmarks/sass_backtest.py --fit           # refit the six constants, rewrite speed_model.json
    python benchmarks/sass_backtest.py --out DIR       # write backtest.md and backtest.json there

The fitted constants (least squares on log(model / measured) over all the measured numbers): the launch
cost t_launch, the DRAM latency L_dram, the latency L_hit of a load that hits L2/L1 (s, the norm weight
after the first touch), the copy bandwidth BW, the issue efficiency e and the compute/memory overlap phi.
Refit after every GPU run (add it to RUNS: its timings and the commit of the kernels it timed) and
commit the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sass_budget as sb  # noqa: E402

# The GPU runs the constants are fitted to: (timings of the run, the commit whose kernels it timed). Add
# each new run here (its gpu_timings.json and the commit of the wheel it loaded) and refit.
RUNS = [(ROOT / "benchmarks" / "results" / "h200-2026-12-01" / "run1" / "gpu_timings.json", "9974255")]
TOLERANCE = 0.15
# The measured cases: (case name in run1/gpu_timings.json, op, d, rows). The copies are modelled too.
CASES = [("cuda patch", "hadamard_patch"), ("cuda transform", "hadamard_transform"),
         ("epilogue: cuda fused", "patch_add_rmsnorm")]
# The units of each dtype (only those of the dtypes a run timed are built; the others' launchers are stubs).
UNITS = {"bfloat16": ("hadamard_bf16.cu", "patch_add_rmsnorm_bf16.cu"), "float16": ("hadamard_f16.cu", "patch_add_rmsnorm_f16.cu"),
         "float32": ("hadamard_f32.cu", "patch_add_rmsnorm_f32.cu")}
SUFFIX = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def stubs(dtypes) -> str:
    lines = ["// Launchers of the dtypes the backtest does not build.", '#include "hadamard_launch.h"',
             "namespace linearpatch_cuda {"]
    for dtype, suffix in SUFFIX.items():
        if dtype not in dtypes:
            for op in ("hadamard", "patch_add_rmsnorm"):
                lines.append(f'std::string launch_{op}_{suffix}(const HadamardArgs&) {{ return "not built for the backtest"; }}')
    lines.append("}  // namespace linearpatch_cuda")
    return "\n".join(lines) + "\n"


SWEEP_OPS = {"patch": "hadamard_patch", "transform": "hadamard_transform", "patch_add_rmsnorm": "patch_add_rmsnorm"}


def measured() -> list[dict]:
    """Every CUDA kernel and copy time of the runs: [{case, op, dtype, d, rows, ms, commit, weight_cast}], from
    the timings table (bf16) and the copy-ratio sweep (every dtype; where it ran)."""
    out = []
    for path, commit in RUNS:
        data = json.loads(path.read_text())
        seen = set()

        def add(case, op, dtype, d, rows, ms, weight_cast=False):
            key = (op, dtype, d, rows)
            if key in seen or not isinstance(ms, (int, float)) or ms != ms:  # repeated copies; NaN: not measured
                return
            seen.add(key)
            out.append(dict(case=case, op=op, dtype=dtype, d=d, rows=rows, ms=ms, commit=commit, weight_cast=weight_cast))

        for r in data["results"]:
            op = dict(CASES).get(r["case"])
            if op is None and r["case"] != "copy":
                continue
            # the timings table's epilogue took a bf16 norm weight, cast to fp32 by cuda_backend first
            add(r["case"], op or "copy", r.get("dtype", "bfloat16"), r["d"], r["rows"], r["median_ms"],
                weight_cast=op == "patch_add_rmsnorm")
        for r in data.get("copy_ratios", []):
            op = SWEEP_OPS.get(r["op"])
            if op is None:
                continue
            add(f"sweep {r['op']}", op, r["dtype"], r["d"], r["rows"], r["median_ms"])
            add("sweep copy", "copy", r["dtype"], r["d"], r["rows"], r.get("copy_ms"))
    return out


def commit_sources(commit: str) -> dict[str, str]:
    """csrc/*.cu, *.cuh, *.h of ``commit`` (git show)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{commit}:csrc"], capture_output=True,
                            text=True)
    if listed.returncode != 0:
        raise SystemExit(f"sass_backtest: cannot read csrc/ of commit {commit} with git ({listed.stderr.strip()}); "
                         "the backtest rebuilds the kernels the GPU run measured and needs a clone with that history")
    names = listed.stdout.split()
    return {n: subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:csrc/{n}"], capture_output=True, text=True,
                              check=True).stdout
            for n in names if n.endswith((".cu", ".cuh", ".h"))}


def build_sass(sources: dict[str, str], cache: Path, commit: str, dtypes) -> tuple[dict, dict]:
    """(ptxas resources, SASS instructions) per kernel symbol of the units of ``dtypes``, sm_90."""
    nvcc = sb.find_tool("nvcc")
    cuobjdump = sb.find_tool("cuobjdump")
    h = hashlib.sha256(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(sb.NVCC_FLAGS).encode())
    for n in sorted(sources):
        h.update(n.encode() + sources[n].encode())
    out = cache / f"backtest-sm90-{h.hexdigest()[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    resources, code = {}, {}
    sim = sb.load_sim()
    for unit in [u for dtype in sorted(dtypes) for u in UNITS[dtype]]:
        log, sass = out / f"{unit}.ptxas.txt", out / f"{unit}.sass.txt"
        if not (log.exists() and sass.exists()):
            with tempfile.TemporaryDirectory() as tmp:
                for n, text in sources.items():
                    (Path(tmp) / n).write_text(text)
                cubin = Path(tmp) / "k.cubin"
                done = subprocess.run([nvcc, "-cubin", "-arch=sm_90", *sb.NVCC_FLAGS, "-Xptxas", "-v", "-I", tmp,
                                       str(Path(tmp) / unit), "-o", str(cubin)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"nvcc failed for {unit} of {commit}:\n{done.stderr[-4000:]}")
                dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
                sass.write_text(dump)
                log.write_text(done.stderr)
        resources.update(sb.parse_ptxas(log.read_text()))
        code.update(sim.parse_sass_functions(sass.read_text()))
    return resources, code


def emulated_launchers(sources: dict[str, str], dtypes):
    """The commit's launchers in the CUDA emulator (the units of ``dtypes`` only)."""
    emulate = sb.load_emulate()
    wanted = {u for dtype in dtypes for u in UNITS[dtype]}
    units = {n: t for n, t in sources.items() if not n.endswith(".cu") or n in wanted}
    units["backtest_stubs.cu"] = stubs(dtypes)
    lib = emulate.compile_emulated(units, [emulate.HERE / "driver.cpp"], "libbacktest_kernels.so")
    return emulate, emulate.EmulatedKernels(lib)


def model_case(case: dict, kernels, emulate, resources, code, gpu: dict, c: dict) -> dict:
    """The modelled time of one measured case (seconds) and what went into it."""
    if case["op"] == "copy":
        return dict(time_s=sb.copy_time(case["rows"] * case["d"] * sb.DTYPES[case["dtype"]] * 2, c))
    from linearpatch_kernels.hadamard import hadamard_factors

    m = sb.model_launches(case["op"], case["dtype"], case["d"], case["rows"], hadamard_factors(case["d"]).k, kernels,
                          emulate, resources, code, gpu, c)
    if case["weight_cast"]:
        # the measured call (cuda_backend.patch_add_rmsnorm) cast the bf16 norm weight to fp32 first: one
        # more small kernel (d elements read as bf16, written as fp32)
        m["time_s"] += sb.copy_time(case["d"] * 6, c)
    return m


_BUILT: dict = {}


def commit_kernels(commit: str):
    """(resources, code, emulate, kernels) of ``commit``'s kernels of the dtypes its runs timed, built once."""
    if commit not in _BUILT:
        dtypes = {c["dtype"] for c in measured() if c["commit"] == commit}
        sources = commit_sources(commit)
        resources, code = build_sass(sources, sb.default_cache(), commit, dtypes)
        emulate, kernels = emulated_launchers(sources, dtypes)
        _BUILT[commit] = (resources, code, emulate, kernels)
    return _BUILT[commit]


def run(constants: dict) -> list[dict]:
    gpu = sb.GPUS["H200"]
    rows = []
    for case in measured():
        resources, code, emulate, kernels = commit_kernels(case["commit"])
        m = model_case(case, kernels, emulate, resources, code, gpu, constants)
        rows.append(dict(case, model_ms=m["time_s"] * 1e3, detail={k: v for k, v in m.items() if k != "time_s"}))
    return rows


def residuals(rows: list[dict]) -> list[float]:
    return [r["model_ms"] / r["ms"] - 1 for r in rows]


NAMES = ("t_launch_s", "latency_dram_s", "latency_hit_s", "copy_bytes_per_s", "issue_efficiency", "overlap")
SCALE = (1e-6, 1e-6, 1e-6, 1e12, 1.0, 1.0)
BOUNDS = ((0.5, 0.05, 0.01, 2.0, 0.3, 0.0), (10.0, 3.0, 3.0, 6.0, 1.0, 1.0))


def fit(constants: dict) -> tuple[dict, dict]:
    """Least squares on log(model / measured) over every measured number. Returns the constants and
    what the fit says about itself: residuals, the parameters' standard errors and correlations (from
    the Jacobian), leave-one-out errors (each number predicted by a fit without it), and the profile of
    the fit along the issue efficiency (the other five refitted for each fixed value)."""
    import numpy as np
    from scipy.optimize import least_squares

    gpu = sb.GPUS["H200"]
    cases = measured()
    from linearpatch_kernels.hadamard import hadamard_factors

    # Profiles do not depend on the constants: simulate once, then model many times.
    cached = []
    for case in cases:
        if case["op"] == "copy":
            cached.append(None)
            continue
        resources, code, emulate, kernels = commit_kernels(case["commit"])
        cached.append(sb.launch_profiles(case["op"], case["dtype"], case["d"], case["rows"], hadamard_factors(case["d"]).k,
                                         kernels, emulate, resources, code, gpu))
    scale = np.array(SCALE)

    def consts(x, fixed=None):
        c = dict(constants, **{n: float(v) for n, v in zip(NAMES, x * scale)})
        c.update(fixed or {})
        return c

    def modelled(c, case, prof):
        if case["op"] == "copy":
            return sb.copy_time(case["rows"] * case["d"] * sb.DTYPES[case["dtype"]] * 2, c)
        t = sb.model_from_profiles(prof, gpu, c)["time_s"]
        return t + (sb.copy_time(case["d"] * 6, c) if case["weight_cast"] else 0.0)

    def residual(x, keep=None, fixed=None):
        c = consts(x, fixed)
        return np.array([math.log(modelled(c, case, prof) * 1e3 / case["ms"])
                         for i, (case, prof) in enumerate(zip(cases, cached)) if keep is None or i in keep])

    lower, upper = np.array(BOUNDS[0]), np.array(BOUNDS[1])
    x0 = np.clip(np.array([constants[n] for n in NAMES]) / scale, lower, upper)
    sol = least_squares(residual, x0, bounds=(lower, upper))
    best = consts(sol.x)
    r = residual(sol.x)
    # Standard errors from J^T J (log residuals, the residual variance from the fit's dof).
    jac = sol.jac
    dof = max(1, len(r) - len(NAMES))
    cov = np.linalg.pinv(jac.T @ jac) * float(r @ r) / dof
    sd = np.sqrt(np.maximum(np.diag(cov), 0))
    corr = cov / np.outer(np.where(sd > 0, sd, 1), np.where(sd > 0, sd, 1))
    loo = []
    for i in range(len(cases)):
        keep = set(range(len(cases))) - {i}
        xi = least_squares(lambda x: residual(x, keep), sol.x, bounds=(lower, upper)).x
        loo.append(math.exp(residual(xi, {i})[0]) - 1)
    profile = []
    for e in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        idx = NAMES.index("issue_efficiency")
        free = [j for j in range(len(NAMES)) if j != idx]

        def sub(z, e=e):
            x = sol.x.copy()
            x[free] = z
            return residual(x, fixed=dict(issue_efficiency=e))

        zs = least_squares(sub, sol.x[free], bounds=(lower[free], upper[free])).x
        rr = np.exp(sub(zs)) - 1
        xs = sol.x.copy()
        xs[free] = zs
        profile.append(dict(issue_efficiency=e, overlap=round(float(xs[NAMES.index("overlap")]), 3),
                            max_error=round(float(abs(rr).max()), 4), rms_error=round(float(np.sqrt((rr ** 2).mean())), 4)))
    report = dict(
        measured_numbers=len(cases), constants=len(NAMES),
        residuals={f"{c['case']} d={c['d']} rows={c['rows']}": round(math.exp(v) - 1, 4) for c, v in zip(cases, r)},
        standard_error={n: float(v * sc) for n, v, sc in zip(NAMES, sd, scale)},
        correlation={f"{NAMES[i]} ~ {NAMES[j]}": round(float(corr[i, j]), 3)
                     for i in range(len(NAMES)) for j in range(i + 1, len(NAMES)) if abs(corr[i, j]) >= 0.5},
        leave_one_out={f"{c['case']} d={c['d']} rows={c['rows']}": round(v, 4) for c, v in zip(cases, loo)},
        issue_efficiency_profile=profile)
    return best, report


def format_table(rows: list[dict], c: dict, report: dict | None = None) -> str:
    lines = ["| case | d | rows | kernel | blocks/SM x rounds | bound | measured | model | model / measured |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        det = r["detail"]
        shape = f"{det['blocks_per_sm']} x {det['rounds']}" if det else ""
        lines.append(f"| {r['case']} | {r['d']} | {r['rows']} | {det.get('kernel', '')} | {shape} | {det.get('bound', '')} | "
                     f"{r['ms'] * 1e3:.1f} us | {r['model_ms'] * 1e3:.1f} us | {r['model_ms'] / r['ms']:.3f} |")
    res = residuals(rows)
    lines.append("")
    lines.append(f"Largest error {max(abs(x) for x in res) * 100:.1f} %, rms {math.sqrt(sum(x * x for x in res) / len(res)) * 100:.1f} %"
                 f" over {len(res)} measured numbers with {len(NAMES)} fitted constants: " +
                 ", ".join(f"{k} = {v:.4g}" for k, v in c.items() if k in NAMES) + ".")
    if report:
        lines += ["", "Standard errors (from the Jacobian of the log residuals): " +
                  ", ".join(f"{k} {v:.2g}" for k, v in report["standard_error"].items()) + ".",
                  "Correlations beyond 0.5: " + ", ".join(f"{k} {v}" for k, v in report["correlation"].items()) + ".",
                  "", "Leave-one-out (each number predicted by a fit without it):", "",
                  "| case | error |", "|---|---:|"]
        lines += [f"| {k} | {v * 100:+.1f} % |" for k, v in report["leave_one_out"].items()]
        lines += ["", "Profile along the issue efficiency (the other five constants refitted for each value):", "",
                  "| issue efficiency | overlap | largest error | rms error |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['issue_efficiency']} | {p['overlap']} | {p['max_error'] * 100:.1f} % | {p['rms_error'] * 100:.1f} % |"
                  for p in report["issue_efficiency_profile"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a number is off by more than {TOLERANCE:.0%}")
    parser.add_argument("--fit", action="store_true", help="refit the constants and rewrite speed_model.json")
    parser.add_argument("--out", type=Path, help="write backtest.md and backtest.json into this folder")
    args = parser.parse_args(argv)
    data = json.loads(sb.MODEL_FILE.read_text())
    constants = data["gpus"]["H200"]
    if args.fit:
        constants, report = fit(constants)
        data["gpus"]["H200"] = constants
        data["fit"] = report
        sb.MODEL_FILE.write_text(json.dumps(data, indent=1) + "\n")
    rows = run(constants)
    table = format_table(rows, constants, data.get("fit"))
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "backtest.md").write_text(table + "\n")
        (args.out / "backtest.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if args.check:
        bad = [r for r in rows if abs(r["model_ms"] / r["ms"] - 1) > TOLERANCE]
        for r in bad:
            print(f"sass_backtest: FAIL {r['case']} d={r['d']} rows={r['rows']}: model {r['model_ms'] * 1e3:.1f} us, "
                  f"measured {r['ms'] * 1e3:.1f} us")
        if bad:
            return 1
        print(f"sass_backtest: OK ({len(rows)} measured numbers within {TOLERANCE:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The prepared GPU run: its steps, their time budgets, the artifacts it carries, and what it times.

GPU time comes in short windows (about 15 minutes, the machine's start included) on one H100 or H200
without network or pip. One run of ``benchmarks/gpu_check.sh`` must answer every open question in at
most 8 minutes, so that a second run still fits the same window. This file is the run's single
description; ``gpu_check.sh --plan`` prints it, ``gpu_check.sh`` follows it, ``scripts/gpu_bundle.py``
prepares what it lists, and ``benchmarks/gpu_timings.py`` times the cases it lists.

Steps, in order of value (each under its own deadline, each writing its results as it ends, so a
step cut short keeps what it measured; budgets in seconds on an H200, ``STEPS`` below):

1. ``timings``: the bf16 and fp16 patch, transform and fused epilogue of the CUDA and Triton
   backends beside a copy of the same tensor, the dense bf16 matmul, the paper's fp32 matmul and
   fast-hadamard-transform applied twice with the scale between; three interleaved repeats; the
   public op beside the direct backend call; decode sizes also replayed from a CUDA graph.
2. ``cuda-tests``: ``tests/test_cuda_backend.py`` on the GPU.
3. ``sanitizer``: compute-sanitizer memcheck, racecheck and synccheck on small cases of every
   CUDA kernel family.
4. ``e2e``: a LLaMA-3-8B-shaped model, random bf16 weights, 32 layers, 5 removed: prefill and
   decode tokens/s of dense, pruned, pruned + the paper's fp32 hook, pruned + our patch, eager and
   replayed from CUDA graphs; the patch's share of the step.
5. ``triton-tests``: ``tests/test_triton_backend.py`` on the GPU.
6. ``jit``: the JIT fallback (a source tree without the compiled library builds ``csrc/`` at first use;
   the build itself, CPU only, starts in the background once the timings are done, so that the
   step mostly checks what it built).

Artifacts (built on a CPU machine by ``python scripts/gpu_bundle.py``, carried in one folder, by
default ``.gpu-bundle/`` at the repository root, ignored by git): the cu130 sm_90 wheel, Triton's
cache for triton 3.6 with every kernel the run launches, the SASS model's JSON, and
fast-hadamard-transform's kernels behind our own ``torch.ops`` registration. The bundle's
``manifest.json`` says what it holds and the source hashes it was built from; the last one built is
committed as ``benchmarks/results/gpu-bundle/manifest.json``, so that the plan can say whether a
bundle built from it would still be current (``stale`` when the sources it was built from changed).

    python benchmarks/gpu_plan.py [--bundle DIR] [--json | --budgets | --unusable]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / ".gpu-bundle"
COMMITTED_MANIFEST = ROOT / "benchmarks" / "results" / "gpu-bundle" / "manifest.json"
TOTAL_BUDGET_S = 480  # 8 minutes on an H200: the machine's start and a second run fit in 15
SETUP_S = 25  # environment, clocks, unpacking the wheel and the Triton cache (not a step of its own)


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    what: str


STEPS = (
    Step("timings", 140, "bf16/fp16 patch, transform, epilogue (cuda, triton, public op) beside copy, dense bf16, "
                         "paper fp32, FHT twice; 3 interleaved repeats; CUDA-graph replay at decode sizes"),
    Step("cuda-tests", 45, "tests/test_cuda_backend.py on the GPU"),
    Step("sanitizer", 70, "compute-sanitizer memcheck, racecheck, synccheck on small cases of every kernel family"),
    Step("e2e", 95, "LLaMA-3-8B shape, 32 layers, 5 removed: prefill and decode tokens/s, 4 variants, eager "
                     "and CUDA graphs, the patch's share"),
    Step("triton-tests", 35, "tests/test_triton_backend.py on the GPU"),
    Step("jit", 70, "JIT fallback: csrc/ built at first use from a tree without the compiled library (the "
                     "build starts in the background after the timings)"),
)


@dataclass(frozen=True)
class Artifact:
    name: str
    path: str  # inside the bundle folder
    what: str
    sources: tuple  # repository paths whose content the artifact is built from (for "current/stale")


ARTIFACTS = (
    Artifact("wheel", "wheel", "linearpatch_kernels cu130 wheel, sm_90, checked under torch 2.11.0",
             ("csrc", "setup.py", "build_support")),
    # (and the list of launches, triton_launches(): see artifact_hash)
    Artifact("triton-cache", "triton-cache", "Triton 3.6 cache (Python 3.12 key): every kernel the run launches, sm_90",
             ("linearpatch_kernels/backends/triton_backend.py", "linearpatch_kernels/hadamard.py",
              "linearpatch_kernels/backends/gpu_limits.py", "scripts/triton_cache.py")),
    Artifact("sass-model", "sass_model.json", "benchmarks/sass_budget.py --arch 90 --json (the modelled column)",
             ("csrc", "benchmarks/sass_budget.py")),
    Artifact("fht", "fht", "fast-hadamard-transform's kernels (sm_90) behind torch.ops.fht, for torch 2.11",
             ("scripts/fht_ops.cpp",)),
)

# ------------------------------------------------------------------------------------------------
# What the timing step times, in order of value. Sizes: the core sizes first, then the
# extras if time is left; rows: prefill (16,384 and 4,096) before decode (64 and 1).

CORE_SIZES = (4096, 5120, 576, 8192)
EXTRA_SIZES = (2304, 16384)
PREFILL_ROWS = (16384, 4096)
DECODE_ROWS = (64, 1)
DTYPES = ("bfloat16", "float16")
OPS = ("hadamard_patch", "hadamard_transform", "patch_add_rmsnorm")
# Triton sizes whose H_K can take either form (the add network or the padded tensor-core dot): the
# form the launcher does not pick is timed too, bf16 prefill (NETWORK_PREFERRED's model, measured).
OTHER_H_K_SIZES = (576, 2304, 5120)
# The CUDA ops' copy ratios over the SASS model's sizes (bf16, 2**26 elements), last: the model's
# backtest beyond the core sizes.
SWEEP_SIZES = (1024, 2048, 2560, 4608, 5376, 7168, 9216, 18432, 32768)
REPEATS = 3  # interleaved repeats of every case group


def timing_groups() -> list[dict]:
    """The timing step's case groups, in the order they run: each one (dtype, d, rows) with every
    provider timed side by side. ``phase`` says why it is there."""
    groups = []
    for sizes, phase in ((CORE_SIZES, "core"), (EXTRA_SIZES, "extra")):
        for dtype in DTYPES:
            for rows in PREFILL_ROWS + DECODE_ROWS:
                for d in sizes:
                    groups.append(dict(phase=phase, dtype=dtype, d=d, rows=rows, graph=rows in DECODE_ROWS))
    for d in OTHER_H_K_SIZES:
        groups.append(dict(phase="other-h-k", dtype="bfloat16", d=d, rows=16384, graph=False))
    for d in SWEEP_SIZES:
        groups.append(dict(phase="sweep", dtype="bfloat16", d=d, rows=(1 << 26) // d, graph=False))
    return groups


def triton_launches() -> list[dict]:
    """Every Triton launch of the run (the timing step's and the Triton tests'), as (op, dtype, d,
    rows, norm-weight dtype, H_K form): what ``scripts/gpu_bundle.py`` compiles into the carried cache.
    ``rows`` matters only through the launch configuration (the kernels do not specialize on it)."""
    launches = []
    for g in timing_groups():
        if g["phase"] == "sweep":
            continue
        for op in OPS:
            if g["phase"] == "other-h-k" and op != "hadamard_patch":
                continue
            launches.append(dict(op=op, dtype=g["dtype"], d=g["d"], rows=g["rows"], weight=g["dtype"],
                                 other_h_k=g["phase"] == "other-h-k"))
    # tests/test_triton_backend.py on the GPU: the add network at 9216 in every dtype (3 rows; its
    # kernels take the longest to compile), the persistent loop over many row blocks and the backward
    # (fp32 transforms of x and of the gradient) at 576, 4096 and 5120.
    for dtype in ("float32", "float16", "bfloat16"):
        for op in OPS:
            launches.append(dict(op=op, dtype=dtype, d=9216, rows=3, weight=dtype, other_h_k=False))
    for d in (576, 4096, 5120):
        for rows in (3, 5, 10 ** 6):
            for op in OPS:
                launches.append(dict(op=op, dtype="bfloat16", d=d, rows=rows, weight="bfloat16", other_h_k=False))
        for op in ("hadamard_patch", "hadamard_transform"):
            launches.append(dict(op=op, dtype="float32", d=d, rows=5, weight="float32", other_h_k=False))
    unique = {tuple(sorted(l.items())): l for l in launches}
    return list(unique.values())


# ------------------------------------------------------------------------------------------------
# Artifacts: found in the bundle, and whether the committed manifest is still current


def source_hash(paths) -> str:
    """sha256 over the repository files under ``paths`` (names and contents, sorted): what an artifact
    was built from. A missing path counts as empty."""
    h = hashlib.sha256()
    for rel in paths:
        base = ROOT / rel
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base] if base.is_file() else []
        for p in files:
            if "__pycache__" in p.parts or p.suffix in (".pyc", ".so", ".o"):
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def artifact_hash(a: Artifact) -> str:
    """What an artifact is built from: its source files, and for the Triton cache also the launches it
    holds (the plan's list, not the whole of this file, so that editing these notes changes nothing)."""
    if a.name != "triton-cache":
        return source_hash(a.sources)
    launches = json.dumps(sorted(json.dumps(l, sort_keys=True) for l in triton_launches()))
    return hashlib.sha256((source_hash(a.sources) + launches).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def artifact_status(bundle: Path) -> list[dict]:
    """Per artifact: found in ``bundle`` (its manifest entry and its files), and whether the committed
    manifest's source hash still matches the tree (``current``/``stale``/``not built``)."""
    here = read_manifest(bundle / "manifest.json") or {}
    committed = read_manifest(COMMITTED_MANIFEST) or {}
    rows = []
    for a in ARTIFACTS:
        entry = (here.get("artifacts") or {}).get(a.name) or {}
        target = bundle / a.path
        found = bool(entry) and target.exists() and entry.get("status") == "built"
        now = artifact_hash(a)
        last = (committed.get("artifacts") or {}).get(a.name) or {}
        if last.get("status") != "built":
            state = "not built" if not last else f"not built ({last.get('status')})"
        else:
            state = "current" if last.get("source_hash") == now else "stale"
        rows.append(dict(name=a.name, path=str(target), found=found, what=a.what,
                         bundle_detail=entry.get("detail"), bundle_source_current=(entry.get("source_hash") == now)
                         if entry else None, committed=state, source_hash=now))
    return rows


def plan(bundle: Path) -> dict:
    steps = [asdict(s) for s in STEPS]
    return dict(total_budget_s=TOTAL_BUDGET_S, setup_s=SETUP_S, steps=steps,
                steps_total_s=SETUP_S + sum(s.budget_s for s in STEPS), bundle=str(bundle),
                artifacts=artifact_status(bundle), timing_groups=len(timing_groups()),
                triton_launches=len(triton_launches()))


def format_plan(p: dict) -> str:
    lines = [f"GPU run plan: {len(p['steps'])} steps, {p['steps_total_s']} s of {p['total_budget_s']} s "
             f"(setup {p['setup_s']} s), most valuable first", ""]
    start = p["setup_s"]
    for i, s in enumerate(p["steps"], 1):
        lines.append(f"  {i}. {s['name']:<13} {s['budget_s']:>4} s  (by {start + s['budget_s']:>3} s)  {s['what']}")
        start += s["budget_s"]
    lines += ["", f"  timing: {p['timing_groups']} case groups; Triton launches prebuilt: {p['triton_launches']}", "",
              f"artifacts (bundle {p['bundle']}; committed manifest: {COMMITTED_MANIFEST.relative_to(ROOT)}):"]
    for a in p["artifacts"]:
        found = "found" if a["found"] else "missing"
        detail = f" [{a['bundle_detail']}]" if a["bundle_detail"] else ""
        stale = "" if a["bundle_source_current"] in (None, True) else " (built from other sources: rebuild)"
        lines.append(f"  {a['name']:<13} {found:<8} last built: {a['committed']:<10} {a['what']}{detail}{stale}")
    missing = [a["name"] for a in p["artifacts"] if not a["found"]]
    lines.append("")
    lines.append("every artifact found" if not missing else
                 f"missing: {', '.join(missing)} (gpu_check.sh builds what it can on the GPU machine and says so; "
                 f"python scripts/gpu_bundle.py --out {p['bundle']} prepares all of them here)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("GPU_BUNDLE") or DEFAULT_BUNDLE))
    parser.add_argument("--json", action="store_true", help="the plan as JSON")
    parser.add_argument("--budgets", action="store_true", help="'step seconds' lines (for gpu_check.sh)")
    parser.add_argument("--unusable", action="store_true",
                        help="the bundle's artifacts that are missing or built from other sources than this tree's")
    args = parser.parse_args(argv)
    if args.budgets:
        print("\n".join(f"{s.name} {s.budget_s}" for s in STEPS))
        return 0
    if args.unusable:
        print(" ".join(a["name"] for a in artifact_status(args.bundle.resolve())
                       if not a["found"] or a["bundle_source_current"] is False))
        return 0
    p = plan(args.bundle.resolve())
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())

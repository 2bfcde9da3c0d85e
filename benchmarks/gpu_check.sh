#!/usr/bin/env bash
# GPU verification of the CUDA backend in one go, for a machine with a CUDA GPU, python3 with torch
# (>= 2.10, a CUDA build), triton, pytest, nvcc and ninja, and no network (nothing is downloaded).
#
#   OUT=<results folder> benchmarks/gpu_check.sh [WHEEL]        (from anywhere; OUT is required)
#
# WHEEL defaults to the newest dist/linearpatch_kernels-*+cu*.whl (e.g. built elsewhere with
# `python scripts/build_wheels.py --cuda cu13`: that also checks that a wheel built against another
# torch loads).
# Without a wheel, or if it does not load, the extension is built from csrc/ on this machine for its
# GPU only (dist/ is not tracked: bring the wheel along). Steps, logged to stdout and
# $OUT/gpu_check.log, most important first:
#   1. environment; 2. install (unpack the wheel into a scratch folder on PYTHONPATH);
#   3. tests/test_cuda_backend.py (every backend vs fp64, all dtypes, rows 1/7/4096, non-contiguous
#      input, > 2**31 elements; the fused epilogue patch_add_rmsnorm vs fp64 and vs the unfused ops;
#      junit XML in $OUT); 4. timings at d=4096 x 16384 rows, bf16 (CUDA events, median): cuda and
#      triton patch and transform, the dense bf16 matmul, the paper's fp32 matmul, a device-to-device
#      copy; also decode sizes and d=5120; the fused epilogue vs add + patch + RMSNorm at 4096 and
#      16384 rows (target: >= 1.3x faster); copy ratios of the cuda ops over d = 576 .. 32768 and the
#      three dtypes beside the SASS model's (benchmarks/sass_budget.py), Triton's bf16 patch and
#      epilogue beside them (JSON and a table in $OUT);
#   5. compute-sanitizer memcheck, racecheck and synccheck on small cases of every kernel family;
#   6. the JIT fallback (a source tree without the compiled library compiles csrc/ at first use);
#   7. tests/test_triton_backend.py on the GPU: the Triton kernels compiled for this GPU vs fp64, the
#      sizes Triton refuses routed to a backend that runs them, the fp32-inside backward (last: its
#      d = 9216 kernels take minutes to compile at first use).
# STEPS="tests timings sanitizer jit triton" (the default) picks steps 3-7, e.g. STEPS=timings for a
# rerun. Each step has its own time limit (6, 5, 3 x 2.5, 4 and 4 minutes), cut to what is left of
# GPU_CHECK_SECONDS (default 480) for the whole run.
# SASS_MODEL=<sass_model.json> reuses a model written elsewhere by
# `python benchmarks/sass_budget.py --arch 90 --json F` (it needs only nvcc, not the GPU) instead of
# building it here. Tests use pytest-xdist (up to 8 workers) when it is installed.
# GPU_CHECK_TIMINGS="ops epilogue sweep" (the default) picks the parts of step 4;
# GPU_CHECK_TRITON_SWEEP="576 4096 5120 16384" the sizes of its bf16 Triton rows (each compiles at
# first use: d = 9216's add network takes minutes on an H200, so it is left out by default).
# A step that would start with under 10 s of GPU_CHECK_SECONDS left is skipped and named at the end.
# Exit status: 0 when every step ran and passed, else the number of failed and skipped steps.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the steps below run from a scratch folder
[ -n "${SASS_MODEL:-}" ] && [ -f "$SASS_MODEL" ] && SASS_MODEL=$(cd "$(dirname "$SASS_MODEL")" && pwd)/$(basename "$SASS_MODEL")
exec > >(tee "$OUT/gpu_check.log") 2>&1
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/linearpatch-gpu-check.XXXXXX")
site="$scratch/site"
failed=0
steps=" ${STEPS:-tests timings sanitizer jit triton} "
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-480} ))
skipped=""
# wants STEP: the step was asked for and there are at least 10 s left to run it (else it is skipped,
# and reported as such at the end).
wants() {
    [[ "$steps" == *" $1 "* ]] || return 1
    if (( deadline - $(date +%s) < 10 )); then
        skipped="$skipped $1"; echo; echo "=== skipped: $1 (GPU_CHECK_SECONDS used up) ==="; return 1
    fi
}
# limit SECONDS: a step's time limit, cut to what is left of GPU_CHECK_SECONDS (at least 1: `timeout 0`
# would mean no limit).
limit() { local left=$(( deadline - $(date +%s) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
xdist=()
step() { echo; echo "=== $(date +%H:%M:%S) $* ==="; }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$python" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(0), 'sm_%d%d' % torch.cuda.get_device_capability(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
nvcc --version | tail -n 2

step "2. install"
load_check() {
    (cd "$scratch" && PYTHONPATH="$site" "$python" -c "
import sys
from linearpatch_kernels.backends import cuda_backend as c
ok = c.load_extension(allow_jit=False)
print('loaded:', c.loaded_from() if ok else None)
sys.exit(0 if ok else 1)")
}
unpack() { rm -rf "$site" && mkdir -p "$site" && "$python" -m zipfile -e "$1" "$site"; }
wheel=${1:-$(ls -t "$root"/dist/linearpatch_kernels-*+cu*.whl 2>/dev/null | head -n 1)}
if [ -n "$wheel" ] && unpack "$wheel" && load_check; then
    echo "using the prebuilt wheel $(basename "$wheel") under torch $("$python" -c 'import torch; print(torch.__version__)')"
else
    [ -n "$wheel" ] && fail "the wheel $wheel does not load here; building from source"
    arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
    (cd "$root" && LINEARPATCH_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
        "$python" -m pip wheel . --no-build-isolation --no-deps --no-index -w "$scratch/dist") \
        && unpack "$(ls "$scratch"/dist/linearpatch_kernels-*.whl)" && load_check \
        || { fail "build from source"; echo "gpu_check: nothing to test"; exit "$failed"; }
fi
export PYTHONPATH="$site"
cd "$scratch"  # never import the package from the source tree below

"$python" -c "import xdist" 2>/dev/null && xdist=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
# run_tests NAME SECONDS: one test file on the GPU, its junit XML in $OUT.
run_tests() {
    timeout "$(limit "$2")" "$python" -m pytest -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} -rs --durations=10 \
        --junitxml="$OUT/$1.xml" "$root/tests/$1.py" || fail "tests/$1.py"
}

if wants tests; then
step "3. tests/test_cuda_backend.py"
run_tests test_cuda_backend 360
fi

if wants timings; then
step "4. timings"
# The SASS budget's modelled copy ratios (built here with nvcc for sm_90), printed beside the measured ones.
if [ -n "${SASS_MODEL:-}" ] && [ -f "$SASS_MODEL" ]; then
    cp "$SASS_MODEL" "$OUT/sass_model.json"
    [ -f "${SASS_MODEL%.json}.txt" ] && cp "${SASS_MODEL%.json}.txt" "$OUT/sass_model.txt"
    echo "SASS model from $SASS_MODEL"
elif [ -f "$root/benchmarks/sass_budget.py" ]; then
    (cd "$root" && timeout "$(limit 150)" "$python" benchmarks/sass_budget.py --arch 90 --json "$OUT/sass_model.json" \
        > "$OUT/sass_model.txt") \
        || echo "the SASS model did not run: no modelled column"
fi
timeout "$(limit 300)" "$python" - "$OUT" <<'PY' || fail "timings"
import json
import math
import os
import statistics
import sys

import torch

import linearpatch_kernels as lp
from linearpatch_kernels.hadamard import hadamard_matrix

out = sys.argv[1]
torch.backends.cuda.matmul.allow_tf32 = False


def median_ms(fn, reps=50, warmup=5):
    """Median of per-call CUDA event times; a 256 MB write between calls evicts the L2 (60 MB).
    A case that raises is reported and timed as NaN, so that one failing case keeps the others' rows."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    try:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    except Exception as e:  # noqa: BLE001 -- reported, the failure counted at the end
        errors.append(repr(e))
        print("FAILED case:", repr(e)[:300], flush=True)
        return float("nan")
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured once in a CUDA graph, replayed per call: the kernel time without the host's
    Python and launch overhead, which a CUDA-event time of one eager call includes whenever the host
    takes longer than the kernel (decode-sized inputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


from linearpatch_kernels.backends import cuda_backend, triton_backend

# Loads the library (its ops are registered at load): every part below calls the kernels directly.
assert cuda_backend.is_available(torch.device("cuda")), cuda_backend._load_error
results, sweep, speedups, errors = [], [], {}, []
def source_commit():
    """The commit of the kernels timed (benchmarks/sass_backtest.py refits the speed model to each run's
    numbers against that commit's kernels): GPU_CHECK_COMMIT, else git, else unknown."""
    import subprocess
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda, commit=source_commit(),
            method="median of 50 CUDA-event timings per call, 5 warm-ups, L2 flushed between calls")


def no_nan(v):
    """NaN (a failed case) as null, so that the JSON is valid."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [no_nan(x) for x in v]
    return v


def save():
    """Write (and print) what has been measured so far: a step cut short keeps its rows."""
    lines = [f"{'d':>5} {'rows':>6}  {'case':<40} {'median ms':>10} {'GB/s (r+w)':>11} {'x copy':>7}"]
    for r in results:
        lines.append(f"{r['d']:>5} {r['rows']:>6}  {r['case']:<40} {r['median_ms']:>10.4f} "
                     f"{r['gb_per_s_read_plus_write']:>11.0f} {r['ratio_to_copy']:>7.2f}")
    for rows, x in speedups.items():
        verdict = "not measured" if math.isnan(x) else "met" if x >= TARGET else "MISSED"
        lines.append(f"fused epilogue vs separate add + patch + RMSNorm, d=4096 x {rows} rows bf16: "
                     f"{x:.2f}x faster (target >= {TARGET}x: {verdict})")
    sweep_lines = [f"{'op':<24} {'dtype':<9} {'d':>6} {'rows':>7} {'median ms':>10} {'x copy':>7} {'model':>6}"]
    for r in sweep:
        m = f"{r['modelled_ratio']:.2f}" if r["modelled_ratio"] is not None else "-"
        sweep_lines.append(f"{r['op']:<24} {r['dtype']:<9} {r['d']:>6} {r['rows']:>7} {r['median_ms']:>10.4f} "
                           f"{r['ratio_to_copy']:>7.2f} {m:>6}")
    sweep_lines.append("x copy: median time / median time of a copy of x (the epilogue moves two tensors in and "
                       "two out: its floor is 2); model: the SASS budget's H200 estimate (benchmarks/sass_budget.py), "
                       "same basis")
    table = "\n".join(lines + [""] + sweep_lines + [f"failed cases: {len(errors)}"])
    with open(f"{out}/gpu_timings.json", "w") as f:
        json.dump(no_nan(dict(meta=meta, results=results, copy_ratios=sweep, errors=errors)), f, indent=1)
    with open(f"{out}/gpu_timings.txt", "w") as f:
        f.write(table + "\n")
    return table


TARGET = 1.3
PARTS = os.environ.get("GPU_CHECK_TIMINGS", "ops epilogue sweep").split()
EPS = 1e-6
if "ops" in PARTS:
    for d, rows_list in ((4096, (16384, 4096, 64, 1)), (5120, (16384,))):
        s = 0.5 + torch.rand(d, device="cuda")
        h = hadamard_matrix(d, device="cuda")
        p_fp32 = ((h * s.double()) @ h.T).float()  # the dense patch H diag(s) H^T
        p_bf16 = p_fp32.to(torch.bfloat16)
        del h
        for rows in rows_list:
            x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
            y = torch.empty_like(x)
            assert cuda_backend.is_available(x.device), cuda_backend._load_error
            cases = {
                "copy": lambda: y.copy_(x),
                "cuda patch": lambda: cuda_backend.hadamard_patch(x, s),
                "triton patch": lambda: triton_backend.hadamard_patch(x, s),
                "cuda transform": lambda: cuda_backend.hadamard_transform(x, d ** -0.5),
                "triton transform": lambda: triton_backend.hadamard_transform(x, d ** -0.5),
                "public op, auto backend": lambda: lp.hadamard_patch(x, s),
                "dense bf16 matmul": lambda: x @ p_bf16,
                "paper: fp32 matmul + casts": lambda: (x.float() @ p_fp32).to(torch.bfloat16),
            }
            if rows <= 64:  # host overhead vs kernel time: the same calls replayed from a CUDA graph
                for name in ("cuda patch", "triton patch", "cuda transform", "public op, auto backend",
                             "dense bf16 matmul"):
                    try:
                        cases[name + " (CUDA graph)"] = graphed(cases[name])
                    except Exception as e:  # noqa: BLE001 -- reported, the failure counted at the end
                        errors.append(f"capturing {name}: {e!r}")
                        print("FAILED capture:", name, repr(e)[:300], flush=True)
            copy_ms = median_ms(cases["copy"])
            for name, fn in cases.items():
                ms = copy_ms if name == "copy" else median_ms(fn)
                gbps = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
                results.append(dict(d=d, rows=rows, dtype="bfloat16", case=name, median_ms=ms,
                                    gb_per_s_read_plus_write=gbps, ratio_to_copy=ms / copy_ms))
            print(f"timed d={d} x {rows} rows", flush=True)
            save()

if "epilogue" in PARTS:
    # The fused interface epilogue against what it replaces: the residual add, the patch (cuda backend)
    # and Hugging Face's RMSNorm, as separate ops. Traffic counted for the fused op: read residual and
    # update, write h and normed (4 tensors); the copy moves 2.
    d = 4096
    s = 0.5 + torch.rand(d, device="cuda")
    w = (0.5 + torch.rand(d, device="cuda")).to(torch.bfloat16)


    def separate(r, u):
        h = cuda_backend.hadamard_patch(r + u, s)
        hf = h.float()
        return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)


    speedups = {}
    for rows in (4096, 16384):
        r = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
        u = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(r)
        try:  # a wrong or failing fused op is counted as an error; the timings go on
            fused_h, fused_n = cuda_backend.patch_add_rmsnorm(r, u, s, w, EPS)
            sep_h, sep_n = separate(r, u)
            agree = float((fused_n.double() - sep_n.double()).norm() / sep_n.double().norm())
            if not agree < 1e-2:
                raise AssertionError(f"fused and separate epilogues disagree at {rows} rows: {agree:.1e}")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
            print("FAILED check:", repr(e)[:300], flush=True)
        cases = {
            "copy": lambda: y.copy_(r),
            "epilogue: cuda fused": lambda: cuda_backend.patch_add_rmsnorm(r, u, s, w, EPS),
            "epilogue: triton fused": lambda: triton_backend.patch_add_rmsnorm(r, u, s, w, EPS),
            "epilogue: separate (cuda)": lambda: separate(r, u),
            "epilogue: public op, auto": lambda: lp.patch_add_rmsnorm(r, u, s, w, EPS),
        }
        times = {name: median_ms(fn) for name, fn in cases.items()}
        speedups[rows] = times["epilogue: separate (cuda)"] / times["epilogue: cuda fused"]
        for name, ms in times.items():
            moved = (2 if name == "copy" else 4) * r.numel() * r.element_size()
            results.append(dict(d=d, rows=rows, dtype="bfloat16", case=name, median_ms=ms,
                                gb_per_s_read_plus_write=moved / (ms * 1e-3) / 1e9, ratio_to_copy=ms / times["copy"],
                                fused_speedup_over_separate=speedups[rows] if name == "epilogue: cuda fused" else None))
    save()

# Copy ratios of the cuda ops over the sizes and dtypes, beside the SASS model's (step 4 writes
# $OUT/sass_model.json first when benchmarks/sass_budget.py is there). 2**26 elements per tensor.
try:
    with open(f"{out}/sass_model.json") as f:
        model = {(m["op"].removeprefix("hadamard_"), m["dtype"], int(m["d"])): m["ratio"]
                 for m in json.load(f) if m.get("gpu") == "H200" and m.get("ratio") is not None}
except (OSError, KeyError, TypeError, ValueError, AttributeError):
    model = {}


def other_h_k_path(fn, dim):
    """(name, ``fn`` with the Triton backend's K > 1 rows of ``dim`` on the other form of H_K than the one
    it picks on this GPU): the add network where it picks the padded tensor-core dot (as if no padded row
    fitted the dot), the dot where NETWORK_PREFERRED picks the network. The prefill model of the
    compiled code chose per architecture; this times both."""
    capability = torch.cuda.get_device_capability()
    picks_network = triton_backend.launch_config(dim, 1 << 14, 132, torch.bfloat16, "hadamard_patch", None,
                                                 capability).NETWORK

    def run():
        saved = triton_backend.MAX_TILE_DOT, triton_backend.NETWORK_PREFERRED
        if picks_network:
            triton_backend.NETWORK_PREFERRED = {}
        else:
            triton_backend.MAX_TILE_DOT = 1
        try:
            return fn()
        finally:
            triton_backend.MAX_TILE_DOT, triton_backend.NETWORK_PREFERRED = saved
    return ("triton patch, H_K on the padded dot" if picks_network else "triton patch, H_K as adds"), run


# bf16 only: each size compiles for the GPU first (the 9216 add network takes minutes to compile)
TRITON_SWEEP = [int(v) for v in os.environ.get("GPU_CHECK_TRITON_SWEEP", "576 2304 4096 5120 16384").split()]
for dtype in (torch.bfloat16, torch.float16, torch.float32) if "sweep" in PARTS else ():
    for dim in (576, 1024, 2048, 2304, 2560, 4096, 4608, 5120, 5376, 7168, 8192, 9216, 16384, 18432, 32768):
        rows = (1 << 26) // dim
        x = torch.randn(rows, dim, device="cuda", dtype=dtype)
        u = torch.randn(rows, dim, device="cuda", dtype=dtype)
        y = torch.empty_like(x)
        s = 0.5 + torch.rand(dim, device="cuda")
        w = 0.5 + torch.rand(dim, device="cuda")
        copy_ms = median_ms(lambda: y.copy_(x))
        ops = {
            "patch": lambda: cuda_backend.hadamard_patch(x, s),
            "transform": lambda: cuda_backend.hadamard_transform(x, 0.5),
            "patch_add_rmsnorm": lambda: cuda_backend.patch_add_rmsnorm(x, u, s, w, EPS),
        }
        if dtype == torch.bfloat16 and dim in TRITON_SWEEP:
            ops["triton patch"] = lambda: triton_backend.hadamard_patch(x, s)
            ops["triton patch_add_rmsnorm"] = lambda: triton_backend.patch_add_rmsnorm(x, u, s, w, EPS)
            if dim in (576, 2304, 5120):  # the other form of H_K: +-1 add network <-> padded tensor-core dot
                name, fn = other_h_k_path(lambda: triton_backend.hadamard_patch(x, s), dim)
                ops[name] = fn
        for op, fn in ops.items():
            ms = median_ms(fn)
            name = str(dtype).removeprefix("torch.")
            sweep.append(dict(op=op, dtype=name, d=dim, rows=rows, median_ms=ms, copy_ms=copy_ms,
                              ratio_to_copy=ms / copy_ms, modelled_ratio=model.get((op, name, dim))))
        del x, u, y
        save()
print(save())
sys.exit(1 if errors else 0)
PY
fi

if wants sanitizer; then
step "5. compute-sanitizer"
cat > "$scratch/small_cases.py" <<'PY'
# Every kernel family on small inputs: row (64, 4096; a block per row with s read through L1 at 16384,
# and the lane-shuffle stage at 32768), kfast
# (K > 1 transform and patch at 576 and 5120: a partial row tile), kron (the epilogue at 576 and 5120,
# every op at 24576), 3 rows (a partial block), all dtypes; transform, patch and the fused epilogue
# patch_add_rmsnorm. fp64 references on
# the CPU, so that the only GPU work is ours and the copies.
import sys

import torch
import linearpatch_kernels as lp

sys.path.insert(0, sys.argv[1])  # the tests folder: its fp64 Kronecker-form reference
from reference import factored_reference as transform64


def rel(a, b):
    return float((a.cpu().double() - b).norm() / b.norm())


worst = 0.0
for d in (64, 576, 4096, 5120, 16384, 32768, 24576):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, d).to(dtype)
        u = (0.1 * torch.randn(3, d)).to(dtype)
        s = 0.5 + torch.rand(d)
        w = 0.5 + torch.rand(d)
        with lp.use_backend("cuda"):
            y = lp.hadamard_patch(x.cuda(), s.cuda())
            t = lp.hadamard_transform(x.cuda(), 0.5)
            h, n = lp.patch_add_rmsnorm(x.cuda(), u.cuda(), s.cuda(), w.cuda(), 1e-6)
        ref = transform64(transform64(x) * s.double()) / d
        ref_t = transform64(x) * 0.5
        ref_h = transform64(transform64(x.double() + u.double()) * s.double()) / d
        ref_n = ref_h * torch.rsqrt(ref_h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        worst = max(worst, rel(y, ref), rel(t, ref_t), rel(h, ref_h), rel(n, ref_n))
print(f"small cases: worst rel. error {worst:.1e}")
assert worst < 1e-2
PY
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
        # One cudaMalloc per tensor, so that memcheck sees every out-of-bounds access.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit 150)" compute-sanitizer --tool "$tool" --error-exitcode 3 \
            "$python" "$scratch/small_cases.py" "$root/tests" 2>&1 | tail -n 5
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "compute-sanitizer --tool $tool"
    done
else
    fail "compute-sanitizer not found"
fi
fi

if wants jit; then
step "6. JIT fallback (source tree without the compiled library)"
(PYTHONPATH="$root" LINEARPATCH_CUDA_CACHE="$scratch/jit" MAX_JOBS=$(nproc) timeout "$(limit 240)" "$python" - <<'PY'
import time
import torch
from linearpatch_kernels.backends import cuda_backend as c
import linearpatch_kernels as lp
assert c.prebuilt_library() is None, c.prebuilt_library()
t = time.time()
assert c.is_available(torch.device("cuda")), c._load_error
print(f"JIT: {c.loaded_from()} in {time.time() - t:.0f} s")
x = torch.randn(7, 5120, device="cuda", dtype=torch.bfloat16)
s = 0.5 + torch.rand(5120, device="cuda")
with lp.use_backend("cuda"):
    y = lp.hadamard_patch(x, s)
with lp.use_backend("torch"):
    ref = lp.hadamard_patch(x.double(), s.double())
err = float((y.double() - ref).norm() / ref.norm())
print(f"JIT-built patch, d=5120 bf16: rel. error {err:.1e}")
assert err < 1e-2
u = torch.randn(7, 5120, device="cuda", dtype=torch.bfloat16)
w = 0.5 + torch.rand(5120, device="cuda")
with lp.use_backend("cuda"):
    h, n = lp.patch_add_rmsnorm(x, u, s, w, 1e-6)
with lp.use_backend("torch"):
    ref_h, ref_n = lp.patch_add_rmsnorm(x.double(), u.double(), s.double(), w.double(), 1e-6)
err = max(float((h.double() - ref_h).norm() / ref_h.norm()), float((n.double() - ref_n).norm() / ref_n.norm()))
print(f"JIT-built patch_add_rmsnorm, d=5120 bf16: rel. error {err:.1e}")
assert err < 1e-2
PY
) || fail "JIT fallback"
fi

if wants triton; then
step "7. tests/test_triton_backend.py (compiled for this GPU)"
run_tests test_triton_backend 240
fi

step "done: $failed failed step(s)${skipped:+, skipped for lack of time:$skipped}"
rm -rf "$scratch"
exit $(( failed + $(wc -w <<<"$skipped") ))

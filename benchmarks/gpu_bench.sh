#!/usr/bin/env bash
# The prepared GPU run of both benchmarks: one GPU, about 8 minutes, no network, no pip.
#
#   bash benchmarks/gpu_bench.sh [WHEEL]    # results under $OUT/<gpu>-<date>/ ($OUT default: benchmarks/results)
#
# The CUDA backend's library comes from WHEEL (default: the newest dist/linearpatch_kernels-*+cu*.whl,
# if any) when it loads here: it is copied next to the source tree's package. Otherwise the backend's
# JIT loader compiles csrc/ once, into LINEARPATCH_CUDA_CACHE.
# PYTHON picks the interpreter (default python3).
#
# Stages, in order of importance, each with its own time limit so that a slow or failing stage
# leaves time for the next ones (the whole run stays under GPU_BENCH_SECONDS, default 480):
#   1. versions (torch, triton, CUDA, driver, GPU) and the CUDA backend: loaded prebuilt, or compiled
#      once by its JIT loader into LINEARPATCH_CUDA_CACHE
#   2. op benchmark, bf16: every provider, tokens 1..65536, d in {576, 2048, 4096, 5120, 8192}
#   3. end-to-end benchmark: LLaMA-3-8B shape, prefill 1x2048 and 8x2048, decode b = 1, 16, 64
#   4. op benchmark, fp16 (same sweep)
#   5. op benchmark under CUDA graphs at decode sizes (the GPU time without launch overhead)
# Every stage writes its JSON as it goes, so a stage cut short by its limit still leaves its rows.
# Plots need matplotlib; without it, render them later: python benchmarks/plot.py <file>.json
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
python() { "$PY" "$@"; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}"  # parallel nvcc jobs of the JIT build
export LINEARPATCH_CUDA_CACHE="${LINEARPATCH_CUDA_CACHE:-${TMPDIR:-/tmp}/linearpatch-cuda-jit}"
TOTAL="${GPU_BENCH_SECONDS:-480}"
START=$(date +%s)

remaining() { echo $((TOTAL - ($(date +%s) - START))); }
clamp() { local v=$1 lo=$2 hi=$3; ((v < lo)) && v=$lo; ((v > hi)) && v=$hi; echo "$v"; }

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: torch sees no CUDA device; nothing to do" >&2
    exit 1
fi
GPU_SLUG=$(python -c "import torch; print('-'.join(torch.cuda.get_device_name(0).lower().split()))")
DIR="${OUT:-$REPO/benchmarks/results}/$GPU_SLUG-$(date -u +%Y-%m-%d)"
mkdir -p "$DIR"
exec > >(tee -a "$DIR/gpu_bench.log") 2>&1
echo "== gpu_bench.sh: results in $DIR, time limit ${TOTAL} s"

# ---- 1. versions and the CUDA backend ------------------------------------------------------------
{
    python - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for name in ("triton", "transformers", "fast_hadamard_transform", "matplotlib"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "not available:", type(e).__name__)
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, "capability", torch.cuda.get_device_capability(0), "memory_gib", round(p.total_memory / 2**30, 1),
      "sms", p.multi_processor_count, "l2_bytes", getattr(p, "L2_cache_size", None))
EOF
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1
    nvcc --version 2>&1 | tail -n 2
    git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "git commit: not a git checkout"
} | tee "$DIR/versions.txt"

WHEEL="${1:-$(ls -t "$REPO"/dist/linearpatch_kernels-*+cu*.whl 2>/dev/null | head -n 1)}"
if [ -n "$WHEEL" ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/linearpatch-bench-site.XXXXXX")
    if python -m zipfile -e "$WHEEL" "$SITE" && (cd "$SITE" && PYTHONPATH="$SITE" python -c "
import sys
from linearpatch_kernels.backends import cuda_backend as c
sys.exit(0 if c.load_extension(allow_jit=False) else 1)"); then
        # Only the compiled library is taken from the wheel (ignored by git, as an in-place build
        # would leave it); the Python code stays the source tree's.
        cp "$SITE"/linearpatch_kernels/_C*.so "$REPO/linearpatch_kernels/" && echo "using the library of the wheel $WHEEL"
    else
        echo "the wheel $WHEEL does not load here; using the source tree (JIT build)"
    fi
fi

budget=$(clamp $(( $(remaining) - 300 )) 60 240)
echo "== 1. CUDA backend (limit ${budget} s)"
timeout "$budget" "$PY" - <<'EOF'
import time
t0 = time.time()
import linearpatch_kernels as lp
from linearpatch_kernels.backends import get_backend
names = lp.available_backends("cuda")
print(f"backends on cuda: {names} ({time.time() - t0:.0f} s)")
if "cuda" in names:
    print("cuda backend loaded from:", get_backend("cuda").loaded_from())
else:
    raise SystemExit("the cuda backend is not available")
EOF
status=$?
echo "stage 1 exit $status"
if [ "$status" -ne 0 ]; then
    # Later stages would otherwise restart the (interrupted or failing) build inside their own time.
    export LINEARPATCH_CUDA_JIT=0
    echo "no cuda backend: the benchmarks run without it (LINEARPATCH_CUDA_JIT=0)"
fi

# ---- 2. op benchmark, bf16 -----------------------------------------------------------------------
budget=$(clamp $(( ($(remaining) - 200) / 2 )) 40 110)
echo "== 2. op benchmark bf16 (configurations started within ${budget} s)"
timeout $((budget + 60)) "$PY" benchmarks/bench_patch.py --device cuda --dtype bf16 --budget 0.25 \
    --d 4096 8192 2048 5120 576 --max-seconds "$budget" --out-dir "$DIR" --name bench_patch_bf16
echo "stage 2 exit $?"

# ---- 3. end to end -------------------------------------------------------------------------------
budget=$(clamp $(( $(remaining) - 100 )) 60 220)
echo "== 3. end-to-end benchmark (workloads started within ${budget} s)"
timeout $((budget + 60)) "$PY" benchmarks/bench_e2e.py --device cuda --max-seconds "$budget" --out-dir "$DIR"
echo "stage 3 exit $?"

# ---- 4. op benchmark, fp16 -----------------------------------------------------------------------
budget=$(clamp $(( $(remaining) - 60 )) 10 100)
echo "== 4. op benchmark fp16 (configurations started within ${budget} s)"
timeout $((budget + 40)) "$PY" benchmarks/bench_patch.py --device cuda --dtype fp16 --budget 0.2 \
    --max-seconds "$budget" --d 4096 8192 576 2048 5120 --out-dir "$DIR" --name bench_patch_fp16
echo "stage 4 exit $?"

# ---- 5. CUDA graphs at decode sizes --------------------------------------------------------------
budget=$(clamp $(( $(remaining) - 20 )) 5 40)
echo "== 5. op benchmark bf16 under CUDA graphs (configurations started within ${budget} s)"
timeout $((budget + 30)) "$PY" benchmarks/bench_patch.py --device cuda --dtype bf16 --cuda-graph --budget 0.2 \
    --tokens 1 8 64 512 --d 4096 576 8192 --max-seconds "$budget" --out-dir "$DIR" --name bench_patch_graph
echo "stage 5 exit $?"

echo "== done in $(( $(date +%s) - START )) s; files:"
ls -l "$DIR"

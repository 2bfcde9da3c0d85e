#!/usr/bin/env bash
# The prepared GPU run: one command that checks and times everything open, in at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh --plan                  # steps, budgets, artifacts found (no GPU needed)
#   OUT=<results folder> bash benchmarks/gpu_check.sh    # the run, from the repository root
#
# How GPU time is used here (the rules this script is written for):
# * A GPU machine is available for about 15 minutes at a time (its start included), without
#   network or pip. Everything that can be built without a GPU is built beforehand and carried:
#   `python scripts/gpu_bundle.py` writes it into `.gpu-bundle/` (the cu130 sm_90 wheel, Triton's
#   cache for triton 3.6 under Python 3.12, the SASS model's JSON, fast-hadamard-transform's kernels;
#   under 64 MB). Carry the repository and that folder (the one ignored path to bring along); nothing
#   else is needed there: Python 3.12, torch 2.11, triton 3.6, transformers, nvcc and ninja are
#   the machine's. A missing piece is said so and built there, at the cost of the run's time.
# * One prepared command, run once: this script. Give it a time limit of 9 minutes: the steps'
#   budgets add up to 8 (benchmarks/gpu_plan.py), so a second run still fits the same window if the first
#   one fails early (STEPS=... reruns only some steps). The whole invocation, from the repository
#   root of a copy that carries `.gpu-bundle/` (the only path outside git it needs) and with OUT
#   naming the folder whose contents come back:
#       OUT=$OUT bash benchmarks/gpu_check.sh          (time limit 540 s)
#   Nothing else may run on the GPU meanwhile.
# * Results are written under $OUT as each step ends (a step cut short keeps what it measured):
#   gpu_check.log, environment.txt, clocks.csv (SM/memory clocks every 250 ms), steps.json,
#   gpu_timings.json/.txt, junit XML of the test steps, bench_e2e.json/.txt, sanitizer.txt, and
#   record/ (benchmarks/gpu_record.py: the comparable record with the measured-vs-modelled table).
#   Bring $OUT back and commit its record/ as benchmarks/results/<gpu>-<date>/.
#
# Steps, most valuable first (budgets in benchmarks/gpu_plan.py, each a hard limit, all of them cut to
# what is left of GPU_CHECK_SECONDS, default 480): timings, cuda-tests, sanitizer, e2e,
# triton-tests, jit. A step that would start with under 10 s left is skipped and named at the end.
# Environment: OUT (required for a run), GPU_BUNDLE (default <repo>/.gpu-bundle), STEPS (default all,
# e.g. STEPS="timings e2e"), GPU_CHECK_SECONDS, PYTHON (default python3).
# Exit status: 0 when every step ran and passed, else the number of failed and skipped steps.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
bundle=${GPU_BUNDLE:-$root/.gpu-bundle}
if [ "${1:-}" = "--plan" ]; then
    exec "$python" "$root/benchmarks/gpu_plan.py" --bundle "$bundle"
fi
OUT=${OUT:?set OUT to the folder for the results (or run with --plan)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the steps below run from a scratch folder
bundle=$(cd "$bundle" 2>/dev/null && pwd || echo "$bundle")
exec > >(tee "$OUT/gpu_check.log") 2>&1
scratch=$(mktemp -d "${TMPDIR:-/tmp}/linearpatch-gpu-check.XXXXXX")
site="$scratch/site"
failed=0
skipped=""
started=$(date +%s)
deadline=$(( started + ${GPU_CHECK_SECONDS:-480} ))
steps=" ${STEPS:-timings cuda-tests sanitizer e2e triton-tests jit} "
declare -A budget
while read -r name seconds; do budget[$name]=$seconds; done <<< "$("$python" "$root/benchmarks/gpu_plan.py" --budgets)"
clock_pid=""
cleanup() { { [ -n "$clock_pid" ] && kill "$clock_pid"; rm -rf "$scratch"; } 2>/dev/null; }
trap cleanup EXIT

say() { echo; echo "=== $(date +%H:%M:%S) (+$(( $(date +%s) - started )) s) $* ==="; }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }
# limit SECONDS: a step's budget, cut to what is left of GPU_CHECK_SECONDS (at least 1: `timeout 0` means none)
limit() { local left=$(( deadline - $(date +%s) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
# Triton's cache entries now (a step that adds some compiled them at run time: the bundle missed them)
entries() { find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l; }
record_step() {  # NAME STATUS SECONDS NEW_KERNELS: one line of steps.json per step, as it ends
    "$python" - "$OUT/steps.json" "$@" <<'PY'
import json, sys
path, name, status, seconds, kernels = sys.argv[1:6]
try:
    steps = json.load(open(path))
except (OSError, ValueError):
    steps = []
steps.append(dict(name=name, status=status, seconds=int(seconds), triton_kernels_compiled_here=int(kernels)))
json.dump(steps, open(path, "w"), indent=1)
PY
}
# run_step NAME COMMAND...: the step under its budget, its status and Triton's misses recorded.
run_step() {
    local name=$1 t0 before status
    shift
    [[ "$steps" == *" $name "* ]] || return 0
    if (( deadline - $(date +%s) < 10 )); then
        skipped="$skipped $name"; say "skipped: $name (GPU_CHECK_SECONDS used up)"; record_step "$name" skipped 0 0; return 0
    fi
    say "$name (budget $(limit "${budget[$name]}") s)"
    t0=$(date +%s); before=$(entries)
    timeout "$(limit "${budget[$name]}")" "$@"
    status=$?
    local compiled=$(( $(entries) - before ))
    (( compiled > 0 )) && echo "note: Triton compiled $compiled kernel(s) during $name (not in the bundle's cache)"
    case $status in
        0) record_step "$name" passed $(( $(date +%s) - t0 )) "$compiled" ;;
        124) fail "$name: cut at its budget"; record_step "$name" timeout $(( $(date +%s) - t0 )) "$compiled" ;;
        *) fail "$name (exit $status)"; record_step "$name" failed $(( $(date +%s) - t0 )) "$compiled" ;;
    esac
}

say "setup: environment, clocks, bundle $bundle"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,clocks.sm,power.limit --format=csv
    "$python" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); p = torch.cuda.get_device_properties(0); print('gpu', p.name, 'sm_%d%d' % torch.cuda.get_device_capability(0), p.multi_processor_count, 'SMs', getattr(p, 'L2_cache_size', '?'), 'B L2')"
    nvcc --version | tail -n 2
    command -v compute-sanitizer || echo "compute-sanitizer: not found"
    git -C "$root" rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
    echo "bundle manifest:"; cat "$bundle/manifest.json" 2>/dev/null || echo "  (none)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
# The SM and memory clocks through the whole run (the timings' groups log theirs too).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv \
    -lms 250 > "$OUT/clocks.csv" 2>/dev/null &
clock_pid=$!

# Pieces of the bundle that are missing or were built from other sources than this tree's.
unusable=" $("$python" "$root/benchmarks/gpu_plan.py" --bundle "$bundle" --unusable) "
echo "bundle: unusable pieces:${unusable}(missing, or built from other sources)"

# The wheel's compiled library under this tree's Python package, in a scratch folder on PYTHONPATH,
# loaded without a JIT build (a wheel built from other kernel sources is not used).
load_check() {
    (cd "$scratch" && PYTHONPATH="$site" "$python" -c "
import sys
from linearpatch_kernels.backends import cuda_backend as c
ok = c.load_extension(allow_jit=False)
print('loaded:', c.loaded_from() if ok else c.load_error())
sys.exit(0 if ok else 1)")
}
unpack() {  # WHEEL: its package, then this tree's Python files over it (the compiled parts stay the wheel's)
    rm -rf "$site" && mkdir -p "$site" && "$python" -m zipfile -e "$1" "$site" \
        && (cd "$root" && find linearpatch_kernels -name "*.py" -exec cp --parents {} "$site" \;)
}
wheel=$(ls -t "$bundle"/wheel/linearpatch_kernels-*+cu13*.whl 2>/dev/null | head -n 1)
[[ "$unusable" == *" wheel "* ]] && [ -n "$wheel" ] && echo "wheel: built from other kernel sources: not used" && wheel=""
if [ -n "$wheel" ] && unpack "$wheel" && load_check; then
    echo "wheel: $(basename "$wheel") (from the bundle)"
else
    [ -n "$wheel" ] && fail "the bundle's wheel $(basename "$wheel") does not load here"
    echo "wheel: missing from the bundle: building the extension here for this GPU (minutes of the run)"
    arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
    (cd "$root" && LINEARPATCH_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
        "$python" -m pip wheel . --no-build-isolation --no-deps --no-index -w "$scratch/dist") \
        && unpack "$(ls "$scratch"/dist/linearpatch_kernels-*.whl)" && load_check \
        || { fail "build from source"; echo "gpu_check: nothing to test"; exit "$failed"; }
fi
export PYTHONPATH="$site"

# Triton's cache: the bundle's kernels, their group files pointed here (re-keyed if this triton's key
# differs from the one recorded); without it every Triton kernel compiles at first use.
export TRITON_CACHE_DIR="$scratch/triton-cache"
if [ -f "$bundle/triton-cache/entries.json" ]; then
    "$python" "$root/scripts/triton_cache.py" install --cache "$bundle/triton-cache" --to "$TRITON_CACHE_DIR" \
        || fail "installing the bundle's Triton cache"
    # the prefill model of those kernels (the Triton rows' modelled column of the record)
    [[ "$unusable" != *" triton-cache "* ]] && cp "$bundle/triton_model.json" "$OUT/" 2>/dev/null
else
    mkdir -p "$TRITON_CACHE_DIR"
    echo "triton cache: missing from the bundle: Triton compiles each kernel at first use"
fi
if [ -f "$bundle/sass_model.json" ] && [[ "$unusable" != *" sass-model "* ]]; then
    cp "$bundle/sass_model.json" "$OUT/sass_model.json" && echo "SASS model: from the bundle"
else
    echo "SASS model: missing from the bundle or stale: building it here in the background (nvcc, no GPU)"
    (cd "$root" && "$python" benchmarks/sass_budget.py --arch 90 --json "$OUT/sass_model.json" > "$OUT/sass_model.txt" 2>&1) &
fi
lib=$(ls "$bundle"/fht/libfht_ops*.so 2>/dev/null | head -n 1)
if [ -n "$lib" ]; then
    export FHT_OPS_LIBRARY="$lib"; echo "fast-hadamard-transform: $lib"
else
    echo "fast-hadamard-transform: missing from the bundle: its rows are left out of the timings"
fi
cd "$scratch"  # never import the package from the source tree below (PYTHONPATH is the wheel's)
# (run_step runs commands under `timeout`, which cannot run shell functions: each step is a command.)
pytest=("$python" -m pytest -q -p no:cacheprovider -rs --durations=10)
"$python" -c "import xdist" 2>/dev/null && pytest+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")

# 1. timings: each group saved as it ends; the groups stop 10 s before the budget so the last one finishes.
run_step timings "$python" "$root/benchmarks/gpu_timings.py" --out "$OUT" --seconds $(( $(limit "${budget[timings]}") - 10 ))

# The JIT fallback's build (nvcc only, no GPU) in the background from here on, niced, after the
# timings so that it cannot disturb them; step 6 checks what it built.
(cd "$scratch" && PYTHONPATH="$root" LINEARPATCH_CUDA_CACHE="$scratch/jit" MAX_JOBS=$(nproc) nice -n 10 "$python" -c "
import sys, time
from linearpatch_kernels.backends import cuda_backend as c
t = time.time()
ok = c.prebuilt_library() is None and c.load_extension()
print(f'JIT build in the background: {c.loaded_from() if ok else c.load_error()} after {time.time() - t:.0f} s')
" > "$OUT/jit_build.txt" 2>&1) &
jit_pid=$!
[[ "$steps" == *" jit "* ]] || { kill "$jit_pid" 2>/dev/null; jit_pid=""; }

# 2. the CUDA backend's tests on the GPU
run_step cuda-tests "${pytest[@]}" --junitxml="$OUT/test_cuda_backend.xml" "$root/tests/test_cuda_backend.py"

# 3. compute-sanitizer on small cases of every kernel family (benchmarks/gpu_small_cases.py)
run_step sanitizer bash -c '
    status=0
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; exit 1; }
    for tool in memcheck racecheck synccheck; do
        # One cudaMalloc per tensor, so that memcheck sees every out-of-bounds access.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
            "$1" "$2/benchmarks/gpu_small_cases.py" 2>&1 | tee -a "$3/sanitizer.txt" | tail -n 4
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: compute-sanitizer --tool $tool"; status=1; }
    done
    exit $status' sanitize "$python" "$root" "$OUT"

# 4. end to end: LLaMA-3-8B shape, eager and CUDA graphs; workloads stop 30 s before the budget. One
# prefill shape (1 x 2048; 8 x 2048 would take a fifth of the budget) and the three decode batches.
run_step e2e "$python" "$root/benchmarks/bench_e2e.py" --device cuda --cuda-graph --repeats 5 --decode-repeats 1 \
    --new-tokens 64 --prefill 1x2048 --decode-batch 1 16 64 \
    --max-seconds $(( $(limit "${budget[e2e]}") - 30 )) --out-dir "$OUT"

# 5. the Triton backend's tests on the GPU (kernels from the bundle's cache)
run_step triton-tests "${pytest[@]}" --junitxml="$OUT/test_triton_backend.xml" "$root/tests/test_triton_backend.py"

# 6. the JIT fallback: a source tree without the compiled library builds csrc/ at first use
run_step jit bash -c '
    while [ -n "$4" ] && kill -0 "$4" 2>/dev/null; do sleep 1; done  # the background build
    cat "$3/jit_build.txt"
    PYTHONPATH="$2" LINEARPATCH_CUDA_CACHE="$5" MAX_JOBS=$(nproc) "$1" "$2/benchmarks/gpu_small_cases.py" --jit
    ' jit "$python" "$root" "$OUT" "$jit_pid" "$scratch/jit"

say "record: benchmarks/gpu_record.py"
(cd "$root" && PYTHONPATH="$root" "$python" benchmarks/gpu_record.py --run "$OUT" --out "$OUT/record" --compare-latest \
    --command "OUT=<results> STEPS=\"${STEPS:-}\" GPU_CHECK_SECONDS=${GPU_CHECK_SECONDS:-480} bash benchmarks/gpu_check.sh") \
    || echo "the record writer failed: run it here on the fetched folder (benchmarks/gpu_record.py --run)"
say "done in $(( $(date +%s) - started )) s: $failed failed step(s)${skipped:+, skipped for lack of time:$skipped}"
exit $(( failed + $(wc -w <<<"$skipped") ))

#!/usr/bin/env bash
# Triton kernels compiled ahead of time for real GPUs (no GPU needed): every op x dtype x hidden size
# (the README's model sizes and the extremes) at the launch configurations the backend picks for
# decode (1 row) and prefill (16,384 rows), for sm_80 and sm_90 (sm_86/sm_89 limits from the sm_80
# build). Fails on a compile error, a spill, or shared memory over the architecture's limit or over
# the backend's own estimate, for any configuration the automatic choice can pick.
# Compiled kernels and their measurements are cached under ~/.cache (reruns: seconds; a cold cache:
# about 10 minutes on 2 shared cores, most of it the add-network kernels at 3-47 s of CPU each). The
# report goes to $TRITON_AOT_OUT (default: a temporary folder).
# Environment: PYTHON (default python), TRITON_CACHE_DIR, TRITON_AOT_OUT, JOBS (default: cores),
# TRITON_AOT_ARGS (arguments instead of CI's matrix, e.g. "--dtypes bf16,fp32"), TRITON_AOT_FULL=1 (the whole
# matrix; by default the add-network sizes are compiled in bf16 only, see below).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/linearpatch_kernels/triton-aot}
out=${TRITON_AOT_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/linearpatch-triton-aot.XXXXXX")}
unset TRITON_INTERPRET
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${TRITON_AOT_ARGS:-}" ] || [ "${TRITON_AOT_FULL:-0}" = 1 ]; then
    "$python" scripts/triton_aot.py --out "$out" --jobs "${JOBS:-$(nproc)}" ${TRITON_AOT_ARGS:-}
else
    # CI's matrix: every size in every dtype except those where some target runs the add network
    # (9216; 576; 2304 on sm_80/86), whose kernels (most of a cold run) are compiled in bf16 only; fp16
    # and fp32 there differ only in the loads and stores. TRITON_AOT_FULL=1 compiles the whole matrix
    # (benchmarks/results/triton-aot/ holds its report, all dtypes).
    split=$("$python" -c "import sys; sys.path.insert(0, 'scripts'); import triton_aot as t; n = t.network_sizes(); print(','.join(str(d) for d in t.SIZES if d not in n), ','.join(map(str, n)))")
    others=${split% *}
    network=${split#* }
    "$python" scripts/triton_aot.py --out "$out" --jobs "${JOBS:-$(nproc)}" --sizes "$others"
    "$python" scripts/triton_aot.py --out "$out/network" --jobs "${JOBS:-$(nproc)}" --sizes "$network" --dtypes bf16
fi
echo "triton_aot: report in $out/report.md"

#!/usr/bin/env bash
# CUDA kernels proven without a GPU (csrc/emulation/README.md, benchmarks/sass_budget.py):
#   1. builds the emulation library (the csrc/ kernels and launchers compiled by the host compiler
#      against emulated CUDA built-ins), cached by source hash under ~/.cache/linearpatch_kernels/;
#      its tests (tests/test_cuda_emulation.py) then run with the test suite and reuse the build;
#   2. builds the kernels for sm_90 and sm_80 with nvcc (cached the same way), and runs the SASS
#      budget with --check: no kernel may spill, no launch may exceed its architecture's shared
#      memory per block, and the modelled H200 time of the bf16/fp16 patch at d = 4096 and 8192 must
#      be <= SASS_MAX_RATIO x a copy, at the K > 1 sizes d = 576 and 5120 <= SASS_MAX_RATIO_K x a copy.
# Environment: SASS_MAX_RATIO (default 1.10), SASS_MAX_RATIO_K (default 1.50) (0 turns a ratio gate
# off, the other gates stay),
# PYTHON (default python), MAX_JOBS (default 2), CUDA_HOME (default: the toolkit of the nvcc on PATH,
# which may be a wrapper script; cuobjdump comes from the triton wheel where the toolkit lacks it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
export MAX_JOBS=${MAX_JOBS:-2}
cd "$root"

start=$SECONDS
"$python" csrc/emulation/emulate.py
echo "cuda_proofs: emulation library ready in $(( SECONDS - start )) s"

start=$SECONDS
"$python" benchmarks/sass_budget.py --check --max-ratio "${SASS_MAX_RATIO:-1.10}" \
    --max-ratio-k "${SASS_MAX_RATIO_K:-1.50}" > "${TMPDIR:-/tmp}/sass_budget.txt" \
    || { grep -E "^sass_budget:" "${TMPDIR:-/tmp}/sass_budget.txt"; echo "cuda_proofs: FAILED: SASS budget (table: ${TMPDIR:-/tmp}/sass_budget.txt)"; exit 1; }
grep -E "^sass_budget:" "${TMPDIR:-/tmp}/sass_budget.txt"
echo "cuda_proofs: SASS budget in $(( SECONDS - start )) s"

#!/usr/bin/env bash
# Build the wheel with the compiled CUDA extension:
#     dist/linearpatch_kernels-<version>+cu<XY>-cp310-abi3-linux_x86_64.whl
# (<XY> = the CUDA version of the installed torch). The extension uses only the libtorch stable ABI
# and the CPython limited API: the wheel installs under Python >= 3.10 and torch >= 2.10 built for
# the same CUDA major version. It is compiled against the torch installed here, hence
# --no-build-isolation.
#
# Usage:  scripts/build_wheel.sh [OUT_DIR]          (default: dist/)
# Environment:
#   TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX", see setup.py), e.g. "9.0"
#   MAX_JOBS              parallel compiler jobs (ninja)
#   CUDA_HOME             the CUDA toolkit (default: the toolkit of the nvcc on PATH, even a wrapper)
#   PYTHON                the interpreter whose torch to build against (default: python)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)
python=${PYTHON:-python}

if [ -z "${CUDA_HOME:-}" ]; then
    nvcc=$(command -v nvcc) || { echo "build_wheel.sh: no nvcc on PATH and CUDA_HOME unset" >&2; exit 1; }
    # nvcc may be a wrapper script: ask the real compiler where its toolkit is.
    top=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$top" ] || { echo "build_wheel.sh: cannot locate the toolkit of $nvcc" >&2; exit 1; }
    CUDA_HOME=$(realpath "$top")
    export CUDA_HOME
fi
echo "build_wheel.sh: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>}"

cd "$root"
LINEARPATCH_BUILD_CUDA=1 "$python" -m pip wheel . --no-build-isolation --no-deps --no-index -w "$out"
ls -1 "$out"/linearpatch_kernels-*+cu*.whl

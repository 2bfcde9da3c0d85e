#!/usr/bin/env bash
# CI check of the release wheels on a machine without a GPU: scripts/build_wheels.py for the CUDA
# majors in CUDA_WHEELS (default cu13), for one architecture (CUDA_ARCH, default 9.0: all six take
# far longer on 2 cores), then what the release checks: auditwheel repair to manylinux_2_28, the
# glibc and libtorch symbol checks, and in a fresh venv per torch (the oldest and the newest of that
# CUDA major on PyPI) the load, the kernel registration for the CUDA key, CPU calls on the torch
# backend, and tests/test_cuda_backend.py against the installed wheel.
# The release command, for both majors and every architecture: python scripts/build_wheels.py
# Torch environments, the CUDA 12 toolkit and downloads are cached in LINEARPATCH_WHEEL_ENVS
# (default ~/.cache/linearpatch-wheels); the build folder too, so a rerun recompiles only changes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/linearpatch-wheels.XXXXXX")
trap 'rm -rf "$out"' EXIT
MAX_JOBS=${MAX_JOBS:-2} python "$root/scripts/build_wheels.py" --cuda "${CUDA_WHEELS:-cu13}" \
    --arch-list "${CUDA_ARCH:-9.0}" --out "$out" --pytest "$root/tests/test_cuda_backend.py"
echo "cuda_check: OK"

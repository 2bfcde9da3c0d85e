#!/usr/bin/env bash
# The AArch64 cross compiler and qemu's user-mode emulator, so that tests/test_cpu_kernels_cross.py
# compiles the NEON kernels of csrc/cpu/ and checks them against the scalar ones on this x86 machine.
set -euo pipefail
if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
    apt-get update -q > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user > /dev/null
fi
aarch64-linux-gnu-g++ --version | head -1
qemu-aarch64 --version | head -1

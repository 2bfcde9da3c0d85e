"""The NEON kernels of csrc/cpu/ against the scalar kernels, torch-free (tests/cpu_kernels_driver.cpp),
cross-compiled for AArch64 and run under qemu where ``aarch64-linux-gnu-g++`` and ``qemu-aarch64``
are installed (CI installs them: .ci/cpu_cross.sh). The scalar, AVX2 and AVX-512 kernels are checked
against fp64 through torch by tests/test_cpu_backend.py on the machine itself (the driver also runs
natively: ``g++ -std=c++17 -O2 -Icsrc/cpu tests/cpu_kernels_driver.cpp csrc/cpu/cpu_{avx512,avx2,neon,scalar}.cpp``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_SRC = ROOT / "csrc" / "cpu"
SOURCES = [ROOT / "tests" / "cpu_kernels_driver.cpp", *sorted(p for p in CPU_SRC.glob("cpu_*.cpp") if p.name != "cpu_ops.cpp")]


def _build_and_run(compiler: str, runner: list[str], tmp_path: Path) -> str:
    binary = tmp_path / "driver"
    subprocess.run([compiler, "-std=c++17", "-O2", f"-I{CPU_SRC}", *map(str, SOURCES), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=600)
    out = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    return out.stdout


def _summary(out: str) -> tuple[int, int]:
    match = re.search(r"checked (\d+) cases on (\d+) vector instruction sets", out)
    assert match, out[-2000:]
    return int(match.group(1)), int(match.group(2))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/cpu_cross.sh installs them)")
def test_neon_cross_compiled_matches_scalar_under_qemu(tmp_path):
    out = _build_and_run("aarch64-linux-gnu-g++", ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"], tmp_path)
    cases, sets = _summary(out)
    assert sets == 1 and cases == 90 and out.startswith("neon ")

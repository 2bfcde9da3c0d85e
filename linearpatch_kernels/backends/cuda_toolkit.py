"""Where the CUDA toolkit is. Standard library only: ``setup.py`` loads this file by path at build
time, before torch or the package can be imported, and the CUDA backend imports it for its JIT build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

def toolkit_from_nvcc(nvcc: str) -> str | None:
    """The CUDA toolkit folder of ``nvcc``, also when ``nvcc`` is a wrapper script.

    ``nvcc --dryrun`` prints ``TOP=<toolkit>/bin/..`` from the real compiler, wherever it lives.
    """
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, flags=re.MULTILINE)
    if match is None:
        return None
    top = os.path.realpath(match.group(1).strip())
    return top if os.path.isfile(os.path.join(top, "bin", "nvcc")) else None


def find_cuda_home() -> str | None:
    """``CUDA_HOME``/``CUDA_PATH`` when set, else the toolkit of the ``nvcc`` on ``PATH``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    return toolkit_from_nvcc(nvcc) if nvcc else None

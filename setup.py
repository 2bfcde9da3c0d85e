"""Build script: the pure-Python package, plus the optional CUDA extension ``linearpatch_kernels._C``.

The extension (``csrc/``) uses only the libtorch stable ABI and the CPython limited API, so one
wheel per CUDA major version loads under every torch >= 2.10 and Python >= 3.10. It is built
against the installed torch, so install with ``--no-build-isolation``:

    pip install . --no-build-isolation                      # extension if possible, else pure Python
    LINEARPATCH_BUILD_CUDA=1 pip install . --no-build-isolation   # extension or a build error
    LINEARPATCH_BUILD_CUDA=0 pip install .                   # pure Python (CUDA via JIT at first use)

``LINEARPATCH_BUILD_CUDA`` unset builds the extension when torch is a CUDA build, a CUDA toolkit
is found (``CUDA_HOME`` or ``nvcc`` on ``PATH``) and there is something to build for: a visible
GPU or an explicit ``TORCH_CUDA_ARCH_LIST``. ``TORCH_CUDA_ARCH_LIST`` defaults to
``DEFAULT_ARCH_LIST``. A wheel with the extension gets the local version tag ``+cu<XY>``
(``torch.version.cuda``), e.g. ``linearpatch_kernels-0.1.0+cu130-cp310-abi3-linux_x86_64.whl``,
and a build record ``linearpatch_kernels/_build_info.json`` (CUDA, nvcc, arch list, torch) that
``linearpatch_kernels.build_info()`` reports. Release wheels (one per CUDA major, manylinux_2_28):
``scripts/build_wheels.py``.

The C++ CPU kernels ``linearpatch_kernels._cpu`` (``csrc/cpu/``, the same stable ABI) are built
wherever a C++ compiler and torch >= 2.10 are there at build time: by the plain ``pip install .`` /
``pip install -e .`` too, whose isolated build environment gets torch and ninja from the in-tree
build backend (``build_support/build_backend.py``) exactly when a compiler is found. Without a
compiler (or with ``LINEARPATCH_BUILD_CPU=0``) the package is pure Python on the CPU and one line
says so; ``LINEARPATCH_BUILD_CPU=1`` makes a failed CPU build an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
# The kernels need sm_80+ (bf16 conversions); PTX of the newest arch runs on later GPUs.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# libtorch stable ABI level the extension is compiled against: [major][minor][patch][abi tag 5 bytes].
TORCH_TARGET_VERSION = "0x020a000000000000"  # 2.10
PY_LIMITED_API = "cp310"
ENV_FLAG = "LINEARPATCH_BUILD_CUDA"
CPU_ENV_FLAG = "LINEARPATCH_BUILD_CPU"
CPU_SRC = "csrc/cpu"
# Written into the wheel next to the extension; read by linearpatch_kernels.build_info().
BUILD_RECORD = "_build_info.json"
# What keeps the extension within manylinux_2_28 (glibc 2.28, GCC 8's libstdc++) when it is built on a
# newer Linux: a header that stops libstdc++ from reading a glibc 2.32 variable, and a source that
# defines two libstdc++ >= 9 constructors in the extension (see the files).
MANYLINUX_SUPPORT = "build_support/manylinux_2_28"


def cuda_sources() -> list[str]:
    """The extension's sources, relative to the project root (setuptools wants relative paths)."""
    src = ROOT / CSRC
    sources = [f"{CSRC}/{p.name}" for p in sorted(src.glob("*.cpp")) + sorted(src.glob("*.cu"))]
    if sys.platform.startswith("linux"):
        sources.append(f"{MANYLINUX_SUPPORT}/libstdcxx_compat.cpp")
    return sources


def cpu_sources() -> list[str]:
    """The CPU kernels' sources (one file per instruction set, each switching its own target on)."""
    sources = [f"{CPU_SRC}/{p.name}" for p in sorted((ROOT / CPU_SRC).glob("*.cpp"))]
    if sys.platform.startswith("linux"):
        sources.append(f"{MANYLINUX_SUPPORT}/libstdcxx_compat.cpp")
    return sources


def _load_toolkit_module():
    # By path: importing the package would import torch, which a build environment may lack.
    spec = importlib.util.spec_from_file_location(
        "linearpatch_cuda_toolkit", ROOT / "linearpatch_kernels" / "backends" / "cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toolkit = _load_toolkit_module()


def _load_backend_module():
    spec = importlib.util.spec_from_file_location("linearpatch_build_backend", ROOT / "build_support" / "build_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


find_cxx_compiler = _load_backend_module().find_cxx_compiler
toolkit_from_nvcc = _toolkit.toolkit_from_nvcc
find_cuda_home = _toolkit.find_cuda_home


def cuda_build_decision(flag: str | None, torch_cuda: str | None, cuda_home: str | None,
                        has_target: bool) -> tuple[bool, str]:
    """Whether to build the extension, and why (the reason is printed).

    ``flag``: the value of ``LINEARPATCH_BUILD_CUDA`` (None when unset); ``torch_cuda``:
    ``torch.version.cuda`` (None without torch or for a CPU build); ``cuda_home``: the toolkit
    folder or None; ``has_target``: a GPU is visible or ``TORCH_CUDA_ARCH_LIST`` is set.
    Raises ``RuntimeError`` when ``flag == "1"`` and the build cannot happen.
    """
    flag = None if flag is None or flag.strip() == "" else flag.strip()
    if flag not in (None, "0", "1"):
        raise RuntimeError(f"{ENV_FLAG}={flag!r}: use 1 (build the CUDA extension), 0 (skip it) or leave it unset (auto)")
    if flag == "0":
        return False, f"{ENV_FLAG}=0"
    missing = []
    if torch_cuda is None:
        missing.append("a CUDA build of torch importable at build time, the installed one (use --no-build-isolation)")
    if cuda_home is None:
        missing.append("a CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    if flag == "1":
        if missing:
            raise RuntimeError(f"{ENV_FLAG}=1 but the CUDA extension cannot be built: missing {' and '.join(missing)}")
        return True, f"{ENV_FLAG}=1"
    if missing:
        return False, f"missing {' and '.join(missing)}"
    if not has_target:
        return False, f"no GPU visible and TORCH_CUDA_ARCH_LIST unset (set {ENV_FLAG}=1 to build for {DEFAULT_ARCH_LIST})"
    return True, f"torch {torch_cuda} and the toolkit in {cuda_home}"


def local_version(torch_cuda: str) -> str:
    """``"13.0" -> "cu130"``: the wheel's local version tag."""
    major, minor = torch_cuda.split(".")[:2]
    return f"cu{major}{minor}"


def torch_min_version(target: str = TORCH_TARGET_VERSION) -> str:
    """``"0x020a000000000000" -> "2.10"``: the oldest torch whose stable ABI the extension uses."""
    value = int(target, 16)
    return f"{value >> 56}.{(value >> 48) & 0xFF}"


def nvcc_version(cuda_home: str) -> str | None:
    """``"12.4.131"`` from ``nvcc --version`` (``release 12.4, V12.4.131``), None if it does not say."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [0-9.]+, V([0-9.]+)", out)
    return match.group(1) if match else None


def build_record(torch_version: str, torch_cuda: str, nvcc: str | None, arch_list: str) -> dict:
    """What the compiled extension was built for: which wheel fits which torch."""
    return {
        "cuda": torch_cuda,  # the CUDA of the torch built against: the wheel's CUDA major
        "nvcc": nvcc,
        "arch_list": arch_list,
        "torch": torch_version,
        "torch_min": torch_min_version(),
        "local_version": local_version(torch_cuda),
    }


def _torch_cuda_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if flag_unset(os.environ.get(ENV_FLAG)) and torch_is_the_build_environments():
        # The torch that build_backend put into pip's isolated build environment (for the CPU
        # kernels) need not have the CUDA major of the user's: the CUDA extension, as before, only
        # from the installed torch (--no-build-isolation) or when asked for.
        return None
    return torch.version.cuda


def flag_unset(flag: str | None) -> bool:
    return flag is None or flag.strip() == ""


def torch_is_the_build_environments() -> bool:
    """Whether the importable torch lives outside this interpreter's site-packages, i.e. in pip's
    isolated build environment (pip hides the real site-packages there, but ``site`` still names them)."""
    import site

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    origin = os.path.realpath(spec.origin)
    homes = [*site.getsitepackages(), site.getusersitepackages()]
    return not any(origin.startswith(os.path.realpath(h) + os.sep) for h in homes)


def _gpu_visible() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # a broken driver must not break a pure-Python install
        return False


def cuda_extensions() -> tuple[list, dict, dict, dict | None]:
    """``(ext_modules, cmdclass, options, build record)`` for ``setup()``."""
    flag = os.environ.get(ENV_FLAG)
    if flag is not None and flag.strip() == "0":  # skip the probing too (no torch import, no nvcc call)
        cuda_home = torch_cuda = None
        has_target = False
    else:
        cuda_home = find_cuda_home()
        torch_cuda = _torch_cuda_version()
        has_target = bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or (torch_cuda is not None and _gpu_visible())
    build, why = cuda_build_decision(flag, torch_cuda, cuda_home, has_target)
    if not build:
        print(f"linearpatch-kernels: not building the CUDA extension ({why}); CUDA tensors use a JIT build "
              f"at first use, or triton")
        return [], {}, {}, None
    print(f"linearpatch-kernels: building the CUDA extension ({why})")
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    defines = ["-DUSE_CUDA", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    ext = CUDAExtension(
        name="linearpatch_kernels._C",
        sources=cuda_sources(),
        include_dirs=[str(ROOT / MANYLINUX_SUPPORT / "include")],
        # Ahead of torch's libraries (CUDAExtension appends them): C++ standard library symbols then bind
        # to libstdc++ with their symbol versions, not to copies some torch releases export and others not.
        libraries=["stdc++"] if sys.platform.startswith("linux") else [],
        py_limited_api=True,
        extra_compile_args={
            "cxx": ["-O3", *defines],
            "nvcc": ["-O3", "-lineinfo", *defines],
        },
    )
    options = {"bdist_wheel": {"py_limited_api": PY_LIMITED_API}}
    record = build_record(torch.__version__, torch_cuda, nvcc_version(cuda_home), os.environ["TORCH_CUDA_ARCH_LIST"])
    return [ext], {"build_ext": BuildExtension}, options, record


def cpu_build_decision(flag: str | None, compiler: str | None, torch_version: str | None) -> tuple[bool, str]:
    """Whether to build the C++ CPU kernels, and why (printed). ``torch_version``: the torch importable
    at build time (None without one). Raises ``RuntimeError`` when ``flag == "1"`` and it cannot be built."""
    flag = None if flag is None or flag.strip() == "" else flag.strip()
    if flag not in (None, "0", "1"):
        raise RuntimeError(f"{CPU_ENV_FLAG}={flag!r}: use 1 (build the CPU kernels), 0 (skip them) or leave it unset (auto)")
    if flag == "0":
        return False, f"{CPU_ENV_FLAG}=0"
    missing = []
    if compiler is None:
        missing.append("a C++ compiler (set CXX or install g++/clang++)")
    if torch_version is None:
        missing.append("torch importable at build time")
    elif _version_tuple(torch_version) < _version_tuple(torch_min_version()):
        missing.append(f"torch >= {torch_min_version()} at build time (found {torch_version})")
    if missing:
        if flag == "1":
            raise RuntimeError(f"{CPU_ENV_FLAG}=1 but the CPU kernels cannot be built: missing {' and '.join(missing)}")
        return False, f"missing {' and '.join(missing)}"
    return True, f"{compiler}, torch {torch_version}"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:2])


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def cpu_extensions() -> list:
    """``[the CPU extension]`` or ``[]`` (with one line saying why not)."""
    flag = os.environ.get(CPU_ENV_FLAG)
    skip = flag is not None and flag.strip() == "0"
    compiler = None if skip else find_cxx_compiler()
    torch_version = None if skip else _torch_version()
    build, why = cpu_build_decision(flag, compiler, torch_version)
    if not build:
        print(f"linearpatch-kernels: not building the C++ CPU kernels ({why}); CPU tensors use the torch backend")
        return []
    print(f"linearpatch-kernels: building the C++ CPU kernels ({why})")
    from torch.utils.cpp_extension import CppExtension

    return [CppExtension(
        name="linearpatch_kernels._cpu",
        sources=cpu_sources(),
        include_dirs=[str(ROOT / MANYLINUX_SUPPORT / "include")],
        libraries=["stdc++"] if sys.platform.startswith("linux") else [],
        py_limited_api=True,
        # No -march: each instruction set's file switches its own target on (csrc/cpu/cpu_avx512.cpp).
        extra_compile_args={"cxx": ["-O3", "-std=c++17", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]},
    )]


class BuildPyWithSources(build_py):
    """Also ship csrc/ as ``linearpatch_kernels/_csrc`` so that the JIT fallback can compile it, and
    the build record of the compiled extension (when there is one) as ``linearpatch_kernels/_build_info.json``."""

    record: dict | None = None

    def run(self):
        super().run()
        package = Path(self.build_lib) / "linearpatch_kernels"
        if self.record is not None:
            (package / BUILD_RECORD).write_text(json.dumps(self.record, indent=1) + "\n")
        target = package / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in (ROOT / CSRC).iterdir():
            if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
                shutil.copy2(path, target / path.name)


class DistributionWithLocalVersion(Distribution):
    """Appends ``+cu<XY>`` to the version that pyproject.toml reads from the package."""

    local_tag: str | None = None

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        if self.local_tag and "+" not in str(self.metadata.version):
            self.metadata.version = f"{self.metadata.version}+{self.local_tag}"


if __name__ == "__main__":
    if os.environ.get("LINEARPATCH_REQUIRES_ONLY") == "1":
        # build_backend collects the build requirements: no probing, nothing to say yet.
        ext_modules, cmdclass, options, record, cpu_modules, cpu_tag = [], {}, {}, None, [], None
    else:
        ext_modules, cmdclass, options, record = cuda_extensions()
        cpu_modules = cpu_extensions()
        # The +cpu release wheel (scripts/build_wheels.py): the CPU kernels only, for CPU-only torch.
        cpu_tag = os.environ.get("LINEARPATCH_LOCAL_VERSION", "").strip() or None
    if cpu_tag is not None and (record is not None or not cpu_modules):
        raise RuntimeError(f"LINEARPATCH_LOCAL_VERSION={cpu_tag!r} tags a wheel of the CPU kernels alone: build them "
                           f"({CPU_ENV_FLAG}=1) without the CUDA extension ({ENV_FLAG}=0)")
    if cpu_modules:
        from torch.utils.cpp_extension import BuildExtension

        ext_modules = [*cpu_modules, *ext_modules]
        cmdclass = {"build_ext": BuildExtension, **cmdclass}
        options = {"bdist_wheel": {"py_limited_api": PY_LIMITED_API}, **options}
    DistributionWithLocalVersion.local_tag = record["local_version"] if record else cpu_tag
    BuildPyWithSources.record = record
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_py": BuildPyWithSources, **cmdclass},
        options=options,
        distclass=DistributionWithLocalVersion,
    )

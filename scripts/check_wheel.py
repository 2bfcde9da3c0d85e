#!/usr/bin/env python3
"""Check a linearpatch-kernels wheel with compiled kernels (a +cu12x/+cu13x wheel with the CUDA
extension and the C++ CPU kernels, or the +cpu wheel with the CPU kernels only); no GPU needed.

    python scripts/check_wheel.py WHEEL TORCH_PYTHON [TORCH_PYTHON ...] [--pytest TEST_FILE ...]
                                  [--symbols-only TORCH_PYTHON ...] [--find-links DIR]

``TORCH_PYTHON``: interpreters of environments that each hold one torch to check under (e.g. the
oldest and the newest of the wheel's CUDA major). Checks, failing with a message on the first miss:

1. each library (``linearpatch_kernels/_C*.so``, the CUDA extension, and ``_cpu*.so``, the CPU kernels): the highest glibc / libstdc++ / libgcc symbol
   versions it needs are within manylinux_2_28 (GLIBC 2.28, GLIBCXX 3.4.24, CXXABI 1.3.11, GCC 7.0.0),
   it needs no other shared library than those manylinux_2_28 allows plus the ones torch provides
   (libc10, libtorch*, libcudart of the wheel's CUDA major), no C++ symbol of libtorch (only the
   C functions of the stable ABI, which every later torch keeps), and every C++ standard library
   symbol versioned, i.e. bound to libstdc++ (not to a copy one torch release exports);
2. for each torch: every symbol it takes from torch is exported by that torch's libraries and every
   CUDA runtime symbol by that torch's libcudart;
3. for each torch, in a fresh virtual environment holding that torch (through a .pth file naming the
   folder it is installed in), the wheel, and every other requirement of the two installed there by
   pip (nothing from the base interpreter's site-packages): the installed package is the wheel's, the
   build record matches the torch's CUDA major, ``torch.ops.load_library`` loads the extension, the three
   ``linearpatch_cuda::*`` kernels are registered for the CUDA dispatch key and not for CPU, the
   three ``linearpatch_cpu::*`` kernels for the CPU key, and CPU calls of ``torch.ops.linearpatch.*``
   go to the C++ CPU kernels and match an fp64 reference; then the ``--pytest`` test files run there
   against the installed wheel. A +cpu wheel: the same without the CUDA parts, under a CPU-only torch;
4. ``--symbols-only``: the symbols it takes from torch are exported by these torch environments too,
   whatever their CUDA major (the stable ABI does not depend on CUDA).

Standard library only (plus binutils' nm and readelf) outside the fresh environments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# manylinux_2_28 (PEP 600; auditwheel's policy): the newest symbol version per versioned library.
MANYLINUX_2_28 = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libgcc_s.so.1",
               "libstdc++.so.6", "ld-linux-x86-64.so.2"}
TORCH_LIB_PATTERNS = (r"libc10(_cuda)?\.so", r"libtorch(_cpu|_cuda|_python)?\.so")
C_PLUS_PLUS_TORCH = ("_ZN3c10", "_ZN2at", "_ZN5torch")
C_PLUS_PLUS_STD = ("_ZNSt", "_ZNKSt", "_ZSt", "_ZTISt", "_ZTSSt", "_ZTVSt", "_ZTINSt", "_ZTVNSt")
OPS = ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")
PYTHON_API = ("Py", "_Py")


def say(msg: str) -> None:
    print(f"check_wheel: {msg}", flush=True)


def fail(msg: str) -> None:
    raise SystemExit(f"check_wheel: FAILED: {msg}")


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def versioned_imports(nm_undefined: str) -> dict[str, tuple[int, ...]]:
    """``nm -D --undefined-only`` output -> the highest version needed per versioned library.

    Lines look like ``                 U dlsym@GLIBC_2.34`` (``@@`` for defaults); ``GLIBC_PRIVATE``
    and other non-numeric versions are kept as ``(inf,)``-like huge tuples so that they fail.
    """
    highest: dict[str, tuple[int, ...]] = {}
    for line in nm_undefined.splitlines():
        match = re.search(r"@@?([A-Z]+)_([0-9.]+|[A-Z]+)$", line.strip())
        if not match:
            continue
        family, ver = match.groups()
        version = parse_version(ver) if ver[0].isdigit() else (10 ** 9,)
        if family not in highest or version > highest[family]:
            highest[family] = version
    return highest


def manylinux_violations(highest: dict[str, tuple[int, ...]]) -> list[str]:
    """The symbol versions beyond manylinux_2_28 (empty when the library complies)."""
    return [f"{family}_{'.'.join(map(str, version))} > {family}_{'.'.join(map(str, MANYLINUX_2_28[family]))}"
            for family, version in sorted(highest.items())
            if family in MANYLINUX_2_28 and version > MANYLINUX_2_28[family]]


def undefined_symbols(nm_undefined: str) -> dict[str, str | None]:
    """``{symbol: version or None}`` of the strong undefined symbols (weak ``w``/``v`` ones may stay unresolved)."""
    symbols = {}
    for line in nm_undefined.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U":
            continue
        name, _, version = parts[1].partition("@")
        symbols[name] = version.lstrip("@") or None
    return symbols


def nm(path: Path, *flags: str) -> str:
    return subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout


def exported(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        for line in nm(path, "--defined-only").splitlines():
            parts = line.split()
            if len(parts) == 3:
                names.add(parts[2].split("@")[0])
    return names


def needed_libraries(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def check_library(library: Path, cuda_major: str | None) -> dict[str, str | None]:
    """Step 1; returns the library's strong undefined symbols."""
    undefined = nm(library, "--undefined-only")
    highest = versioned_imports(undefined)
    violations = manylinux_violations(highest)
    if violations:
        fail(f"{library.name} needs symbol versions newer than manylinux_2_28 allows: {', '.join(violations)}")
    say("highest symbol versions needed: " + ", ".join(f"{f}_{'.'.join(map(str, v))}" for f, v in sorted(highest.items()))
        + " (manylinux_2_28: GLIBC_2.28, GLIBCXX_3.4.24, CXXABI_1.3.11, GCC_7.0.0)")
    needed = needed_libraries(library)
    from_torch = [lib for lib in needed if any(re.fullmatch(p, lib) for p in TORCH_LIB_PATTERNS)
                  or (cuda_major is not None and lib == f"libcudart.so.{cuda_major}")]
    others = [lib for lib in needed if lib not in from_torch and lib not in SYSTEM_LIBS]
    if others:
        fail(f"{library.name} needs {others}: neither manylinux_2_28 system libraries nor torch's "
             f"({f'CUDA {cuda_major}' if cuda_major else 'no CUDA'})")
    say(f"needs {', '.join(needed)}")
    symbols = undefined_symbols(undefined)
    unstable = sorted(s for s in symbols if s.startswith(C_PLUS_PLUS_TORCH))
    if unstable:
        fail(f"{library.name} uses C++ symbols of libtorch (not the stable ABI): {unstable[:5]}")
    unbound = sorted(s for s, v in symbols.items() if v is None and s.startswith(C_PLUS_PLUS_STD))
    if unbound:
        fail(f"{library.name} takes C++ standard library symbols without a libstdc++ version (bound to another "
             f"library's copy at link time; link libstdc++ first): {unbound[:5]}")
    return symbols


def torch_layout(python: str) -> dict:
    """Version, CUDA version, library folder and site-packages folders of the torch of ``python``."""
    code = ("import json, os, site, sys, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
            "'lib': os.path.join(os.path.dirname(torch.__file__), 'lib'), "
            "'path': [p for p in sys.path if p.endswith('-packages')], "
            "'site': os.path.dirname(os.path.dirname(torch.__file__))}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        fail(f"torch does not import with {python}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_symbols(symbols: dict[str, str | None], layout: dict, cuda_major: str | None) -> None:
    """Step 2 for one torch."""
    torch_libs = sorted(Path(layout["lib"]).glob("lib*.so*"))
    # Unversioned imports come from torch, except the CPython limited API (the interpreter's).
    from_torch = {s for s, v in symbols.items() if v is None and not s.startswith(PYTHON_API)}
    missing = sorted(from_torch - exported(torch_libs))
    if missing:
        fail(f"torch {layout['version']} does not export {len(missing)} symbols the extension needs: {missing[:8]}")
    cudart = f"libcudart.so.{cuda_major}"
    from_cudart = {s for s, v in symbols.items() if v == cudart}
    found = [p for folder in layout["path"] for p in Path(folder).glob(f"nvidia/*/lib/{cudart}")]  # cuda_runtime/ (CUDA 12), cu13/ (CUDA 13)
    found += list(Path(layout["lib"]).glob(f"{cudart}*"))
    if from_cudart and not found:
        fail(f"no {cudart} next to torch {layout['version']} to check {len(from_cudart)} CUDA runtime symbols against")
    missing_rt = sorted(from_cudart - exported(found[:1])) if found else []
    if missing_rt:
        fail(f"{found[0]} does not export {missing_rt[:8]}")
    say(f"torch {layout['version']}: its libraries export all {len(from_torch)} torch symbols"
        + (f", {found[0].name} all {len(from_cudart)} CUDA runtime symbols" if found and from_cudart else ""))


def fresh_env(wheel: Path, layout: dict, work: Path, extra: list[str] = (), pip_args: list[str] = ()) -> Path:
    """A new virtual environment with the torch under test, the wheel and the wheel's own dependencies;
    returns its python.

    Nothing of the base interpreter's site-packages is visible there (that interpreter may be any Python,
    e.g. the one a venv running this script was made from). torch comes from its own environment through
    a .pth file naming only the folder torch is installed in (``layout["site"]``); pip then installs the
    wheel and everything the wheel and that torch declare that is not in that folder (tqdm,
    transformers, ..., and torch's own requirements such as its CUDA libraries) into the new environment,
    from the package index or pip's cache (``pip_args``: e.g. ``--no-index --find-links DIR`` for a local
    wheelhouse). So the check holds what a user's ``pip install torch==X WHEEL`` holds. ``extra``: more
    requirements to install, e.g. ``pytest``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The torch under test is exact: a machine-wide pip constraint (e.g. torch<=2.14) must not make pip
    # replace it with another torch in the new environment (build_wheels does the same for its pips).
    pip_env = {**env, "PIP_CONSTRAINT": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    venv = work / f"venv-torch{layout['version']}"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, env=env).stdout.strip()
    # After the environment's own site-packages on sys.path: what pip installs there comes first.
    Path(site_dir, "torch_under_test.pth").write_text(layout["site"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pip_args, str(wheel), *extra], check=True,
                   env=pip_env)
    return python


def check_in_fresh_env(wheel: Path, layout: dict, work: Path, tests: list[str], kind: str,
                       pip_args: list[str] = ()) -> None:
    """Step 3 for one torch: the wheel in a fresh environment (``fresh_env``), checked from outside the
    source tree (the installed package only), then the ``--pytest`` files run against it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = fresh_env(wheel, layout, work, ["pytest"] if tests else [], pip_args)
    venv = python.parent.parent
    subprocess.run([str(python), str(Path(__file__).resolve()), "--inside", str(venv), layout["version"], kind],
                   check=True, cwd=work, env=env)
    if tests:
        subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        *[str(Path(t).resolve()) for t in tests]], check=True, cwd=work, env=env)


def inside(venv: str, torch_version: str, kind: str = "cuda") -> None:
    """Step 3, run by the fresh environment's interpreter; ``kind``: "cuda" or "cpu" (the +cpu wheel)."""
    import importlib.metadata

    import torch

    import linearpatch_kernels as lp
    from linearpatch_kernels.backends import cpu_backend, cuda_backend, select_backend
    from linearpatch_kernels.hadamard import hadamard_matrix

    assert torch.__version__ == torch_version, f"imported torch {torch.__version__}, not {torch_version}"
    assert lp.__file__.startswith(venv), f"imported {lp.__file__}, not the wheel installed in {venv}"
    version = importlib.metadata.version("linearpatch-kernels")
    info = lp.build_info()
    cpu_library = cpu_backend.library_path()
    assert cpu_library is not None and cpu_library.startswith(venv), cpu_library
    assert cpu_backend.load_library(), f"the C++ CPU kernels did not load: {cpu_backend.load_error()}"
    for op in OPS:
        name = f"linearpatch_cpu::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"
    if kind == "cpu":
        assert torch.version.cuda is None, f"the +cpu wheel is checked under a CPU-only torch, not {torch.__version__}"
        assert version.endswith("+cpu") and info["built_for"] is None and info["extension"] is None, (version, info)
        assert "CPU-only" in info["cuda_backend"], info["cuda_backend"]
        _check_cpu_ops(venv, version, info, hadamard_matrix, select_backend)
        return
    record = info["built_for"]
    assert record is not None and version.endswith("+" + record["local_version"]), (version, record)
    assert record["cuda"].split(".")[0] == torch.version.cuda.split(".")[0], (record, torch.version.cuda)
    library = cuda_backend.prebuilt_library()
    assert library is not None and library.startswith(venv), library
    assert cuda_backend.load_extension(allow_jit=False), f"the prebuilt extension did not load: {cuda_backend.load_error()}"
    for op in OPS:
        name = f"linearpatch_cuda::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has a CPU kernel"
    schema = str(torch.ops.linearpatch_cuda.patch_add_rmsnorm.default._schema)
    assert schema.endswith("-> (Tensor, Tensor)"), schema
    expected_state = "available" if torch.cuda.is_available() else "no CUDA GPU is visible"
    assert info["cuda_backend"].startswith(expected_state), info["cuda_backend"]
    errors = _check_cpu_ops(venv, version, info, hadamard_matrix, select_backend)
    say(f"torch {torch.__version__}: {version} loads from {library.removeprefix(venv)}, kernels registered for CUDA "
        f"only; built for CUDA {record['cuda']} ({record['arch_list']}), nvcc {record['nvcc']}, torch {record['torch']}; "
        f"cuda backend: {info['cuda_backend']}; CPU ops on the C++ kernels (rel. errors {errors})")


def _check_cpu_ops(venv: str, version: str, info: dict, hadamard_matrix, select_backend) -> str:
    """CPU calls of the public ops go to the C++ CPU kernels and match fp64; returns the errors."""
    import torch

    d = 4096
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, d, generator=g)
    s = 0.5 + torch.rand(d, generator=g)
    assert select_backend(x).NAME == "cpu"
    assert select_backend(x, "patch_add_rmsnorm").NAME == "cpu"
    h = hadamard_matrix(d)
    ref = ((x.double() @ h) * s.double()) @ h.T
    err = float((torch.ops.linearpatch.hadamard_patch(x, s).double() - ref).norm() / ref.norm())
    ref_t = x.double() @ hadamard_matrix(d, normalized=False) * 0.5
    err_t = float((torch.ops.linearpatch.hadamard_transform(x, 0.5).double() - ref_t).norm() / ref_t.norm())
    u = 0.1 * torch.randn(8, d, generator=g)
    w = 0.5 + torch.rand(d, generator=g)
    h_ref = (((x + u).double() @ h) * s.double()) @ h.T
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    h_out, n_out = torch.ops.linearpatch.patch_add_rmsnorm(x, u, s, w, 1e-6)
    err_e = max(float((h_out.double() - h_ref).norm() / h_ref.norm()), float((n_out.double() - n_ref).norm() / n_ref.norm()))
    assert max(err, err_t, err_e) < 1e-5, (err, err_t, err_e)
    errors = f"{err:.1e}, {err_t:.1e}, {err_e:.1e}"
    say(f"torch {torch.__version__}: {version}: CPU kernels from {info['cpu_extension'].removeprefix(venv)}, "
        f"{info['cpu_backend']}; CPU ops on them match fp64 (rel. errors {errors})")
    return errors


def check_symbols_only(symbols: dict[str, str | None], python: str) -> None:
    """Step 2's torch part against a torch of another CUDA major: the stable ABI's C functions do not
    depend on CUDA, so a newer torch's exports stand in for its builds the package index lacks."""
    layout = torch_layout(python)
    from_torch = {s for s, v in symbols.items() if v is None and not s.startswith(PYTHON_API)}
    missing = sorted(from_torch - exported(sorted(Path(layout["lib"]).glob("lib*.so*"))))
    if missing:
        fail(f"torch {layout['version']} does not export {len(missing)} symbols the extension needs: {missing[:8]}")
    say(f"torch {layout['version']} (CUDA {layout['cuda']}, symbols only): its libraries export all {len(from_torch)} torch symbols")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--inside"]:
        inside(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("pythons", nargs="+", metavar="TORCH_PYTHON", help="interpreters of torch environments to check under")
    parser.add_argument("--pytest", nargs="*", default=[], metavar="TEST_FILE", help="run against each installed wheel")
    parser.add_argument("--symbols-only", nargs="*", default=[], metavar="TORCH_PYTHON",
                        help="torch environments (any CUDA major) to check the torch symbols against, nothing else")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR",
                        help="a folder of wheels for pip to install the wheel's dependencies from (repeatable)")
    if len(argv) < 2:
        print(__doc__)
        return 2
    args = parser.parse_args(argv)
    wheel = args.wheel.resolve()
    if not shutil.which("nm") or not shutil.which("readelf"):
        fail("nm and readelf (binutils) are needed")
    with tempfile.TemporaryDirectory(prefix="linearpatch-check-") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(work / "unpacked")
        package = work / "unpacked" / "linearpatch_kernels"
        libraries = list(package.glob("_C*.so"))
        cpu_libraries = list(package.glob("_cpu*.so"))
        if len(cpu_libraries) != 1:
            fail(f"{wheel.name} holds {len(cpu_libraries)} C++ CPU kernel libraries, not one")
        if len(libraries) > 1 or (libraries and not (package / "_build_info.json").is_file()):
            fail(f"{wheel.name} holds {len(libraries)} CUDA extensions (and a build record: "
                 f"{(package / '_build_info.json').is_file()}), not one with its record or none")
        if libraries:
            kind = "cuda"
            record = json.loads((package / "_build_info.json").read_text())
            cuda_major = record["cuda"].split(".")[0]
            say(f"{wheel.name}: built for CUDA {record['cuda']} ({record['arch_list']}) with nvcc {record['nvcc']} "
                f"against torch {record['torch']}")
            symbols = check_library(libraries[0], cuda_major)
        else:
            kind, cuda_major, symbols = "cpu", None, {}
            say(f"{wheel.name}: the C++ CPU kernels only (for CPU-only torch)")
        cpu_symbols = check_library(cpu_libraries[0], None)
        versions = []
        for python in args.pythons:
            layout = torch_layout(python)
            if (layout["cuda"] or "").split(".")[0] != (cuda_major or ""):
                fail(f"torch {layout['version']} of {python} is built for CUDA {layout['cuda']}, the wheel for "
                     f"{f'CUDA {cuda_major}' if cuda_major else 'CPU-only torch'}")
            if symbols:
                check_symbols(symbols, layout, cuda_major)
            check_symbols(cpu_symbols, layout, None)
            check_in_fresh_env(wheel, layout, work, args.pytest, kind, [f"--find-links={d}" for d in args.find_links])
            versions.append(layout["version"])
        for python in args.symbols_only:
            check_symbols_only({**symbols, **cpu_symbols}, python)
    say(f"OK: {wheel.name} under torch {', '.join(versions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

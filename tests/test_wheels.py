"""The wheel matrix: build record, what ``build_info()`` reports, and the wheel check's ELF rules.

The wheels themselves are built and checked by ``scripts/build_wheels.py`` (CI: ``.ci/cuda_check.sh``);
these tests cover the logic that decides, without a compiler."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearpatch_kernels as lp
from linearpatch_kernels import build_record
from linearpatch_kernels.backends import cuda_backend

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


setup_script = load_script(ROOT / "setup.py", "linearpatch_setup_for_wheels")
check_wheel = load_script(ROOT / "scripts" / "check_wheel.py", "linearpatch_check_wheel")
build_wheels = load_script(ROOT / "scripts" / "build_wheels.py", "linearpatch_build_wheels")

RECORD_CU12 = {"cuda": "12.8", "nvcc": "12.4.131", "arch_list": "8.0;8.6;8.9;9.0+PTX", "torch": "2.10.0+cu128",
               "torch_min": "2.10", "local_version": "cu128"}


def test_torch_min_version_decodes_the_stable_abi_target():
    # [major][minor][patch][5-byte tag]: 0x020a... is 2.10, 0x020b... 2.11, 0x0301... 3.1.
    assert setup_script.torch_min_version() == "2.10"
    assert setup_script.torch_min_version("0x020b000000000000") == "2.11"
    assert setup_script.torch_min_version("0x0301000000000000") == "3.1"


def test_build_record_names_the_wheel_and_its_torch():
    record = setup_script.build_record("2.10.0+cu128", "12.8", "12.4.131", "8.0;9.0+PTX")
    assert record == {**RECORD_CU12, "arch_list": "8.0;9.0+PTX"}
    assert json.loads(json.dumps(record)) == record  # written as JSON into the wheel


def test_nvcc_version_is_read_from_the_banner(tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert setup_script.nvcc_version(str(tmp_path)) == "12.4.131"
    assert setup_script.nvcc_version(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("torch_version,torch_cuda,expected", [
    ("2.10.0+cu128", "12.8", None),
    ("2.12.0", "12.6", None),                         # any later CUDA 12 build of torch
    ("2.11.0", "13.0", "install the +cu13x wheel"),   # PyPI's 2.11 is a CUDA 13 build
    ("2.9.1", "12.8", "older than 2.10"),
    ("2.10.0+cpu", None, "CPU-only build"),
])
def test_mismatch_reason_says_which_wheel_fits(torch_version, torch_cuda, expected):
    reason = build_record.mismatch_reason(RECORD_CU12, torch_version, torch_cuda)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_version_tuple_ignores_local_and_prerelease_parts():
    assert build_record._version_tuple("2.10.0+cu128") == (2, 10, 0)
    assert build_record._version_tuple("2.11.0a0+git123") == (2, 11, 0)
    assert build_record._version_tuple("2.9") < build_record._version_tuple("2.10")


def test_build_info_reports_this_install():
    info = lp.build_info()
    assert set(info) == {"version", "extension", "built_for", "torch", "torch_cuda", "cuda_backend", "cpu_extension",
                         "cpu_backend"}
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    from linearpatch_kernels.backends import cpu_backend

    assert info["cpu_extension"] == cpu_backend.library_path()
    assert info["cpu_backend"] == (f"available ({cpu_backend.isa_info()['selected']})" if cpu_backend.load_library()
                                   else cpu_backend.load_error())
    assert info["extension"] == cuda_backend.prebuilt_library()
    if info["built_for"] is None:
        assert info["version"] == lp.__version__
    if torch.version.cuda is None:
        assert "CPU-only" in info["cuda_backend"]
    elif not torch.cuda.is_available() and info["built_for"] is not None:
        assert info["cuda_backend"] == "no CUDA GPU is visible"


def test_build_info_says_why_without_extension_or_toolkit(monkeypatch):
    monkeypatch.setattr(build_record, "build_record", lambda: None)
    monkeypatch.setattr(cuda_backend, "prebuilt_library", lambda: None)
    monkeypatch.setattr(cuda_backend, "_loaded_from", None)
    monkeypatch.setattr(cuda_backend, "find_cuda_home", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "no compiled extension is installed" in lp.build_info()["cuda_backend"]
    assert "no CUDA toolkit found" in lp.build_info()["cuda_backend"]


def test_build_info_reports_a_prebuilt_library_that_does_not_load(monkeypatch, tmp_path):
    library = tmp_path / "_C.abi3.so"
    library.write_bytes(b"not an ELF file")
    monkeypatch.setattr(build_record, "build_record", lambda: {**RECORD_CU12, "cuda": "13.0", "local_version": "cu130"})
    monkeypatch.setattr(cuda_backend, "prebuilt_library", lambda: str(library))
    monkeypatch.setattr(cuda_backend, "_loaded_from", None)
    monkeypatch.setattr(cuda_backend, "_load_error", None)
    monkeypatch.setattr(cuda_backend, "_prebuilt_error", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    state = lp.build_info()["cuda_backend"]
    assert "does not load" in state and str(library) in state


NM_UNDEFINED = """\
                 w __gmon_start__
                 U aoti_torch_empty_strided
                 U cudaLaunchKernel@libcudart.so.12
                 U dlsym@GLIBC_2.34
                 U memcpy@GLIBC_2.14
                 U __libc_single_threaded@GLIBC_2.32
                 U _ZSt28__throw_bad_array_new_lengthv@GLIBCXX_3.4.29
                 U __cxa_begin_catch@CXXABI_1.3
                 U _Unwind_Resume@GCC_3.0
"""


def test_versioned_imports_and_the_manylinux_2_28_limits():
    highest = check_wheel.versioned_imports(NM_UNDEFINED)
    assert highest == {"GLIBC": (2, 34), "GLIBCXX": (3, 4, 29), "CXXABI": (1, 3), "GCC": (3, 0)}
    assert check_wheel.manylinux_violations(highest) == ["GLIBC_2.34 > GLIBC_2.28", "GLIBCXX_3.4.29 > GLIBCXX_3.4.24"]
    ok = check_wheel.versioned_imports(NM_UNDEFINED.replace("2.34", "2.2.5").replace("2.32", "2.17").replace("3.4.29", "3.4.21"))
    assert check_wheel.manylinux_violations(ok) == []
    assert check_wheel.manylinux_violations({"GLIBC": (10 ** 9,)})  # GLIBC_PRIVATE never passes


def test_undefined_symbols_keep_strong_ones_with_their_library_version():
    symbols = check_wheel.undefined_symbols(NM_UNDEFINED)
    assert "__gmon_start__" not in symbols  # weak: may stay unresolved
    assert symbols["aoti_torch_empty_strided"] is None
    assert symbols["cudaLaunchKernel"] == "libcudart.so.12"
    assert symbols["dlsym"] == "GLIBC_2.34"


def test_elf_rules_on_a_real_library():
    """The check's nm/readelf reading on a library of this machine (torch's libc10) against a plain
    reading of the same tools' output."""
    lib = Path(torch.__file__).parent / "lib" / "libc10.so"
    if not lib.is_file() or not (shutil.which("nm") and shutil.which("readelf")):
        pytest.skip("needs torch's libc10.so and binutils")
    needed = check_wheel.needed_libraries(lib)
    raw = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert needed and all(f"[{name}]" in raw for name in needed)
    assert "c10_cuda" not in " ".join(needed)
    exported = check_wheel.exported([lib])
    assert any(name.startswith("_ZN3c10") for name in exported)


def test_matrix_covers_both_cuda_majors_and_cpu_only_torch_from_a_supported_torch():
    assert set(build_wheels.MATRIX) == {"cu12", "cu13", "cpu"}
    assert build_wheels.MATRIX["cpu"].major == 0 and all("+cpu" in v for v in build_wheels.MATRIX["cpu"].check_torch)
    for target in build_wheels.MATRIX.values():
        assert target.build_torch == target.check_torch[0]  # built against the oldest it is checked under
        assert build_record._version_tuple(target.build_torch) >= build_record._version_tuple(setup_script.torch_min_version())
    assert build_wheels.ARCHS[0] == "8.0"  # cuda_backend.MIN_CAPABILITY
    assert cuda_backend.MIN_CAPABILITY == (8, 0)


def test_arch_list_takes_what_the_toolkit_knows(tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nprintf 'compute_75\\ncompute_80\\ncompute_86\\ncompute_89\\ncompute_90\\n'\n")
    nvcc.chmod(0o755)
    assert build_wheels.arch_list(tmp_path, None) == "8.0;8.6;8.9;9.0+PTX"  # a CUDA 12.4-like toolkit
    nvcc.write_text("#!/bin/sh\nprintf 'compute_80\\ncompute_86\\ncompute_89\\ncompute_90\\ncompute_100\\ncompute_120\\n'\n")
    assert build_wheels.arch_list(tmp_path, None) == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert build_wheels.arch_list(tmp_path, "9.0") == "9.0"


def test_check_wheel_without_arguments_prints_its_usage():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_wheel.py")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "TORCH_PYTHON" in out.stdout


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None, reason="needs g++ and binutils")
def test_manylinux_support_keeps_a_library_within_glibc_2_28_and_gcc_8(tmp_path):
    """A library using what the extension uses (string streams, shared_ptr reference counts), built
    like the extension (the support include folder first, the compat source linked in), imports
    nothing newer than manylinux_2_28 allows; built without them on this machine it may not."""
    source = tmp_path / "uses_streams.cpp"
    source.write_text(
        "#include <memory>\n#include <sstream>\n#include <string>\n"
        "std::string message(int v) { std::ostringstream s; s << \"value \" << v; return s.str(); }\n"
        "std::string both(int v) { std::stringstream s; s << v; return s.str(); }\n"
        "long count(std::shared_ptr<int> p) { auto q = p; return q.use_count(); }\n")
    support = ROOT / setup_script.MANYLINUX_SUPPORT
    compat = ROOT / [s for s in setup_script.cuda_sources() if s.startswith(setup_script.MANYLINUX_SUPPORT)][0]
    library = tmp_path / "with_support.so"
    subprocess.run(["g++", "-O2", "-std=c++17", "-fPIC", "-shared", f"-I{support / 'include'}", str(source), str(compat),
                    "-o", str(library)], check=True)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True).stdout
    highest = check_wheel.versioned_imports(undefined)
    assert check_wheel.manylinux_violations(highest) == [], highest
    assert "__libc_single_threaded" not in undefined


def test_unversioned_standard_library_imports_are_refused(tmp_path, monkeypatch):
    """std:: symbols bound at link time to a torch library's copy (unversioned) instead of libstdc++."""
    nm_output = NM_UNDEFINED + "                 U _ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE10_M_replaceEmmPKcm\n"
    nm_output = nm_output.replace("2.34", "2.17").replace("2.32", "2.17").replace("3.4.29", "3.4.21")
    monkeypatch.setattr(check_wheel, "nm", lambda path, *flags: nm_output)
    monkeypatch.setattr(check_wheel, "needed_libraries", lambda path: ["libtorch_cpu.so", "libcudart.so.12", "libc.so.6"])
    with pytest.raises(SystemExit, match="without a libstdc\\+\\+ version.*_M_replace"):
        check_wheel.check_library(tmp_path / "_C.abi3.so", "12")
    monkeypatch.setattr(check_wheel, "nm", lambda path, *flags: nm_output.replace("_M_replaceEmmPKcm", "_M_replaceEmmPKcm@GLIBCXX_3.4.21"))
    symbols = check_wheel.check_library(tmp_path / "_C.abi3.so", "12")
    assert symbols["aoti_torch_empty_strided"] is None
    monkeypatch.setattr(check_wheel, "needed_libraries", lambda path: ["libcudart.so.13"])
    with pytest.raises(SystemExit, match="libcudart.so.13"):
        check_wheel.check_library(tmp_path / "_C.abi3.so", "12")  # the other CUDA major's runtime


def test_cpu_kernels_build_decision_says_why():
    decide = setup_script.cpu_build_decision
    assert decide(None, "/usr/bin/g++", "2.14.1+cu130") == (True, "/usr/bin/g++, torch 2.14.1+cu130")
    built, why = decide(None, None, "2.14.1")
    assert not built and "a C++ compiler" in why
    built, why = decide(None, "/usr/bin/g++", "2.9.1")
    assert not built and "torch >= 2.10 at build time (found 2.9.1)" in why
    assert decide("0", "/usr/bin/g++", "2.14.1") == (False, "LINEARPATCH_BUILD_CPU=0")
    with pytest.raises(RuntimeError, match=r"LINEARPATCH_BUILD_CPU=1 but the CPU kernels cannot be built: missing a C\+\+ compiler"):
        decide("1", None, "2.14.1")
    with pytest.raises(RuntimeError, match=r"use 1 \(build the CPU kernels\), 0 \(skip them\)"):
        decide("yes", "/usr/bin/g++", "2.14.1")


def test_build_backend_asks_for_torch_and_ninja_only_where_a_compiler_is(monkeypatch):
    backend = load_script(ROOT / "build_support" / "build_backend.py", "linearpatch_build_backend_for_wheels")
    monkeypatch.setattr(backend, "_setuptools_requires", lambda hook, settings: ["wheel"])
    monkeypatch.setattr(backend, "find_cxx_compiler", lambda: "/usr/bin/c++")
    monkeypatch.delenv("LINEARPATCH_BUILD_CPU", raising=False)
    assert backend.get_requires_for_build_editable() == ["wheel", "torch>=2.10", "ninja"]
    assert backend.get_requires_for_build_wheel() == ["wheel", "torch>=2.10", "ninja"]
    monkeypatch.setenv("LINEARPATCH_BUILD_CPU", "0")
    assert backend.get_requires_for_build_wheel() == ["wheel"]
    monkeypatch.delenv("LINEARPATCH_BUILD_CPU")
    monkeypatch.setattr(backend, "find_cxx_compiler", lambda: None)
    assert backend.get_requires_for_build_wheel() == ["wheel"]
    # The real finder, on an empty PATH and no CXX: nothing.
    monkeypatch.undo()
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(backend.sysconfig, "get_config_var", lambda name: None)
    assert backend.find_cxx_compiler() is None


def test_the_build_environments_torch_is_told_apart_from_the_installed_one(monkeypatch, tmp_path):
    # Installed torch (this interpreter's site-packages): the CUDA decision may use it.
    assert not setup_script.torch_is_the_build_environments()
    fake = tmp_path / "pip-build-env-x" / "torch" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")

    class Spec:
        origin = str(fake)
    monkeypatch.setattr(setup_script.importlib.util, "find_spec", lambda name: Spec())
    assert setup_script.torch_is_the_build_environments()


def make_wheel(folder: Path, name: str, version: str = "1.0", requires=()) -> Path:
    """A minimal pure-Python wheel (one package, its metadata) written as the zip file a wheel is."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    entries = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    entries[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*entries, f"{dist}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for entry, text in entries.items():
            z.writestr(entry, text)
    return path


def test_the_check_environment_installs_the_wheels_own_dependencies(tmp_path, monkeypatch):
    """The fresh environment of ``check_wheel.py`` takes the torch under test from that torch's own
    environment, gets the wheel's other dependencies and torch's own installed into it (here from a
    local wheelhouse), and sees nothing of the base interpreter's site-packages: it used to be made with
    --system-site-packages and the wheel installed with --no-deps, so the check failed wherever that
    interpreter lacked a dependency (``No module named 'tqdm'`` when the release script ran from a
    virtual environment)."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    for name, version in [("lpcheck_dep", "1.2"), ("lpcheck_dep", "0.5"), ("lpcheck_cudalib", "13.0")]:
        make_wheel(wheelhouse, name, version)
    wheel = make_wheel(tmp_path, "lpcheck_pkg", requires=["lpcheck_dep>=1.0", "lpcheck_torch>=2.0"])
    # The environment holding the torch under test: torch installed without its requirement (as
    # build_wheels installs it, --no-deps), beside the base interpreter's packages (pytest is one).
    torch_site = tmp_path / "torch-env" / "site-packages"
    torch_site.mkdir(parents=True)
    shutil.unpack_archive(make_wheel(tmp_path, "lpcheck_torch", "2.1", requires=["lpcheck_cudalib==13.0"]), torch_site,
                          format="zip")
    layout = {"version": "2.1", "site": str(torch_site), "path": [str(torch_site), str(Path(pytest.__file__).parents[1])]}
    work = tmp_path / "work"
    work.mkdir()
    constraints = tmp_path / "constraints.txt"  # a machine-wide cap below the torch under test changes nothing
    constraints.write_text("lpcheck_torch<2.0\n")
    monkeypatch.setenv("PIP_CONSTRAINT", str(constraints))
    python = check_wheel.fresh_env(wheel, layout, work, pip_args=["--no-index", f"--find-links={wheelhouse}"])
    code = ("import importlib.util, json, lpcheck_pkg, lpcheck_dep, lpcheck_torch, lpcheck_cudalib; print(json.dumps("
            "[lpcheck_dep.__file__, lpcheck_dep.VERSION, lpcheck_cudalib.__file__, lpcheck_torch.__file__, "
            "importlib.util.find_spec('pytest')]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=work)
    assert out.returncode == 0, out.stderr
    dep_file, dep_version, cudalib_file, torch_file, pytest_spec = json.loads(out.stdout)
    assert Path(dep_file).is_relative_to(work) and dep_version == "1.2"  # installed there, the version it asks for
    assert Path(cudalib_file).is_relative_to(work)  # torch's own requirement, installed too
    assert Path(torch_file).is_relative_to(torch_site)  # the torch under test, not a copy
    assert pytest_spec is None  # the base interpreter's packages are not visible

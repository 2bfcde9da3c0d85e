#!/usr/bin/env python3
"""Build, on a machine without a GPU, everything the prepared GPU run carries: one folder, one command.

    python scripts/gpu_bundle.py [--out .gpu-bundle] [--fht-source DIR] [--record]

The GPU machine (one H100 or H200, Python 3.12, torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0, no
network, no pip) should compile nothing. The bundle (``benchmarks/gpu_plan.py`` lists it, under 64 MB):

* ``wheel/``: the CUDA extension for sm_90 as the cu130 release wheel (``scripts/build_wheels.py --cuda
  cu13 --arch-list 9.0``: built against torch 2.11.0, repaired to manylinux_2_28, and loaded and
  checked under torch 2.11.0 in a fresh virtual environment by ``scripts/check_wheel.py``);
* ``triton-cache/``: Triton's cache with every kernel the run launches (``gpu_plan.triton_launches``)
  compiled for sm_90 by triton 3.6.0, filed under the key the GPU machine's triton 3.6.0 computes under
  Python 3.12, and proven to hit (``scripts/triton_cache.py``: ``warm``, then ``verify`` in a new process
  against a moved copy); beside it ``triton_model.json``, the prefill model of those kernels
  (``scripts/triton_aot.py``'s), the Triton rows' modelled column of the run's record;
* ``sass_model.json``: ``benchmarks/sass_budget.py --arch 90`` (the modelled column of the record);
* ``fht/``: fast-hadamard-transform's CUDA kernels for sm_90 behind our own ``torch.ops.fht``
  registration (``scripts/fht_ops.cpp``: no pybind, no Python ABI, so it loads under Python 3.12 as
  under 3.11), compiled against torch 2.11.0's headers. PyPI's sdist of fast-hadamard-transform 1.1.0
  holds no CUDA sources (its setup.py downloads a prebuilt wheel from the project's releases, which
  neither machine can reach), so the sources come from ``--fht-source`` (a checkout of the project);
  without it the piece is recorded as missing and the run leaves the fht rows out.

Each piece is rebuilt only when the sources it comes from changed (``manifest.json`` keeps their
hashes, ``gpu_plan.artifact_hash``). ``--record`` also copies the manifest to
``benchmarks/results/gpu-bundle/manifest.json`` (committed: what the last bundle held, and whether a
bundle built now would differ). Virtual environments and downloads live in ``LINEARPATCH_WHEEL_ENVS``
(default ``~/.cache/linearpatch-wheels``), shared with ``build_wheels.py``. Standard library only.
Environment: MAX_JOBS (parallel compiler jobs, default 2).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20
TRITON = "3.6.0"  # the GPU machine's
TORCH = "2.11.0"  # the GPU machine's (cu130)
GPU_PYTHON = "3.12"
FHT = "1.1.0"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


PLAN = _load("linearpatch_gpu_plan", ROOT / "benchmarks" / "gpu_plan.py")
WHEELS = _load("linearpatch_build_wheels", ROOT / "scripts" / "build_wheels.py")


def log(msg: str) -> None:
    print(f"gpu_bundle: {msg}", flush=True)


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def artifact(name: str):
    return next(a for a in PLAN.ARTIFACTS if a.name == name)


def files_of(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


# ------------------------------------------------------------------------------------------------
# The pieces


def build_wheel(out: Path, envs: Path) -> str:
    folder = out / "wheel"
    shutil.rmtree(folder, ignore_errors=True)
    run([sys.executable, ROOT / "scripts" / "build_wheels.py", "--cuda", "cu13", "--arch-list", "9.0",
         "--check-torch", TORCH, "--out", folder], env={**os.environ, "LINEARPATCH_WHEEL_ENVS": str(envs),
                                                      "MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
    (wheel,) = folder.glob("linearpatch_kernels-*+cu13*.whl")
    return f"{wheel.name}, loads under torch {TORCH} (check_wheel.py)"


def build_sass_model(out: Path) -> str:
    text = run([sys.executable, ROOT / "benchmarks" / "sass_budget.py", "--arch", "90", "--json", out / "sass_model.json"],
               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    (out / "sass_model.txt").write_text(text)
    rows = json.loads((out / "sass_model.json").read_text())
    return f"{sum(r.get('ratio') is not None for r in rows)} modelled (op, dtype, d) rows on H200"


def triton_env(envs: Path) -> Path:
    """A Python 3.11 venv with triton 3.6.0 and torch 2.11.0 (cached): compiles the GPU machine's kernels."""
    folder = envs / f"triton-{TRITON}-torch-{TORCH}"
    python = folder / "bin" / "python"
    if (folder / ".ready").is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    log(f"environment with triton {TRITON} and torch {TORCH} in {folder}")
    run([sys.executable, "-m", "venv", "--system-site-packages", folder])
    WHEELS.pip(python, "install", "--no-deps", f"triton=={TRITON}", f"torch=={TORCH}")
    out = run([python, "-c", "import torch, triton; print(torch.__version__, triton.__version__)"],
              capture_output=True, text=True).stdout.split()
    (folder / ".ready").write_text(" ".join(out) + "\n")
    return python


def gpu_triton_wheel(envs: Path) -> Path:
    """The triton wheel the GPU machine has installed (Python 3.12), whose files make its cache key."""
    folder = envs / "downloads"
    found = sorted(folder.glob(f"triton-{TRITON}-cp312-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    WHEELS.pip(Path(sys.executable), "download", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON,
               "--platform", "manylinux_2_28_x86_64", f"triton=={TRITON}", "-d", str(folder))
    return sorted(folder.glob(f"triton-{TRITON}-cp312-*.whl"))[0]


def build_triton_cache(out: Path, envs: Path) -> str:
    python, key_wheel = triton_env(envs), gpu_triton_wheel(envs)
    folder = out / "triton-cache"
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        launches = Path(tmp) / "launches.json"
        launches.write_text(json.dumps(PLAN.triton_launches()))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(folder)}
        env.pop("TRITON_INTERPRET", None)
        tool = ROOT / "scripts" / "triton_cache.py"
        # compiled into a cache kept with the environments: a rebuild compiles only what changed
        run([python, tool, "warm", "--out", folder, "--launches", launches, "--key-wheel", key_wheel,
             "--work", envs / f"triton-{TRITON}-sm90-cache"], env=env)
        verify = run([python, tool, "verify", "--cache", folder, "--launches", launches, "--key-wheel", key_wheel],
                     env={**env, "TRITON_CACHE_DIR": tmp}, capture_output=True, text=True).stdout.strip()
        # The re-keying that install does where a machine's triton_key differs from the recorded one:
        # here the key of this Python's triton (3.11's libtriton), which the entries were not filed under.
        rekeyed = run([python, tool, "verify", "--cache", folder, "--launches", launches],
                      env={**env, "TRITON_CACHE_DIR": tmp}, capture_output=True, text=True).stdout.strip()
    print(verify)
    print(rekeyed)
    info = json.loads((folder / "entries.json").read_text())
    hits = lambda text: text.removeprefix("triton_cache: verify: ").split(" over ")[0]  # noqa: E731
    return (f"{len(info['entries'])} kernels for {len(info['launches'])} launches, triton {info['triton']}, key "
            f"{info['triton_key']} (Python {GPU_PYTHON}); moved: {hits(verify)}; re-keyed for Python 3.11's "
            f"triton: {hits(rekeyed)}")


def fht_sources(given: Path | None, envs: Path) -> tuple[Path | None, str]:
    """The folder with fast-hadamard-transform's csrc/: ``given``, else the PyPI sdist if it holds one."""
    if given:
        if not (given / "csrc").is_dir():
            raise SystemExit(f"gpu_bundle: --fht-source {given}: no csrc/ folder (a checkout of "
                             "fast-hadamard-transform is expected)")
        return given, f"sources from {given}"
    folder = envs / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / f"fast_hadamard_transform-{FHT}.tar.gz"
    if not sdist.is_file():
        WHEELS.pip(Path(sys.executable), "download", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
                   f"fast-hadamard-transform=={FHT}", "-d", str(folder))
    with tarfile.open(sdist) as tar:
        if not any("/csrc/" in n for n in tar.getnames()):
            return None, (f"PyPI's sdist of fast-hadamard-transform {FHT} holds no CUDA sources (its setup.py "
                          "downloads a prebuilt wheel); pass --fht-source with a checkout of the project")
        target = folder / f"fast_hadamard_transform-{FHT}"
        tar.extractall(folder)
    return target, f"sources from the sdist {sdist.name}"


def build_fht(out: Path, envs: Path, source: Path) -> str:
    """Our torch.ops.fht registration (scripts/fht_ops.cpp) and the project's kernels, built with torch
    2.11.0's extension builder for sm_90 (no Python module: a plain library torch.ops.load_library loads),
    with the nvcc flags of the project's own setup.py (fast math among them), so that it is timed as
    its users build it."""
    python = WHEELS.torch_env(envs, TORCH)
    folder = out / "fht"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    kernels = sorted(p for p in (source / "csrc").glob("fast_hadamard_transform*.cu"))
    cuda_home = WHEELS.toolkit(WHEELS.MATRIX["cu13"], envs)
    code = f"""
import glob, os, shutil, sys, torch
from torch.utils.cpp_extension import load
build = {str(folder / 'build')!r}
os.makedirs(build, exist_ok=True)
load(name="fht_ops", sources=[{str(ROOT / 'scripts' / 'fht_ops.cpp')!r}] + {[str(k) for k in kernels]!r},
     extra_include_paths=[{str(source / 'csrc')!r}], extra_cflags=["-O3"],
     extra_cuda_cflags=["-O3", "-gencode", "arch=compute_90,code=sm_90", "--expt-relaxed-constexpr",
                        "--expt-extended-lambda", "--use_fast_math",
                        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"],
     build_directory=build, is_python_module=False, verbose=False)
shutil.copy(os.path.join(build, "fht_ops.so"), {str(folder / 'libfht_ops.so')!r})
"""
    # loaded in a fresh process (the build's own process has the namespace registered already)
    probe = f"""
import torch
torch.ops.load_library({str(folder / 'libfht_ops.so')!r})
print("registers", ", ".join(f"fht::{{n}}" for n in ("hadamard_transform", "hadamard_transform_12N",
      "hadamard_transform_20N", "hadamard_transform_28N") if hasattr(torch.ops.fht, n)))
"""
    env = {**os.environ, "CUDA_HOME": str(cuda_home), "TORCH_CUDA_ARCH_LIST": "9.0",
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "PATH": f"{cuda_home / 'bin'}:{os.environ['PATH']}"}
    run([python, "-c", code], env=env, capture_output=True, text=True)
    printed = run([python, "-c", probe], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    shutil.rmtree(folder / "build")
    undefined = run(["nm", "-D", "--undefined-only", folder / "libfht_ops.so"], capture_output=True, text=True).stdout
    python_symbols = [line.split()[-1] for line in undefined.splitlines() if line.split()[-1].startswith("Py")]
    if python_symbols:
        raise SystemExit(f"gpu_bundle: libfht_ops.so needs Python symbols ({', '.join(python_symbols[:5])}): it would "
                         "be tied to this Python's ABI")
    return f"libfht_ops.so for sm_90, torch {TORCH}, no Python symbols; {printed}"


# ------------------------------------------------------------------------------------------------
# Main


def git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PLAN.DEFAULT_BUNDLE, help="the bundle folder (default .gpu-bundle)")
    parser.add_argument("--fht-source", type=Path, help="a checkout of fast-hadamard-transform (its csrc/)")
    parser.add_argument("--only", help="comma-separated pieces to (re)build: " + ",".join(a.name for a in PLAN.ARTIFACTS))
    parser.add_argument("--force", action="store_true", help="rebuild pieces whose sources did not change")
    parser.add_argument("--record", action="store_true", help="copy the manifest to " +
                        str(PLAN.COMMITTED_MANIFEST.relative_to(ROOT)))
    args = parser.parse_args(argv)
    names = [a.name for a in PLAN.ARTIFACTS]
    only = [n.strip() for n in args.only.split(",")] if args.only else names
    if set(only) - set(names):
        parser.error(f"--only {','.join(sorted(set(only) - set(names)))}: the pieces are {', '.join(names)}")
    envs = Path(os.environ.get("LINEARPATCH_WHEEL_ENVS")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "linearpatch-wheels")
    envs.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = PLAN.read_manifest(out / "manifest.json") or {}
    entries = manifest.get("artifacts", {})
    builders = {"wheel": lambda: build_wheel(out, envs), "sass-model": lambda: build_sass_model(out),
                "triton-cache": lambda: build_triton_cache(out, envs)}
    for name in names:
        a = artifact(name)
        source_hash = PLAN.artifact_hash(a)
        old = entries.get(name, {})
        if name not in only or (not args.force and old.get("status") == "built" and old.get("source_hash") == source_hash
                                and (out / a.path).exists()):
            if old:
                log(f"{name}: kept ({old.get('status')}: {old.get('detail')})")
            continue
        start = time.monotonic()
        log(f"{name}: building ({a.what})")
        try:
            if name == "fht":
                source, where = fht_sources(args.fht_source, envs)
                if source is None:
                    entries[name] = dict(status="missing", detail=where, source_hash=source_hash)
                    log(f"{name}: missing: {where}")
                    continue
                detail = build_fht(out, envs, source) + f"; {where}"
            else:
                detail = builders[name]()
        except (subprocess.CalledProcessError, OSError, ValueError, StopIteration) as e:
            # the command's last lines of error output (a C++ trace's frames left out), not the command
            err = [line for line in str(getattr(e, "stderr", None) or "").splitlines() if not line.startswith("frame #")]
            what = f"exit {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else f"{type(e).__name__}: {e}"
            entries[name] = dict(status="failed", detail=(what + ": " + " | ".join(err[-6:]))[:2000],
                                 source_hash=source_hash)
            log(f"{name}: FAILED: {entries[name]['detail']}")
            continue
        entries[name] = dict(status="built", detail=detail, source_hash=source_hash,
                             seconds=round(time.monotonic() - start), **files_of(out / a.path))
        log(f"{name}: {detail} ({entries[name]['bytes'] / 2**20:.1f} MB, {entries[name]['seconds']} s)")
    total = sum(e.get("bytes", 0) for e in entries.values() if e.get("status") == "built")
    manifest = dict(built_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    commit=git_commit(), for_gpu_machine=dict(python=GPU_PYTHON, torch=f"{TORCH}+cu130", triton=TRITON,
                                                              arch="sm_90"),
                    total_bytes=total, limit_bytes=LIMIT_BYTES, artifacts=entries)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print()
    print(f"bundle {out} ({total / 2**20:.1f} MB of {LIMIT_BYTES / 2**20:.0f} MB):")
    for name in names:
        e = entries.get(name, {})
        size = f"{e['bytes'] / 2**20:6.1f} MB" if e.get("bytes") else " " * 9
        print(f"  {name:<13} {e.get('status', 'not built'):<9} {size}  {e.get('detail', '')}")
    if args.record:
        PLAN.COMMITTED_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        PLAN.COMMITTED_MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
        log(f"manifest recorded in {PLAN.COMMITTED_MANIFEST.relative_to(ROOT)}")
    if total > LIMIT_BYTES:
        log(f"the bundle is {total / 2**20:.1f} MB: over the {LIMIT_BYTES / 2**20:.0f} MB that can be carried")
        return 1
    return 0 if all(entries.get(n, {}).get("status") in ("built", "missing") for n in only) else 1


if __name__ == "__main__":
    sys.exit(main())

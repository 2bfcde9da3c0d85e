#!/usr/bin/env python3
"""Triton's on-disk cache, prepared on a machine without a GPU for the one with it, and proven to hit.

Triton finds a compiled kernel in its cache under ``sha256(key)`` with (triton 3.6,
``triton/runtime/cache.py: get_cache_key``)

    key = triton_key() - src.hash() - backend.hash() - options.hash() - sorted(cache-invalidating env vars)

* ``triton_key()``: the triton version and the sha256 of its own files: ``runtime/cache.py``, every
  module under ``compiler/`` and ``backends/``, ``_C/libtriton.so`` and every module under
  ``language/``. ``libtriton.so`` is built per Python version, so the key of triton 3.6.0 under
  Python 3.11 (this machine) differs from the GPU machine's (Python 3.12) although both compile the
  same code. ``key_of_tree`` computes it from the files of a wheel (checked against triton's own
  ``triton_key()`` on the installed one); ``warm`` files every kernel under the GPU machine's key.
* ``src.hash()``: the kernel's source and its dependencies, its signature (argument types), constexpr
  values and specialization attributes (16-byte alignment of pointers, divisibility of integers by
  16). ``warm`` gets them exactly as a launch does: the backend's real launcher code runs on CPU
  tensors and calls ``JITFunction.warmup`` (Triton's binder, the same specialization code as a launch),
  with Triton's driver replaced by one that reports an sm_90 GPU and a launch configuration computed
  for 132 SMs and sm_90 (the launcher's own ``launch_config``).
* ``backend.hash()``: the version text of the ptxas in the triton wheel and the architecture (90);
  ``options.hash()``: the compile options (num_warps, stages ...; libdevice by content, not path);
  the environment part is empty when no cache-invalidating variable (``TRITON_*`` debug/dump knobs) is
  set, on either machine. ``warm`` checks that the GPU machine's wheel and the triton compiling here
  have byte-identical Python modules, ptxas and libdevice (for 3.6.0 cp311 and cp312: only the
  compiled libraries differ), so these parts are the same on both.

Triton's group files (``__grp__<kernel>.json``) hold absolute paths of the files of an entry, so a
cache moved to another folder misses. ``install`` rewrites them for the folder the cache lands in and,
should the GPU machine's ``triton_key()`` differ from the one recorded (another build of 3.6.0),
re-files every entry under the new key from the key's other parts, which ``warm`` records per entry
in ``entries.json``. ``verify`` replays the launches in a new process against a copy of the cache
moved elsewhere, counting Triton's own cache-hit reports (``knobs.compilation.listener``): every
launch must hit.

    python scripts/triton_cache.py warm --out DIR --launches launches.json [--key-wheel triton-...-cp312-...whl] [--work DIR]
    python scripts/triton_cache.py verify --cache DIR --launches launches.json [--key-wheel ...]
    python scripts/triton_cache.py install --cache DIR --to DEST      # on the GPU machine
    python scripts/triton_cache.py key [--wheel W]                    # triton_key's hash: installed / of a wheel
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = (".cubin", ".json")  # what a cache hit and a launch read (the IR text is left out: size)
ARCH, SMS = 90, 132  # H100 / H200


# ------------------------------------------------------------------------------------------------
# triton_key(), computed from a tree of files


def _modules(folder: Path) -> list[Path]:
    """The files ``pkgutil.walk_packages([folder])`` visits, in its order: modules and packages of each
    folder sorted by name, a package's ``__init__`` before its contents (folders without one skipped)."""
    import inspect

    out = []
    entries = sorted(os.listdir(folder))
    for name in entries:
        path = folder / name
        if path.is_dir():
            if "." in name or not (path / "__init__.py").is_file():
                continue
            out.append(path / "__init__.py")
            out.extend(_modules(path))
        else:
            module = inspect.getmodulename(name)
            if module and module != "__init__" and "." not in module:
                out.append(path)
    # pkgutil yields each name once (a module and a package of the same name: the first seen)
    seen, unique = set(), []
    for p in out:
        key = p.parent if p.name == "__init__.py" else p.with_suffix("")
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def key_of_tree(triton_dir: Path, version: str) -> str:
    """triton 3.6's ``triton_key()`` for the installed files under ``triton_dir`` (the package folder)."""
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    contents = [digest(triton_dir / "runtime" / "cache.py")]
    for sub in ("compiler", "backends"):
        contents += [digest(p) for p in _modules(triton_dir / sub)]
    contents.append(digest(triton_dir / "_C" / "libtriton.so"))
    contents += [digest(p) for p in _modules(triton_dir / "language")]
    return f"{version}" + "-".join(contents)


def key_inputs(triton_dir: Path) -> list[Path]:
    """The files the rest of the key depends on, besides the modules ``key_of_tree`` hashes: the ptxas
    whose version is ``backend.hash()`` and the libdevice whose content is in ``options.hash()``."""
    nvidia = triton_dir / "backends" / "nvidia"
    return [*(_modules(triton_dir / "compiler")), *(_modules(triton_dir / "backends")), *(_modules(triton_dir / "language")),
            triton_dir / "runtime" / "cache.py", triton_dir / "runtime" / "jit.py", nvidia / "bin" / "ptxas",
            nvidia / "lib" / "libdevice.10.bc"]


def key_of_wheel(wheel: Path, installed: Path | None = None) -> str:
    """``triton_key()`` of the triton that ``wheel`` installs (unpacked into a scratch folder). With
    ``installed`` (the package folder of the triton that compiles here), every other input of the key
    (the Python modules, ptxas, libdevice) must be byte-identical in both: only ``libtriton.so`` may
    differ (it is built per Python version), so the rest of the key is the same on both machines."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith("triton/")])
        version = wheel.name.split("-")[1]
        tree = Path(tmp) / "triton"
        if installed is not None:
            differ = [str(p.relative_to(tree)) for p in key_inputs(tree)
                      if not (installed / p.relative_to(tree)).is_file()
                      or (installed / p.relative_to(tree)).read_bytes() != p.read_bytes()]
            if differ:
                raise SystemExit(f"triton_cache: {wheel.name} and the installed triton differ in {', '.join(differ[:5])}: "
                                 "kernels compiled here would not be what that triton compiles")
        return key_of_tree(tree, version)


def short(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def dir_name(full_key: str) -> str:
    """The cache folder of an entry: base32 of sha256(key), as ``get_cache_manager`` names it."""
    return base64.b32encode(hashlib.sha256(full_key.encode()).digest()).decode().rstrip("=")


# ------------------------------------------------------------------------------------------------
# The launches, compiled through the launcher under a driver that reports sm_90


def _fake_sm90(tb):
    """Triton's active driver replaced by one for an sm_90 GPU (no launch ever reaches it), and the
    backend's grid computed for 132 SMs on sm_90. Returns the restore function."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from linearpatch_kernels.backends.gpu_limits import shared_memory_limit

    class Sm90Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    def grid(x, rows, d, op, dtypes=()):
        capability = (ARCH // 10, ARCH % 10)
        return (1,), tb.launch_config(d, rows, SMS, x.dtype, op, shared_memory_limit(capability), capability), None

    class Warmup:
        """``kernel[grid](*args, **kw)`` -> ``kernel.warmup(*args, grid=grid, **kw)``: compile, no launch.
        The compiled kernels are appended to ``COMPILED`` (for the model of the prefill kernels)."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def warmup(*args, **kwargs):
                compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
                COMPILED.append(compiled)
                return compiled
            return warmup

    names = ("_hadamard_kernel", "_hadamard_parts_kernel", "_patch_add_rmsnorm_kernel", "_patch_add_rmsnorm_parts_kernel")
    saved = {n: getattr(tb, n) for n in (*names, "_grid")}
    previous = driver._active  # None here: no GPU driver is active on this machine
    driver.set_active(Sm90Driver())
    tb._grid = grid
    for n in names:
        setattr(tb, n, Warmup(saved[n]))

    def restore():
        for n, v in saved.items():
            setattr(tb, n, v)
        driver._active = previous
    return restore


COMPILED: list = []


def launch_all(launches: list[dict]) -> list[dict]:
    """Run every launch through the backend's launcher (compiling, not launching); per launch the
    Triton cache hits and misses it caused (Triton's compilation listener)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from triton import knobs

    from linearpatch_kernels.backends import triton_backend as tb

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    events = []
    knobs.compilation.listener = lambda **kw: events.append(bool(kw.get("cache_hit")))
    restore = _fake_sm90(tb)
    results = []
    try:
        for launch in launches:
            before = len(events)
            d, dtype = launch["d"], dtypes[launch["dtype"]]
            # Two rows: the launch configuration comes from launch["rows"] (the grid above), the tensors
            # only give the argument types and their 16-byte alignment, as on the GPU.
            x = torch.zeros(2, d, dtype=dtype)
            s = torch.ones(d)
            w = torch.ones(d, dtype=dtypes[launch["weight"]])
            rows = launch["rows"]
            tb_grid = tb._grid
            tb._grid = lambda x_, r_, d_, op_, dt_=(), _g=tb_grid: _g(x_, rows, d_, op_, dt_)
            saved = tb.MAX_TILE_DOT, tb.NETWORK_PREFERRED
            try:
                if launch.get("other_h_k"):  # the form of H_K the launcher does not pick (gpu_timings.other_h_k)
                    if tb.launch_config(d, rows, SMS, dtype, launch["op"], None, (ARCH // 10, ARCH % 10)).NETWORK:
                        tb.NETWORK_PREFERRED = {}
                    else:
                        tb.MAX_TILE_DOT = 1
                if tb.unsupported_reason_for(dtype, d, (ARCH // 10, ARCH % 10), launch["op"]) is not None:
                    results.append(dict(launch, refused=True, hits=0, misses=0))
                    continue
                if launch["op"] == "hadamard_patch":
                    tb.hadamard_patch(x, s)
                elif launch["op"] == "hadamard_transform":
                    tb.hadamard_transform(x, 0.5)
                else:
                    tb.patch_add_rmsnorm(x, x, s, w, 1e-6)
            finally:
                tb._grid = tb_grid
                tb.MAX_TILE_DOT, tb.NETWORK_PREFERRED = saved
            new = events[before:]
            results.append(dict(launch, hits=sum(new), misses=len(new) - sum(new),
                                config=tb.launch_config(d, rows, SMS, dtype, launch["op"], None, (ARCH // 10, ARCH % 10))
                                if not launch.get("other_h_k") else None,
                                kernel=COMPILED[-1] if COMPILED else None))
    finally:
        restore()
        knobs.compilation.listener = None
    return results


def _with_key(key: str | None):
    """Make Triton file entries under ``key`` (the GPU machine's triton_key) and record each entry's
    full key. Returns the list the keys are appended to."""
    import triton.compiler.compiler as compiler
    import triton.runtime.cache as cache

    if key is not None:
        cache.triton_key = lambda: key
    keys = []
    original = compiler.get_cache_key

    def recording(src, backend, options, env_vars):
        full = original(src, backend, options, env_vars)
        keys.append(full)
        return full
    compiler.get_cache_key = recording
    return keys


def _prune(cache: Path) -> None:
    """Keep what a hit and a launch read (cubin, metadata, group file); rewrite the group files."""
    for entry in cache.iterdir():
        if not entry.is_dir():
            continue
        for f in entry.iterdir():
            if f.name.startswith("tmp.") or not (f.suffix in KEEP):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        relocate_entry(entry)


def relocate_entry(entry: Path) -> None:
    """Point the entry's group files at the files in ``entry`` (Triton stores absolute paths)."""
    for grp in entry.glob("__grp__*.json"):
        data = json.loads(grp.read_text())
        children = {name: str(entry / name) for name in data.get("child_paths", {}) if (entry / name).exists()}
        grp.write_text(json.dumps({"child_paths": children}))


def warm(out: Path, launches: list[dict], key_wheel: Path | None, work: Path | None = None) -> dict:
    """Compile every launch into ``out`` (a Triton cache), filed under the key of the triton that
    ``key_wheel`` installs (default: the installed one); ``out/entries.json`` records each entry.
    With ``work``, Triton compiles into that folder (kept between builds: kernels whose key did not
    change are not compiled again) and only the launches' entries are copied to ``out``."""
    import triton
    from triton.runtime.cache import triton_key

    local = triton_key()
    mine = key_of_tree(Path(triton.__file__).parent, triton.__version__)
    if mine != local:
        raise SystemExit("triton_cache: key_of_tree() does not reproduce this triton's triton_key(): "
                         "the cache key computation changed; update key_of_tree")
    target = key_of_wheel(key_wheel, Path(triton.__file__).parent) if key_wheel else local
    out.mkdir(parents=True, exist_ok=True)
    cache = work or out
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    from triton import knobs
    knobs.cache.dir = str(cache)
    keys = _with_key(target)
    start = time.time()
    results = launch_all(launches)
    if work is not None:
        for full in keys:
            if (work / dir_name(full)).is_dir():
                shutil.copytree(work / dir_name(full), out / dir_name(full), dirs_exist_ok=True)
    _prune(out)
    models = model_prefill(results)
    for r in results:
        r.pop("kernel", None)
        r.pop("config", None)
    entries = {}
    for full in keys:
        name = dir_name(full)
        if (out / name).is_dir():
            entries[name] = {"key_rest": full[len(target):], "files": sorted(p.name for p in (out / name).iterdir())}
    info = dict(triton=triton.__version__, triton_key=short(target), built_with_triton_key=short(local),
                key_from=key_wheel.name if key_wheel else "installed triton", arch=ARCH, sms=SMS,
                seconds=round(time.time() - start, 1), launches=results, entries=entries,
                env_vars=_env_vars())
    (out / "entries.json").write_text(json.dumps(info, indent=1))
    (out.parent / "triton_model.json").write_text(json.dumps({"meta": dict(triton=triton.__version__, source=
        "scripts/triton_cache.py warm: scripts/triton_aot.py's measure() and model() on the carried kernels"),
        "rows": models}, indent=1))
    return info


def model_prefill(results: list[dict]) -> list[dict]:
    """The prefill model of ``scripts/triton_aot.py`` (SASS of one row-block iteration, the pipe model
    of ``benchmarks/sass_budget.py``) for the carried kernels of prefill launches (16,384 rows or
    more): the Triton kernels' modelled column of the run's record, in the AOT report's row format."""
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("linearpatch_triton_aot", ROOT / "scripts" / "triton_aot.py")
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    short_dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    rows, seen = [], set()
    for r in results:
        if r.get("kernel") is None or r.get("config") is None or r.get("refused") or r["rows"] < 16384:
            continue
        key = (r["op"], r["dtype"], r["d"])
        if key in seen:
            continue
        seen.add(key)
        config = r["config"]
        row = dict(target="sm_90", arch=ARCH, regime="prefill", op=r["op"], dtype=short_dtype[r["dtype"]], d=r["d"],
                   config={**dataclasses.asdict(config), "num_warps": config.num_warps}, **aot.measure(r["kernel"]))
        row["model"] = aot.model(row)
        rows.append(row)
    return rows


def _env_vars() -> dict:
    from triton._C.libtriton import get_cache_invalidating_env_vars
    return dict(get_cache_invalidating_env_vars())


def verify(cache: Path, launches: list[dict], key_wheel: Path | None) -> dict:
    """Copy ``cache`` elsewhere, ``install`` it there as the GPU machine would, replay the launches with
    the GPU machine's key and count Triton's cache-hit reports: every launch must hit."""
    import triton
    from triton import knobs
    from triton.runtime.cache import triton_key

    target = key_of_wheel(key_wheel) if key_wheel else triton_key()
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "moved"
        report = install(cache, dest, local_key=target)
        knobs.cache.dir = str(dest)
        _with_key(target)
        results = launch_all(launches)
        new = sorted(p.name for p in dest.iterdir() if p.is_dir() and p.name not in report["entries"])
    misses = sum(r["misses"] for r in results)
    hits = sum(r["hits"] for r in results)
    return dict(triton=triton.__version__, triton_key=short(target), launches=len(results), hits=hits, misses=misses,
                compiled_entries=len(new), refused=sum(bool(r.get("refused")) for r in results))


def install(cache: Path, dest: Path, local_key: str | None = None) -> dict:
    """Copy the prepared cache to ``dest`` (Triton's cache folder here), its group files pointing into
    ``dest``; entries are re-filed under this triton's key when it differs from the one recorded."""
    info = json.loads((cache / "entries.json").read_text())
    if local_key is None:
        import triton
        from triton.runtime.cache import triton_key
        if triton.__version__ != info["triton"]:
            raise SystemExit(f"triton_cache: the cache is for triton {info['triton']}, this is {triton.__version__}")
        local_key = triton_key()
    rekey = short(local_key) != info["triton_key"]
    dest.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, entry in info["entries"].items():
        new_name = dir_name(local_key + entry["key_rest"]) if rekey else name
        target = dest / new_name
        shutil.copytree(cache / name, target, dirs_exist_ok=True)
        if rekey:
            for meta in target.glob("*.json"):
                if not meta.name.startswith("__grp__"):
                    data = json.loads(meta.read_text())
                    data["hash"] = hashlib.sha256((local_key + entry["key_rest"]).encode()).hexdigest()
                    meta.write_text(json.dumps(data))
        relocate_entry(target)
        entries[new_name] = entry
    return dict(entries=entries, rekeyed=rekey, triton_key=short(local_key), recorded_key=info["triton_key"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("warm", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--out" if name == "warm" else "--cache", type=Path, required=True)
        p.add_argument("--launches", type=Path, required=True, help="JSON list of launches (gpu_plan.triton_launches)")
        p.add_argument("--key-wheel", type=Path, help="file entries under the triton_key of this triton wheel")
        if name == "warm":
            p.add_argument("--work", type=Path, help="compile into this cache (kept) and copy the entries to --out")
    p = sub.add_parser("install")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--to", type=Path, required=True)
    p = sub.add_parser("key")
    p.add_argument("--wheel", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.command == "key":
        if args.wheel:
            print(short(key_of_wheel(args.wheel)))
        else:
            from triton.runtime.cache import triton_key
            print(short(triton_key()))
        return 0
    if args.command == "install":
        report = install(args.cache, args.to)
        print(f"triton_cache: {len(report['entries'])} kernels installed in {args.to}"
              + (f" (re-keyed: recorded key {report['recorded_key']}, this triton's {report['triton_key']})"
                 if report["rekeyed"] else f" (key {report['triton_key']} as recorded)"))
        return 0
    launches = json.loads(args.launches.read_text())
    if args.command == "warm":
        info = warm(args.out, launches, args.key_wheel, args.work)
        refused = sum(bool(r.get("refused")) for r in info["launches"])
        print(f"triton_cache: {len(info['entries'])} kernels for {len(launches)} launches ({refused} refused by the "
              f"backend) in {info['seconds']} s, filed under triton_key {info['triton_key']} ({info['key_from']})")
        return 0
    report = verify(args.cache, launches, args.key_wheel)
    print(f"triton_cache: verify: {report['hits']} hits, {report['misses']} misses, {report['compiled_entries']} "
          f"entries compiled anew over {report['launches']} launches ({report['refused']} refused), key "
          f"{report['triton_key']}")
    return 0 if report["misses"] == 0 and report["compiled_entries"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

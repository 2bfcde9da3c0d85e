"""Run the CUDA kernels of csrc/ on the CPU: build them with the host C++ compiler against the
emulated CUDA built-ins of include/, and call their launchers through ctypes.

    from emulate import EmulatedKernels          # (this folder on sys.path)
    kernels = EmulatedKernels.build()             # cached by the hash of every source it compiles
    y = kernels.hadamard_patch(x, s)              # torch CPU tensors in, torch CPU tensors out

Command line: ``python csrc/emulation/emulate.py [--cache DIR]`` builds (or finds) the library and
prints its path. See README.md for what the emulation checks and what it cannot see.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
# The kernel sources: every .cu of csrc/ (launchers and kernels) and the headers they include.
# hadamard_ops.cpp (the torch binding) is replaced by driver.cpp.
KERNEL_SUFFIXES = (".cu", ".cuh", ".h")
CXXFLAGS = ["-std=c++17", "-O2", "-g0", "-fPIC", "-fno-strict-aliasing", "-fwrapv", "-Wno-attributes"]
GUARD_BYTES = 256  # guard band around every output buffer, checked after each launch
SENTINEL = 0x5A    # byte pattern of the output guards

# Two pieces of CUDA syntax that no header can provide, rewritten in the build's copy of the sources.
_TEMPLATE_ARGS = r"(?:<(?:[^<>;()]|<[^<>;()]*>)*>)?"
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*\s*" + _TEMPLATE_ARGS + r")\s*<<<(.*?)>>>\s*\(", re.S)
_ALIGN = r"(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s+)?"
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+" + _ALIGN + r"([\w:<>, ]+?)\s+" + _ALIGN + r"(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+" + _ALIGN + r"([\w:<>, ]+?)\s+" + _ALIGN + r"(\w+)\s*((?:\[[^\]]+\])+)\s*;")


def rewrite_cuda_syntax(source: str) -> str:
    """``k<<<g, b, s, st>>>(args)`` -> ``::emu::launch(k, g, b, s, st)(args)``; shared-memory
    declarations -> the emulated block's shared memory (dynamic, or one array per declaration)."""
    source = _LAUNCH.sub(lambda m: f"::emu::launch({m.group(1).strip()}, {m.group(2).strip()})(", source)
    source = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::emu::dynamic_shared<{m.group(1)}>();", source)
    return _STATIC_SHARED.sub(
        lambda m: (f"auto& {m.group(2)} = ::emu::static_shared<{m.group(1)}{m.group(3)}>("
                   "[] { static const char key = 0; return &key; }());"), source)


def kernel_sources(csrc: Path = CSRC) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(csrc.iterdir()) if p.is_file() and p.suffix in KERNEL_SUFFIXES}


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the CUDA emulation needs a C++17 compiler: {cxx!r} not found (set CXX)")
    return cxx


def source_hash(sources: dict[str, str], extra_units: list[Path]) -> str:
    """Hash of everything that goes into a library: sources, emulator, flags, compiler."""
    h = hashlib.sha256()
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update((cxx + version + " ".join(CXXFLAGS)).encode())
    for name, text in sources.items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    emulator = [p for p in sorted(HERE.rglob("*")) if p.is_file() and p.suffix in (".cpp", ".h", ".py")]
    for p in [*emulator, *extra_units]:
        h.update(str(p.name).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    root = os.environ.get("LINEARPATCH_EMULATION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "linearpatch_kernels", "emulation")
    return Path(root)


def build_library(cache_dir: Path | None = None, csrc: Path = CSRC, jobs: int | None = None) -> Path:
    """The shared library of the emulated csrc/ kernels (driver.cpp as their entry), compiled once per
    source hash."""
    return compile_emulated(kernel_sources(csrc), [HERE / "driver.cpp"], "libemulated_kernels.so", cache_dir, jobs)


def compile_emulated(sources: dict[str, str], extra_units: list[Path], name: str, cache_dir: Path | None = None,
                     jobs: int | None = None) -> Path:
    """Compile ``sources`` (file name -> CUDA source text; every ``.cu`` is a unit, the rest are
    headers they may include) with ``extra_units`` and the emulator into the shared library ``name``,
    cached under ``cache_dir`` by the hash of all of it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / source_hash(sources, extra_units) / name
    if target.exists():
        return target
    cxx = compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for file_name, text in sources.items():
            (src / file_name).write_text(rewrite_cuda_syntax(text))
        units = [src / n for n in sources if n.endswith(".cu")] + [HERE / "runtime.cpp", *extra_units]
        include = ["-I", str(HERE / "include"), "-I", str(src)]

        def compile_unit(unit: Path) -> Path:
            obj = Path(tmp) / (unit.stem + ".o")
            cmd = [cxx, *CXXFLAGS, *include, "-x", "c++", "-c", str(unit), "-o", str(obj)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"emulation build of {unit.name} failed:\n{' '.join(cmd)}\n{done.stderr[-6000:]}")
            return obj

        jobs = jobs or int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = list(pool.map(compile_unit, units))
        tmp_lib = Path(tmp) / name
        done = subprocess.run([cxx, "-shared", "-o", str(tmp_lib), *map(str, objects)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{done.stderr[-6000:]}")
        os.replace(tmp_lib, target)  # atomic: a concurrent build of the same hash is harmless
    return target


def build_selftest_library(cache_dir: Path | None = None) -> Path:
    """The emulator's own test kernels (selftest_kernels.cu): known bugs to catch, known answers."""
    source = (HERE / "selftest_kernels.cu").read_text()
    return compile_emulated({"selftest_kernels.cu": source}, [], "libemulation_selftest.so", cache_dir)


class EmulationError(RuntimeError):
    """A launcher error or an emulator diagnostic (race, divergence, out-of-bounds write)."""


DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
SM90 = dict(smem_optin=232448, cc=(9, 0))
SM80 = dict(smem_optin=166912, cc=(8, 0))


class EmulatedKernels:
    """The csrc/ kernels running in the emulator, with the ops' calling conventions (torch CPU tensors)."""

    def __init__(self, library: Path):
        self.path = Path(library)
        lib = ctypes.CDLL(str(self.path))
        lib.emu_launch.restype = ctypes.c_char_p
        lib.emu_launch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_double,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
        lib.emu_configure.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.emu_last_diagnostic.restype = ctypes.c_char_p
        for name in ("emu_convert_to_half", "emu_convert_to_bfloat16", "emu_convert_from_half"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.emu_launch_record.restype = ctypes.c_char_p
        lib.emu_launch_record.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint64)]
        lib.emu_launch_args.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
        lib.emu_launch_programmatic.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
        self.lib = lib
        self.configure()

    @classmethod
    def build(cls, cache_dir: Path | None = None) -> "EmulatedKernels":
        return cls(build_library(cache_dir))

    def configure(self, seed: int = 1, sm_count: int = 4, arch: dict = SM90) -> None:
        """Seed of the random schedules, the SM count the device reports, sm_90 or sm_80 limits."""
        self.lib.emu_configure(seed, sm_count, arch["smem_optin"], *arch["cc"])

    # -- buffers with guard bands ------------------------------------------------------------------
    @staticmethod
    def _guarded(t, fill):
        """A flat copy of ``t`` inside a larger buffer: the guards around it hold ``fill`` bytes."""
        import torch

        pad = GUARD_BYTES // t.element_size()
        buf = torch.empty(t.numel() + 2 * pad, dtype=t.dtype)
        buf.view(torch.uint8).fill_(fill)
        inner = buf[pad:pad + t.numel()]
        inner.copy_(t.reshape(-1))
        return buf, inner

    @staticmethod
    def _check_guards(buf, inner, name):
        import torch

        pad = (buf.numel() - inner.numel()) // 2
        raw = buf.view(torch.uint8)
        nbytes = pad * buf.element_size()
        if bool((raw[:nbytes] != SENTINEL).any()) or bool((raw[raw.numel() - nbytes:] != SENTINEL).any()):
            raise EmulationError(f"the kernel wrote outside {name} (its guard bands changed)")

    def _run(self, op, x, h_k, scale=None, transform_scale=1.0, update=None, weight=None, eps=0.0):
        import torch

        dtype = str(x.dtype).removeprefix("torch.")
        if dtype not in DTYPE_CODES:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        d, k = x.shape[-1], h_k.shape[0]
        n = d // k
        log2_n = n.bit_length() - 1
        rows = x.numel() // d if d else 0
        # Inputs are surrounded by NaN (reads past the ends poison the result); outputs by a sentinel.
        keep = []

        def inp(t, dt=None):
            t = t.to(dt or t.dtype).contiguous()
            buf, inner = self._guarded(t, 0xFF)
            keep.append(buf)
            return inner.data_ptr()

        outs = []

        def out():
            buf, inner = self._guarded(torch.zeros(x.shape, dtype=x.dtype), SENTINEL)
            inner.view(torch.uint8).fill_(0xFF)  # never-written outputs read as NaN
            outs.append((buf, inner))
            return inner.data_ptr()

        args = [op, DTYPE_CODES[dtype], inp(x), out(), inp(h_k, torch.float32),
                inp(scale, torch.float32) if scale is not None else None, rows, k, log2_n, float(transform_scale),
                inp(update, x.dtype) if update is not None else None, out() if op == 2 else None,
                inp(weight, torch.float32) if weight is not None else None, float(eps)]
        err = self.lib.emu_launch(*args)
        if err is not None:
            raise EmulationError(err.decode())
        for i, (buf, inner) in enumerate(outs):
            self._check_guards(buf, inner, "normed" if i else "y")
        return [inner.reshape(x.shape).clone() for _, inner in outs]

    def hadamard_transform(self, x, h_k, scale: float = 1.0):
        return self._run(0, x, h_k, transform_scale=scale)[0]

    @staticmethod
    def prepared_scale(s, dtype, d):
        """``s`` as the kernels read it, from the CUDA backend's cache per tensor (as its ops call them):
        s/d in row_kernel's register order for K = 1, s itself otherwise."""
        from linearpatch_kernels.backends import cuda_backend

        return cuda_backend.prepared_scale(s, dtype, d)

    def hadamard_patch(self, x, h_k, s):
        return self._run(1, x, h_k, scale=self.prepared_scale(s, x.dtype, x.shape[-1]))[0]

    def patch_add_rmsnorm(self, residual, update, h_k, s, weight, eps):
        from linearpatch_kernels.backends import cuda_backend

        d = residual.shape[-1]
        h, normed = self._run(2, residual, h_k, scale=self.prepared_scale(s, residual.dtype, d), update=update,
                              weight=cuda_backend.prepared_norm_weight(weight, residual.dtype, d), eps=eps)
        return h, normed

    def launches_of(self, op: str, dtype: str, d: int, rows: int, k: int) -> list[dict]:
        """The launches that ``op`` ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm") makes
        for ``rows`` rows of size ``d = k * 2**m`` in ``dtype``, recorded without running them (no data
        is touched): kernel symbol (mangled, as in the compiled code), grid, block, dynamic shared memory,
        and ``args``: the kernel's arguments in order, the integers as passed and None for the others."""
        code = {"hadamard_transform": 0, "hadamard_patch": 1, "patch_add_rmsnorm": 2}[op]
        fake = 1 << 20  # an aligned address that is never dereferenced in a dry run
        self.lib.emu_clear_launch_log()
        self.lib.emu_set_dry_run(1)
        try:
            err = self.lib.emu_launch(code, DTYPE_CODES[dtype], fake, fake, fake, fake, rows, k,
                                      (d // k).bit_length() - 1, 1.0, fake, fake, fake, 1e-6)
        finally:
            self.lib.emu_set_dry_run(0)
        if err is not None:
            raise EmulationError(err.decode())
        return self.launch_records()

    def clear_launch_records(self) -> None:
        self.lib.emu_clear_launch_log()

    def launch_records(self) -> list[dict]:
        """The launches since the log was last cleared: as ``launches_of`` gives them, plus
        ``programmatic`` (launched with programmatic stream serialization: sm_90's dependent launch) and
        ``dependency_waits`` (threads that passed the kernel's grid-dependency wait; 0 in a dry run)."""
        records = []
        for i in range(self.lib.emu_launch_count()):
            dims = (ctypes.c_uint * 6)()
            smem = ctypes.c_uint64()
            symbol = self.lib.emu_launch_record(i, dims, ctypes.byref(smem)).decode()
            raw = (ctypes.c_longlong * 32)()
            count = self.lib.emu_launch_args(i, raw, 32)
            args = [None if raw[j] == -(1 << 63) else int(raw[j]) for j in range(min(count, 32))]
            waits = ctypes.c_uint64()
            programmatic = bool(self.lib.emu_launch_programmatic(i, ctypes.byref(waits)))
            records.append(dict(symbol=symbol, grid=tuple(dims[:3]), block=tuple(dims[3:]), smem=smem.value, args=args,
                                programmatic=programmatic, dependency_waits=waits.value))
        return records

    # -- the emulated fp16/bf16 conversions, for their own test ------------------------------------
    def convert(self, x, kind: str):
        import torch

        x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape, dtype=torch.int16)
        fn = self.lib.emu_convert_to_half if kind == "half" else self.lib.emu_convert_to_bfloat16
        fn(x.data_ptr(), y.data_ptr(), x.numel())
        return y.view(torch.float16 if kind == "half" else torch.bfloat16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: %(default)s -> ~/.cache/...)")
    args = parser.parse_args(argv)
    print(build_library(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())

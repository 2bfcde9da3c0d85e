"""CPU backend: the C++ kernels of ``csrc/cpu/``, registered as ``torch.ops.linearpatch_cpu.*``.

The compiled library ``linearpatch_kernels/_cpu*.so`` (libtorch stable ABI, so it loads under every
torch >= 2.10, CPU-only or CUDA builds) registers for the CPU dispatch key:

* ``linearpatch_cpu::hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor``
* ``linearpatch_cpu::hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor``
* ``linearpatch_cpu::patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, Tensor scale,
  Tensor norm_weight, float eps) -> (Tensor, Tensor)``

with the arguments of the ``linearpatch_cuda`` ops (``h_k``: the +-1 factor ``H_K`` of
``H_d = H_K (x) H_N``, fp32). Each row is read once, transformed (and scaled and transformed back,
and for the epilogue added and normalised) in the core's cache and written once, vectorised for
AVX-512, AVX2 or NEON (chosen at load from what the CPU supports; ``LINEARPATCH_CPU_ISA`` or
``set_isa`` force a narrower one), over torch's intra-op threads in chunks taken from a shared
counter. Every size of ``hadamard_matrix`` and fp32/fp16/bf16 (fp32 inside); float64 goes to the
torch backend.

The library is built by ``pip install`` wherever a C++ compiler exists (``setup.py``); without it
the backend is unavailable, CPU tensors use the torch backend, and the first CPU call says so once.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch

from ..hadamard import kernel_h_k

NAME = "cpu"
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ISA_ENV = "LINEARPATCH_CPU_ISA"
ISAS = ("avx512", "avx2", "neon", "scalar")

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None}  # loaded: the library's path once loaded
_CPU = torch.device("cpu")


def library_path() -> str | None:
    """Path of the compiled CPU kernels installed with the package, if any."""
    try:
        spec = importlib.util.find_spec("linearpatch_kernels._cpu")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def _missing_ops() -> list[str]:
    return [f"linearpatch_cpu::{op}" for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"linearpatch_cpu::{op}", "CPU")]


def load_library() -> bool:
    """Load the kernels once; True when the ops are registered. A failure is warned about once
    (one line: why, and that CPU tensors use the torch backend) and remembered."""
    if _state["loaded"] is not None:
        return True
    with _lock:
        if _state["loaded"] is not None:
            return True
        if _state["error"] is not None:
            return False
        path = library_path()
        error = None
        if path is None:
            error = ("the C++ CPU kernels are not built (no C++ compiler when the package was installed, or "
                     "LINEARPATCH_BUILD_CPU=0; `pip install .` with a compiler builds them)")
        else:
            try:
                torch.ops.load_library(path)
            except OSError as e:  # e.g. a torch older than 2.10, whose stable ABI lacks what the library uses
                error = f"the C++ CPU kernels in {path} do not load under torch {torch.__version__}: {e}"
            else:
                missing = _missing_ops()
                if missing:
                    error = f"{path} loaded but did not register {', '.join(missing)} for the CPU"
        if error is not None:
            _state["error"] = error
            warnings.warn(f"linearpatch_kernels: {error}; CPU tensors use the torch backend", RuntimeWarning,
                          stacklevel=4)
            return False
        _state["loaded"] = path
        return True


def load_error() -> str | None:
    """Why the kernels are not loaded (None when they are, or before a load was tried)."""
    return _state["error"]


def is_available(device: torch.device) -> bool:
    return torch.device(device).type == "cpu" and load_library()


def unsupported_reason(x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"it runs on CPU tensors only, not {x.device.type}"
    if x.dtype not in IO_DTYPES:
        return f"it takes float32, float16 or bfloat16 (fp32 math inside), not {x.dtype}; use the torch backend for float64"
    return None


def isa_info() -> dict:
    """``{"selected": "avx512", "supported": [...], "compiled": [...]}`` (the library must be loaded)."""
    fields = dict(item.split("=", 1) for item in torch.ops.linearpatch_cpu.isa_info().split(";"))
    return {"selected": fields["selected"], "supported": fields["supported"].split(","),
            "compiled": fields["compiled"].split(",")}


def set_isa(name: str) -> str:
    """Use at most the instruction set ``name`` (``"auto"``: the widest the CPU supports); returns the
    one selected. An instruction set the CPU lacks is an error that names the supported ones."""
    if not load_library():
        raise RuntimeError(f"linearpatch_kernels: {load_error()}")
    return torch.ops.linearpatch_cpu.set_isa(name)


# ------------------------------------------------------------------------------------------------
# The ops


def runner(op: str, device: torch.device, d: int):
    """``op``'s kernel for rows of ``d`` with ``H_K`` bound: one C++ op call per use (``backends.plan_for``)."""
    h_k = kernel_h_k(d, _CPU)
    if op == "hadamard_transform":
        kernel = torch.ops.linearpatch_cpu.hadamard_transform.default
        return lambda x, scale: kernel(x, h_k, float(scale))
    if op == "hadamard_patch":
        kernel = torch.ops.linearpatch_cpu.hadamard_patch.default
        return lambda x, scale: kernel(x, h_k, scale)
    kernel = torch.ops.linearpatch_cpu.patch_add_rmsnorm.default

    def epilogue(residual, update, scale, norm_weight, eps):
        if norm_weight.dtype not in IO_DTYPES:
            norm_weight = norm_weight.to(torch.float32)
        return kernel(residual, update, h_k, scale, norm_weight, float(eps))
    return epilogue


def hadamard_transform(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.ops.linearpatch_cpu.hadamard_transform(x, kernel_h_k(int(x.shape[-1]), _CPU), float(scale))


def hadamard_patch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.linearpatch_cpu.hadamard_patch(x, kernel_h_k(int(x.shape[-1]), _CPU), scale)


def patch_add_rmsnorm(residual: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel reads an fp32, bf16 or fp16 weight as it is (converted once per call, d values).
    if norm_weight.dtype not in IO_DTYPES:
        norm_weight = norm_weight.to(torch.float32)
    return torch.ops.linearpatch_cpu.patch_add_rmsnorm(
        residual, update, kernel_h_k(int(residual.shape[-1]), _CPU), scale, norm_weight, float(eps))

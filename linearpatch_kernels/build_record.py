"""What the installed binary was built for, and why the CUDA backend is unavailable if it is.

A wheel with the compiled extension carries ``_build_info.json`` (written by ``setup.py``): the
CUDA version of the torch it was built against (the wheel's CUDA major: ``+cu12x`` wheels load
under CUDA 12 builds of torch, ``+cu13x`` under CUDA 13 builds), the nvcc that compiled it, the
GPU architecture list and the torch versions (built against; the oldest whose stable ABI it uses).

    >>> import linearpatch_kernels as lp
    >>> lp.build_info()["cuda_backend"]                      # "available" or the reason it is not
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from .backends import cpu_backend, cuda_backend

BUILD_RECORD = "_build_info.json"


def build_record() -> dict | None:
    """The record of the compiled extension installed with the package (None without one)."""
    spec = importlib.util.find_spec(__package__)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, BUILD_RECORD)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.10.0+cu128" -> (2, 10, 0)``; pre-release suffixes are dropped (``"2.11.0a0"`` -> (2, 11, 0))."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def mismatch_reason(record: dict | None, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a compiled extension with ``record`` cannot load under this torch (None when it can).

    Pure: compares the record with the running torch's version and CUDA version only.
    """
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU-only build (install a CUDA build of torch)"
    if record is None:
        return None
    built_major = str(record["cuda"]).split(".")[0]
    running_major = torch_cuda.split(".")[0]
    if built_major != running_major:
        return (f"the compiled extension is for CUDA {built_major} builds of torch (built against torch "
                f"{record['torch']}), this torch {torch_version} is built for CUDA {torch_cuda}: install the "
                f"+cu{running_major}x wheel of linearpatch-kernels")
    if _version_tuple(torch_version) < _version_tuple(record["torch_min"]):
        return (f"torch {torch_version} is older than {record['torch_min']}, the oldest torch whose stable ABI "
                f"the compiled extension uses: upgrade torch")
    return None


def _backend_state(record: dict | None) -> str:
    """``"available"`` or why the CUDA backend is not, checking in the order a user would fix it."""
    reason = mismatch_reason(record, torch.__version__, torch.version.cuda)
    if reason is not None:
        return reason
    if cuda_backend.prebuilt_library() is None and cuda_backend.loaded_from() is None:
        home = cuda_backend.find_cuda_home()
        if home is None or os.environ.get(cuda_backend.JIT_ENV, "1") == "0":
            why = "no CUDA toolkit found" if home is None else f"{cuda_backend.JIT_ENV}=0"
            return f"no compiled extension is installed and the JIT build cannot run ({why}): install a +cu wheel"
    elif not cuda_backend.load_extension(allow_jit=False):
        return cuda_backend.load_error() or "the compiled extension did not load"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    index = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < cuda_backend.MIN_CAPABILITY:
        return (f"GPU {index} ({torch.cuda.get_device_name(index)}) is sm_{capability[0]}{capability[1]}; "
                f"the kernels need sm_{cuda_backend.MIN_CAPABILITY[0]}{cuda_backend.MIN_CAPABILITY[1]} or newer")
    if cuda_backend.loaded_from() is None:
        return "available (the first CUDA call compiles the kernels for this GPU)"
    return "available"


def build_info() -> dict:
    """What the binary was built for and what it runs under, as a dict:

    * ``version``: the package version (``+cu<XY>`` for a wheel with the compiled extension);
    * ``extension``: path of the compiled extension, or None;
    * ``built_for``: its build record (``cuda``, ``nvcc``, ``arch_list``, ``torch``, ``torch_min``,
      ``local_version``), or None;
    * ``torch``, ``torch_cuda``: the running torch and its CUDA version;
    * ``cuda_backend``: ``"available"`` or why the CUDA backend is not (CUDA tensors then use triton);
    * ``cpu_extension``: path of the compiled C++ CPU kernels, or None;
    * ``cpu_backend``: ``"available (<instruction set>)"`` or why the C++ CPU kernels are not (CPU
      tensors then use the torch backend).
    """
    from . import __version__

    record = build_record()
    return {
        "version": __version__ if record is None else f"{__version__}+{record['local_version']}",
        "extension": cuda_backend.prebuilt_library(),
        "built_for": record,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_backend": _backend_state(record),
        "cpu_extension": cpu_backend.library_path(),
        "cpu_backend": _cpu_state(),
    }


def _cpu_state() -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reason is returned here instead
        if not cpu_backend.load_library():
            return cpu_backend.load_error() or "the C++ CPU kernels did not load"
    return f"available ({cpu_backend.isa_info()['selected']})"

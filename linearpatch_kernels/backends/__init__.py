"""Backend registry and selection.

Every backend is one module with the same four functions:

* ``is_available(device) -> bool``: can it run on this device at all (extension built, triton
  importable, interpreter on for CPU tensors ...);
* ``unsupported_reason(x) -> str | None``: ``None`` when it can take this (validated) input, else a
  sentence saying why not (dtype, size). For GPU tensors it answers for ``x``'s device: a backend
  whose kernels need shared memory, registers or instructions that the device's architecture lacks
  (its compute capability, its opt-in shared memory per block) must refuse here, before any launch,
  so that the automatic choice moves on to the next backend and a forced backend fails with the
  reason instead of an out-of-resources error inside the launch. A backend whose limits differ per
  op takes the op's name as a keyword, ``unsupported_reason(x, op="patch_add_rmsnorm")``;
* ``hadamard_transform(x, scale: float) -> Tensor`` and ``hadamard_patch(x, scale: Tensor) -> Tensor``:
  the kernels; optionally ``patch_add_rmsnorm(residual, update, scale, norm_weight, eps)`` (the fused
  interface epilogue, see ``linearpatch_kernels.ops``). A backend without a function for an op is
  skipped for that op by the automatic choice. ``x`` has been validated by ``linearpatch_kernels.ops`` (float dtype, supported last
  dim, any strides, possibly zero rows); ``scale`` is a contiguous 1-D fp32 tensor of length ``d`` on
  ``x``'s device (fp64 when ``x`` is fp64). They return a new tensor of ``x``'s shape and dtype.

The automatic choice takes the first backend of ``AUTO_ORDER[device type]`` that is available and
supports the input (``torch`` runs everything, so it is the last resort on every device): on CUDA
tensors ``cuda > triton > torch``, on CPU tensors ``cpu`` (the C++ kernels, where they were built)
``> torch``. Backends
launch on ``x``'s device and its current stream, whichever device is current. ``LINEARPATCH_BACKEND`` or ``use_backend(name)`` force one backend; a forced
backend that cannot run the input is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import os
from types import ModuleType
from typing import Iterator

import torch

from . import gpu_limits

BACKENDS = ("torch", "triton", "cuda", "cpu")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
DEFAULT_ORDER = ("torch",)
ENV_VAR = "LINEARPATCH_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("linearpatch_backend", default=None)
_modules: dict[str, ModuleType] = {}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown linearpatch backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend(name: str) -> ModuleType:
    """The backend module called ``name`` (imported on first use)."""
    _check_name(name)
    if name not in _modules:
        _modules[name] = importlib.import_module(f"linearpatch_kernels.backends.{name}_backend")
    return _modules[name]


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``LINEARPATCH_BACKEND``, if any (context first)."""
    name = _forced.get()
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is not None:
            try:
                _check_name(name)
            except ValueError as e:
                raise ValueError(f"{ENV_VAR}={name!r}: {e}") from None
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one backend (``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu"``) inside a ``with`` block.

    ``use_backend(None)`` restores the automatic choice (ignoring ``LINEARPATCH_BACKEND``
    would be surprising, so it only clears an outer ``use_backend``).
    """
    if name is not None:
        _check_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``, in automatic-choice order."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, DEFAULT_ORDER)
    names = [n for n in order if _available(n, device)]
    # Backends outside the automatic order that can still be forced (e.g. triton's CPU interpreter).
    names += [n for n in BACKENDS if n not in names and _available(n, device)]
    return names


def _available(name: str, device: torch.device) -> bool:
    try:
        return bool(get_backend(name).is_available(device))
    except Exception:  # noqa: BLE001 - a broken optional install (e.g. triton) must not break the automatic choice
        return False


def select_backend(x: torch.Tensor, op: str = "hadamard_patch") -> ModuleType:
    """The backend that runs ``op`` on ``x`` (validated input)."""
    name = forced_backend()
    if name is not None:
        try:
            backend = get_backend(name)
        except ImportError as e:
            raise RuntimeError(f"linearpatch backend {name!r} was requested but cannot be imported: {e}") from e
        if not backend.is_available(x.device):
            raise RuntimeError(
                f"linearpatch backend {name!r} was requested but is not available for {x.device.type} tensors; "
                f"available here: {', '.join(available_backends(x.device))}"
            )
        reason = _unsupported_reason(backend, x, op)
        if reason is None and not hasattr(backend, op):
            reason = f"it has no {op} kernel"
        if reason is not None:
            raise ValueError(f"linearpatch backend {name!r} cannot run this input: {reason}")
        return backend
    for candidate in AUTO_ORDER.get(x.device.type, DEFAULT_ORDER):
        if _available(candidate, x.device):
            backend = get_backend(candidate)
            if hasattr(backend, op) and _unsupported_reason(backend, x, op) is None:
                return backend
    return get_backend("torch")


# ------------------------------------------------------------------------------------------------
# Cached choice: what an eager call runs, by (device, dtype, d, op)

_plans: dict[tuple, object] = {}


def plan_for(x: torch.Tensor, op: str, check=None):
    """The kernel that runs ``op`` on ``x`` (validated input): a callable taking the op's arguments,
    e.g. ``run(x, scale)``, from the backend ``select_backend`` chooses, made once per (device,
    dtype, d, op) and reused while the forced backend and the GPU limit tables stay as they were.

    A backend may offer ``runner(op, device, d)`` (a callable with its per-size constants bound,
    e.g. ``H_K`` on the device); otherwise its ``op`` function is the runner. Errors (a forced
    backend that cannot run the input) are raised on every call, never cached; ``check(x)``, when
    given, validates the input before a choice is made for a new key. The choice depends
    on the rows only through the CUDA kernels' shared memory for very few rows of a small ``d``,
    which fits every supported GPU, so the choice made for the first call's rows holds for all.
    """
    forced = _forced.get()
    if forced is None:
        # _environment_backend(), inline: a call costs as much as the lookup
        forced = _ENVIRON_DATA.get(_ENV_KEY) if _ENVIRON_DATA is not None else os.environ.get(ENV_VAR)
    key = (x.device, x.dtype, x.shape[-1], op, forced or None, _limits.version)
    run = _plans.get(key)
    if run is None:
        if check is not None:
            check(x)
        backend = select_backend(x, op)
        make = getattr(backend, "runner", None)
        run = make(op, x.device, int(x.shape[-1])) if make is not None else getattr(backend, op)
        _plans[key] = run
    return run


# os.environ keeps its values in a dict of encoded keys; reading that directly costs a tenth of
# os.environ.get (which encodes the key on every call), and still sees every change made through
# os.environ. Other Pythons: os.environ.get.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None
if _ENV_KEY is None:
    _ENVIRON_DATA = None


_limits = gpu_limits._Limits  # its ``version``: gpu_limits.limits_version() without the call


def _environment_backend() -> str | bytes | None:
    """The raw value of LINEARPATCH_BACKEND (validated by ``select_backend`` when a plan is made)."""
    if _ENVIRON_DATA is not None:  # (None where the key cannot be encoded: see above)
        return _ENVIRON_DATA.get(_ENV_KEY) or None
    return os.environ.get(ENV_VAR) or None


def clear_plans() -> None:
    """Forget the cached choices (e.g. after a backend's availability changed)."""
    _plans.clear()


@functools.lru_cache(maxsize=None)
def _takes_op(backend: ModuleType) -> bool:
    return "op" in inspect.signature(backend.unsupported_reason).parameters


def _unsupported_reason(backend: ModuleType, x: torch.Tensor, op: str) -> str | None:
    return backend.unsupported_reason(x, op=op) if _takes_op(backend) else backend.unsupported_reason(x)

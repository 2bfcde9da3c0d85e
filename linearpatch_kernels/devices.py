"""One rule for where models run: ``"auto"`` means the first CUDA device when there is one, else the CPU.

Every entry point that takes a device (the command line's ``--device``, ``load_pruned``,
``distill_patch``) goes through ``resolve_device``, so a device that this machine lacks is a clear
``ValueError`` before anything is loaded, never PyTorch's driver error halfway through.
"""

from __future__ import annotations

import torch

__all__ = ["AUTO", "resolve_device"]

AUTO = "auto"
ACCEPTED = "'auto' (a GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str | torch.device | None = AUTO, what: str = "device") -> torch.device:
    """The ``torch.device`` for ``device`` (``None`` or ``"auto"``: ``cuda`` if available, else ``cpu``)."""
    if device is None or device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {device!r} is not a device; accepted: {ACCEPTED}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ValueError(f"{what} {device!r}: only CPU and CUDA devices are supported; accepted: {ACCEPTED}")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {device!r}: no CUDA device is available here; use 'cpu' (or 'auto')")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"{what} {device!r}: this machine has CUDA devices cuda:0 to cuda:{count - 1}")
    return resolved

"""linearpatch-kernels: fast LinearPatch (H diag(s) H^T) kernels, custom ops and model surgery."""

from .backends import available_backends, use_backend
from .hadamard import hadamard_matrix, is_supported_size
from .ops import hadamard_patch, hadamard_transform

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "hadamard_matrix",
    "hadamard_patch",
    "hadamard_transform",
    "is_supported_size",
    "use_backend",
]

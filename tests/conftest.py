"""Test-session setup.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The interpreter is
chosen when a kernel is decorated, so the variable must be set before the Triton backend is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

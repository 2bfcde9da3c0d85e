"""Model layer: the LinearPatch module, pruning surgery, calibration and checkpoints for Hugging Face LLMs."""

from .calibration import BLOCK_METHODS, block_similarities, estimate_scales, select_block
from .checkpoint import load_pruned, save_pruned
from .patch import PATCH_MODES, LinearPatch
from .surgery import (
    SUPPORTED_MODEL_TYPES,
    PatchedDecoderLayer,
    get_patch,
    patch_disabled,
    prune_and_patch,
    set_patch,
    set_patch_enabled,
)

__all__ = [
    "BLOCK_METHODS",
    "PATCH_MODES",
    "SUPPORTED_MODEL_TYPES",
    "LinearPatch",
    "PatchedDecoderLayer",
    "block_similarities",
    "estimate_scales",
    "get_patch",
    "load_pruned",
    "patch_disabled",
    "prune_and_patch",
    "save_pruned",
    "select_block",
    "set_patch",
    "set_patch_enabled",
]

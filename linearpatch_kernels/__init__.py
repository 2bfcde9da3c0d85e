"""linearpatch-kernels: fast LinearPatch (H diag(s) H^T) kernels, custom ops and model surgery."""

from .backends import available_backends, use_backend
from .build_record import build_info
from .corpus import calibration_windows, domain_windows, evaluation_windows
from .default_model import load_default_model
from .evaluation import perplexity
from .hadamard import hadamard_matrix, is_supported_size
from .ops import hadamard_patch, hadamard_transform, patch_add_rmsnorm
from .model import (
    LinearPatch,
    choose_shrinkage,
    distill_patch,
    domain_losses,
    fusion_status,
    set_fused,
    PatchedDecoderLayer,
    block_similarities,
    estimate_scales,
    get_patch,
    is_pruned_checkpoint,
    load_pruned,
    patch_disabled,
    prune_and_patch,
    save_pruned,
    select_block,
    set_patch,
    set_patch_enabled,
    estimate_cut_scales,
    fusion_statuses,
    get_patches,
    select_blocks,
    set_patches,
    upgrade_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "calibration_windows",
    "choose_shrinkage",
    "domain_losses",
    "domain_windows",
    "evaluation_windows",
    "load_default_model",
    "perplexity",
    "LinearPatch",
    "distill_patch",
    "fusion_status",
    "set_fused",
    "PatchedDecoderLayer",
    "block_similarities",
    "estimate_scales",
    "get_patch",
    "is_pruned_checkpoint",
    "load_pruned",
    "patch_disabled",
    "prune_and_patch",
    "save_pruned",
    "select_block",
    "set_patch",
    "set_patch_enabled",
    "estimate_cut_scales",
    "fusion_statuses",
    "get_patches",
    "select_blocks",
    "set_patches",
    "upgrade_checkpoint",
    "available_backends",
    "build_info",
    "hadamard_matrix",
    "hadamard_patch",
    "hadamard_transform",
    "is_supported_size",
    "patch_add_rmsnorm",
    "use_backend",
]

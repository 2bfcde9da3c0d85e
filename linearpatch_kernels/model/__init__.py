"""Model layer: the LinearPatch module, pruning surgery, calibration and checkpoints for Hugging Face LLMs."""

from . import architectures as _architectures  # noqa: F401  (registers the patched classes with transformers)
from .calibration import (BLOCK_METHODS, block_similarities, estimate_cut_scales, estimate_scales, select_block,
                          select_blocks)
from .checkpoint import is_pruned_checkpoint, load_pruned, save_pruned, upgrade_checkpoint
from .distill import DistillResult, distill_patch, topk_kl_loss, train_patch
from .patch import PATCH_MODES, LinearPatch
from .shrinkage import SHRINK_FACTORS, CutShrinkage, choose_shrinkage, domain_losses, shrunk_patch
from .surgery import (
    SUPPORTED_MODEL_TYPES,
    CutHandoff,
    FusedCutNextLayer,
    FusionStatus,
    PatchedDecoderLayer,
    fusion_status,
    fusion_statuses,
    get_patch,
    get_patches,
    patch_disabled,
    plain_layers,
    prune_and_patch,
    pruning_cuts,
    pruning_record,
    set_fused,
    set_patch,
    set_patch_enabled,
    set_patches,
)
from .teacher_cache import TeacherCache, build_teacher_cache

__all__ = [
    "SHRINK_FACTORS",
    "CutShrinkage",
    "choose_shrinkage",
    "domain_losses",
    "shrunk_patch",
    "BLOCK_METHODS",
    "PATCH_MODES",
    "SUPPORTED_MODEL_TYPES",
    "CutHandoff",
    "DistillResult",
    "FusedCutNextLayer",
    "FusionStatus",
    "LinearPatch",
    "PatchedDecoderLayer",
    "TeacherCache",
    "build_teacher_cache",
    "distill_patch",
    "fusion_status",
    "plain_layers",
    "set_fused",
    "topk_kl_loss",
    "train_patch",
    "block_similarities",
    "estimate_scales",
    "get_patch",
    "is_pruned_checkpoint",
    "load_pruned",
    "upgrade_checkpoint",
    "patch_disabled",
    "prune_and_patch",
    "save_pruned",
    "select_block",
    "select_blocks",
    "set_patch",
    "set_patch_enabled",
    "estimate_cut_scales",
    "fusion_statuses",
    "get_patches",
    "pruning_cuts",
    "pruning_record",
    "set_patches",
]

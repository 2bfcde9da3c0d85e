"""Registers the patched architectures of ``modeling_linearpatch`` with transformers' Auto classes.

Run at package import, so that with ``linearpatch_kernels`` imported,
``AutoConfig.from_pretrained(checkpoint)`` and ``AutoModelForCausalLM.from_pretrained(checkpoint)`` of
a checkpoint written by ``save_pruned`` give the patched model (config ``model_type``
``"linearpatch_<family>"``) without ``trust_remote_code``. Registering twice is harmless.
"""

from __future__ import annotations

from .modeling_linearpatch import MODEL_TYPE_PREFIX, PATCHED_ARCHITECTURES

__all__ = ["PATCHED_ARCHITECTURES", "register_with_transformers"]


def register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for family, (config_cls, model_cls) in PATCHED_ARCHITECTURES.items():
        AutoConfig.register(MODEL_TYPE_PREFIX + family, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register_with_transformers()

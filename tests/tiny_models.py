"""Tiny random Hugging Face causal LMs (Llama, Mistral, Qwen2, Qwen3) for fast model-level tests.

``tiny_model(family, num_layers, hidden_size, dtype, seed)`` builds a ``*ForCausalLM`` from a config
with a small vocabulary and a few heads; the hidden size must be a size this package has a Hadamard
matrix for (64 = 2**6 and 48 = 12 * 4, a Paley size, are the usual choices). The weights are random
with a larger spread than Hugging Face's default (``initializer_range=0.2`` instead of 0.02) so that
each layer changes the residual stream visibly: block similarities and scales then differ from layer
to layer, and a wrong index or a missing patch shows in the logits.

Qwen2 and Qwen3 models are built with sliding-window attention on their upper layers, so their
``config.layer_types`` mixes "full_attention" and "sliding_attention" and pruning has to keep it in
step with the layers; Mistral gets a short sliding window.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB_SIZE = 96


def tiny_config(family: str = "llama", num_layers: int = 6, hidden_size: int = 64, vocab_size: int = VOCAB_SIZE):
    """The config of a tiny model of ``family`` (4 query heads, 2 KV heads, MLP width 2 * hidden)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=12)
    # Upper half of the layers sliding, lower half full attention.
    sliding = dict(use_sliding_window=True, sliding_window=12, max_window_layers=num_layers // 2)
    if family == "qwen2":
        return Qwen2Config(**common, **sliding)
    if family == "qwen3":
        return Qwen3Config(**common, **sliding, head_dim=hidden_size // 4)
    raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")


_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def tiny_model(family: str = "llama", num_layers: int = 6, hidden_size: int = 64, dtype: torch.dtype = torch.float32,
               seed: int = 0, vocab_size: int = VOCAB_SIZE):
    """A random tiny ``*ForCausalLM`` in eval mode, deterministic for a given ``seed``."""
    config = tiny_config(family, num_layers, hidden_size, vocab_size)
    torch.manual_seed(seed)
    # Built in ``dtype`` the way from_pretrained builds it, so the rotary inverse frequencies stay
    # fp32 (``model.to(torch.bfloat16)`` would round them too, unlike a loaded checkpoint).
    model = _CLASSES[family]._from_config(config, dtype=dtype)
    return model.eval()


def random_batches(num_batches: int = 3, seqlen: int = 16, vocab_size: int = VOCAB_SIZE, seed: int = 1):
    """Calibration-style inputs: a list of ``[1, seqlen]`` LongTensors of random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (1, seqlen), generator=g) for _ in range(num_batches)]


def cache_name(model) -> str:
    """The name of the KV cache argument of ``model``'s forward and output: ``cache`` in transformers
    >= 5.2x, ``past_key_values`` in the oldest supported release (5.17), so that the tests run on both
    ends of the supported range."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_of(model, out) -> dict:
    """The keyword argument that hands a forward's KV cache (in ``out``) to the next forward."""
    name = cache_name(model)
    return {name: getattr(out, name)}


def edit_tensors(directory, drop=(), **replace) -> None:
    """Rewrite a checkpoint's ``model.safetensors`` in place: the tensors named in ``drop`` removed, those in
    ``replace`` set (added or replaced) — a corrupt or edited checkpoint for the loaders' checks."""
    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    tensors = load_file(str(path))
    for name in drop:
        del tensors[name]
    tensors.update(replace)
    save_file(tensors, str(path), metadata={"format": "pt"})

"""Layer pruning with a LinearPatch at the cut, for Hugging Face decoder stacks.

``prune_and_patch(model, start, end, ...)`` deletes decoder layers ``[start, end)`` of a Llama,
Mistral, Qwen2 or Qwen3 ``*ForCausalLM`` in place and puts a ``LinearPatch`` where the residual
stream is cut, as a module inside ``model.model.layers``:

* ``start > 0``: the layer before the cut, ``layers[start - 1]``, is wrapped in a
  ``PatchedDecoderLayer`` that applies the patch to its output hidden states (the residual stream
  that used to enter layer ``start`` and now enters old layer ``end``, or the final norm when
  ``end`` was the last layer). The patch lives on the device of the layer it follows.
* ``start == 0``: there is no layer before the cut; the first remaining layer (old ``end``) is
  wrapped instead and the patch is applied to its input hidden states, on that layer's device.

Being a module, the patch is saved, moved, compiled and printed like any layer; nothing is hooked.
Everything keyed by the layer index is renumbered so that a KV cache lines up with the layers that
remain: every submodule's ``layer_idx``, ``config.num_hidden_layers``, ``config.layer_types``,
``model.hf_device_map``. What was done is recorded in ``config.linearpatch`` (a dict, written to
``config.json`` by ``save_pretrained``), which the checkpoint code reads back.

``output_hidden_states`` (which Hugging Face records from each decoder layer's own output) reports
the residual stream before the patch at the cut; the next layer receives the patched one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .patch import PATCH_MODES, LinearPatch

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PatchedDecoderLayer",
    "decoder_layers",
    "get_patch",
    "patch_disabled",
    "prune_and_patch",
    "set_patch",
    "set_patch_enabled",
]

# Families whose decoder stack is ``model.model.layers`` of pre-norm residual layers taking the hidden
# states first and returning them first (a tensor in transformers 5, a tuple in 4.x).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Recorded in ``config.linearpatch``; bump when its meaning changes.
RECORD_VERSION = 1


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a supported ``*ForCausalLM``; a clear ``ValueError`` otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model: model_type {model_type!r} ({type(model).__name__}); LinearPatch surgery supports "
            f"Hugging Face *ForCausalLM models of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(inner, "norm"):
        raise ValueError(
            f"unsupported model structure: {type(model).__name__} has no model.layers ModuleList and model.norm; "
            "pass the *ForCausalLM model (e.g. LlamaForCausalLM), not its base model or a wrapper"
        )
    if getattr(config, "is_heterogeneous", False):
        raise ValueError("unsupported model: heterogeneous configs (per_layer_config) cannot be pruned by this package")
    return layers


def module_execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: an accelerate hook's execution device if it has one (its weights may
    be offloaded to "meta"), else the device of its first parameter or buffer, else the CPU."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class PatchedDecoderLayer(nn.Module):
    """A decoder layer with a ``LinearPatch`` on its output (``position="output"``) or its input
    hidden states (``position="input"``, used only when the cut is before the first layer).

    Calls pass straight through to the wrapped layer; attribute reads the wrapper lacks fall back to
    it (``attention_type`` and the like), so model code that inspects layers keeps working.
    """

    def __init__(self, layer: nn.Module, patch: LinearPatch, position: str = "output"):
        super().__init__()
        if position not in ("output", "input"):
            raise ValueError(f"PatchedDecoderLayer: position must be 'output' or 'input', got {position!r}")
        self.layer = layer
        self.patch = patch
        self.position = position

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.position == "input":
            # The input may still be on the previous module's device (accelerate moves it inside the
            # wrapped layer's own hook), so bring it to the patch first.
            hidden_states = self.patch(hidden_states.to(self.patch_device()))
            return self.layer(hidden_states, *args, **kwargs)
        out = self.layer(hidden_states, *args, **kwargs)
        if isinstance(out, torch.Tensor):  # transformers >= 5: the hidden states alone
            return self.patch(out.to(self.patch_device()))
        # transformers 4.x: (hidden_states, attention weights?, cache?)
        return (self.patch(out[0].to(self.patch_device())), *out[1:])

    def patch_device(self) -> torch.device:
        p = self.patch.scale if self.patch.mode != "dense" else self.patch.weight
        return p.device

    def extra_repr(self) -> str:
        return f"position={self.position}"


def _check_block(start, end, num_layers: int) -> tuple[int, int]:
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"prune_and_patch: {name} must be an int, got {v!r}")
    if not 0 <= start < end <= num_layers:
        raise ValueError(
            f"prune_and_patch: block [start={start}, end={end}) is not a block of this model's {num_layers} layers; "
            f"need 0 <= start < end <= {num_layers}"
        )
    if end - start == num_layers:
        raise ValueError(f"prune_and_patch: [{start}, {end}) removes all {num_layers} layers; at least one must remain")
    return start, end


def _patched_layers(layers: nn.ModuleList) -> list[int]:
    return [i for i, layer in enumerate(layers) if isinstance(layer, PatchedDecoderLayer)]


def _renumber_layers(model: nn.Module, layers: nn.ModuleList, kept: list[int]) -> None:
    """Make every index-keyed field agree with the layers that remain (old index ``kept[j]`` is now ``j``)."""
    for j, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(kept)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict):
        new_map = {}
        for key, device in device_map.items():
            prefix = "model.layers."
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                if index.isdigit():
                    if int(index) not in kept:
                        continue
                    key = prefix + str(kept.index(int(index))) + ("." + rest if rest else "")
            new_map[key] = device
        model.hf_device_map = new_map


def attach_patch(model: nn.Module, start: int, patch: LinearPatch) -> None:
    """Put ``patch`` at the cut of an already pruned stack: on the output of layer ``start - 1``, or on
    the input of layer 0 when ``start == 0``. The patch is moved to that layer's execution device."""
    layers = decoder_layers(model)
    if start == 0:
        index, position = 0, "input"
    else:
        index, position = start - 1, "output"
    layer = layers[index]
    patch.to(module_execution_device(layer))
    layers[index] = PatchedDecoderLayer(layer, patch, position)


def pruning_record(start: int, end: int, mode: str, num_layers_original: int, hidden_size: int) -> dict:
    """The ``config.linearpatch`` dict that marks a model as pruned (and travels in config.json)."""
    return {"record_version": RECORD_VERSION, "start": start, "end": end, "mode": mode,
            "num_layers_original": num_layers_original, "hidden_size": hidden_size}


def prune_and_patch(model: nn.Module, start: int, end: int, scales: torch.Tensor | None = None,
                    mode: str = "rotate", weight: torch.Tensor | None = None) -> nn.Module:
    """Delete decoder layers ``[start, end)`` of ``model`` in place and insert a ``LinearPatch`` at the cut.

    ``mode`` is "rotate" (``P = H diag(scales) H^T``), "diag" (``P = diag(scales)``) or "dense"
    (``P = weight``, ``d x d``). ``scales=None`` / ``weight=None`` mean the identity, i.e. plain
    pruning with a patch that can be calibrated or trained later. Returns ``model``.
    """
    layers = decoder_layers(model)
    config = model.config
    if _patched_layers(layers) or getattr(config, "linearpatch", None) is not None:
        raise ValueError(
            "prune_and_patch: this model was already pruned (config.linearpatch is set); prune the original model "
            "once with the whole block instead"
        )
    num_layers = len(layers)
    if getattr(config, "num_hidden_layers", num_layers) != num_layers:
        raise ValueError(
            f"prune_and_patch: config.num_hidden_layers is {config.num_hidden_layers} but model.model.layers holds "
            f"{num_layers} layers"
        )
    start, end = _check_block(start, end, num_layers)
    if mode not in PATCH_MODES:
        raise ValueError(f"prune_and_patch: unknown mode {mode!r}; accepted: {', '.join(PATCH_MODES)}")
    hidden_size = int(config.hidden_size)
    patch = LinearPatch(hidden_size, mode=mode, scale=scales, weight=weight)

    kept = list(range(start)) + list(range(end, num_layers))
    del layers[start:end]
    _renumber_layers(model, layers, kept)
    attach_patch(model, start, patch)
    config.linearpatch = pruning_record(start, end, mode, num_layers, hidden_size)
    return model


def _patch_wrapper(model: nn.Module) -> PatchedDecoderLayer:
    layers = decoder_layers(model)
    found = _patched_layers(layers)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one patched layer in model.model.layers, found {len(found)}; "
            "is this a model returned by prune_and_patch or load_pruned?"
        )
    return layers[found[0]]


def get_patch(model: nn.Module) -> LinearPatch:
    """The ``LinearPatch`` module of a pruned model (to read, calibrate or train it)."""
    return _patch_wrapper(model).patch


def set_patch(model: nn.Module, patch: LinearPatch) -> None:
    """Replace the patch of a pruned model (e.g. by a dense one for distillation); it is moved to
    the device of the layer it is attached to and ``config.linearpatch["mode"]`` follows it."""
    if not isinstance(patch, LinearPatch):
        raise TypeError(f"set_patch: patch must be a LinearPatch, got {type(patch).__name__}")
    wrapper = _patch_wrapper(model)
    if patch.hidden_size != model.config.hidden_size:
        raise ValueError(f"set_patch: patch hidden_size {patch.hidden_size} != model hidden_size {model.config.hidden_size}")
    wrapper.patch = patch.to(module_execution_device(wrapper.layer))
    model.config.linearpatch = {**model.config.linearpatch, "mode": patch.mode}


def set_patch_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the patch of a pruned model on or off (off: the plain pruned model, same weights)."""
    get_patch(model).enabled = bool(enabled)


@contextlib.contextmanager
def patch_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with patch_disabled(model): ...`` runs the pruned model without its patch, then restores it."""
    patch = get_patch(model)
    before = patch.enabled
    patch.enabled = False
    try:
        yield model
    finally:
        patch.enabled = before

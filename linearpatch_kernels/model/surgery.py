"""Layer pruning with a LinearPatch at each cut, for Hugging Face decoder stacks.

``prune_and_patch(model, start, end, ...)`` deletes decoder layers ``[start, end)`` of a Llama,
Mistral, Qwen2 or Qwen3 ``*ForCausalLM`` in place and puts a ``LinearPatch`` where the residual
stream is cut, as a module inside ``model.model.layers``; ``prune_and_patch(model, blocks=[(s1, e1),
(s2, e2), ...], ...)`` does the same for several disjoint blocks at once, one patch per cut. For a
cut at original layers ``[start, end)``:

* ``start > 0``: the layer before the cut, ``layers[start - 1]``, is wrapped in a
  ``PatchedDecoderLayer`` that applies the patch to its output hidden states (the residual stream
  that used to enter layer ``start`` and now enters old layer ``end``, or the final norm when
  ``end`` was the last layer). The patch lives on the device of the layer it follows.
* ``start == 0``: there is no layer before the cut; the first remaining layer (old ``end``) is
  wrapped instead and the patch is applied to its input hidden states, on that layer's device.

Several cuts: every block is deleted, then the stack is renumbered once, then one patch is attached
per cut at its position among the kept layers (``cut_positions``: ``start_k`` minus the layers removed
by the blocks before it). Blocks must be disjoint and must not touch (two touching blocks are one cut).
When only one layer is kept between two cuts, that layer carries the second cut's patch and is also
the layer after the first cut; if the first block starts at layer 0, that one layer has a patch on its
input and one on its output (two nested ``PatchedDecoderLayer``).

Being a module, the patch is saved, moved, compiled and printed like any layer; nothing is hooked.
Everything keyed by the layer index is renumbered so that a KV cache lines up with the layers that
remain: every submodule's ``layer_idx``, ``config.num_hidden_layers``, ``config.layer_types``,
``model.hf_device_map``. What was done is recorded in ``config.linearpatch`` (a dict, written to
``config.json`` by ``save_pretrained``): ``pruning_record`` makes it, with a list of cuts
``[{"start", "end", "mode"}, ...]`` in original layer indices sorted by ``start``; ``pruning_cuts``
reads it (and migrates the single-cut record of version 1).

The fused cut (``fuse=True``, the default)
------------------------------------------

At the cut a pre-norm stack computes, per token, ``h = r + u`` (the last residual add of layer A =
``layers[start - 1]``, ``u`` its MLP output), ``h' = h . P`` (the patch) and ``n = RMSNorm_B(h')``
(the ``input_layernorm`` of the next layer B = ``layers[start]``). Unfused, that is three passes over
the residual stream; ``linearpatch::patch_add_rmsnorm`` does all three in one and returns ``(h', n)``.
Using it needs A's forward to stop before its last add and B's forward to start after its norm, and
``n`` to get from A to B. How:

* Slot ``start - 1`` stays a ``PatchedDecoderLayer`` (so ``get_patch``/``set_patch``, the state-dict
  names and ``print(model)`` are as before), now with ``fused=True``: it runs A's body from A's own
  submodules (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``, in the
  order of transformers' ``LlamaDecoderLayer.forward``, shared by Mistral, Qwen2 and Qwen3), then
  the fused op, and returns a ``CutHandoff(hidden_states=h', normed=n)`` named tuple.
* Slot ``start`` holds B in a ``FusedCutNextLayer``: given a ``CutHandoff`` it runs B's body after
  its ``input_layernorm`` (attention on ``n``, residual ``h'``); given a plain tensor it calls B.

The hand-off travels in the decoder loop's own ``hidden_states`` variable, from one layer call to the
next, so nothing is stored on a module between calls and nothing is recognised by tensor identity:
torch.compile traces it as an ordinary tuple (no graph break), a CUDA graph captures it, and each
slot still gets its own arguments from the model's loop -- its attention mask (Qwen2/3 choose it by
``config.layer_types[i]``, so a full-attention A may be followed by a sliding-window B) and its
attention's own ``layer_idx`` into the KV cache. The alternative, one module in slot ``start - 1``
running both A and B with an identity in slot ``start``, would give B the mask of A's slot and need
A and B of the same attention type; a custom decoder-stack forward would copy transformers' model
forward (masks, cache, rotary embeddings) per family and version.

The fused layers read B's ``input_layernorm`` weight and ``variance_epsilon`` at call time
(``config.rms_norm_eps`` is what every supported family builds it from), so moving or casting the
model needs no refit. ``set_patch_enabled(model, False)`` keeps the structure and passes
``h = r + u`` through B's own norm module: the plain pruned model. The fused op applies only a
"rotate" patch; ``set_patch`` with a "diag" or "dense" patch undoes the fusion, and a later "rotate"
patch fuses again when the model asked for fusion.

Fusion is applied only where it computes exactly what the unfused layers compute; otherwise the cut
silently stays unfused (``PatchedDecoderLayer`` without the fused op). The reason is kept in
``fusion_status(model)`` (``fusion_statuses`` for every cut) and shown by ``print(model)``. Fusion
needs: a layer on each side of the cut (not ``start == 0``, not ``end == num_layers``), a layer after
the cut that does not carry the next cut's patch, a "rotate" patch, transformers >= 5, A and B of a
supported decoder-layer class with the known submodules and forward arguments, B's
``input_layernorm`` a supported RMSNorm, and A, B and the patch on one device without accelerate
hooks (offloaded weights are only loaded by those hooks when a module itself is called).

``output_hidden_states`` (which Hugging Face records with forward hooks on each decoder layer) gives
the same tuple, of the same length, fused or not, except for one entry: ``hidden_states[start]``
(the output of layer ``start - 1``). Unfused it is the residual stream before the patch, since the
hook sits on A inside the wrapper; fused, the stream before the patch is never materialised (that is
the memory pass saved), and the entry is the patched stream ``h'`` -- the input of the next layer, as
everywhere else in the tuple. The fused layers run the forward hooks registered on A and B
themselves (with ``args = (layer input,)`` and the layer's output), which is how transformers'
capture sees them; a hook that returns a replacement output, or a forward pre-hook registered on A
or B themselves, cannot be honoured inside the fused computation and raises a ``RuntimeError`` (hooks
on the slots ``model.model.layers[i]`` run as usual; the one on slot ``start`` is handed the
``CutHandoff``). Under gradient checkpointing the two fused layers are not checkpointed.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from .. import ops as _ops
from .patch import PATCH_MODES, LinearPatch, check_cut_patches

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CutHandoff",
    "FusedCutNextLayer",
    "FusionStatus",
    "PatchedDecoderLayer",
    "PrunedModel",
    "decoder_layers",
    "check_blocks",
    "cut_positions",
    "fusion_status",
    "fusion_statuses",
    "get_patch",
    "get_patches",
    "patch_disabled",
    "plain_layers",
    "prune_and_patch",
    "pruning_cuts",
    "pruning_record",
    "set_fused",
    "set_patch",
    "set_patch_enabled",
    "set_patches",
]

# Families whose decoder stack is ``model.model.layers`` of pre-norm residual layers taking the hidden
# states first and returning them first (a tensor in transformers 5, a tuple in 4.x).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Recorded in ``config.linearpatch``; bump when its meaning changes.
RECORD_VERSION = 2  # 2: a list of cuts; 1 held one cut's start/end/mode at the top


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


class PrunedModel:
    """Mixed into the class of every model that ``prune_and_patch`` or ``load_pruned`` returns, so that
    Hugging Face's own ``save_pretrained`` and ``push_to_hub`` write the pruned checkpoint.

    Without it they would save the stack as it is in memory -- the family's architecture in
    ``config.json``, the wrapped layers' weights under ``model.layers.{i}.layer.*`` -- a checkpoint that
    plain transformers loads with those layers randomly initialised (the only sign a load warning).
    Here both write ``save_pruned``'s checkpoint (the patched architecture, its record, the patch
    tensors, the modeling file, the model card). The class keeps the family's name; pickling stores
    the family class and re-applies this mixin on load (``_restore_pruned``)."""

    def save_pretrained(self, save_directory, **kwargs):
        """``save_pruned``'s checkpoint into ``save_directory`` (created if needed; other files in an
        existing folder, e.g. a tokenizer saved there first, are kept), with transformers' arguments
        ``max_shard_size``, ``is_main_process``, ``safe_serialization=True``, ``token`` and
        ``push_to_hub=True`` (+ ``repo_id``, ``commit_message``, ``private``, ...). Arguments that would
        write something else (``state_dict``, ``variant``, ...) raise a ``TypeError`` naming
        ``save_pruned``."""
        from .checkpoint import save_pretrained_pruned

        return save_pretrained_pruned(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload ``save_pruned``'s checkpoint (model card included) to the Hub repository
        ``repo_id``; the arguments of transformers' ``push_to_hub``."""
        from .checkpoint import push_pruned_to_hub

        return push_pruned_to_hub(self, repo_id, **kwargs)

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        return (_restore_pruned, (_family_class(type(self)),), *reduced[2:])


def _importable(cls: type) -> bool:
    import importlib

    try:
        found = importlib.import_module(cls.__module__)
        for part in cls.__qualname__.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return False
    return found is cls


def _family_class(cls: type) -> type:
    """The importable family class under a pruned model's run-time class (what pickle can name)."""
    return next(c for c in cls.__mro__ if c is not PrunedModel and not issubclass(c, PrunedModel) and _importable(c))


_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type, **attributes) -> type:
    """``base`` (a family ``*ForCausalLM``) with ``PrunedModel`` mixed in, under ``base``'s own name."""
    if issubclass(base, PrunedModel) and not attributes:
        return base
    key = (base, tuple(sorted((k, repr(v)) for k, v in attributes.items())))
    if key not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[key] = type(base.__name__, (PrunedModel, base), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, **attributes})
    return _PRUNED_CLASSES[key]


def _restore_pruned(base: type):
    return object.__new__(pruned_class(base))


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


# Decoder layers whose transformers-5 forward is exactly
#     r = x; x = input_layernorm(x); x = self_attn(hidden_states=x, <every other argument>)[0]; x = r + x
#     r = x; x = mlp(post_attention_layernorm(x)); return r + x
# and RMSNorms computing ``weight * (x / sqrt(mean(x^2) + variance_epsilon))``: what the fused cut
# recomputes from their submodules. Matched by class name within transformers' own model modules.
_FUSABLE_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_FUSABLE_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_LAYER_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# The forward arguments those layers pass on to ``self_attn`` (names across transformers 5.x).
_KNOWN_LAYER_ARGUMENTS = frozenset({
    "attention_mask", "position_ids", "cache", "past_key_values", "past_key_value", "use_cache",
    "cache_position", "position_embeddings",
})


class CutHandoff(NamedTuple):
    """What a fused cut passes from layer ``start - 1`` to layer ``start`` through the decoder loop:
    the patched residual stream ``h' = (r + u) . P`` and ``RMSNorm_next(h')``."""

    hidden_states: torch.Tensor
    normed: torch.Tensor


class FusionStatus(NamedTuple):
    """``fused``: whether the cut runs the fused epilogue; ``reason``: why not (``None`` when fused)."""

    fused: bool
    reason: str | None


class _LayerCall:
    """How to call a decoder layer's body without its ``forward``: the names and defaults of its
    forward arguments after ``hidden_states``, all of which the layer hands on to ``self_attn``."""

    def __init__(self, layer: nn.Module):
        params = list(inspect.signature(type(layer).forward).parameters.values())[2:]  # skip self, hidden_states
        named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.names = tuple(p.name for p in named if p.kind != p.KEYWORD_ONLY)
        self.defaults = {p.name: p.default for p in named if p.default is not p.empty}

    def attention_kwargs(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.names):
            raise TypeError(f"fused decoder layer: {len(args)} positional arguments after hidden_states; "
                            f"the layer takes at most {len(self.names)} ({', '.join(self.names)})")
        merged = dict(self.defaults)
        merged.update(zip(self.names, args))
        merged.update(kwargs)
        return merged


def _run_layer_hooks(layer: nn.Module, hidden_in: torch.Tensor, output, where: str) -> None:
    """Run the forward hooks registered on ``layer`` itself, as ``layer(hidden_in)`` returning
    ``output`` would (the fused cut computes the layer from its submodules, so ``nn.Module.__call__``
    does not). That is how transformers' ``output_hidden_states`` capture sees the fused layers."""
    for hook_id, hook in layer._forward_hooks.items():
        if hook_id in layer._forward_hooks_with_kwargs:
            result = hook(layer, (hidden_in,), {}, output)
        else:
            result = hook(layer, (hidden_in,), output)
        if result is not None:
            raise RuntimeError(
                f"a forward hook on {where} returned a replacement output, which the fused cut cannot apply "
                "(the next layer's norm is already computed); use fuse=False or set_fused(model, False)"
            )


def _check_no_pre_hooks(layer: nn.Module, where: str) -> None:
    if layer._forward_pre_hooks:
        raise RuntimeError(
            f"{where} has forward pre-hooks of its own, which the fused cut does not run (it computes the "
            "layer from its submodules); register them on model.model.layers[i] instead, or use fuse=False "
            "or set_fused(model, False)"
        )


class _LayerWrapper(nn.Module):
    """A module around a decoder layer (``self.layer``): attribute reads the wrapper lacks fall back to
    the layer (``attention_type`` and the like), so model code that inspects layers keeps working."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)


class PatchedDecoderLayer(_LayerWrapper):
    """A decoder layer with a ``LinearPatch`` on its output (``position="output"``) or its input
    hidden states (``position="input"``, used only when the cut is before the first layer).

    Unfused, calls pass straight through to the wrapped layer and the patch is applied to its result.
    Fused (``fused`` is True; see the module docstring), it computes the layer from its submodules,
    ends with ``linearpatch::patch_add_rmsnorm`` and the next layer's ``input_layernorm``, and returns
    a ``CutHandoff`` for the ``FusedCutNextLayer`` in the next slot. ``fuse_requested`` records what
    was asked for, ``fusion_fallback`` why a cut is not fused (``None`` when it is). Attribute reads
    the wrapper lacks fall back to the wrapped layer (``attention_type`` and the like), so model code
    that inspects layers keeps working.
    """

    def __init__(self, layer: nn.Module, patch: LinearPatch, position: str = "output"):
        super().__init__()
        if position not in ("output", "input"):
            raise ValueError(f"PatchedDecoderLayer: position must be 'output' or 'input', got {position!r}")
        self.layer = layer
        self.patch = patch
        self.position = position
        self.fuse_requested = False
        self.fused = False
        self.fusion_fallback: str | None = "fuse=False"
        # Plain attributes, not submodules: the next layer's norm is registered (and saved) in the
        # next slot only; this holds a second reference to the same module.
        self._next_norm: tuple[nn.Module, ...] = ()
        self._call: _LayerCall | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.fused:
            return self._fused_forward(hidden_states, args, kwargs)
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

    def _fused_forward(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> CutHandoff:
        layer = self.layer
        _check_no_pre_hooks(layer, "the layer before the fused cut")
        attention_kwargs = self._call.attention_kwargs(args, kwargs)
        # The wrapped layer's own forward, up to its MLP.
        residual = hidden_states
        x = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **attention_kwargs)[0]
        residual = residual + x
        update = layer.mlp(layer.post_attention_layernorm(residual))
        out = self._epilogue(residual, update)
        _run_layer_hooks(layer, hidden_states, out, "the layer before the fused cut")
        return out

    def _epilogue(self, residual: torch.Tensor, update: torch.Tensor) -> CutHandoff:
        """``h' = (residual + update) . P`` and the next layer's ``input_layernorm(h')``, in one op."""
        norm = self._next_norm[0]
        if update.dtype != residual.dtype:
            # ``residual + update`` in eager PyTorch promotes (an fp32 stream plus a bf16 MLP output
            # under autocast gives fp32); the op takes one dtype, so promote first.
            dtype = torch.promote_types(residual.dtype, update.dtype)
            residual, update = residual.to(dtype), update.to(dtype)
        if not self.patch.enabled:
            h = residual + update
            return CutHandoff(h, norm(h))
        # The public function: the cached kernel directly in eager inference, the op otherwise.
        h, normed = _ops.patch_add_rmsnorm(residual, update, self.patch.scale, norm.weight,
                                           float(norm.variance_epsilon))
        if norm.weight.dtype != h.dtype:
            # The norm module returns ``weight * x.to(input dtype)``: the promoted dtype of the two.
            normed = normed.to(torch.promote_types(norm.weight.dtype, h.dtype))
        return CutHandoff(h, normed)

    def patch_device(self) -> torch.device:
        p = self.patch.scale if self.patch.mode != "dense" else self.patch.weight
        return p.device

    def extra_repr(self) -> str:
        if self.position == "input":
            return "position=input"
        if self.fused:
            return "position=output, fused=True (patch_add_rmsnorm with the next layer's input_layernorm)"
        return f"position=output, fused=False ({self.fusion_fallback})"


class FusedCutNextLayer(_LayerWrapper):
    """The decoder layer right after a fused cut (``layers[start]``).

    Given the ``CutHandoff`` of the ``PatchedDecoderLayer`` before it, it runs the wrapped layer's
    body after its ``input_layernorm``: attention on the already normed stream, residual the patched
    stream. Given a plain tensor it is the wrapped layer. Attribute reads fall back to the wrapped
    layer (``attention_type``, ``self_attn``, ...).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self._call = _LayerCall(layer)

    def forward(self, hidden_states, *args, **kwargs):
        if not isinstance(hidden_states, CutHandoff):
            return self.layer(hidden_states, *args, **kwargs)
        layer = self.layer
        _check_no_pre_hooks(layer, "the layer after the fused cut")
        attention_kwargs = self._call.attention_kwargs(args, kwargs)
        h, normed = hidden_states
        # The wrapped layer's own forward, after its input_layernorm.
        x = layer.self_attn(hidden_states=normed, **attention_kwargs)[0]
        residual = h + x
        out = residual + layer.mlp(layer.post_attention_layernorm(residual))
        _run_layer_hooks(layer, h, out, "the layer after the fused cut")
        return out

    def extra_repr(self) -> str:
        return "input: CutHandoff from the fused cut before it"


def _is_transformers_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def _layer_fusion_blocker(layer: nn.Module, which: str) -> str | None:
    if not _is_transformers_class(layer, _FUSABLE_LAYER_CLASSES):
        return f"{which} is a {type(layer).__name__}, not one of {', '.join(_FUSABLE_LAYER_CLASSES)}"
    missing = [name for name in _LAYER_SUBMODULES if not isinstance(getattr(layer, name, None), nn.Module)]
    if missing:
        return f"{which} has no {', '.join(missing)}"
    unknown = sorted(set(_LayerCall(layer).names) - _KNOWN_LAYER_ARGUMENTS)
    if unknown:
        return f"{which}'s forward takes arguments the fused body does not know to pass on: {', '.join(unknown)}"
    return None


def _single_device(modules: list[nn.Module]) -> torch.device | str:
    """The one device all parameters and buffers of ``modules`` are on, or a reason string."""
    devices = set()
    for module in modules:
        for m in module.modules():
            if getattr(m, "_hf_hook", None) is not None:
                return "accelerate hooks (device_map dispatch or offload) on the layers at the cut"
        devices.update(t.device for t in list(module.parameters()) + list(module.buffers()))
    if any(d.type == "meta" for d in devices):
        return "weights on the meta device (offloaded) at the cut"
    if len(devices) != 1:
        return f"the layers and the patch at the cut are on several devices ({', '.join(sorted(map(str, devices)))})"
    return devices.pop()


def _fusion_blocker(layers: nn.ModuleList, index: int, patch: LinearPatch) -> str | None:
    """``None`` when the cut after ``layers[index]`` can run the fused epilogue, else why not."""
    if index + 1 >= len(layers):
        return "no layer after the cut (the patched stream goes to the final norm)"
    if patch.mode != "rotate":
        return f"the patch is mode {patch.mode!r}; the fused op applies a 'rotate' patch"
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__}: the fused cut needs transformers >= 5"
    before, after = layers[index], layers[index + 1]
    if isinstance(before, PatchedDecoderLayer):
        before = before.layer
    if isinstance(before, PatchedDecoderLayer):
        return ("the layer before the cut also carries the patch on its input of a block starting at layer 0; "
                "the fused body would skip that patch")
    if isinstance(after, PatchedDecoderLayer):
        return ("the layer after the cut carries the next cut's patch (one layer between two cuts); "
                "the next cut is fused instead where it can be")
    if isinstance(after, FusedCutNextLayer):
        after = after.layer
    for layer, which in ((before, "the layer before the cut"), (after, "the layer after the cut")):
        reason = _layer_fusion_blocker(layer, which)
        if reason is not None:
            return reason
    norm = after.input_layernorm
    if not _is_transformers_class(norm, _FUSABLE_NORM_CLASSES):
        return (f"the next layer's input_layernorm is a {type(norm).__name__}, "
                f"not one of {', '.join(_FUSABLE_NORM_CLASSES)}")
    eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        return f"the next layer's input_layernorm has variance_epsilon {eps!r}, not a non-negative float"
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (patch.hidden_size,):
        return f"the next layer's input_layernorm weight is not of shape ({patch.hidden_size},)"
    device = _single_device([before, after, patch])
    if isinstance(device, str):
        return device
    return None


def _slot_index(layers: nn.ModuleList, wrapper: nn.Module) -> int:
    """The slot of ``layers`` that holds ``wrapper``, directly or inside another wrapper."""
    for i, layer in enumerate(layers):
        m = layer
        while isinstance(m, _LayerWrapper):
            if m is wrapper:
                return i
            m = m.layer
    raise ValueError("the patched layer is not in model.model.layers")


def _unfuse(layers: nn.ModuleList, index: int, wrapper: PatchedDecoderLayer, reason: str) -> None:
    if wrapper.fused and index + 1 < len(layers) and isinstance(layers[index + 1], FusedCutNextLayer):
        layers[index + 1] = layers[index + 1].layer
    wrapper.fused = False
    wrapper.fusion_fallback = reason
    wrapper._next_norm = ()
    wrapper._call = None


def _plan_fusion(model: nn.Module, wrapper: PatchedDecoderLayer, fuse: bool) -> FusionStatus:
    """Fuse the cut at ``wrapper`` when ``fuse`` and the model allow it, else make it unfused."""
    layers = decoder_layers(model)
    index = _slot_index(layers, wrapper)
    wrapper.fuse_requested = fuse
    if wrapper.position == "input":
        reason = "no layer before the cut (start == 0: the patch is on the first layer's input)"
    elif not fuse:
        reason = "fuse=False"
    else:
        reason = _fusion_blocker(layers, index, wrapper.patch)
    _unfuse(layers, index, wrapper, reason)
    if reason is not None:
        return FusionStatus(False, reason)
    after = FusedCutNextLayer(layers[index + 1])
    layers[index + 1] = after
    wrapper._next_norm = (after.layer.input_layernorm,)
    wrapper._call = _LayerCall(wrapper.layer)
    wrapper.fused = True
    return FusionStatus(True, None)


# --- blocks, cuts and the pruning record ---------------------------------------------------------------


def _check_block(start, end, num_layers: int, caller: str = "prune_and_patch") -> tuple[int, int]:
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{caller}: {name} must be an int, got {v!r}")
    if not 0 <= start < end <= num_layers:
        what = "is empty" if start == end else f"is not a block of this model's {num_layers} layers"
        raise ValueError(f"{caller}: block [start={start}, end={end}) {what}; need 0 <= start < end <= {num_layers}")
    if end - start == num_layers:
        raise ValueError(f"{caller}: [{start}, {end}) removes all {num_layers} layers; at least one must remain")
    return start, end


def check_blocks(blocks, num_layers: int, caller: str = "prune_and_patch") -> list[tuple[int, int]]:
    """``blocks`` (``[(start, end), ...]`` in any order) as a list of int pairs, in the order given, after
    checking that each is a non-empty block of the model, that no two overlap or touch (two touching
    blocks are one cut: pass their union) and that at least one layer remains; a clear error otherwise."""
    if isinstance(blocks, (str, bytes, torch.Tensor)) or not hasattr(blocks, "__iter__"):
        raise TypeError(f"{caller}: blocks must be a list of (start, end) pairs, got {type(blocks).__name__}")
    blocks = list(blocks)
    if not blocks:
        raise ValueError(f"{caller}: blocks is empty; pass at least one (start, end) pair")
    checked = []
    for b in blocks:
        if isinstance(b, (str, bytes)) or not hasattr(b, "__len__") or len(b) != 2:
            raise TypeError(f"{caller}: each block must be a (start, end) pair of ints, got {b!r}")
        checked.append(_check_block(b[0], b[1], num_layers, caller))
    ordered = sorted(checked)
    for (s1, e1), (s2, e2) in zip(ordered, ordered[1:]):
        if s2 < e1:
            raise ValueError(f"{caller}: blocks [{s1}, {e1}) and [{s2}, {e2}) overlap; blocks must be disjoint")
        if s2 == e1:
            raise ValueError(f"{caller}: blocks [{s1}, {e1}) and [{s2}, {e2}) touch, which makes one cut; "
                             f"pass [{s1}, {e2}) as one block")
    removed = sum(e - s for s, e in checked)
    if removed >= num_layers:
        raise ValueError(f"{caller}: the blocks remove all {num_layers} layers; at least one must remain")
    return checked


def cut_positions(cuts: list[dict]) -> list[int]:
    """Where each cut (sorted by ``start``) sits in the pruned stack: the number of kept layers before it,
    ``start_k - sum_{j<k} (end_j - start_j)``. The patch of cut ``k`` is on the output of kept layer
    ``position - 1`` (on the input of kept layer 0 when the position is 0)."""
    positions, removed = [], 0
    for cut in cuts:
        positions.append(cut["start"] - removed)
        removed += cut["end"] - cut["start"]
    return positions


def pruning_record(cuts, num_layers_original: int, hidden_size: int, calibration: dict | None = None) -> dict:
    """The ``config.linearpatch`` dict that marks a model as pruned (and travels in config.json):
    ``{"record_version", "num_layers_original", "hidden_size", "cuts": [{"start", "end", "mode"}, ...]}``
    with ``start``/``end`` original layer indices and the cuts sorted by ``start``. ``cuts``: dicts with
    those keys or ``(start, end, mode)`` triples. ``pruning_cuts`` reads it back. ``calibration`` (optional,
    see ``shrinkage.calibration_record``: how the scales were made, the shrinkage factor per cut) is kept
    as the record's ``"calibration"`` entry."""
    listed = [dict(c) if isinstance(c, dict) else {"start": c[0], "end": c[1], "mode": c[2]} for c in cuts]
    listed = [{"start": int(c["start"]), "end": int(c["end"]), "mode": c["mode"]} for c in listed]
    record = {"record_version": RECORD_VERSION, "num_layers_original": int(num_layers_original),
              "hidden_size": int(hidden_size), "cuts": sorted(listed, key=lambda c: c["start"])}
    if calibration is not None:
        record["calibration"] = calibration
    return record


def pruning_cuts(record) -> list[dict]:
    """The cuts of a pruning record, ``[{"start", "end", "mode"}, ...]`` sorted by ``start``: the list form
    (``"cuts"``), or the single-cut form of record version 1 (``"start"``, ``"end"``, ``"mode"`` at the
    top), migrated. A clear ``ValueError`` when it is neither or the cuts are not a valid set of blocks."""
    if not isinstance(record, dict):
        raise ValueError(f"pruning record: expected a dict (config.linearpatch), got {type(record).__name__}")
    if "cuts" in record:
        cuts = record["cuts"]
    elif {"start", "end", "mode"} <= set(record):
        cuts = [{"start": record["start"], "end": record["end"], "mode": record["mode"]}]
    else:
        raise ValueError(f"pruning record: neither a 'cuts' list nor 'start', 'end' and 'mode' in {sorted(record)}")
    if not isinstance(cuts, list) or not all(isinstance(c, dict) and {"start", "end", "mode"} <= set(c) for c in cuts):
        raise ValueError(f"pruning record: 'cuts' must be a list of {{'start', 'end', 'mode'}} objects, got {cuts!r}")
    total = record.get("num_layers_original")
    if isinstance(total, bool) or not isinstance(total, int):
        raise ValueError(f"pruning record: num_layers_original is {total!r}; expected an int")
    check_blocks([(c["start"], c["end"]) for c in cuts], total, "pruning record")
    for c in cuts:
        if c["mode"] not in PATCH_MODES:
            raise ValueError(f"pruning record: cut mode {c['mode']!r}; accepted: {', '.join(PATCH_MODES)}")
    return sorted(({"start": c["start"], "end": c["end"], "mode": c["mode"]} for c in cuts), key=lambda c: c["start"])


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
        new_index = {old: new for new, old in enumerate(kept)}
        new_map = {}
        for key, device in device_map.items():
            prefix = "model.layers."
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                if index.isdigit():
                    if int(index) not in new_index:
                        continue
                    key = prefix + str(new_index[int(index)]) + ("." + rest if rest else "")
            new_map[key] = device
        model.hf_device_map = new_map


def attach_patches(model: nn.Module, positions: list[int], patches: list[LinearPatch],
                   fuse: bool = True) -> list[FusionStatus]:
    """Put one patch per cut into an already pruned stack; ``positions`` (ascending) from ``cut_positions``.
    A patch goes on the output of kept layer ``position - 1``, or on the input of layer 0 at position 0,
    and is moved to that layer's execution device. All patches are attached before any cut is fused,
    so each fusion decision sees its neighbours (a layer between two cuts carries the second patch).

    A block starting at layer 0 followed by a block after exactly one kept layer puts two patches on
    kept layer 0: its ``PatchedDecoderLayer`` (input) is wrapped by a second one (output)."""
    layers = decoder_layers(model)
    wrappers = []
    for position, patch in zip(positions, patches):
        index, where = (0, "input") if position == 0 else (position - 1, "output")
        layer = layers[index]
        patch.to(module_execution_device(layer))
        wrapper = PatchedDecoderLayer(layer, patch, where)
        layers[index] = wrapper
        wrappers.append(wrapper)
    return [_plan_fusion(model, wrapper, fuse) for wrapper in wrappers]


def attach_patch(model: nn.Module, start: int, patch: LinearPatch, fuse: bool = True) -> FusionStatus:
    """``attach_patches`` for one cut at kept position ``start``."""
    return attach_patches(model, [start], [patch], fuse)[0]


def _per_cut(value, count: int, name: str, single_ok) -> list:
    """``value`` for each of ``count`` cuts: one value for all (where ``single_ok(value)``) or a list."""
    if single_ok(value):
        return [value] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"prune_and_patch: {len(value)} {name} for {count} block(s); pass one per block "
                             f"(in the order of blocks{', None for the identity' if name != 'modes' else ''})")
        return list(value)
    raise TypeError(f"prune_and_patch: {name} must be a list with one entry per block, got {type(value).__name__}")


def prune_and_patch(model: nn.Module, start: int | None = None, end: int | None = None,
                    scales: torch.Tensor | list | None = None, mode: str | list[str] = "rotate",
                    weight: torch.Tensor | list | None = None, fuse: bool = True, *,
                    blocks=None) -> nn.Module:
    """Delete decoder layers from ``model`` in place and insert a ``LinearPatch`` at each cut.

    One block: ``prune_and_patch(model, start, end, scales)`` removes ``[start, end)``. Several:
    ``prune_and_patch(model, blocks=[(s1, e1), (s2, e2), ...], scales=[s_1, s_2, ...])`` removes every
    block (original layer indices; disjoint, not touching, in any order) and patches every cut; then
    ``scales``, ``mode`` and ``weight`` are lists in the order of ``blocks`` (``mode`` may be one string
    for all, ``scales``/``weight`` ``None`` for all identities). The layers are deleted and renumbered
    once for all cuts.

    ``mode`` is "rotate" (``P = H diag(scales) H^T``), "diag" (``P = diag(scales)``) or "dense"
    (``P = weight``, ``d x d``). ``scales=None`` / ``weight=None`` mean the identity, i.e. plain
    pruning with a patch that can be calibrated or trained later. ``fuse`` (default True) runs the
    last residual add before a cut, the patch and the next layer's RMSNorm as one fused op where
    the model and the cut allow it, and otherwise leaves the cut unfused (``fusion_statuses(model)``
    says which and why). Every argument is checked before the model is touched. Returns ``model``.
    """
    if not isinstance(fuse, bool):
        raise TypeError(f"prune_and_patch: fuse must be a bool, got {fuse!r}")
    layers = decoder_layers(model)
    config = model.config
    if _cut_wrappers(layers) or getattr(config, "linearpatch", None) is not None:
        raise ValueError(
            "prune_and_patch: this model was already pruned (config.linearpatch is set); prune the original model "
            "once with every block instead"
        )
    num_layers = len(layers)
    if getattr(config, "num_hidden_layers", num_layers) != num_layers:
        raise ValueError(
            f"prune_and_patch: config.num_hidden_layers is {config.num_hidden_layers} but model.model.layers holds "
            f"{num_layers} layers"
        )
    if blocks is None:
        if isinstance(start, (list, tuple)):
            raise TypeError("prune_and_patch: start must be an int; for several blocks pass blocks=[(start, end), ...]")
        blocks = [_check_block(start, end, num_layers)]
        scales, mode, weight = [scales], [mode], [weight]
    elif start is not None or end is not None:
        raise TypeError("prune_and_patch: give either start and end (one block) or blocks=[(start, end), ...], not both")
    else:
        blocks = check_blocks(blocks, num_layers)
        scales = _per_cut(scales, len(blocks), "scales", lambda v: v is None)
        mode = _per_cut(mode, len(blocks), "modes", lambda v: isinstance(v, str))
        weight = _per_cut(weight, len(blocks), "weights", lambda v: v is None)
    for m in mode:
        if m not in PATCH_MODES:
            raise ValueError(f"prune_and_patch: unknown mode {m!r}; accepted: {', '.join(PATCH_MODES)}")
    hidden_size = int(config.hidden_size)
    patches = [LinearPatch(hidden_size, mode=m, scale=s, weight=w) for m, s, w in zip(mode, scales, weight)]
    check_cut_patches(patches, blocks, "prune_and_patch")

    order = sorted(range(len(blocks)), key=lambda k: blocks[k][0])
    cuts = [{"start": blocks[k][0], "end": blocks[k][1], "mode": mode[k]} for k in order]
    removed = {i for c in cuts for i in range(c["start"], c["end"])}
    kept = [i for i in range(num_layers) if i not in removed]
    for c in reversed(cuts):
        del layers[c["start"]:c["end"]]
    _renumber_layers(model, layers, kept)
    attach_patches(model, cut_positions(cuts), [patches[k] for k in order], fuse=fuse)
    config.linearpatch = pruning_record(cuts, num_layers, hidden_size)
    model.__class__ = pruned_class(type(model))
    return model


# --- reading and changing the cuts of a pruned model ---------------------------------------------------


def _cut_wrappers(layers: nn.ModuleList) -> list[PatchedDecoderLayer]:
    """The ``PatchedDecoderLayer`` of every cut, in cut order (an input patch before an output patch
    on the same layer)."""
    found = []
    for layer in layers:
        chain, m = [], layer
        while isinstance(m, _LayerWrapper):
            if isinstance(m, PatchedDecoderLayer):
                chain.append(m)
            m = m.layer
        found.extend(reversed(chain))
    return found


def _cut_wrapper(model: nn.Module, cut: int | None) -> PatchedDecoderLayer:
    found = _cut_wrappers(decoder_layers(model))
    if cut is None:
        if len(found) > 1:
            raise ValueError(f"expected exactly one patched layer in model.model.layers, found {len(found)}; this model "
                             "has several cuts: pass cut=k (0-based, in layer order) or use the plural form")
        if not found:
            raise ValueError("expected exactly one patched layer in model.model.layers, found 0; is this a model "
                             "returned by prune_and_patch or load_pruned?")
        return found[0]
    if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut < len(found):
        raise ValueError(f"cut={cut!r}: this model has {len(found)} cut(s); accepted: 0 .. {len(found) - 1}")
    return found[cut]


def _patch_wrapper(model: nn.Module) -> PatchedDecoderLayer:
    return _cut_wrapper(model, None)


def get_patch(model: nn.Module, cut: int | None = None) -> LinearPatch:
    """The ``LinearPatch`` module of a pruned model (to read, calibrate or train it): of its only cut,
    or of cut ``cut`` (0-based, in layer order) of a model with several."""
    return _cut_wrapper(model, cut).patch


def get_patches(model: nn.Module) -> list[LinearPatch]:
    """The ``LinearPatch`` of every cut of a pruned model, in layer order."""
    found = _cut_wrappers(decoder_layers(model))
    if not found:
        raise ValueError("expected exactly one patched layer per cut in model.model.layers, found none; is this a "
                         "model returned by prune_and_patch or load_pruned?")
    return [w.patch for w in found]


def set_patch(model: nn.Module, patch: LinearPatch, cut: int | None = None) -> None:
    """Replace the patch of a pruned model's only cut, or of cut ``cut`` (e.g. by a dense one for
    distillation); it is moved to the device of the layer it is attached to and the cut's mode in
    ``config.linearpatch`` follows it.

    A fused cut stays fused only with a "rotate" patch: a "diag" or "dense" one turns the fusion off
    (``fusion_status`` says so), and a later "rotate" patch turns it back on."""
    if not isinstance(patch, LinearPatch):
        raise TypeError(f"set_patch: patch must be a LinearPatch, got {type(patch).__name__}")
    wrapper = _cut_wrapper(model, cut)
    if patch.hidden_size != model.config.hidden_size:
        raise ValueError(f"set_patch: patch hidden_size {patch.hidden_size} != model hidden_size {model.config.hidden_size}")
    record = model.config.linearpatch
    cuts = pruning_cuts(record)
    index = _cut_wrappers(decoder_layers(model)).index(wrapper)
    check_cut_patches([patch], [cuts[index]], "set_patch")
    wrapper.patch = patch.to(module_execution_device(wrapper.layer))
    cuts[index]["mode"] = patch.mode
    model.config.linearpatch = pruning_record(cuts, record["num_layers_original"], model.config.hidden_size,
                                              calibration=record.get("calibration"))
    _plan_fusion(model, wrapper, wrapper.fuse_requested)


def set_patches(model: nn.Module, patches: list[LinearPatch]) -> None:
    """``set_patch`` for every cut: ``patches[k]`` replaces the patch of cut ``k``."""
    count = len(_cut_wrappers(decoder_layers(model)))
    if not isinstance(patches, (list, tuple)) or len(patches) != count:
        raise ValueError(f"set_patches: expected a list of {count} LinearPatch (one per cut), got {patches!r}")
    for k, patch in enumerate(patches):
        set_patch(model, patch, cut=k)


def set_fused(model: nn.Module, fuse: bool):
    """Turn the fused cuts of a pruned model on (where possible) or off. Returns the resulting
    ``FusionStatus`` of a one-cut model, the list of them (one per cut) otherwise.
    The logits are the same either way (up to rounding); only ``output_hidden_states`` at a cut differs."""
    if not isinstance(fuse, bool):
        raise TypeError(f"set_fused: fuse must be a bool, got {fuse!r}")
    wrappers = _cut_wrappers(decoder_layers(model))
    if len(wrappers) <= 1:
        return _plan_fusion(model, _patch_wrapper(model), fuse)
    for wrapper in wrappers:  # all unfused first, so each decision below sees the final neighbours
        _plan_fusion(model, wrapper, False)
    return [_plan_fusion(model, wrapper, fuse) for wrapper in wrappers]


def _status(wrapper: PatchedDecoderLayer) -> FusionStatus:
    return FusionStatus(wrapper.fused, None if wrapper.fused else wrapper.fusion_fallback)


def fusion_status(model: nn.Module, cut: int | None = None) -> FusionStatus:
    """``FusionStatus(fused, reason)`` of a pruned model's only cut (or cut ``cut``); ``reason`` says why
    it is not fused."""
    return _status(_cut_wrapper(model, cut))


def fusion_statuses(model: nn.Module) -> list[FusionStatus]:
    """``fusion_status`` of every cut, in layer order."""
    return [_status(w) for w in _cut_wrappers(decoder_layers(model))]


@contextlib.contextmanager
def plain_layers(model: nn.Module) -> Iterator[nn.Module]:
    """``with plain_layers(model): ...`` puts the unwrapped Hugging Face layers back into
    ``model.model.layers`` (no patch, no fused cut: the plain pruned model, with Hugging Face's weight
    names, e.g. for ``save_pretrained``), then restores the wrappers."""
    layers = decoder_layers(model)
    saved = {i: layer for i, layer in enumerate(layers) if isinstance(layer, _LayerWrapper)}
    for i, layer in saved.items():
        while isinstance(layer, _LayerWrapper):
            layer = layer.layer
        layers[i] = layer
    try:
        yield model
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def set_patch_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the patches of a pruned model on or off (off: the plain pruned model, same weights)."""
    for patch in get_patches(model):
        patch.enabled = bool(enabled)


@contextlib.contextmanager
def patch_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with patch_disabled(model): ...`` runs the pruned model without its patches, then restores them."""
    patches = get_patches(model)
    before = [patch.enabled for patch in patches]
    for patch in patches:
        patch.enabled = False
    try:
        yield model
    finally:
        for patch, enabled in zip(patches, before):
            patch.enabled = enabled

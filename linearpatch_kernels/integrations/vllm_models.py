"""The patched architectures as vLLM models (imported by vLLM only, through the plugin in ``vllm``).

Each class is vLLM's own model of the family (``llama.py``, ``mistral.py``, ``qwen2.py``,
``qwen3.py``: its layers, tensor-parallel linears, attention, weight loading) built for the pruned
layer count, plus one ``LinearPatch`` per cut in ``model.linearpatch`` (the checkpoint's tensor names,
so vLLM's weight loader fills them). The decoder layer that carries a cut gets a subclass of its own
class whose forward applies the patch; nothing else changes.

vLLM's decoder layers hand ``(hidden_states, residual)`` from one to the next with the residual add
deferred: the stream is ``hidden_states + residual``, and the next layer's ``input_layernorm`` adds
and normalises in one fused op. At a cut the patch needs the stream itself, so:

* fused (rotate patch, a next layer exists, and both layers are of the known classes):
  ``linearpatch::patch_add_rmsnorm(residual, hidden_states, s, w_next, eps)`` does the add, the patch
  and the next layer's RMSNorm in one pass and returns ``(h', n)``; the layer returns ``(n, h')`` and
  the next layer, marked to skip its ``input_layernorm``, runs attention on ``n`` with residual
  ``h'``. That is exactly the vLLM layer body after its first norm, so nothing of the layer is
  re-implemented beyond those three calls. Under pipeline parallelism the pair crosses ranks as the
  usual ``IntermediateTensors`` and the marked layer on the next rank consumes it.
* unfused (diag/dense patch, a cut after the last layer -- the final norm is called by the model's
  forward, not by a layer -- or a cut before the first layer): the stream ``hidden_states +
  residual`` is patched and handed on as ``(P(stream), 0)``.

Tensor parallelism: the residual stream is replicated on every rank (row-parallel layers all-reduce
before the add), so each rank applies the whole patch to its full hidden state; the patch is not
sharded. Pipeline parallelism: every rank holds the few-KB patch tensors; only the rank whose layers
include the cut's layer applies it (other ranks hold ``PPMissingLayer`` there).

Checks and features: the record is checked (``modeling_linearpatch.check_record``, the same function
as every other loader) before the family's layers are built, and the stored patch tensors
(``check_patch_tensors``) in ``load_weights``, as they come from the files. LoRA is refused when the
model is built (an adapter names layers by index; pruning renumbers them). EAGLE-3's auxiliary hidden
states are the stream entering each kept layer, fused cuts included (``_aux_hidden_state``).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from ..model.modeling_linearpatch import PATCH_PREFIX, check_patch_tensors, check_record
from ..model.patch import LinearPatch, check_cut_patches

# Decoder layers whose forward is: [add +] input_layernorm, self_attn(positions, hidden_states),
# post_attention_layernorm(h, residual), mlp -- what the fused cut's next layer runs after its norm.
_FUSABLE_LAYERS = (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer)


def _body_after_input_norm(layer: nn.Module, positions: torch.Tensor, normed: torch.Tensor, residual: torch.Tensor):
    hidden_states = layer.self_attn(positions=positions, hidden_states=normed)
    hidden_states, residual = layer.post_attention_layernorm(hidden_states, residual)
    return layer.mlp(hidden_states), residual


_CUT_LAYER_CLASSES: dict[type, type] = {}


def _cut_layer_class(base: type) -> type:
    """``base`` with a forward that applies the cut's patches around ``base.forward``."""
    if base in _CUT_LAYER_CLASSES:
        return _CUT_LAYER_CLASSES[base]

    class CutLayer(base):
        # Set by ``install_cuts``; plain attributes (the patches are registered in ``model.linearpatch``).
        lp_input: tuple = ()       # (patch,): applied to the stream entering this layer
        lp_output: tuple = ()      # (patch,) or (patch, next layer's input_layernorm) when fused
        lp_after_fused: bool = False  # the previous layer ran the fused epilogue: input is (n, h')

        def forward(self, positions, hidden_states, residual, **kwargs):
            if self.lp_input:
                stream = hidden_states if residual is None else hidden_states + residual
                hidden_states, residual = self.lp_input[0](stream), None
            if self.lp_after_fused:
                hidden_states, residual = _body_after_input_norm(self, positions, hidden_states, residual)
            else:
                hidden_states, residual = super().forward(positions, hidden_states, residual, **kwargs)
            if not self.lp_output:
                return hidden_states, residual
            patch = self.lp_output[0]
            if len(self.lp_output) == 2:
                norm = self.lp_output[1]
                stream, normed = torch.ops.linearpatch.patch_add_rmsnorm(
                    residual, hidden_states, patch.scale, norm.weight, float(norm.variance_epsilon))
                return normed, stream
            stream = patch(hidden_states + residual)
            return stream, torch.zeros_like(stream)

    CutLayer.__name__ = CutLayer.__qualname__ = f"LinearPatchCut{base.__name__}"
    _CUT_LAYER_CLASSES[base] = CutLayer
    return CutLayer


def _as_cut_layer(layer: nn.Module) -> nn.Module:
    """Turn ``layer`` into an instance of its cut subclass, in place (its parameters, and so their
    names for weight loading, stay as they are)."""
    if type(layer) not in _CUT_LAYER_CLASSES.values():
        layer.__class__ = _cut_layer_class(type(layer))
    return layer


def _fusable(layer: nn.Module) -> bool:
    """A layer whose body after its ``input_layernorm`` is ``_body_after_input_norm``, with a weighted
    vLLM ``RMSNorm`` as that norm."""
    base = type(layer)
    if base in _CUT_LAYER_CLASSES.values():
        base = base.__mro__[1]
    norm = getattr(layer, "input_layernorm", None)
    return (base in _FUSABLE_LAYERS and type(norm) is RMSNorm and getattr(norm, "has_weight", True)
            and getattr(layer, "ada_rms_norm_t_cond", None) is None)


def install_cuts(model: nn.Module, hf_config) -> list[str]:
    """Give vLLM's ``model`` (a ``*ForCausalLM`` built for the kept layers) the cuts of ``hf_config``;
    returns how each cut runs ("fused" / "unfused: why"), for logs and tests.

    Must run in ``__init__`` (before weights load, CUDA-graph capture and compilation). Fusion is
    decided from the layer classes alone, never from which pipeline rank holds a layer, so every rank
    takes the same decision and a fused hand-off can cross a rank boundary."""
    cuts = check_record(hf_config)
    inner = model.model
    d = int(hf_config.hidden_size)
    inner.linearpatch = nn.ModuleList(LinearPatch(d, mode=c["mode"]) for c in cuts)
    layers = inner.layers
    # For EAGLE-3's auxiliary hidden states (``set_aux_hidden_state_layers``): the positions where the
    # layer loop receives a fused hand-off (n, h') instead of (hidden_states, residual), and the patch
    # applied to the input of kept layer 0.
    inner.lp_fused_handoffs, inner.lp_input_patch = set(), None
    notes = []
    for patch, cut in zip(inner.linearpatch, cuts):
        index, position = cut["kept_index"], cut["position"]
        layer = layers[index]
        if position == "input":
            inner.lp_input_patch = patch
            if not isinstance(layer, PPMissingLayer):
                _as_cut_layer(layer).lp_input = (patch,)
            notes.append("unfused: the cut is before the first layer (no layer before it to fuse with)")
            continue
        next_layer = layers[index + 1] if index + 1 < len(layers) else None
        if next_layer is None:
            fused, why = False, "unfused: the cut is after the last layer (the final norm runs in the model's forward)"
        elif patch.mode != "rotate":
            fused, why = False, f"unfused: a {patch.mode} patch (the fused op applies rotate patches)"
        elif isinstance(layer, PPMissingLayer) or isinstance(next_layer, PPMissingLayer):
            # The two layers are on different pipeline ranks: the next norm's weight is not here. Both
            # ranks see a PPMissingLayer on one side, so both take this branch.
            fused, why = False, "unfused: the cut is at a pipeline-parallel rank boundary"
        elif not (_fusable(layer) and _fusable(next_layer)):
            fused, why = False, f"unfused: layers of class {type(layer).__name__} / {type(next_layer).__name__}"
        else:
            fused, why = True, "fused: patch_add_rmsnorm with the next layer's input_layernorm"
        notes.append(why)
        if not isinstance(layer, PPMissingLayer):
            cut_layer = _as_cut_layer(layer)
            cut_layer.lp_output = (patch, next_layer.input_layernorm) if fused else (patch,)
        if fused and not isinstance(next_layer, PPMissingLayer):
            _as_cut_layer(next_layer).lp_after_fused = True
        if fused:
            inner.lp_fused_handoffs.add(index + 1)
    return notes


def _aux_hidden_state(self, aux_hidden_states: list, layer_idx: int, hidden_states: torch.Tensor,
                      residual: torch.Tensor | None) -> list:
    """``EagleModelMixin._maybe_add_hidden_state`` for a stack with cuts: the auxiliary hidden state at
    position ``i`` is the residual stream entering kept layer ``i``, as vLLM records it for any stack
    (``hidden_states + residual``), except where a cut changes what the loop carries: after a fused
    cut the loop holds ``(n, h')`` = (the next layer's normed input, the patched stream), so the stream
    is ``h'`` alone (``n + h'`` is no hidden state of the model); before kept layer 0 with a cut at the
    start, the stream entering the layer is the patched embedding."""
    if layer_idx in self.aux_hidden_state_layers:
        if layer_idx in self.lp_fused_handoffs:
            value = residual
        else:
            value = hidden_states if residual is None else hidden_states + residual
            if layer_idx == 0 and self.lp_input_patch is not None:
                value = self.lp_input_patch(value)
        aux_hidden_states.append(value)
    return aux_hidden_states


class _PatchedVllmModel:
    """Mixin: build the family's vLLM model, then install the cuts; load and check the patch tensors."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        if vllm_config.lora_config is not None:
            # A LoRA adapter names its modules by layer index (model.layers.17.self_attn.q_proj); one
            # trained on the dense model would land on other layers after the renumbering, and nothing
            # in an adapter says which numbering it uses.
            raise ValueError("LinearPatch checkpoints do not support LoRA adapters in vLLM: an adapter addresses "
                             "layers by index and pruning renumbers them; merge the adapter into the model before "
                             "pruning (or serve without --enable-lora)")
        check_record(vllm_config.model_config.hf_config)  # before the family's layers are built (quantized ones too)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.linearpatch_cuts = install_cuts(self, vllm_config.model_config.hf_config)

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """EAGLE-3: record at each requested position the stream entering that kept layer
        (``_aux_hidden_state``). Positions are those of the pruned stack, as vLLM numbers them."""
        inner = self.model
        if not callable(getattr(inner, "_maybe_add_hidden_state", None)):
            raise ValueError(f"{type(inner).__name__} records EAGLE-3 hidden states in a way this plugin does not "
                             "know; speculative decoding with auxiliary hidden states is refused")
        super().set_aux_hidden_state_layers(layers)
        inner._maybe_add_hidden_state = types.MethodType(_aux_hidden_state, inner)

    def load_weights(self, weights):
        """The family's weights through vLLM's loader; the patch tensors, checked against the record
        (``check_patch_tensors``, as stored: before any cast), into ``model.linearpatch``."""
        stored = {}

        def family_weights():
            for name, tensor in weights:
                if name.startswith(PATCH_PREFIX):
                    stored[name] = tensor
                    continue
                yield name, tensor

        loaded = super().load_weights(family_weights())
        cuts = check_record(self.config)
        check_patch_tensors(self.config, stored, cuts=cuts)
        params = dict(self.model.linearpatch.named_parameters(prefix=PATCH_PREFIX.rstrip(".")))
        # A tracked in-place copy (not through .data): it bumps the tensor's version counter, which the CUDA
        # backend's prepared copy of s / d is keyed on, so a reload into a model that already ran is seen.
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(stored[name])
        check_cut_patches(self.model.linearpatch, cuts, "checkpoint")
        return loaded | set(params) | set(stored)


class LinearPatchLlamaForCausalLM(_PatchedVllmModel, LlamaForCausalLM):
    pass


class LinearPatchMistralForCausalLM(_PatchedVllmModel, MistralForCausalLM):
    pass


class LinearPatchQwen2ForCausalLM(_PatchedVllmModel, Qwen2ForCausalLM):
    pass


class LinearPatchQwen3ForCausalLM(_PatchedVllmModel, Qwen3ForCausalLM):
    pass


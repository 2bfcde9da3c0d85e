"""The plugin's cut placement under pipeline parallelism, without starting an engine (run by
tests/test_vllm.py in the vLLM environment): ``install_cuts`` on a stack where another rank's
layers are vLLM's ``PPMissingLayer``. Prints a JSON report."""

import json

import torch
from torch import nn
from transformers import Qwen3Config
from vllm.model_executor.models.utils import PPMissingLayer

from linearpatch_kernels.integrations.vllm_models import install_cuts


class Layer(nn.Module):
    """Stands in for a decoder layer held by this rank: ``(positions, h, residual) -> (h', residual')``
    with the stream ``h' + residual'`` equal to ``2 * (h + residual)``."""

    def forward(self, positions, hidden_states, residual):
        stream = hidden_states if residual is None else hidden_states + residual
        return stream, stream


def stack(held: list[bool]):
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList(Layer() if h else PPMissingLayer() for h in held)
    return model


def config(start: int, end: int, kept_index: int, mode="rotate"):
    c = Qwen3Config(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    c.linearpatch = {"format_version": 2, "record_version": 2, "num_layers_original": 6, "hidden_size": 48,
                     "hadamard": {"construction": "paley1(q=11)", "k": 12, "n": 4},
                     "cuts": [{"start": start, "end": end, "mode": mode, "kept_index": kept_index, "position": "output"}]}
    return c


report = {}
# Cut [2, 4): patch on kept layer 1. Rank 0 holds kept layers 0-1, rank 1 holds 2-3.
for rank, held in (("rank0", [True, True, False, False]), ("rank1", [False, False, True, True])):
    model = stack(held)
    notes = install_cuts(model, config(2, 4, 1))
    layers = model.model.layers
    layer = layers[1]
    entry = {"notes": notes, "patched_here": bool(getattr(layer, "lp_output", ())),
             "patch_tensors": sorted(n for n, _ in model.named_parameters())}
    if entry["patched_here"]:
        torch.manual_seed(0)
        model.model.linearpatch[0].scale.data = torch.rand(48) + 0.5
        h, r = torch.randn(3, 48), torch.randn(3, 48)
        out_h, out_r = layer(torch.arange(3), h, r)
        want = model.model.linearpatch[0](2 * (h + r))  # the patch on the stream this layer hands on
        entry["handoff_is_patched_stream"] = bool(torch.allclose(out_h + out_r, want, atol=1e-5))
    report[rank] = entry
print("REPORT " + json.dumps(report))

"""Block scores, block selection and scales against fp64 computations written out with explicit loops.

The residual inputs for the references come from Hugging Face's own ``output_hidden_states``
(``hidden_states[i]`` is the input of layer ``i`` for ``i < L``) plus a forward hook on the final
norm for ``X_L`` (``hidden_states[L]`` is the normed state).
"""

import pytest
import torch
from tiny_models import random_batches, tiny_model

from linearpatch_kernels import block_similarities, estimate_scales, hadamard_matrix, select_block


def residual_inputs_fp64(model, input_ids):
    """[X_0, ..., X_L] of one batch in fp64."""
    captured = []
    handle = model.model.norm.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    num_layers = len(model.model.layers)
    assert len(out.hidden_states) == num_layers + 1
    return [x.double() for x in out.hidden_states[:num_layers]] + [captured[0].double()]


def mean_token_cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    total = 0.0
    for t in range(a.shape[0]):
        total += float(a[t] @ b[t] / (a[t].norm() * b[t].norm()))
    return total / a.shape[0]


def reference_scores(model, batches, n, method):
    xs_per_batch = [residual_inputs_fp64(model, ids) for ids in batches]
    num_layers = len(model.model.layers)
    scores = []
    for start in range(num_layers - n + 1):
        if method == "cosine":
            value = sum(mean_token_cosine(xs[start], xs[start + n]) for xs in xs_per_batch) / len(batches)
        else:
            value = 0.0
            for j in range(start, start + n):
                mean_cos = sum(mean_token_cosine(xs[j], xs[j + 1]) for xs in xs_per_batch) / len(batches)
                value += 1.0 - mean_cos
        scores.append(value)
    return torch.tensor(scores, dtype=torch.float64)


def reference_scales(model, batches, start, end, rotate):
    d = model.config.hidden_size
    h = hadamard_matrix(d, dtype=torch.float64) if rotate else torch.eye(d, dtype=torch.float64)
    total = torch.zeros(d, dtype=torch.float64)
    for ids in batches:
        xs = residual_inputs_fp64(model, ids)
        x_start, x_end = xs[start].reshape(-1, d) @ h, xs[end].reshape(-1, d) @ h
        total += x_end.abs().mean(0) / x_start.abs().mean(0)
    return total / len(batches)


@pytest.mark.parametrize("method", ["cosine", "block_influence"])
@pytest.mark.parametrize("num_prune", [1, 3])
def test_block_scores_match_fp64(method, num_prune):
    model = tiny_model("qwen2", num_layers=5, hidden_size=64, seed=1)
    # Batches of different lengths and a batch of two sequences: every batch weighs the same.
    batches = random_batches(2, seqlen=12, seed=1) + [torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(9))]
    scores = block_similarities(model, batches, num_prune, method, progress=False)
    expected = reference_scores(model, batches, num_prune, method)
    assert scores.shape == (5 - num_prune + 1,) and scores.dtype == torch.float64
    assert torch.allclose(scores, expected, atol=1e-5, rtol=0)
    start, end = select_block(model, batches, num_prune, method, progress=False)
    best = int(expected.argmax()) if method == "cosine" else int(expected.argmin())
    assert (start, end) == (best, best + num_prune)


@pytest.mark.parametrize("method", ["cosine", "block_influence"])
def test_select_block_finds_layers_that_do_nothing(method):
    """Layers 2 and 3 with zero output projections add nothing to the residual stream, so the block
    [2, 4) is the one to prune by either criterion (cosine 1, Block Influence 0)."""
    model = tiny_model("llama", num_layers=6, hidden_size=48, seed=2)
    with torch.no_grad():
        for j in (2, 3):
            model.model.layers[j].self_attn.o_proj.weight.zero_()
            model.model.layers[j].mlp.down_proj.weight.zero_()
    batches = random_batches(2, seqlen=10, seed=2)
    assert select_block(model, batches, 2, method, progress=False) == (2, 4)
    scores = block_similarities(model, batches, 2, method, progress=False)
    assert abs(scores[2].item() - (1.0 if method == "cosine" else 0.0)) < 1e-6


@pytest.mark.parametrize("mode", ["rotate", "diag"])
@pytest.mark.parametrize("d, start, end", [(64, 2, 4), (48, 0, 2), (48, 3, 6)])
def test_scales_match_fp64(mode, d, start, end):
    model = tiny_model("mistral", num_layers=6, hidden_size=d, seed=3)
    batches = random_batches(3, seqlen=10, seed=3)
    s = estimate_scales(model, batches, start, end, mode, progress=False)
    assert s.dtype == torch.float32 and s.shape == (d,) and s.device.type == "cpu"
    expected = reference_scales(model, batches, start, end, rotate=(mode == "rotate"))
    assert torch.allclose(s.double(), expected, rtol=1e-5, atol=0)


def test_scales_from_a_bf16_model_are_fp32_of_its_hidden_states():
    model = tiny_model("qwen3", num_layers=5, hidden_size=64, dtype=torch.bfloat16, seed=4)
    batches = random_batches(2, seqlen=10, seed=4)
    s = estimate_scales(model, batches, 1, 3, progress=False)
    assert s.dtype == torch.float32
    assert torch.allclose(s.double(), reference_scales(model, batches, 1, 3, rotate=True), rtol=1e-5, atol=0)
    scores = block_similarities(model, batches, 2, progress=False)
    assert torch.allclose(scores, reference_scores(model, batches, 2, "cosine"), atol=1e-5, rtol=0)


def test_zero_denominator_channels_get_scale_one():
    """Channels that are identically zero in X_start (here: zeroed embedding columns, start = 0) carry no
    magnitude to match; their ratio is taken as 1. The other channels follow the formula."""
    model = tiny_model("llama", num_layers=4, hidden_size=64, seed=5)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [5, 17]] = 0.0
    batches = random_batches(2, seqlen=8, seed=5)
    s = estimate_scales(model, batches, 0, 2, "diag", progress=False)
    assert s[5].item() == 1.0 and s[17].item() == 1.0
    assert torch.isfinite(s).all()
    expected = reference_scales(model, batches, 0, 2, rotate=False)
    others = [c for c in range(64) if c not in (5, 17)]
    assert torch.allclose(s[others].double(), expected[others], rtol=1e-5, atol=0)


def test_calibration_leaves_the_model_as_it_was():
    model = tiny_model("llama", num_layers=4, hidden_size=64, seed=6).train()
    batches = random_batches(1, seqlen=8, seed=6)
    select_block(model, batches, 1, progress=False)
    estimate_scales(model, batches, 1, 2, progress=False)
    assert model.training
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)
    assert not model.model.norm._forward_pre_hooks


def test_bad_arguments():
    model = tiny_model("llama", num_layers=4, hidden_size=64)
    batches = random_batches(1, seqlen=8)
    with pytest.raises(ValueError, match="unknown method 'angular'.*cosine, block_influence"):
        block_similarities(model, batches, 1, "angular")
    for n in (0, 4):
        with pytest.raises(ValueError, match=r"num_prune=%d for a model of 4 layers; accepted: 1 \.\. 3" % n):
            select_block(model, batches, n)
    with pytest.raises(ValueError, match="batches is empty"):
        select_block(model, [], 1)
    with pytest.raises(TypeError, match="batches must be a list"):
        select_block(model, batches[0], 1)
    with pytest.raises(TypeError, match=r"batches\[0\] must be a LongTensor"):
        select_block(model, [torch.ones(1, 8)], 1)
    with pytest.raises(ValueError, match=r"batches\[0\] has shape \(8,\); expected \[batch, seqlen\]"):
        estimate_scales(model, [torch.ones(8, dtype=torch.long)], 1, 2)
    with pytest.raises(ValueError, match="unknown mode 'dense'"):
        estimate_scales(model, batches, 1, 2, "dense")
    for start, end in [(2, 2), (-1, 1), (1, 5), (0, 4)]:
        with pytest.raises(ValueError, match="is not prunable in a model of 4 layers"):
            estimate_scales(model, batches, start, end)

"""Block scores, block selection and scales against fp64 computations written out with explicit loops.

The residual inputs for the references come from Hugging Face's own ``output_hidden_states``
(``hidden_states[i]`` is the input of layer ``i`` for ``i < L``) plus a forward hook on the final
norm for ``X_L`` (``hidden_states[L]`` is the normed state).
"""

import itertools

import pytest
import torch
from tiny_models import random_batches, tiny_model

from linearpatch_kernels import (
    block_similarities,
    estimate_cut_scales,
    estimate_scales,
    hadamard_matrix,
    select_block,
    select_blocks,
)
from linearpatch_kernels.model.calibration import best_blocks, pairwise_similarities


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


def replace_channel(layer, channel, value):
    """A pre-hook that sets ``channel`` of ``layer``'s input hidden states to ``value`` for every token (run
    before the calibration's own hooks, so that they read the changed stream)."""
    def hook(module, args, kwargs):
        if args:
            h = args[0].clone()
            h[..., channel] = value
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].clone()
        h[..., channel] = value
        return args, {**kwargs, "hidden_states": h}
    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_calibration_that_cannot_give_a_scale_says_which_channels_and_why():
    model = tiny_model("llama", num_layers=5, hidden_size=64, seed=9)
    batches = random_batches(2, seqlen=8, seed=9)
    with torch.no_grad():  # an overflowing layer: X_3 onwards hold infinities and NaN
        model.model.layers[2].mlp.down_proj.weight[6, :] = float("inf")
    with pytest.raises(ValueError, match=r"estimate_scales: block \[1, 3\): the residual stream entering layer 3 is "
                                         r"not finite in calibration batch 0 \(mean\|x H\| is NaN or infinite at "
                                         r"channels? .*\): the model overflows in torch.float32"):
        estimate_scales(model, batches, 1, 3, "rotate", progress=False)
    with pytest.raises(ValueError, match=r"block \[3, 4\): the residual stream entering layer 3 is not finite.*"
                                         r"mean\|x\| is NaN or infinite at channel"):
        estimate_cut_scales(model, batches, [(3, 4)], "diag", progress=False)

    model = tiny_model("llama", num_layers=5, hidden_size=64, seed=9)
    handle = replace_channel(model.model.layers[3], [12, 30], 0.0)  # no signal after the cut in two channels
    try:
        with pytest.raises(ValueError, match=r"estimate_scales: block \[1, 3\): diag scales come out 0 at channels "
                                             r"12, 30: mean\|x\| of the residual stream entering layer 3 is 0 there "
                                             r"in every calibration batch"):
            estimate_scales(model, batches, 1, 3, "diag", progress=False)
        assert torch.isfinite(estimate_scales(model, batches, 1, 2, "diag", progress=False)).all()  # other blocks
    finally:
        handle.remove()
    handles = [replace_channel(model.model.layers[1], 7, 1e-29), replace_channel(model.model.layers[3], 7, 1e12)]
    try:
        with pytest.raises(ValueError, match=r"diag scales overflow float32 at channel 7: mean\|x\| of the residual "
                                             r"stream entering layer 1 is so close to 0"):
            estimate_scales(model, batches, 1, 3, "diag", progress=False)
    finally:
        for handle in handles:
            handle.remove()


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


# --- several cuts ----------------------------------------------------------------------------------


def test_pairwise_similarities_match_fp64():
    model = tiny_model("qwen3", num_layers=4, hidden_size=64, seed=7)
    batches = random_batches(2, seqlen=9, seed=7)
    table = pairwise_similarities(model, batches, progress=False)
    xs_per_batch = [residual_inputs_fp64(model, ids) for ids in batches]
    assert table.shape == (5, 5) and table.dtype == torch.float64
    for i in range(5):
        for j in range(5):
            want = sum(mean_token_cosine(xs[i], xs[j]) for xs in xs_per_batch) / len(batches)
            assert abs(table[i, j].item() - want) <= 1e-5


def brute_force_best_cost(costs, num_prune, max_cuts, exact):
    """Least summed cost over every set of disjoint, non-touching blocks, by enumeration."""
    num_layers = costs.shape[0] - 1
    blocks = [(s, e) for s in range(num_layers) for e in range(s + 1, num_layers + 1)]
    best = float("inf")
    for k in range(1, max_cuts + 1):
        if exact and k != max_cuts:
            continue
        for chosen in itertools.combinations(blocks, k):
            if sum(e - s for s, e in chosen) != num_prune:
                continue
            if any(b[0] <= a[1] for a, b in zip(chosen, chosen[1:])):  # sorted; must leave a gap
                continue
            best = min(best, sum(costs[s, e].item() for s, e in chosen))
    return best


def test_best_blocks_is_the_least_cost_choice():
    num_layers = 7
    g = torch.Generator().manual_seed(0)
    costs = torch.rand(num_layers + 1, num_layers + 1, generator=g, dtype=torch.float64)
    for num_prune in range(1, num_layers):
        for max_cuts in (1, 2, 3):
            for exact in (False, True):
                want = brute_force_best_cost(costs, num_prune, max_cuts, exact)
                if want == float("inf"):
                    with pytest.raises(ValueError, match="disjoint, non-touching"):
                        best_blocks(costs, num_prune, max_cuts, exact)
                    continue
                got = best_blocks(costs, num_prune, max_cuts, exact)
                assert sum(e - s for s, e in got) == num_prune and len(got) <= max_cuts
                assert not exact or len(got) == max_cuts
                assert all(b[0] > a[1] for a, b in zip(got, got[1:]))
                assert sum(costs[s, e].item() for s, e in got) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("method", ["cosine", "block_influence"])
def test_select_blocks_with_one_cut_is_select_block(method):
    model = tiny_model("llama", num_layers=6, hidden_size=64, seed=8)
    batches = random_batches(2, seqlen=10, seed=8)
    for n in (1, 3):
        assert select_blocks(model, batches, n, 1, method, progress=False) == [
            select_block(model, batches, n, method, progress=False)]


@pytest.mark.parametrize("method", ["cosine", "block_influence"])
def test_select_blocks_finds_two_blocks_that_do_nothing(method):
    """Layers 1, 2 and 5 add nothing to the residual stream: removing 3 layers in at most 2 cuts takes
    exactly those (cost 0), which no single block of 3 can match."""
    model = tiny_model("llama", num_layers=8, hidden_size=48, seed=9)
    with torch.no_grad():
        for j in (1, 2, 5):
            model.model.layers[j].self_attn.o_proj.weight.zero_()
            model.model.layers[j].mlp.down_proj.weight.zero_()
    batches = random_batches(2, seqlen=10, seed=9)
    assert select_blocks(model, batches, 3, 2, method, progress=False) == [(1, 3), (5, 6)]
    assert select_blocks(model, batches, 3, 3, method, progress=False) == [(1, 3), (5, 6)]


def in_order_reference_scales(model, batches, blocks, rotate):
    """Scales of each cut with the earlier blocks skipped and their fp64 patches applied by hooks."""
    d = model.config.hidden_size
    h = hadamard_matrix(d, dtype=torch.float64) if rotate else torch.eye(d, dtype=torch.float64)
    layers = model.model.layers
    handles, result = [], []
    try:
        for start, end in blocks:
            total = torch.zeros(d, dtype=torch.float64)
            for ids in batches:
                seen = {}
                for i, module in ((start, layers[start]), (end, layers[end] if end < len(layers) else model.model.norm)):
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args, i=i: seen.__setitem__(i, args[0].double())))
                with torch.no_grad():
                    model(ids, use_cache=False)
                for _ in range(2):
                    handles.pop().remove()
                x_start, x_end = seen[start].reshape(-1, d) @ h, seen[end].reshape(-1, d) @ h
                total += x_end.abs().mean(0) / x_start.abs().mean(0)
            s = total / len(batches)
            result.append(s)
            p64 = h @ torch.diag(s) @ h.T
            handles += [layers[j].register_forward_hook(lambda m, args, out: args[0]) for j in range(start, end)]
            handles.append(layers[start - 1].register_forward_hook(lambda m, args, out, p64=p64: (out.double() @ p64).float()))
    finally:
        for handle in handles:
            handle.remove()
    return result


@pytest.mark.parametrize("mode", ["rotate", "diag"])
def test_cut_scales_are_calibrated_in_order(mode):
    model = tiny_model("mistral", num_layers=8, hidden_size=64, seed=10)
    batches = random_batches(2, seqlen=10, seed=10)
    blocks = [(1, 3), (4, 5), (6, 8)]
    # Given out of order: the result follows the order of the blocks.
    got = estimate_cut_scales(model, batches, blocks[::-1], mode, progress=False)[::-1]
    want = in_order_reference_scales(model, batches, blocks, rotate=(mode == "rotate"))
    for s, w in zip(got, want):
        assert s.dtype == torch.float32 and s.shape == (64,)
        assert torch.allclose(s.double(), w, rtol=1e-4, atol=0)
    # In order differs from calibrating every cut on the dense model (the point of doing it in order).
    assert not torch.allclose(got[1], estimate_scales(model, batches, 4, 5, mode, progress=False), rtol=1e-3)
    # One block is estimate_scales exactly; the model is left as it was.
    assert torch.equal(estimate_cut_scales(model, batches, [(2, 5)], mode, progress=False)[0],
                       estimate_scales(model, batches, 2, 5, mode, progress=False))
    assert all(type(layer).__name__ == "MistralDecoderLayer" for layer in model.model.layers)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


def test_bad_multicut_arguments():
    model = tiny_model("llama", num_layers=6, hidden_size=64)
    batches = random_batches(1, seqlen=8)
    with pytest.raises(ValueError, match="max_cuts must be a positive int, got 0"):
        select_blocks(model, batches, 2, 0)
    with pytest.raises(ValueError, match=r"num_prune=6 for a model of 6 layers"):
        select_blocks(model, batches, 6, 2)
    with pytest.raises(ValueError, match="unknown method"):
        select_blocks(model, batches, 2, 2, "angular")
    with pytest.raises(ValueError, match=r"estimate_cut_scales: blocks \[1, 3\) and \[2, 4\) overlap"):
        estimate_cut_scales(model, batches, [(1, 3), (2, 4)])
    with pytest.raises(ValueError, match="unknown mode 'dense'"):
        estimate_cut_scales(model, batches, [(1, 3)], "dense")

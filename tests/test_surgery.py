"""prune_and_patch against a plain formulation on the unpruned model.

The reference keeps every layer of an untouched copy and uses forward hooks: the removed layers
return their input unchanged and the residual stream at the cut is multiplied by a dense fp64
``P = H diag(s) H^T``. No layer is deleted and no index renumbered there, so it checks the surgery
(which layers go, where the patch sits, what it applies) independently of how it is done.
"""

import copy

import pytest
import torch
from tiny_models import FAMILIES, cache_of, random_batches, tiny_model

from linearpatch_kernels import (
    LinearPatch,
    PatchedDecoderLayer,
    get_patch,
    hadamard_matrix,
    patch_disabled,
    prune_and_patch,
    set_patch,
    set_patch_enabled,
)
from linearpatch_kernels.model import pruning_cuts


def rotate_p64(s: torch.Tensor) -> torch.Tensor:
    h = hadamard_matrix(s.numel(), dtype=torch.float64)
    return h @ torch.diag(s.double()) @ h.T


def reference_logits(unpruned, input_ids, start, end, p64):
    """Logits of ``unpruned`` with layers [start, end) skipped and ``h @ p64`` at the cut (fp64 matmul)."""
    return reference_logits_cuts(unpruned, input_ids, [(start, end, p64)])


def reference_logits_cuts(unpruned, input_ids, cuts):
    """Logits of ``unpruned`` with the layers of every ``(start, end, p64)`` in ``cuts`` skipped and
    ``h @ p64`` applied at that cut: after layer ``start - 1``, or before layer ``end`` when ``start == 0``."""
    layers = unpruned.model.layers

    def apply_p(h, p64):
        return (h.double() @ p64).to(h.dtype)

    def skip(module, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    def patch_output(p64):
        def hook(module, args, out):
            return apply_p(out, p64) if isinstance(out, torch.Tensor) else (apply_p(out[0], p64), *out[1:])
        return hook

    def patch_input(p64):
        def hook(module, args, kwargs):
            if args:
                return (apply_p(args[0], p64), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply_p(kwargs["hidden_states"], p64)}
        return hook

    handles = []
    for start, end, p64 in cuts:
        handles += [layers[j].register_forward_hook(skip, with_kwargs=True) for j in range(start, end)]
        if start > 0:
            handles.append(layers[start - 1].register_forward_hook(patch_output(p64)))
        else:
            handles.append(layers[end].register_forward_pre_hook(patch_input(p64), with_kwargs=True))
    try:
        with torch.no_grad():
            return unpruned(input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_scales(d, seed=0):
    return torch.rand(d, generator=torch.Generator().manual_seed(seed)) + 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_plain_formulation(family):
    model = tiny_model(family, num_layers=6, hidden_size=64)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=16)[0]
    s = random_scales(64)
    prune_and_patch(model, 2, 4, s)
    assert len(model.model.layers) == 4
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    expected = reference_logits(unpruned, ids, 2, 4, rotate_p64(s))
    assert rel_err(logits, expected) <= 1e-5
    # The patch matters: without it the logits are those of plain pruning, visibly different.
    assert rel_err(reference_logits(unpruned, ids, 2, 4, torch.eye(64, dtype=torch.float64)), expected) > 1e-2


@pytest.mark.parametrize("start, end", [(0, 2), (3, 6), (0, 5), (1, 2)])
def test_edge_blocks_non_power_of_two(start, end):
    """Cut before the first layer (patch on the next layer's input), after the last (patch before the
    final norm), one layer left, one layer removed; hidden size 48 = 12 * 4 (a Paley Hadamard size)."""
    model = tiny_model("llama", num_layers=6, hidden_size=48, seed=1)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=12, seed=2)[0]
    s = random_scales(48, seed=1)
    prune_and_patch(model, start, end, s)
    wrapped = [(i, layer.position) for i, layer in enumerate(model.model.layers) if isinstance(layer, PatchedDecoderLayer)]
    assert wrapped == ([(0, "input")] if start == 0 else [(start - 1, "output")])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert rel_err(logits, reference_logits(unpruned, ids, start, end, rotate_p64(s))) <= 1e-5


@pytest.mark.parametrize("mode", ["diag", "dense"])
def test_diag_and_dense_modes(mode):
    model = tiny_model("mistral", num_layers=5, hidden_size=64, seed=2)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=16, seed=3)[0]
    g = torch.Generator().manual_seed(4)
    if mode == "diag":
        s = torch.rand(64, generator=g) + 0.5
        prune_and_patch(model, 1, 3, s, mode="diag")
        p64 = torch.diag(s.double())
    else:
        w = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g)
        prune_and_patch(model, 1, 3, mode="dense", weight=w)
        p64 = w.double()
    with torch.no_grad():
        logits = model(ids).logits
    assert rel_err(logits, reference_logits(unpruned, ids, 1, 3, p64)) <= 1e-5


def test_disabling_the_patch_gives_plain_pruning():
    model = tiny_model("qwen3", num_layers=6, hidden_size=64, seed=3)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=16, seed=4)[0]
    s = random_scales(64, seed=2)
    prune_and_patch(model, 3, 5, s)
    plain = reference_logits(unpruned, ids, 3, 5, torch.eye(64, dtype=torch.float64))
    patched = reference_logits(unpruned, ids, 3, 5, rotate_p64(s))
    with torch.no_grad():
        with patch_disabled(model):
            assert rel_err(model(ids).logits, plain) <= 1e-5
        assert rel_err(model(ids).logits, patched) <= 1e-5
        set_patch_enabled(model, False)
        assert rel_err(model(ids).logits, plain) <= 1e-5
        set_patch_enabled(model, True)
        assert rel_err(model(ids).logits, patched) <= 1e-5


def test_index_fields_config_and_print():
    model = tiny_model("qwen2", num_layers=6, hidden_size=64)
    old_types = list(model.config.layer_types)
    old_attn = [layer.self_attn for layer in model.model.layers]
    assert len(set(old_types)) == 2  # the tiny Qwen2 mixes full and sliding attention
    prune_and_patch(model, 1, 4, random_scales(64))
    kept = [0, 4, 5]
    attn = [layer.self_attn for layer in model.model.layers]  # the wrapper forwards attribute reads
    assert attn == [old_attn[i] for i in kept]
    assert [a.layer_idx for a in attn] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    assert model.config.layer_types == [old_types[i] for i in kept]
    assert [a.sliding_window is not None for a in attn] == [t == "sliding_attention" for t in model.config.layer_types]
    assert model.config.linearpatch == {
        "record_version": 2, "num_layers_original": 6, "hidden_size": 64,
        "cuts": [{"start": 1, "end": 4, "mode": "rotate"}],
    }
    text = repr(model)
    assert "PatchedDecoderLayer(" in text and "LinearPatch(mode=rotate, hidden_size=64)" in text
    assert "model.layers.0.patch.scale" in model.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache_matches_without(family):
    model = tiny_model(family, num_layers=6, hidden_size=64, seed=5)
    prune_and_patch(model, 2, 5, random_scales(64, seed=3))
    check_generate_with_kv_cache(model)


def check_generate_with_kv_cache(model):
    """Greedy generation with the KV cache gives the tokens of generation without it, and step-by-step
    decoding with the cache the logits of one full forward pass."""
    prompt = random_batches(1, seqlen=6, seed=5)[0]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        assert cached.shape == (1, 18)
        assert torch.equal(cached, uncached)
        # Step-by-step decoding with the cache gives the logits of one full forward pass.
        full = model(cached, use_cache=False).logits
        out = model(cached[:, :10], use_cache=True)
        steps = [out.logits]
        for t in range(10, 18):
            out = model(cached[:, t:t + 1], **cache_of(model, out), use_cache=True)
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_bf16_and_fp16_models():
    model = tiny_model("llama", num_layers=6, hidden_size=64, dtype=torch.bfloat16, seed=6)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=16, seed=6)[0]
    s = random_scales(64, seed=6)
    prune_and_patch(model, 2, 4, s)
    patch = get_patch(model)
    assert patch.scale.dtype == torch.float32
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    assert rel_err(logits, reference_logits(unpruned, ids, 2, 4, rotate_p64(s))) <= 1e-2
    model.half()
    assert patch.scale.dtype == torch.float32 and torch.equal(patch.scale.data, s)
    with torch.no_grad():
        logits16 = model(ids).logits
    assert logits16.dtype == torch.float16
    assert rel_err(logits16, reference_logits(unpruned.half(), ids, 2, 4, rotate_p64(s))) <= 1e-2


def test_offloaded_device_map_puts_patch_on_execution_device(tmp_path):
    """accelerate device_map with layers on "cpu" and offloaded to "disk" (their weights on "meta"): the
    patch must land on the execution device, not on "meta", and hf_device_map must follow the layers."""
    from accelerate import dispatch_model

    model = tiny_model("llama", num_layers=6, hidden_size=64, seed=7)
    unpruned = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("cpu" if i < 2 else "disk") for i in range(6)})
    model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert model.model.layers[3].self_attn.q_proj.weight.device.type == "meta"
    s = random_scales(64, seed=7)
    prune_and_patch(model, 4, 5, s)
    assert get_patch(model).scale.device.type == "cpu"
    assert model.hf_device_map == {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
        "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk",
        "model.layers.4": "disk",
    }
    ids = random_batches(1, seqlen=16, seed=7)[0]
    with torch.no_grad():
        logits = model(ids).logits
    assert rel_err(logits, reference_logits(unpruned, ids, 4, 5, rotate_p64(s))) <= 1e-5


def test_set_patch_swaps_in_a_dense_patch():
    model = tiny_model("llama", num_layers=5, hidden_size=48, seed=8)
    ids = random_batches(1, seqlen=10, seed=8)[0]
    prune_and_patch(model, 2, 3, random_scales(48, seed=8))
    with torch.no_grad():
        before = model(ids).logits
        dense = LinearPatch(48, "dense", weight=get_patch(model).dense_matrix())
        set_patch(model, dense)
        assert get_patch(model) is dense and pruning_cuts(model.config.linearpatch)[0]["mode"] == "dense"
        assert rel_err(model(ids).logits, before) <= 1e-5
    with pytest.raises(ValueError, match="hidden_size 64 != model hidden_size 48"):
        set_patch(model, LinearPatch(64))
    with pytest.raises(TypeError, match="must be a LinearPatch"):
        set_patch(model, torch.nn.Identity())


def test_bad_arguments():
    model = tiny_model("llama", num_layers=4, hidden_size=64)
    for start, end in [(-1, 2), (2, 2), (3, 1), (0, 5)]:
        with pytest.raises(ValueError, match=r"need 0 <= start < end <= 4"):
            prune_and_patch(model, start, end)
    with pytest.raises(ValueError, match="removes all 4 layers; at least one must remain"):
        prune_and_patch(model, 0, 4)
    with pytest.raises(TypeError, match="start must be an int"):
        prune_and_patch(model, 1.0, 2)
    with pytest.raises(ValueError, match="unknown mode 'hadamard'"):
        prune_and_patch(model, 1, 2, mode="hadamard")
    with pytest.raises(ValueError, match=r"scale has shape \(48,\); expected \(64,\)"):
        prune_and_patch(model, 1, 2, torch.ones(48))
    # Nothing was changed by the failed calls.
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert getattr(model.config, "linearpatch", None) is None
    prune_and_patch(model, 1, 2)
    with pytest.raises(ValueError, match="already pruned"):
        prune_and_patch(model, 0, 1)
    with pytest.raises(ValueError, match="pass the \\*ForCausalLM model"):
        prune_and_patch(tiny_model("llama", num_layers=4).model, 1, 2)
    with pytest.raises(ValueError, match="expected exactly one patched layer"):
        get_patch(tiny_model("llama", num_layers=4))


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32))
    with pytest.raises(ValueError, match="unsupported model: model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        prune_and_patch(gpt2, 0, 1)


def test_patched_model_compiles_without_graph_breaks():
    model = tiny_model("llama", num_layers=4, hidden_size=64, seed=9)
    ids = random_batches(1, seqlen=12, seed=9)[0]
    prune_and_patch(model, 1, 2, random_scales(64, seed=9))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) <= 1e-6


def test_scale_gradient_through_the_model_matches_fp64():
    """Distillation trains the patch inside the frozen model: d loss / d s equals the reference's."""
    model = tiny_model("qwen2", num_layers=5, hidden_size=48, seed=10)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=10, seed=10)[0]
    s = random_scales(48, seed=10)
    prune_and_patch(model, 2, 4, s)
    for p in model.parameters():
        p.requires_grad_(False)
    patch = get_patch(model)
    patch.scale.requires_grad_(True)
    weights = torch.randn(1, 10, 96, generator=torch.Generator().manual_seed(0))
    (model(ids).logits * weights).sum().backward()

    s64 = s.double().requires_grad_()
    h = hadamard_matrix(48, dtype=torch.float64)
    layers = unpruned.model.layers
    hooks = [layers[j].register_forward_hook(lambda m, args, kwargs, out: args[0], with_kwargs=True) for j in (2, 3)]
    hooks.append(layers[1].register_forward_hook(lambda m, args, out: (out.double() @ h @ torch.diag(s64) @ h.T).float()))
    try:
        (unpruned(ids, use_cache=False).logits * weights).sum().backward()
    finally:
        for handle in hooks:
            handle.remove()
    assert rel_err(patch.scale.grad, s64.grad) <= 1e-4


def test_non_finite_or_non_positive_scales_are_refused_naming_the_cut():
    """prune_and_patch refuses before touching the model, set_patch before swapping the patch."""
    model = tiny_model("llama", num_layers=6, hidden_size=64, seed=2)
    s = random_scales(64, seed=2)
    for bad_value, message in [(float("nan"), "has 1 non-finite values"), (float("inf"), "has 1 non-finite values"),
                               (0.0, "is <= 0 at channel 4"), (-1.0, "is <= 0 at channel 4")]:
        bad = s.clone()
        bad[4] = bad_value
        with pytest.raises(ValueError, match=r"prune_and_patch: cut \[1, 3\): the rotate patch's scale " + message):
            prune_and_patch(model, 1, 3, bad)
        with pytest.raises(ValueError, match=r"prune_and_patch: cut \[4, 5\): the diag patch's scale"):
            prune_and_patch(model, blocks=[(1, 2), (4, 5)], scales=[s, bad], mode="diag")
    w = torch.eye(64)
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"prune_and_patch: cut \[1, 3\): the dense patch's weight has 1 non-finite"):
        prune_and_patch(model, 1, 3, mode="dense", weight=w)
    assert len(model.model.layers) == 6 and getattr(model.config, "linearpatch", None) is None  # untouched

    prune_and_patch(model, blocks=[(1, 2), (4, 5)], scales=[s, s])
    good = get_patch(model, cut=1)
    bad = s.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match=r"set_patch: cut \[4, 5\): the diag patch's scale has 1 non-finite values "
                                         r"\(1 NaN, 0 infinite\) at channel 0"):
        set_patch(model, LinearPatch(64, "diag", scale=bad), cut=1)
    assert get_patch(model, cut=1) is good and pruning_cuts(model.config.linearpatch)[1]["mode"] == "rotate"

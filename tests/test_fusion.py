"""The fused cut: ``prune_and_patch(..., fuse=True)`` runs the last residual add before the cut, the
patch and the next layer's RMSNorm as ``linearpatch::patch_add_rmsnorm``.

References: the unpruned model with forward hooks (the removed layers return their input, the
residual stream at the cut is multiplied by a dense fp64 ``P``), as in test_surgery, and the unfused
model (itself checked against that reference there). Every fused test also checks that the fused op
really ran (and the separate patch op did not), so a silent fallback cannot pass for fusion.
"""

import copy
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, cache_name, cache_of, random_batches, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from linearpatch_kernels import LinearPatch, hadamard_matrix, load_pruned, save_pruned
from linearpatch_kernels.model.surgery import (
    CutHandoff,
    FusedCutNextLayer,
    PatchedDecoderLayer,
    fusion_status,
    get_patch,
    patch_disabled,
    prune_and_patch,
    pruning_cuts,
    set_fused,
    set_patch,
    set_patch_enabled,
)

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_scales(d, seed=0):
    return torch.rand(d, generator=torch.Generator().manual_seed(seed)) + 0.5


def rotate_p64(s):
    h = hadamard_matrix(s.numel(), dtype=torch.float64)
    return (h * s.double()) @ h.T


def reference_logits(unpruned, ids, start, end, p64):
    """Logits of ``unpruned`` with layers [start, end) skipped and ``h @ p64`` (fp64) after layer start-1."""
    layers = unpruned.model.layers

    def skip(module, args, out):
        return args[0]

    def patch_output(module, args, out):
        return (out.double() @ p64).to(out.dtype)

    handles = [layers[j].register_forward_hook(skip) for j in range(start, end)]
    handles.append(layers[start - 1].register_forward_hook(patch_output))
    try:
        with torch.no_grad():
            return unpruned(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched (custom ops included, as one call each)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, name):
        return sum(1 for op in self.ops if op.startswith(name))


def pruned_pair(family, start, end, s, dtype=torch.float32, num_layers=6, seed=0):
    """(unpruned, fused, unfused) copies of one tiny model."""
    model = tiny_model(family, num_layers=num_layers, hidden_size=s.numel(), dtype=dtype, seed=seed)
    fused = prune_and_patch(copy.deepcopy(model), start, end, s)
    unfused = prune_and_patch(copy.deepcopy(model), start, end, s, fuse=False)
    return model, fused, unfused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_match_unfused_and_reference(family, dtype):
    s = random_scales(64, seed=1)
    unpruned, fused, unfused = pruned_pair(family, 2, 4, s, dtype=dtype)
    assert fusion_status(fused) == (True, None)
    assert isinstance(fused.model.layers[1], PatchedDecoderLayer) and fused.model.layers[1].fused
    assert isinstance(fused.model.layers[2], FusedCutNextLayer)
    ids = random_batches(1, seqlen=16, seed=2)[0]
    with torch.no_grad(), OpRecorder() as rec:
        logits = fused(ids, use_cache=False).logits
    assert rec.count("linearpatch.patch_add_rmsnorm") == 1 and rec.count("linearpatch.hadamard_patch") == 0
    assert logits.dtype == dtype
    with torch.no_grad(), OpRecorder() as rec:
        plain = unfused(ids, use_cache=False).logits
    assert rec.count("linearpatch.patch_add_rmsnorm") == 0 and rec.count("linearpatch.hadamard_patch") == 1
    assert rel_err(logits, plain) <= TOL[dtype]
    assert rel_err(logits, reference_logits(unpruned, ids, 2, 4, rotate_p64(s))) <= TOL[dtype]


def test_next_norm_eps_and_autocast():
    """The fused op takes eps from the next layer's input_layernorm; under bf16 autocast (fp32 stream,
    bf16 MLP output) the residual add promotes to fp32 as in eager PyTorch."""
    s = random_scales(64, seed=6)
    model = tiny_model("llama", num_layers=5, hidden_size=64, seed=6)
    model.model.layers[3].input_layernorm.variance_epsilon = 0.5  # large enough to change the logits
    ids = random_batches(1, seqlen=12, seed=6)[0]
    fused = prune_and_patch(copy.deepcopy(model), 1, 3, s)
    unfused = prune_and_patch(copy.deepcopy(model), 1, 3, s, fuse=False)
    assert fusion_status(fused).fused
    expected = reference_logits(model, ids, 1, 3, rotate_p64(s))
    with torch.no_grad():
        assert rel_err(fused(ids).logits, expected) <= 1e-5
        default_eps = copy.deepcopy(fused)  # slot 1 is old layer 3, after the cut
        default_eps.model.layers[1].layer.input_layernorm.variance_epsilon = 1e-6
        assert rel_err(default_eps(ids).logits, expected) > 1e-3  # so the eps used above was 0.5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with OpRecorder() as rec:
                a = fused(ids).logits
            b = unfused(ids).logits
    assert rec.count("linearpatch.patch_add_rmsnorm") == 1
    # bf16 tolerance: the model's own matmuls run in bf16 under autocast (the ops themselves compute
    # in fp32 inside; tests/test_ops.py::test_fp32_math_under_autocast checks that to 1e-5).
    assert rel_err(a, b) <= 2e-2 and rel_err(a, expected) <= 5e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache_matches_without(family):
    _, fused, _ = pruned_pair(family, 2, 5, random_scales(64, seed=3), seed=5)
    assert fusion_status(fused).fused
    prompt = random_batches(1, seqlen=6, seed=5)[0]
    with torch.no_grad():
        cached = fused.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = fused.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
        assert cached.shape == (1, 16) and torch.equal(cached, uncached)
        full = fused(cached, use_cache=False).logits
        out = fused(cached[:, :9], use_cache=True)
        steps = [out.logits]
        for t in range(9, 16):
            out = fused(cached[:, t:t + 1], **cache_of(fused, out), use_cache=True)
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_disabled_patch_gives_plain_pruning():
    s = random_scales(64, seed=4)
    unpruned, fused, _ = pruned_pair("qwen3", 3, 5, s, seed=3)
    ids = random_batches(1, seqlen=16, seed=4)[0]
    plain = reference_logits(unpruned, ids, 3, 5, torch.eye(64, dtype=torch.float64))
    patched = reference_logits(unpruned, ids, 3, 5, rotate_p64(s))
    assert rel_err(plain, patched) > 1e-2  # the patch matters
    with torch.no_grad():
        set_patch_enabled(fused, False)
        assert fusion_status(fused).fused  # the structure stays; the epilogue skips the patch
        assert rel_err(fused(ids).logits, plain) <= 1e-5
        set_patch_enabled(fused, True)
        assert rel_err(fused(ids).logits, patched) <= 1e-5
        with patch_disabled(fused):
            assert rel_err(fused(ids).logits, plain) <= 1e-5


def test_fallbacks_are_reported_and_correct():
    s = random_scales(48, seed=5)
    ids = random_batches(1, seqlen=10, seed=5)[0]
    cases = [  # (start, end, mode, fuse, expected reason)
        (0, 2, "rotate", True, "no layer before the cut"),
        (3, 5, "rotate", True, "no layer after the cut"),
        (2, 3, "diag", True, "the patch is mode 'diag'"),
        (2, 3, "rotate", False, "fuse=False"),
    ]
    model = tiny_model("llama", num_layers=5, hidden_size=48, seed=6)
    for start, end, mode, fuse, reason in cases:
        pruned = prune_and_patch(copy.deepcopy(model), start, end, s, mode=mode, fuse=fuse)
        status = fusion_status(pruned)
        assert not status.fused and reason in status.reason
        assert not any(isinstance(layer, FusedCutNextLayer) for layer in pruned.model.layers)
        wrapper = next(layer for layer in pruned.model.layers if isinstance(layer, PatchedDecoderLayer))
        if wrapper.position == "output":
            assert f"fused=False ({status.reason})" in repr(pruned)
        with torch.no_grad(), OpRecorder() as rec:
            logits = pruned(ids).logits
        assert rec.count("linearpatch.patch_add_rmsnorm") == 0
        if start > 0:
            p64 = torch.diag(s.double()) if mode == "diag" else rotate_p64(s)
            assert rel_err(logits, reference_logits(model, ids, start, end, p64)) <= 1e-5
    fused = prune_and_patch(copy.deepcopy(model), 2, 3, s)
    assert "fused=True" in repr(fused) and "FusedCutNextLayer(" in repr(fused)


def test_unknown_layer_class_and_accelerate_hooks_fall_back(tmp_path):
    from accelerate import dispatch_model
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class CustomLayer(LlamaDecoderLayer):  # same submodules, but its forward could be anything
        pass

    model = tiny_model("llama", num_layers=4, hidden_size=64, seed=7)
    custom = copy.deepcopy(model)
    old = custom.model.layers[3]
    new = CustomLayer(custom.config, 3)
    new.load_state_dict(old.state_dict())
    custom.model.layers[3] = new
    prune_and_patch(custom, 1, 3, random_scales(64))
    assert not fusion_status(custom).fused and "CustomLayer" in fusion_status(custom).reason

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("cpu" if i < 2 else "disk") for i in range(4)})
    dispatched = dispatch_model(copy.deepcopy(model), device_map=device_map, main_device="cpu",
                                offload_dir=str(tmp_path))
    s = random_scales(64, seed=7)
    prune_and_patch(dispatched, 1, 2, s)
    assert not fusion_status(dispatched).fused and "accelerate hooks" in fusion_status(dispatched).reason
    ids = random_batches(1, seqlen=8, seed=7)[0]
    with torch.no_grad():
        logits = dispatched(ids).logits
    assert rel_err(logits, reference_logits(model, ids, 1, 2, rotate_p64(s))) <= 1e-5


def test_set_patch_dense_unfuses_and_rotate_refuses():
    s = random_scales(48, seed=8)
    unpruned, fused, _ = pruned_pair("mistral", 2, 3, s, num_layers=5, seed=8)
    ids = random_batches(1, seqlen=10, seed=8)[0]
    with torch.no_grad():
        before = fused(ids).logits
        dense = LinearPatch(48, "dense", weight=get_patch(fused).dense_matrix())
        set_patch(fused, dense)
        status = fusion_status(fused)
        assert not status.fused and "'dense'" in status.reason
        assert get_patch(fused) is dense and pruning_cuts(fused.config.linearpatch)[0]["mode"] == "dense"
        assert not any(isinstance(layer, FusedCutNextLayer) for layer in fused.model.layers)
        with OpRecorder() as rec:
            assert rel_err(fused(ids).logits, before) <= 1e-5
        assert rec.count("linearpatch.patch_add_rmsnorm") == 0
        s2 = random_scales(48, seed=9)
        set_patch(fused, LinearPatch(48, "rotate", scale=s2))
        assert fusion_status(fused).fused and isinstance(fused.model.layers[2], FusedCutNextLayer)
        with OpRecorder() as rec:
            logits = fused(ids).logits
        assert rec.count("linearpatch.patch_add_rmsnorm") == 1
        assert rel_err(logits, reference_logits(unpruned, ids, 2, 3, rotate_p64(s2))) <= 1e-5
        # Turning fusion off and on by hand keeps the logits.
        assert set_fused(fused, False) == (False, "fuse=False")
        assert rel_err(fused(ids).logits, logits) <= 1e-5
        assert set_fused(fused, True) == (True, None)
        assert rel_err(fused(ids).logits, logits) <= 1e-5
    with pytest.raises(TypeError, match="fuse must be a bool"):
        set_fused(fused, 1)
    with pytest.raises(TypeError, match="fuse must be a bool"):
        prune_and_patch(tiny_model("llama", num_layers=4), 1, 2, fuse="yes")


def test_output_hidden_states_fused():
    """Same length and entries as unfused, except hidden_states[start]: the patched stream there."""
    s = random_scales(64, seed=10)
    _, fused, unfused = pruned_pair("qwen2", 1, 3, s, seed=10)  # layer 0 feeds the cut: the first hooked layer
    ids = random_batches(1, seqlen=12, seed=10)[0]
    with torch.no_grad():
        a = fused(ids, output_hidden_states=True, use_cache=False)
        b = unfused(ids, output_hidden_states=True, use_cache=False)
    assert len(a.hidden_states) == len(b.hidden_states) == 5
    assert torch.equal(a.hidden_states[0], fused.model.embed_tokens(ids))
    for i in (0, 2, 3, 4):
        assert rel_err(a.hidden_states[i], b.hidden_states[i]) <= 1e-5, i
    expected = (b.hidden_states[1].double() @ rotate_p64(s)).float()
    assert rel_err(a.hidden_states[1], expected) <= 1e-5
    assert rel_err(a.logits, b.logits) <= 1e-5
    with torch.no_grad():  # the capture hooks stay installed; plain calls are unaffected
        assert rel_err(fused(ids, use_cache=False).logits, b.logits) <= 1e-5


def test_hooks_that_fusion_cannot_honour_raise():
    _, fused, _ = pruned_pair("llama", 2, 3, random_scales(64), num_layers=4)
    ids = random_batches(1, seqlen=6)[0]
    before, after = fused.model.layers[1].layer, fused.model.layers[2].layer
    handle = before.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(RuntimeError, match="forward pre-hooks of its own.*fuse=False"):
        fused(ids)
    handle.remove()
    handle = after.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(RuntimeError, match="returned a replacement output.*fuse=False"):
        fused(ids)
    handle.remove()
    # Hooks on the slots themselves run as usual; the one after the cut is handed the CutHandoff.
    seen = []
    handle = fused.model.layers[2].register_forward_pre_hook(lambda m, args: seen.append(type(args[0])))
    with torch.no_grad():
        fused(ids)
    handle.remove()
    assert seen == [CutHandoff]


def test_deepcopy_and_dtype_moves_keep_the_norm_link():
    _, fused, unfused = pruned_pair("qwen3", 2, 4, random_scales(64, seed=11), seed=11)
    twin = copy.deepcopy(fused)
    wrapper, after = twin.model.layers[1], twin.model.layers[2]
    assert wrapper._next_norm[0] is after.layer.input_layernorm
    ids = random_batches(1, seqlen=8, seed=11)[0]
    with torch.no_grad():
        after.layer.input_layernorm.weight.mul_(1.5)  # the fused epilogue reads the live weight
        unfused.model.layers[2].input_layernorm.weight.mul_(1.5)
        assert rel_err(twin(ids).logits, unfused(ids).logits) <= 1e-5
        twin.to(torch.bfloat16)
        unfused.to(torch.bfloat16)
        assert get_patch(twin).scale.dtype == torch.float32
        assert rel_err(twin(ids).logits, unfused(ids).logits) <= 1e-2
    assert "model.layers.1.patch.scale" in twin.state_dict()
    assert not any("_next_norm" in k for k in twin.state_dict())


def test_scale_gradient_through_the_fused_cut():
    """Distilling the scales trains through the fused op's autograd: same gradient as unfused."""
    s = random_scales(48, seed=12)
    _, fused, unfused = pruned_pair("qwen2", 2, 4, s, num_layers=5, seed=12)
    ids = random_batches(1, seqlen=10, seed=12)[0]
    weights = torch.randn(1, 10, 96, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (fused, unfused):
        for p in model.parameters():
            p.requires_grad_(False)
        get_patch(model).scale.requires_grad_(True)
        (model(ids).logits * weights).sum().backward()
        grads.append(get_patch(model).scale.grad)
    assert rel_err(grads[0], grads[1]) <= 1e-4 and grads[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_round_trip(tmp_path, dtype):
    s = random_scales(64, seed=13)
    _, fused, unfused = pruned_pair("qwen2", 2, 4, s, dtype=dtype, seed=13)
    ids = random_batches(1, seqlen=12, seed=13)[0]
    save_pruned(fused, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.2.input_layernorm.weight" in names
    # The plain Hugging Face layout, plus the patch as the checkpoint's own named tensor
    assert not any(".layer." in n or ".patch." in n for n in names)
    assert "model.linearpatch.0.scale" in names
    assert fusion_status(fused).fused and isinstance(fused.model.layers[2], FusedCutNextLayer)  # restored
    loaded = load_pruned(tmp_path)
    assert fusion_status(loaded).fused
    loaded_plain = load_pruned(tmp_path, fuse=False)
    assert fusion_status(loaded_plain) == (False, "fuse=False")
    with torch.no_grad():
        expected = fused(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert rel_err(loaded_plain(ids).logits, unfused(ids).logits) <= TOL[dtype]
    save_pruned(unfused, tmp_path / "unfused")
    assert fusion_status(load_pruned(tmp_path / "unfused")).fused  # loading re-applies fusion by default


def test_static_cache_decode_has_no_host_syncs():
    """What CUDA-graph capture needs, checked on the CPU: a fused decode step with a static cache
    runs no op that reads a tensor back to the host, and gives the logits of a full forward."""
    from transformers import StaticCache

    _, fused, _ = pruned_pair("qwen2", 2, 4, random_scales(64, seed=14), seed=14)
    ids = random_batches(1, seqlen=12, seed=14)[0]
    cache = StaticCache(config=fused.config, max_cache_len=16)
    with torch.no_grad():
        full = fused(ids, use_cache=False).logits
        steps = [fused(ids[:, :8], **{cache_name(fused): cache}, use_cache=True).logits]
        for t in range(8, 12):
            with OpRecorder() as rec:
                steps.append(fused(ids[:, t:t + 1], **{cache_name(fused): cache}, use_cache=True).logits)
            syncs = [op for op in rec.ops if any(k in op for k in ("_local_scalar_dense", "nonzero", "is_nonzero"))]
            assert syncs == [] and rec.count("linearpatch.patch_add_rmsnorm") == 1
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    s = random_scales(64, seed=15)
    _, fused, unfused = pruned_pair("llama", 1, 2, s, num_layers=3, seed=15)
    ids = random_batches(1, seqlen=12, seed=15)[0]
    with torch.no_grad():
        eager = {name: m(ids, use_cache=False).logits for name, m in (("fused", fused), ("unfused", unfused))}
        for name, model in (("fused", fused), ("unfused", unfused)):
            compiled = torch.compile(model, backend="inductor", fullgraph=True)  # fullgraph: a break is an error
            assert rel_err(compiled(ids, use_cache=False).logits, eager[name]) <= 1e-5, name
    assert rel_err(eager["fused"], eager["unfused"]) <= 1e-5


# ------------------------------------------------------------------------------------------------
# GPU: CUDA-graph capture of the decode step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CUDA-graph capture of a decode step); none here")


def _decode_kwargs(model, cache, position: int, device) -> dict:
    """Keyword arguments of one decode step at ``position`` (the cache's name and ``cache_position``
    differ across transformers 5.x releases)."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True,
              "position_ids": torch.tensor([[position]], device=device)}
    if "cache_position" in params:
        kwargs["cache_position"] = torch.tensor([position], device=device)
    return kwargs


@needs_cuda
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_cuda_graph_decode_step_replays(fuse):
    """A decode step with a static cache captured in a ``torch.cuda.CUDAGraph``; each replay reads
    the token and position from static buffers and appends to the cache in place."""
    from transformers import StaticCache

    device = torch.device("cuda")
    model = tiny_model("qwen2", num_layers=6, hidden_size=64, seed=16)
    prune_and_patch(model, 2, 4, random_scales(64, seed=16), fuse=fuse)
    model.to(device)
    assert fusion_status(model).fused == fuse
    ids = random_batches(1, seqlen=16, seed=16)[0].to(device)
    cache = StaticCache(config=model.config, max_cache_len=24)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefill = _decode_kwargs(model, cache, 0, device)
        prefill["position_ids"] = torch.arange(8, device=device)[None]
        if "cache_position" in prefill:
            prefill["cache_position"] = torch.arange(8, device=device)
        steps = [model(ids[:, :8], **prefill).logits]
        static_ids = ids[:, 8:9].clone()
        static = _decode_kwargs(model, cache, 8, device)  # its position tensors are the static buffers

        def set_position(t):
            static["position_ids"].fill_(t)
            if "cache_position" in static:
                static["cache_position"].fill_(t)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager step (position 8) as the warm-up before capture
            steps.append(model(static_ids, **static).logits.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the cache does not advance
            static_out = model(static_ids, **static).logits
        for t in range(9, 16):
            static_ids.copy_(ids[:, t:t + 1])
            set_position(t)
            graph.replay()
            steps.append(static_out.clone())
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-4


@needs_cuda
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_reduce_overhead_compile_decode_uses_cuda_graphs(fuse):
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    torch._dynamo.reset()
    counters.clear()
    device = torch.device("cuda")
    model = tiny_model("llama", num_layers=6, hidden_size=64, seed=17)
    prune_and_patch(model, 2, 4, random_scales(64, seed=17), fuse=fuse)
    model.to(device)
    ids = random_batches(1, seqlen=16, seed=17)[0].to(device)
    cache = StaticCache(config=model.config, max_cache_len=24)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefill = _decode_kwargs(model, cache, 0, device)
        prefill["position_ids"] = torch.arange(8, device=device)[None]
        if "cache_position" in prefill:
            prefill["cache_position"] = torch.arange(8, device=device)
        steps = [model(ids[:, :8], **prefill).logits]
        for t in range(8, 16):
            steps.append(step(ids[:, t:t + 1], **_decode_kwargs(model, cache, t, device)).logits.clone())
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-4


# ------------------------------------------------------------------------------------------------
# The benchmark runs (smoke test: tiny sizes, few rounds)


def test_bench_epilogue_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_epilogue", REPO / "benchmarks" / "bench_epilogue.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--tokens", "1", "64", "--d", "48", "64", "--repeats", "3",
                         "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    timed = [r for r in rows if "median_us" in r]
    assert {(r["d"], r["tokens"], r["provider"]) for r in timed} == {
        (d, t, p) for d in (48, 64) for t in (1, 64) for p in ("fused-torch", "separate-torch")}
    for r in timed:
        assert r["median_us"] > 0 and r["rel_error_h"] <= 1e-5 and r["rel_error_normed"] <= 1e-5
    assert all(r["speedup"] > 0 for r in timed if r["provider"].startswith("fused"))

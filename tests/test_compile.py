"""torch.compile traces through the ops without graph breaks (CPU, Inductor)."""

import torch
import torch._dynamo

import linearpatch_kernels as lp
from reference import llm_like, positive_scales


def _patched_block(x, s, w):
    h = torch.nn.functional.linear(x, w)
    h = lp.hadamard_patch(h, s) + x
    return lp.hadamard_transform(h, 0.5).relu()


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    d = 576
    x = llm_like(16, d)
    s = positive_scales(d)
    w = torch.randn(d, d) / d**0.5
    with lp.use_backend("torch"):
        eager = _patched_block(x, s, w)
        compiled = torch.compile(_patched_block, fullgraph=True, backend="inductor")
        out = compiled(x, s, w)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-5)
    # A second shape exercises the fake kernel under dynamic shapes.
    x2 = llm_like(5, d, seed=4)
    with lp.use_backend("torch"):
        assert torch.allclose(compiled(x2, s, w), _patched_block(x2, s, w), rtol=1e-5, atol=1e-5)


def test_compile_backward_matches_eager():
    torch._dynamo.reset()
    d = 64
    x = llm_like(8, d).requires_grad_()
    s = positive_scales(d).requires_grad_()

    def loss(x, s):
        return (lp.hadamard_patch(x, s) ** 2).sum()

    loss(x, s).backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    torch.compile(loss, fullgraph=True)(x, s).backward()
    assert torch.allclose(x.grad, gx, rtol=1e-5, atol=1e-4)
    assert torch.allclose(s.grad, gs, rtol=1e-5, atol=1e-3)


def test_no_graph_break_reported():
    torch._dynamo.reset()
    d = 64
    explanation = torch._dynamo.explain(_patched_block)(llm_like(4, d), positive_scales(d), torch.randn(d, d))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

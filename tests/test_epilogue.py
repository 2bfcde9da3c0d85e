"""The fused interface epilogue op (residual add + patch + RMSNorm) against fp64 and the unfused ops."""

import pytest
import torch

import linearpatch_kernels as lp
from linearpatch_kernels.backends import available_backends
from reference import llm_like, positive_scales, reference_patch, rel_err

BACKENDS = [b for b in available_backends("cpu") if b != "cuda"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
EPS = 1e-5


@pytest.fixture(params=BACKENDS)
def backend(request):
    with lp.use_backend(request.param):
        yield request.param


def reference_epilogue(residual, update, scale, weight, eps=EPS):
    h = reference_patch(residual.double() + update.double(), scale)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return h, n


def inputs(rows, d, dtype, seed=0):
    residual = llm_like(rows, d, dtype, seed=seed)
    update = llm_like(rows, d, dtype, seed=seed + 1) * 0.1
    weight = (0.5 + torch.rand(d, generator=torch.Generator().manual_seed(seed + 2))).to(dtype)
    return residual, update, positive_scales(d, seed=seed + 3), weight


@pytest.mark.parametrize("d", [64, 576, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_fp64_reference(backend, d, dtype):
    r, u, s, w = inputs(19, d, dtype)
    h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    h_ref, n_ref = reference_epilogue(r, u, s, w)
    assert h.dtype == n.dtype == dtype and h.shape == n.shape == r.shape
    assert rel_err(h, h_ref) <= TOLERANCE[dtype]
    assert rel_err(n, n_ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_unfused_sequence(backend, dtype):
    # What a Llama layer boundary computes without fusion: add in the model dtype, patch, then
    # LlamaRMSNorm (fp32 statistics, weight times the normalised state cast back to the dtype).
    d = 576
    r, u, s, w = inputs(8, d, dtype, seed=5)
    h_unfused = lp.hadamard_patch(r + u, s)
    hf = h_unfused.float()
    n_unfused = w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    assert rel_err(h, h_unfused.double()) <= TOLERANCE[dtype]
    assert rel_err(n, n_unfused.double()) <= TOLERANCE[dtype]


def test_leading_shape_non_contiguous_and_empty(backend):
    d = 64
    r = llm_like(12, d).view(3, 4, d).transpose(0, 1)
    u = torch.randn(4, 3, d)
    s, w = positive_scales(d), torch.rand(d) + 0.5
    h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
    h_ref, n_ref = reference_epilogue(r, u, s, w)
    assert rel_err(h, h_ref) <= 1e-5 and rel_err(n, n_ref) <= 1e-5
    empty = torch.zeros(0, d)
    h0, n0 = lp.patch_add_rmsnorm(empty, empty, s, w, EPS)
    assert h0.shape == n0.shape == (0, d)


def test_gradcheck_fp64():
    d = 12
    r = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    s = (0.5 + torch.rand(d, dtype=torch.float64)).requires_grad_()
    w = (0.5 + torch.rand(d, dtype=torch.float64)).requires_grad_()
    with lp.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: lp.patch_add_rmsnorm(*a, EPS), (r, u, s, w))


def test_gradients_match_dense_formulation(backend):
    d = 64
    r, u, s, w = inputs(6, d, torch.float32, seed=9)
    leaves = [t.clone().requires_grad_() for t in (r, u, s, w)]
    gh, gn = torch.randn(6, d, dtype=torch.float64), torch.randn(6, d, dtype=torch.float64)
    h, n = lp.patch_add_rmsnorm(*leaves, EPS)
    ((h.double() * gh).sum() + (n.double() * gn).sum()).backward()

    ref_leaves = [t.detach().double().requires_grad_() for t in (r, u, s, w)]
    hm = lp.hadamard_matrix(d)
    h_ref = ((ref_leaves[0] + ref_leaves[1]) @ hm * ref_leaves[2]) @ hm.T
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + EPS) * ref_leaves[3]
    ((h_ref * gh).sum() + (n_ref * gn).sum()).backward()
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= 1e-4


def test_opcheck(backend):
    r, u, s, w = inputs(5, 64, torch.float32, seed=2)
    args = (r.requires_grad_(), u.requires_grad_(), s.requires_grad_(), w.requires_grad_(), EPS)
    torch.library.opcheck(torch.ops.linearpatch.patch_add_rmsnorm.default, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    r, u, s, w = inputs(4, 64, torch.float32, seed=3)

    def f(r, u):
        h, n = lp.patch_add_rmsnorm(r, u, s, w, EPS)
        return h * 2 + n

    with lp.use_backend("torch"):
        assert torch.allclose(torch.compile(f, fullgraph=True)(r, u), f(r, u), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    r, u, s, w = inputs(2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"update .* must match residual"):
        lp.patch_add_rmsnorm(r, u[:1], s, w)
    with pytest.raises(ValueError, match=r"must match residual"):
        lp.patch_add_rmsnorm(r, u.double(), s, w)
    with pytest.raises(ValueError, match=r"norm_weight has shape \(32,\); expected \(64,\)"):
        lp.patch_add_rmsnorm(r, u, s, w[:32])
    with pytest.raises(TypeError, match=r"norm_weight has dtype torch.int64"):
        lp.patch_add_rmsnorm(r, u, s, torch.ones(64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"scale has shape"):
        lp.patch_add_rmsnorm(r, u, s[:10], w)
    with pytest.raises(ValueError, match=r"eps must be a non-negative float"):
        lp.patch_add_rmsnorm(r, u, s, w, -1.0)
    with pytest.raises(ValueError, match=r"last dim of x is 100"):
        lp.patch_add_rmsnorm(torch.zeros(2, 100), torch.zeros(2, 100), torch.ones(100), torch.ones(100))

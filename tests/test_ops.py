"""The linearpatch ops on every backend that runs here, against fp64 dense references."""

import math

import pytest
import torch

import linearpatch_kernels as lp
from linearpatch_kernels.backends import available_backends
from reference import llm_like, positive_scales, reference_patch, reference_transform, rel_err

BACKENDS = [b for b in available_backends("cpu") if b != "cuda"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(params=BACKENDS)
def backend(request):
    with lp.use_backend(request.param):
        yield request.param


def test_triton_runs_here_under_the_interpreter():
    # The Triton kernels must really be exercised by this suite on a CPU-only machine.
    assert "triton" in BACKENDS or torch.cuda.is_available()


@pytest.mark.parametrize("d", [64, 576, 1024, 4096, 12, 5120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_matches_fp64_reference(backend, d, dtype):
    x = llm_like(33, d, dtype)
    s = positive_scales(d)
    y = lp.hadamard_patch(x, s)
    assert y.dtype == dtype and y.shape == x.shape
    # Reference from the same (rounded) input, so only the op's own error is measured.
    assert rel_err(y, reference_patch(x, s)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("d", [64, 576, 1024, 4096, 12, 5120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_transform_matches_fp64_reference(backend, d, dtype):
    x = llm_like(17, d, dtype, seed=3)
    scale = d**-0.5
    y = lp.hadamard_transform(x, scale)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, reference_transform(x, scale)) <= TOLERANCE[dtype]


def test_transform_default_scale_is_unnormalized(backend):
    x = torch.randn(4, 256)
    assert rel_err(lp.hadamard_transform(x), reference_transform(x, 1.0)) <= 1e-6


def test_fp64_on_torch_backend_is_exact_to_rounding():
    x = llm_like(9, 576, torch.float64)
    s = positive_scales(576).double()
    with lp.use_backend("torch"):
        assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) <= 1e-13
        assert rel_err(lp.hadamard_transform(x, 0.25), reference_transform(x, 0.25)) <= 1e-13


def test_patch_with_unit_scale_is_identity(backend):
    x = llm_like(5, 576)
    assert rel_err(lp.hadamard_patch(x, torch.ones(576)), x.double()) <= 1e-6


def test_leading_shapes_and_non_contiguous_input(backend):
    d = 576
    base = llm_like(2 * 3 * 5, d).view(2, 3, 5, d)
    s = positive_scales(d)
    for x in (base, base.transpose(0, 2), base[:, ::2], base.reshape(6, 5, d)[:, :, :].transpose(0, 1)):
        assert not x.is_contiguous() or x is base
        y = lp.hadamard_patch(x, s)
        assert y.shape == x.shape
        assert rel_err(y, reference_patch(x, s)) <= 1e-5
        assert rel_err(lp.hadamard_transform(x, 2.0), reference_transform(x, 2.0)) <= 1e-5
    # Strided last dim too.
    wide = llm_like(4, 2 * d)
    x = wide[:, ::2]
    assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) <= 1e-5


def test_one_dimensional_input(backend):
    x = llm_like(1, 64)[0]
    s = positive_scales(64)
    assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) <= 1e-5


def test_input_is_not_modified(backend):
    x = llm_like(8, 64)
    before = x.clone()
    lp.hadamard_patch(x, positive_scales(64))
    lp.hadamard_transform(x, 3.0)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 576), (0,) + (2048,)])
def test_zero_rows_give_empty_result(backend, shape):
    x = torch.randn(shape)
    for y in (lp.hadamard_patch(x, torch.ones(shape[-1])), lp.hadamard_transform(x)):
        assert y.shape == x.shape and y.numel() == 0 and y.dtype == x.dtype


def test_nan_and_inf_propagate(backend):
    d = 64
    x = torch.randn(3, d)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    y = lp.hadamard_patch(x, positive_scales(d))
    assert torch.isnan(y[0]).all()  # one NaN channel reaches every output channel through H
    assert (~torch.isfinite(y[1])).all()
    assert torch.isfinite(y[2]).all()
    t = lp.hadamard_transform(x)
    assert torch.isnan(t[0]).all() and torch.isfinite(t[2]).all()


# ---------------------------------------------------------------------------------------------
# Autograd


def test_gradcheck_fp64_patch():
    x = torch.randn(3, 2, 12, dtype=torch.float64, requires_grad=True)
    s = (0.5 + torch.rand(12, dtype=torch.float64)).requires_grad_()
    with lp.use_backend("torch"):
        assert torch.autograd.gradcheck(lp.hadamard_patch, (x, s))
        x64 = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
        s64 = (0.5 + torch.rand(32, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(lp.hadamard_patch, (x64, s64))


def test_gradcheck_fp64_transform():
    x = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    with lp.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: lp.hadamard_transform(t, 0.3), (x,))


@pytest.mark.parametrize("d", [64, 576])
def test_gradients_match_dense_formulation(backend, d):
    x = llm_like(6, d).requires_grad_()
    s = positive_scales(d).requires_grad_()
    w = torch.randn(6, d, dtype=torch.float64)
    (lp.hadamard_patch(x, s).double() * w).sum().backward()

    # Plain fp64 formulation: y = x H diag(s) H^T with a dense H.
    h = lp.hadamard_matrix(d)
    x64 = x.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ((x64 @ h * s64) @ h.T * w).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5
    assert rel_err(s.grad, s64.grad) <= 1e-5
    assert s.grad.dtype == torch.float32


def test_transform_gradient_matches_dense(backend):
    x = torch.randn(4, 576, requires_grad=True)
    w = torch.randn(4, 576)
    (lp.hadamard_transform(x, 0.1) * w).sum().backward()
    expected = (w.double() @ lp.hadamard_matrix(576, normalized=False).T) * 0.1
    assert rel_err(x.grad, expected) <= 1e-5


def test_bf16_gradient_of_scale_is_fp32(backend):
    x = llm_like(8, 64, torch.bfloat16).requires_grad_()
    s = positive_scales(64).requires_grad_()
    lp.hadamard_patch(x, s).float().sum().backward()
    assert s.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("d", [576, 1024])
def test_bf16_gradient_of_scale_matches_fp64(backend, d):
    # grad_s = sum_tokens (x H) * (grad_y H) computed in fp32: transforming x and grad_y in bf16 first
    # would put a ~2**-9 relative error on every product (~1e-3 on the sum, far over this tolerance).
    x = llm_like(64, d, torch.bfloat16, seed=5).requires_grad_()
    s = positive_scales(d).requires_grad_()
    w = torch.randn(64, d, generator=torch.Generator().manual_seed(6))
    (lp.hadamard_patch(x, s).float() * w).sum().backward()
    h = lp.hadamard_matrix(d)
    g64 = w.to(torch.bfloat16).double()  # the bf16 grad_y the op receives
    expected = ((x.detach().double() @ h) * (g64 @ h)).sum(0)
    assert rel_err(s.grad, expected) <= 2e-5


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration, AOT dispatch


@pytest.mark.parametrize("d", [64, 576])
def test_opcheck_patch(backend, d):
    x = llm_like(5, d).requires_grad_()
    s = positive_scales(d).requires_grad_()
    torch.library.opcheck(torch.ops.linearpatch.hadamard_patch.default, (x, s))
    torch.library.opcheck(torch.ops.linearpatch.hadamard_patch.default, (x.detach().bfloat16(), s.detach()))


@pytest.mark.parametrize("d", [64, 576])
def test_opcheck_transform(backend, d):
    x = llm_like(5, d).requires_grad_()
    torch.library.opcheck(torch.ops.linearpatch.hadamard_transform.default, (x, 0.5))
    torch.library.opcheck(torch.ops.linearpatch.hadamard_transform.default, (x.detach().half(),), {"scale": 2.0})


# ---------------------------------------------------------------------------------------------
# Bad input: each gets a clear error naming what was wrong and what is accepted.


def test_unsupported_hidden_size():
    with pytest.raises(ValueError, match=r"last dim of x is 100.*nearest supported"):
        lp.hadamard_patch(torch.randn(2, 100), torch.ones(100))
    with pytest.raises(ValueError, match=r"last dim of x is 4100"):
        lp.hadamard_transform(torch.randn(2, 4100))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_float_x_is_type_error(dtype):
    x = torch.zeros(2, 64, dtype=dtype)
    with pytest.raises(TypeError, match=r"accepted: float32, float16 or bfloat16"):
        lp.hadamard_patch(x, torch.ones(64))
    with pytest.raises(TypeError, match=str(dtype)):
        lp.hadamard_transform(x)


def test_zero_width_last_axis():
    with pytest.raises(ValueError, match=r"last dim of x .* is 0"):
        lp.hadamard_patch(torch.zeros(3, 0), torch.ones(0))
    with pytest.raises(ValueError, match=r"is 0"):
        lp.hadamard_transform(torch.zeros(3, 0))


def test_zero_dim_x():
    with pytest.raises(ValueError, match=r"0-d"):
        lp.hadamard_transform(torch.tensor(1.0))


def test_scale_wrong_length():
    with pytest.raises(ValueError, match=r"scale has shape \(32,\); expected \(64,\)"):
        lp.hadamard_patch(torch.randn(2, 64), torch.ones(32))
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        lp.hadamard_patch(torch.randn(2, 64), torch.ones(1, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_scale_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"scale has dtype .* must be float32"):
        lp.hadamard_patch(torch.randn(2, 64), torch.ones(64, dtype=dtype))


def test_scale_on_another_device():
    with pytest.raises(ValueError, match=r"scale is on meta but x is on cpu"):
        lp.hadamard_patch(torch.randn(2, 64), torch.ones(64, device="meta"))


def test_scale_not_a_tensor():
    with pytest.raises(TypeError, match=r"scale must be a torch.Tensor"):
        lp.hadamard_patch(torch.randn(2, 64), [1.0] * 64)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        lp.hadamard_transform([1.0, 2.0])


@pytest.mark.parametrize("scale", ["a", "2", None, True, 1j, [0.5], torch.ones(3), torch.tensor(True)])
def test_transform_scale_that_is_not_a_real_number(scale):
    """hadamard_transform's scale is one real number; anything else is named (float("a")'s own message,
    "could not convert string to float", said nothing about which argument)."""
    with pytest.raises(TypeError, match=r"hadamard_transform: scale must be a real number \(a float or an int, e.g. "
                                        r"d \*\* -0.5 for the orthonormal transform\), got "):
        lp.hadamard_transform(torch.randn(2, 64), scale)


def test_transform_scale_forms_that_are_numbers():
    import numpy as np

    x = torch.randn(2, 64)
    want = lp.hadamard_transform(x, 0.125)
    for scale in (0.125, np.float32(0.125), torch.tensor(0.125), torch.tensor([0.125])):
        assert torch.equal(lp.hadamard_transform(x, scale), want)
    assert torch.equal(lp.hadamard_transform(x, 2), lp.hadamard_transform(x, 2.0))
    assert torch.equal(lp.hadamard_transform(x, torch.tensor(2)), lp.hadamard_transform(x, 2.0))


def test_float64_scale_accepted_only_with_float64_x():
    x = torch.randn(2, 64, dtype=torch.float64)
    s = torch.ones(64, dtype=torch.float64)
    assert torch.allclose(lp.hadamard_patch(x, s), x)


def test_meta_tensors_give_shapes_without_data():
    x = torch.empty(7, 3, 576, device="meta", dtype=torch.bfloat16)
    y = lp.hadamard_patch(x, torch.ones(576, device="meta"))
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"


def test_scale_argument_math_matches_definition():
    # hadamard_patch == transform(s * transform(x) / d): the definition in unnormalized terms.
    d = 576
    x = llm_like(4, d)
    s = positive_scales(d)
    two_step = lp.hadamard_transform(lp.hadamard_transform(x, 1 / math.sqrt(d)) * s, 1 / math.sqrt(d))
    assert rel_err(lp.hadamard_patch(x, s), two_step.double()) <= 1e-5


def test_fp32_math_under_autocast(backend):
    # Autocast must not turn the kernels' internal matmuls into bf16 ones.
    d = 576
    x = llm_like(16, d)
    s = positive_scales(d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lp.hadamard_patch(x, s)
        t = lp.hadamard_transform(x, d**-0.5)
        h, n = lp.patch_add_rmsnorm(x, x, s, torch.ones(d))
    assert y.dtype == torch.float32
    assert rel_err(y, reference_patch(x, s)) <= 1e-5
    assert rel_err(t, reference_transform(x, d**-0.5)) <= 1e-5
    assert rel_err(h, reference_patch(2 * x.double(), s)) <= 1e-5

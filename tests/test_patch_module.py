"""LinearPatch (the nn.Module) against fp64 formulations of y = h . P written out in the test."""

import pytest
import torch

from linearpatch_kernels import LinearPatch, hadamard_matrix
from linearpatch_kernels.model.patch import check_patch_values


def sylvester_orthonormal(d: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix built here from its recursion, independent of the package, / sqrt(d)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def reference_rotate(d: int, s: torch.Tensor) -> torch.Tensor:
    h = sylvester_orthonormal(d) if d & (d - 1) == 0 else hadamard_matrix(d, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    return h @ torch.diag(s.double()) @ h.T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_rotate_matches_fp64_dense(d, dtype, tol):
    g = torch.Generator().manual_seed(d)
    s = torch.rand(d, generator=g) + 0.5
    x = torch.randn(2, 5, d, generator=g).to(dtype)
    patch = LinearPatch(d, "rotate", scale=s)
    y = patch(x)
    assert y.dtype == dtype and y.shape == x.shape
    expected = x.double() @ reference_rotate(d, s)
    assert rel_err(y, expected) <= tol
    # dense_matrix() is the P the module applies, in fp32.
    p = patch.dense_matrix()
    assert p.dtype == torch.float32 and p.shape == (d, d)
    assert rel_err(p, reference_rotate(d, s)) <= 1e-6


def test_diag_and_dense_match_fp64():
    d = 48
    g = torch.Generator().manual_seed(0)
    s = torch.rand(d, generator=g) + 0.5
    w = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(7, d, generator=g).to(torch.bfloat16)
    y_diag = LinearPatch(d, "diag", scale=s)(x)
    y_dense = LinearPatch(d, "dense", weight=w)(x)
    assert y_diag.dtype == y_dense.dtype == torch.bfloat16
    assert rel_err(y_diag, x.double() * s.double()) <= 1e-2
    assert rel_err(y_dense, x.double() @ w.double()) <= 1e-2
    x32 = x.float()
    assert rel_err(LinearPatch(d, "dense", weight=w)(x32), x32.double() @ w.double()) <= 1e-6
    assert torch.equal(LinearPatch(d, "diag", scale=s).dense_matrix(), torch.diag(s))
    assert torch.equal(LinearPatch(d, "dense", weight=w).dense_matrix(), w)


@pytest.mark.parametrize("mode", ["rotate", "diag", "dense"])
def test_defaults_are_identity_and_disabled_is_identity(mode):
    d = 64
    x = torch.randn(4, d)
    patch = LinearPatch(d, mode)
    assert torch.allclose(patch(x), x, atol=1e-6)
    assert torch.allclose(patch.dense_matrix(), torch.eye(d), atol=1e-6)
    if mode != "dense":
        patch.scale.data.mul_(3.0)
    else:
        patch.weight.data.mul_(3.0)
    assert torch.allclose(patch(x), 3 * x, atol=1e-5)
    patch.enabled = False
    assert patch(x) is x
    assert "enabled=False" in repr(patch)


def test_parameters_stay_fp32_through_dtype_casts():
    d = 64
    s = torch.rand(d) + 0.5
    w = torch.randn(d, d)
    model = torch.nn.Sequential(torch.nn.Linear(d, d), LinearPatch(d, "rotate", scale=s), LinearPatch(d, "dense", weight=w))
    model.half()
    assert model[0].weight.dtype == torch.float16
    assert model[1].scale.dtype == torch.float32 and torch.equal(model[1].scale.data, s)
    assert model[2].weight.dtype == torch.float32 and torch.equal(model[2].weight.data, w)
    model.to(torch.bfloat16)
    model.to(dtype=torch.float16)
    model.to("cpu", torch.bfloat16)
    assert torch.equal(model[1].scale.data, s) and model[1].scale.dtype == torch.float32
    assert isinstance(model[1].scale, torch.nn.Parameter) and model[1].scale.requires_grad
    # A pure device move still happens (meta is the device every machine has besides the CPU).
    model.to("meta")
    assert model[1].scale.device.type == "meta" and model[1].scale.dtype == torch.float32
    # The state dict holds the fp32 tensors, so save/load keeps them exact.
    p = LinearPatch(d, "rotate", scale=s).half()
    assert p.state_dict()["scale"].dtype == torch.float32


def test_repr_shows_mode_and_size():
    assert repr(LinearPatch(48, "diag")) == "LinearPatch(mode=diag, hidden_size=48)"
    assert "mode=rotate, hidden_size=64" in repr(LinearPatch(64))


def test_scale_gradient_matches_fp64_autograd():
    """The scales are trainable (distillation): d loss / d s through the kernel equals fp64 autograd."""
    d = 48
    g = torch.Generator().manual_seed(3)
    s = torch.rand(d, generator=g) + 0.5
    x = torch.randn(6, d, generator=g)
    target = torch.randn(6, d, generator=g)
    patch = LinearPatch(d, "rotate", scale=s)
    ((patch(x) - target) ** 2).sum().backward()
    s64 = s.double().requires_grad_()
    h = hadamard_matrix(d, dtype=torch.float64)
    ((x.double() @ h @ torch.diag(s64) @ h.T - target.double()) ** 2).sum().backward()
    assert rel_err(patch.scale.grad, s64.grad) <= 1e-5


def test_compiles_without_graph_breaks():
    d = 48
    s = torch.rand(d) + 0.5
    x = torch.randn(3, d)
    patch = LinearPatch(d, "rotate", scale=s)
    compiled = torch.compile(patch, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), x.double() @ reference_rotate(d, s)) <= 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mode 'scale'.*rotate, diag, dense"):
        LinearPatch(64, "scale")
    with pytest.raises(ValueError, match=r"scale has shape \(32,\); expected \(64,\)"):
        LinearPatch(64, "rotate", scale=torch.ones(32))
    with pytest.raises(ValueError, match=r"weight has shape \(64,\); expected \(64, 64\)"):
        LinearPatch(64, "dense", weight=torch.ones(64))
    with pytest.raises(ValueError, match="takes weight, not scale"):
        LinearPatch(64, "dense", scale=torch.ones(64))
    with pytest.raises(ValueError, match="takes scale, not weight"):
        LinearPatch(64, "rotate", weight=torch.eye(64))
    with pytest.raises(TypeError, match="scale has dtype torch.int64"):
        LinearPatch(64, "diag", scale=torch.ones(64, dtype=torch.int64))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        LinearPatch(64, "diag", scale=[1.0] * 64)
    with pytest.raises(TypeError, match="hidden_size must be a positive int"):
        LinearPatch(0)
    with pytest.raises(ValueError, match="hidden_size 50 has no Hadamard matrix.*nearest supported"):
        LinearPatch(50, "rotate")
    assert LinearPatch(50, "diag").hidden_size == 50  # no Hadamard matrix needed without rotation
    with pytest.raises(ValueError, match="input has last dim 32; expected hidden size 64"):
        LinearPatch(64, "diag")(torch.ones(2, 32))


@pytest.mark.parametrize("mode", ["rotate", "diag"])
def test_check_patch_values_names_the_bad_scales(mode):
    """Finite scales > 0 pass; NaN, infinities, 0 and negative values are refused with where they are."""
    s = torch.rand(64) + 0.5
    patch = LinearPatch(64, mode, scale=s)
    assert check_patch_values(patch, "here") is patch
    for values, message in [
        ({3: float("nan")}, r"here: the %s patch's scale has 1 non-finite values \(1 NaN, 0 infinite\) at channel 3;"),
        ({3: float("inf"), 9: float("-inf"), 11: float("nan")},
         r"has 3 non-finite values \(1 NaN, 2 infinite\) at channels 3, 9, 11;"),
        ({c: float("nan") for c in range(10)}, r"at channels 0, 1, 2, 3, 4, 5 and 4 more;"),
        ({7: 0.0}, r"here: the %s patch's scale is <= 0 at channel 7 \(smallest 0\); scales are ratios"),
        ({7: -0.25, 40: 0.0}, r"scale is <= 0 at channels 7, 40 \(smallest -0.25\)"),
    ]:
        bad = s.clone()
        for c, v in values.items():
            bad[c] = v
        with pytest.raises(ValueError, match=message.replace("%s", mode)):
            check_patch_values(LinearPatch(64, mode, scale=bad), "here")
    with torch.no_grad():  # a patch changed after it was built is checked as it is now
        patch.scale[0] = float("nan")
    with pytest.raises(ValueError, match="at channel 0;"):
        check_patch_values(patch, "here")


def test_check_patch_values_on_a_dense_patch():
    """A dense P may hold zeros and negative entries (an orthogonal matrix does), never NaN or infinity."""
    w = torch.linalg.qr(torch.randn(48, 48))[0]
    w[0, 0] = 0.0
    assert check_patch_values(LinearPatch(48, "dense", weight=w), "here").mode == "dense"
    w[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"here: the dense patch's weight has 1 non-finite values \(0 NaN, 1 infinite\) "
                                         r"at flat index 101;"):
        check_patch_values(LinearPatch(48, "dense", weight=w), "here")

"""Backend selection: automatic choice, LINEARPATCH_BACKEND, use_backend, and clear errors."""

import pytest
import torch

import linearpatch_kernels as lp
from linearpatch_kernels.backends import available_backends, select_backend
from reference import positive_scales, reference_patch, rel_err


def _cpu_default() -> str:
    """The C++ CPU kernels where they are built (tests/test_cpu_backend.py checks that they are in
    an installed package), else the torch backend."""
    return "cpu" if "cpu" in available_backends("cpu") else "torch"


def test_cpu_default_is_the_cpp_kernels_else_torch(monkeypatch):
    monkeypatch.delenv("LINEARPATCH_BACKEND", raising=False)
    assert select_backend(torch.randn(2, 64)).NAME == _cpu_default()
    assert available_backends("cpu")[0] == _cpu_default()
    assert select_backend(torch.randn(2, 64, dtype=torch.float64)).NAME == "torch"


def test_use_backend_forces_and_restores(monkeypatch):
    monkeypatch.delenv("LINEARPATCH_BACKEND", raising=False)
    x = torch.randn(2, 64)
    with lp.use_backend("triton"):
        assert select_backend(x).NAME == "triton"
        with lp.use_backend("torch"):
            assert select_backend(x).NAME == "torch"
        assert select_backend(x).NAME == "triton"
    assert select_backend(x).NAME == _cpu_default()


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("LINEARPATCH_BACKEND", "triton")
    x = torch.randn(3, 576)
    assert select_backend(x).NAME == "triton"
    s = positive_scales(576)
    assert rel_err(lp.hadamard_patch(x, s), reference_patch(x, s)) <= 1e-5
    # use_backend wins over the environment.
    with lp.use_backend("torch"):
        assert select_backend(x).NAME == "torch"


def test_unknown_backend_name_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown linearpatch backend 'cutlass'; choose one of torch, triton, cuda"):
        with lp.use_backend("cutlass"):
            pass
    monkeypatch.setenv("LINEARPATCH_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"LINEARPATCH_BACKEND='fast'"):
        lp.hadamard_patch(torch.randn(2, 64), torch.ones(64))


def test_unavailable_backend_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("the CUDA backend may be available on this machine")
    with lp.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' was requested but is not available for cpu tensors"):
            lp.hadamard_patch(torch.randn(2, 64), torch.ones(64))


def test_forced_backend_that_cannot_take_the_input():
    x = torch.randn(2, 64, dtype=torch.float64)
    with lp.use_backend("triton"):
        with pytest.raises(ValueError, match=r"backend 'triton' cannot run this input: .*float64"):
            lp.hadamard_patch(x, torch.ones(64, dtype=torch.float64))


def test_automatic_choice_sends_fp64_to_torch():
    x = torch.randn(2, 64, dtype=torch.float64)
    assert select_backend(x).NAME == "torch"

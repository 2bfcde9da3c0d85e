"""The eager host path of the public ops: the cached backend choice and the direct kernel call.

``lp.hadamard_patch`` & co. call the cached kernel directly when nothing needs the op machinery, and
take ``torch.ops.linearpatch.*`` otherwise; both must give the reference's answer, honour a forced
backend at once (and fail loudly where it cannot run), and step aside for autograd, tracing and
dispatch modes. Speed is in ``benchmarks/bench_host.py``, not here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linearpatch_kernels as lp
from linearpatch_kernels import backends
from linearpatch_kernels.backends import gpu_limits, torch_backend
from reference import factored_patch_reference, factored_reference, llm_like, positive_scales, rel_err


@pytest.fixture
def spy(monkeypatch):
    """Counts the torch backend's kernel calls (plans made afresh, so that they bind the spy)."""
    calls = {"hadamard_patch": 0, "hadamard_transform": 0, "patch_add_rmsnorm": 0}
    for op in calls:
        original = getattr(torch_backend, op)

        def counted(*args, _op=op, _original=original):
            calls[_op] += 1
            return _original(*args)
        monkeypatch.setattr(torch_backend, op, counted)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.clear_plans()
    yield calls
    backends.clear_plans()


def _auto_is_torch() -> bool:
    return lp.available_backends("cpu")[0] == "torch"


def test_direct_calls_match_the_reference_and_the_op():
    d = 576
    x, u = llm_like(5, d), llm_like(5, d, seed=3)
    s, w = positive_scales(d), torch.rand(d) + 0.5
    with torch.no_grad():
        y = lp.hadamard_patch(x, s)
        assert rel_err(y, factored_patch_reference(x, s)) <= 1e-5
        assert torch.equal(y, torch.ops.linearpatch.hadamard_patch(x, s))
        t = lp.hadamard_transform(x, 0.5)
        assert torch.equal(t, torch.ops.linearpatch.hadamard_transform(x, 0.5))
        assert rel_err(t, factored_reference(x, 0.5)) <= 1e-5
        h, n = lp.patch_add_rmsnorm(x, u, s, w, 1e-5)
        h2, n2 = torch.ops.linearpatch.patch_add_rmsnorm(x, u, s, w, 1e-5)
        assert torch.equal(h, h2) and torch.equal(n, n2)
        # nn.Parameter scales (the patch module's) take the direct call too.
        assert torch.equal(lp.hadamard_patch(x, torch.nn.Parameter(s)), y)


def test_a_change_of_the_forced_backend_is_seen_at_once(spy, monkeypatch):
    x, s = llm_like(3, 64), positive_scales(64)
    with torch.no_grad():
        lp.hadamard_patch(x, s)
        auto = spy["hadamard_patch"]
        assert auto == (1 if _auto_is_torch() else 0)
        with lp.use_backend("torch"):
            lp.hadamard_patch(x, s)
            lp.hadamard_transform(x)
        assert spy["hadamard_patch"] == auto + 1 and spy["hadamard_transform"] == 1
        lp.hadamard_patch(x, s)  # back to the automatic choice
        assert spy["hadamard_patch"] == auto + 1 + (1 if _auto_is_torch() else 0)
        monkeypatch.setenv(backends.ENV_VAR, "torch")
        lp.patch_add_rmsnorm(x, x, s, torch.ones(64))
        assert spy["patch_add_rmsnorm"] == 1
        monkeypatch.setenv(backends.ENV_VAR, "fast")
        with pytest.raises(ValueError, match=r"LINEARPATCH_BACKEND='fast'"):
            lp.hadamard_patch(x, s)


def test_a_forced_backend_that_cannot_run_the_input_fails_on_every_call():
    x, s = torch.randn(2, 64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    with torch.no_grad(), lp.use_backend("triton"):
        for _ in range(2):  # errors are never cached as a choice
            with pytest.raises(ValueError, match=r"backend 'triton' cannot run this input: .*float64"):
                lp.hadamard_transform(x)
    if not torch.cuda.is_available():
        with torch.no_grad(), lp.use_backend("cuda"):
            for _ in range(2):
                with pytest.raises(RuntimeError, match=r"backend 'cuda' was requested but is not available"):
                    lp.hadamard_patch(torch.randn(2, 64), torch.ones(64))


def test_a_change_of_the_gpu_limit_tables_makes_a_new_choice(monkeypatch):
    x = llm_like(2, 64)
    backends.clear_plans()
    lp.hadamard_transform(x)
    made = len(backends._plans)
    version = gpu_limits.limits_version()
    monkeypatch.setitem(gpu_limits.SHARED_MEMORY_PER_BLOCK, (8, 6), 40_960)
    assert gpu_limits.limits_version() != version
    lp.hadamard_transform(x)
    assert len(backends._plans) == made + 1


def test_the_checks_still_run_on_the_direct_path():
    x = torch.randn(2, 576)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"scale has shape \(575,\); expected \(576,\)"):
            lp.hadamard_patch(x, torch.ones(575))
        with pytest.raises(TypeError, match=r"scale has dtype torch.float16"):
            lp.hadamard_patch(x, torch.ones(576, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"last dim of x is 577"):
            lp.hadamard_patch(torch.randn(2, 577), torch.ones(577))
        with pytest.raises(ValueError, match=r"update .* must match residual"):
            lp.patch_add_rmsnorm(x, torch.randn(3, 576), torch.ones(576), torch.ones(576))
        with pytest.raises(ValueError, match=r"eps must be a non-negative float"):
            lp.patch_add_rmsnorm(x, x, torch.ones(576), torch.ones(576), eps=-1.0)
        assert lp.hadamard_patch(torch.empty(0, 576), torch.ones(576)).shape == (0, 576)


def test_autograd_tracing_and_modes_take_the_op():
    d = 64
    x = llm_like(3, d).requires_grad_()
    s = positive_scales(d)
    y = lp.hadamard_patch(x, s)
    assert y.grad_fn is not None  # recorded by the op's autograd
    y.sum().backward()
    assert x.grad is not None and rel_err(x.grad, factored_patch_reference(torch.ones(3, d), s)) <= 1e-5

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder() as recorder:
        lp.hadamard_patch(x.detach(), s)
        lp.hadamard_transform(x.detach())
    assert "linearpatch.hadamard_patch.default" in recorder.ops
    assert "linearpatch.hadamard_transform.default" in recorder.ops

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(4, d))
        out = lp.hadamard_patch(fake, mode.from_tensor(s))
    assert out.shape == (4, d)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lp.hadamard_patch(x.detach(), s)
    assert z.dtype == torch.float32 and rel_err(z, factored_patch_reference(x.detach(), s)) <= 1e-5

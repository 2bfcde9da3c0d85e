"""The over-correction guard: patches shrunk toward the identity, the factor chosen on held-out windows of
every domain, and the choice stored in the checkpoint's record.

References are plain PyTorch: the pruned model is a copy with its layers deleted and the patch applied
as the dense matrix ``(1 - a) I + a H diag(s) H^T`` (``H`` from ``hadamard_matrix``) by a forward hook;
losses are fp64 sums of ``-log softmax`` per token; the rule is applied by hand to those losses."""

import copy
import json
import math

import pytest
import torch
from test_evaluation import CHAR_VOCAB_SIZE, tiny_char_model

from linearpatch_kernels import hadamard_matrix, load_pruned, prune_and_patch, save_pruned
from linearpatch_kernels.model import LinearPatch, get_patches, patch_disabled
from linearpatch_kernels.model.shrinkage import (SHRINK_FACTORS, calibration_record, check_calibration_record,
                                                 choose_shrinkage, domain_losses, shrunk_patch)

D = 64


def sampled_windows(model, seed, count=2, seqlen=24):
    """Text the model itself writes (sampled at temperature 1): on it the dense model is good and a patch
    that distorts the stream is measurably worse, unlike on random tokens, where a random tiny model is
    so far off that almost any change "helps"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, CHAR_VOCAB_SIZE, (1, 1), generator=g)
        with torch.no_grad():
            while ids.shape[1] < seqlen:
                p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
                ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)[None]], 1)
        out.append(ids)
    return out


_WRITER = tiny_char_model(num_layers=6, seed=5)
DOMAINS = {"a": sampled_windows(_WRITER, 1), "b": sampled_windows(_WRITER, 2), "c": sampled_windows(_WRITER, 3)}


def dense_patch(mode, s, a):
    s = s.double()
    p = torch.diag(s) if mode == "diag" else hadamard_matrix(D).double() @ torch.diag(s) @ hadamard_matrix(D).double().T
    return (1 - a) * torch.eye(D, dtype=torch.float64) + a * p


def reference_losses(base, blocks, patches):
    """``{domain: mean NLL}`` of ``base`` with ``blocks`` deleted and ``patches[k]`` (a d x d fp64 matrix or
    None) applied to the output of the layer before cut ``k``."""
    model = copy.deepcopy(base)
    layers = model.model.layers
    hooks = []
    for (start, end), p in zip(blocks, patches):
        if p is not None:
            def hook(module, args, out, p=p):
                h = out if isinstance(out, torch.Tensor) else out[0]
                h = (h.double() @ p).to(h.dtype)
                return h if isinstance(out, torch.Tensor) else (h, *out[1:])
            hooks.append(layers[start - 1].register_forward_hook(hook))
    for start, end in sorted(blocks, reverse=True):
        del layers[start:end]
    out = {}
    with torch.no_grad():
        for domain, ws in DOMAINS.items():
            total, count = 0.0, 0
            for ids in ws:
                logits = model(input_ids=ids, use_cache=False).logits[0].double()
                logp = logits[:-1] - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)
                total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
                count += ids.shape[1] - 1
            out[domain] = total / count
    return out


def rule(losses):
    """The lowest mean loss among the factors that make no domain worse than factor 0 (ties: smaller)."""
    allowed = [a for a in losses if all(losses[a][d] <= losses[0.0][d] for d in losses[0.0])]
    return min(allowed, key=lambda a: (sum(losses[a].values()), a))


@pytest.mark.parametrize("mode", ["rotate", "diag", "dense"])
def test_shrunk_patch_is_the_interpolation_toward_identity(mode):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(D, generator=g) + 0.5
    if mode == "dense":
        w = torch.randn(D, D, generator=g) / 8
        patch = LinearPatch(D, mode="dense", weight=w)
        want_p = w.double()
    else:
        patch = LinearPatch(D, mode=mode, scale=s)
        want_p = dense_patch(mode, s, 1.0)
    x = torch.randn(5, D, generator=g)
    for a in (0.0, 0.3, 1.0):
        want = x.double() @ ((1 - a) * torch.eye(D, dtype=torch.float64) + a * want_p)
        got = shrunk_patch(patch, a)(x)
        assert got.dtype == x.dtype and shrunk_patch(patch, a).mode == mode
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"factor must be a number in \[0, 1\]"):
            shrunk_patch(patch, bad)


@pytest.mark.parametrize("mode", ["rotate", "diag"])
def test_choice_follows_the_rule_on_reference_losses(mode):
    base = tiny_char_model(num_layers=6, seed=5)
    g = torch.Generator().manual_seed(4)
    s = torch.exp(0.6 * torch.randn(D, generator=g))  # scales are > 0 (non-positive ones are refused)
    model = prune_and_patch(copy.deepcopy(base), 2, 4, s, mode=mode)
    [choice] = choose_shrinkage(model, DOMAINS)
    want = {a: reference_losses(base, [(2, 4)], [dense_patch(mode, s, a)]) for a in SHRINK_FACTORS}
    assert sorted(choice.losses) == list(SHRINK_FACTORS)
    for a in SHRINK_FACTORS:
        for domain in DOMAINS:
            assert choice.losses[a][domain] == pytest.approx(want[a][domain], rel=1e-5)
    assert choice.factor == rule(want)
    record = model.config.linearpatch["calibration"]
    assert record["estimator"] == "shrunk" and record["factors"] == [choice.factor]
    assert record["validation"] == {"domains": ["a", "b", "c"], "windows_per_domain": 2, "seqlen": 24}
    # The model keeps the chosen patch: s_a = 1 + a (s - 1).
    torch.testing.assert_close(get_patches(model)[0].scale, 1 + choice.factor * (s - 1))
    assert all(want[choice.factor][d] <= want[0.0][d] for d in DOMAINS)


def test_a_patch_that_only_hurts_gets_factor_zero():
    """Scales of e^(3 z), z standard normal, blow the rotated channels up and down by factors up to hundreds:
    every shrunk version still hurts every domain, so the guard keeps the unpatched cut (factor 0, s = 1:
    the identity) and the model is plain pruning."""
    base = tiny_char_model(num_layers=6, seed=5)
    s = torch.exp(3 * torch.randn(D, generator=torch.Generator().manual_seed(1)))
    model = prune_and_patch(copy.deepcopy(base), 2, 4, s, mode="rotate")
    want = {a: reference_losses(base, [(2, 4)], [dense_patch("rotate", s, a)]) for a in SHRINK_FACTORS}
    assert all(any(want[a][d] > want[0.0][d] for d in DOMAINS) for a in SHRINK_FACTORS if a > 0)
    [choice] = choose_shrinkage(model, DOMAINS)
    assert choice.factor == 0.0
    assert choice.worse_domains(1.0)
    torch.testing.assert_close(get_patches(model)[0].scale, torch.ones(D))
    with patch_disabled(model):
        plain = domain_losses(model, DOMAINS)
    assert domain_losses(model, DOMAINS) == pytest.approx(plain, rel=1e-6)


def test_several_cuts_are_chosen_in_order_and_never_end_worse():
    base = tiny_char_model(num_layers=8, seed=6)
    g = torch.Generator().manual_seed(9)
    blocks = [(1, 3), (5, 6)]
    scales = [torch.exp(0.5 * torch.randn(D, generator=g)), torch.exp(0.5 * torch.randn(D, generator=g))]
    model = prune_and_patch(copy.deepcopy(base), blocks=blocks, scales=scales, mode="rotate")
    first, second = choose_shrinkage(model, DOMAINS)
    # Cut 1 is tried with cut 2 unpatched; cut 2 with cut 1 at its chosen factor.
    want1 = {a: reference_losses(base, blocks, [dense_patch("rotate", scales[0], a), None]) for a in SHRINK_FACTORS}
    assert first.factor == rule(want1)
    p1 = dense_patch("rotate", scales[0], first.factor)
    want2 = {a: reference_losses(base, blocks, [p1, dense_patch("rotate", scales[1], a)]) for a in SHRINK_FACTORS}
    assert second.factor == rule(want2)
    for a in SHRINK_FACTORS:
        assert second.losses[a] == pytest.approx(want2[a], rel=1e-5)
    unpatched = reference_losses(base, blocks, [None, None])
    final = want2[second.factor]
    assert all(final[d] <= unpatched[d] + 1e-12 for d in DOMAINS)


def test_apply_false_leaves_the_papers_patches():
    base = tiny_char_model(num_layers=6, seed=5)
    s = torch.exp(0.6 * torch.randn(D, generator=torch.Generator().manual_seed(4)))
    model = prune_and_patch(copy.deepcopy(base), 2, 4, s)
    choose_shrinkage(model, DOMAINS, factors=(0.0, 1.0), apply=False)
    torch.testing.assert_close(get_patches(model)[0].scale, s)


@pytest.mark.parametrize("factors, message", [((0.5, 1.0), "include 0"), ((0.0, 2.0), r"lie in \[0, 1\]"),
                                              (("x",), "numbers in")])
def test_bad_factors_are_clear_errors(factors, message):
    model = prune_and_patch(tiny_char_model(num_layers=4), 1, 2, torch.ones(D))
    with pytest.raises(ValueError, match=message):
        choose_shrinkage(model, DOMAINS, factors=factors)
    with pytest.raises(ValueError, match="windows_by_domain"):
        choose_shrinkage(model, {"a": []})


def test_record_round_trip_and_checkpoints_without_it(tmp_path):
    base = tiny_char_model(num_layers=6, seed=5)
    model = prune_and_patch(copy.deepcopy(base), blocks=[(1, 2), (3, 5)], scales=[torch.ones(D), torch.ones(D)])
    record = calibration_record("shrunk", [0.5, 0.0], corpus="default mix", tokens=4096,
                                validation={"domains": ["a"], "windows_per_domain": 2, "seqlen": 24})
    model.config.linearpatch = {**model.config.linearpatch, "calibration": record}
    save_pruned(model, tmp_path / "with")
    on_disk = json.loads((tmp_path / "with" / "config.json").read_text())["linearpatch"]
    assert on_disk["calibration"] == record
    loaded = load_pruned(tmp_path / "with")
    assert loaded.config.linearpatch["calibration"] == record
    # The record survives a patch replacement (distillation replaces patches) and a second save.
    from linearpatch_kernels import set_patch
    set_patch(loaded, LinearPatch(D, scale=torch.ones(D)), cut=0)
    save_pruned(loaded, tmp_path / "again")
    assert load_pruned(tmp_path / "again").config.linearpatch["calibration"] == record

    plain = prune_and_patch(copy.deepcopy(base), 1, 3, torch.ones(D))
    save_pruned(plain, tmp_path / "without")
    assert "calibration" not in json.loads((tmp_path / "without" / "config.json").read_text())["linearpatch"]
    assert "calibration" not in load_pruned(tmp_path / "without").config.linearpatch


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(factors=[0.5]), "expected a list of 2 number"),
    (lambda c: c.update(factors=[0.5, 1.5]), "expected a list of 2 number"),
    (lambda c: c.update(estimator="magic"), "calibration estimator 'magic'; accepted: shrunk, paper"),
])
def test_tampered_record_is_refused(tmp_path, change, message):
    model = prune_and_patch(tiny_char_model(num_layers=6), blocks=[(1, 2), (3, 5)], scales=[torch.ones(D)] * 2)
    model.config.linearpatch = {**model.config.linearpatch,
                                "calibration": calibration_record("paper", [1.0, 1.0], corpus="x", tokens=1)}
    save_pruned(model, tmp_path / "ok")
    path = tmp_path / "ok" / "config.json"
    raw = json.loads(path.read_text())
    change(raw["linearpatch"]["calibration"])
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_pruned(tmp_path / "ok")
    bad = copy.deepcopy(raw["linearpatch"]["calibration"])
    with pytest.raises(ValueError, match=message):
        check_calibration_record(bad, 2)
    model.config.linearpatch = {**model.config.linearpatch, "calibration": bad}
    with pytest.raises(ValueError, match=message):
        save_pruned(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

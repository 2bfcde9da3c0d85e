"""A guard against over-correction: each cut's patch shrunk toward the identity by a factor chosen on
held-out text of every domain.

The paper's scales are a ratio of channel magnitudes, ``s = mean|X_end H| / mean|X_start H|``, measured
on the calibration text. On text whose activations differ they can over-correct: the patch then makes
that text's loss worse than plain pruning. Shrinking a patch toward the identity,

    P_a = (1 - a) I + a P,        i.e. s_a = 1 + a (s - 1) for a "rotate" or "diag" patch
                                  (H diag(s_a) H^T = (1 - a) I + a H diag(s) H^T since H H^T = I),

interpolates between plain pruning (``a = 0``) and the paper's patch (``a = 1``). The loss of each
domain is a smooth function of ``a``; the factor is chosen on held-out windows of every domain:

    L_d(a)  = mean next-token NLL (nats per token) of domain d's windows with the patch P_a
    allowed = { a in factors : L_d(a) <= L_d(0) for every domain d }        (0 is always allowed)
    a*      = argmin_{a in allowed} mean_d L_d(a)                          (ties: the smaller a)

so that, on these windows, no domain's loss is above the unpatched model's, and among such factors
the one with the best average loss is kept. Several cuts are chosen one at a time in layer order on
the fully pruned model: cut ``k`` is tried with the cuts before it at their chosen factors and the
cuts after it at ``a = 0`` (unpatched). Each step can keep ``a = 0``, which reproduces the model of
the step before, so the finished model's loss on every domain is at most plain pruning's (on the
windows the choice was made on). Cost: ``1 + num_cuts * (len(factors) - 1)`` passes over the windows,
each from the layer that carries the cut's patch on (the layers before it run once per window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..evaluation import window_nll
from .patch import LinearPatch
from .calibration import _Skipped
from .modeling_linearpatch import kept_slots
from .surgery import decoder_layers, get_patches, pruning_cuts, set_patch

__all__ = ["SHRINK_FACTORS", "SCALE_ESTIMATORS", "CutShrinkage", "calibration_record", "check_calibration_record",
           "choose_shrinkage", "domain_losses", "shrunk_patch"]

SHRINK_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0)
# "shrunk": the paper's scales shrunk by the factor chosen on held-out text (the default);
# "paper": the paper's estimator, unchanged (factor 1 at every cut).
SCALE_ESTIMATORS = ("shrunk", "paper")


def shrunk_patch(patch: LinearPatch, factor: float) -> LinearPatch:
    """``P_a = (1 - a) I + a P`` as a patch of the same mode (module docstring); ``a = factor`` in [0, 1]."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= float(factor) <= 1.0:
        raise ValueError(f"shrunk_patch: factor must be a number in [0, 1] (0: identity, 1: the patch), got {factor!r}")
    a = float(factor)
    if patch.mode == "dense":
        eye = torch.eye(patch.hidden_size, dtype=torch.float32, device=patch.weight.device)
        out = LinearPatch(patch.hidden_size, mode="dense", weight=(1.0 - a) * eye + a * patch.weight.detach())
    else:
        out = LinearPatch(patch.hidden_size, mode=patch.mode, scale=1.0 + a * (patch.scale.detach() - 1.0))
    out.enabled = patch.enabled
    return out


class _Replay:
    """Inside ``with``: the model's first ``first`` kept layers stand in by identities and the token
    embedding returns ``hidden``: the forward computes layers ``first ..`` from a stored input of layer
    ``first``, exactly what the full forward computes (the rotary embedding and causal mask depend only
    on the token positions). Trying several factors at cut ``k`` changes nothing before the layer that
    carries the patch, so that part runs once per window instead of once per factor."""

    def __init__(self, model: nn.Module, first: int, hidden: torch.Tensor):
        self.layers, self.first, self.hidden = decoder_layers(model), first, hidden
        self.embed = model.get_input_embeddings()
        self.saved, self.handle = [], None

    def __enter__(self):
        import transformers

        returns_tuple = int(transformers.__version__.split(".")[0]) < 5
        self.saved = [self.layers[i] for i in range(self.first)]
        for i in range(self.first):
            self.layers[i] = _Skipped(returns_tuple)
        self.handle = self.embed.register_forward_hook(lambda module, args, out: self.hidden)

    def __exit__(self, *exc):
        self.handle.remove()
        for i, layer in enumerate(self.saved):
            self.layers[i] = layer


@torch.no_grad()
def domain_losses(model: nn.Module, windows_by_domain: dict[str, list[torch.Tensor]], *, replay_from: int = 0,
                  cache: dict | None = None) -> dict[str, float]:
    """``{domain: mean next-token NLL per token}`` of ``model`` on each domain's ``[1, T]`` windows.

    ``replay_from=j`` with a ``cache`` dict: the input of kept layer ``j`` on each window is stored in
    ``cache`` on the first call and replayed on later ones (``_Replay``), for repeated evaluations of a
    model that changes only from layer ``j`` on. Where that input is not a plain tensor (a fused cut's
    hand-off), the window runs in full."""
    was_training = model.training
    model.eval()
    layers = decoder_layers(model)
    try:
        out = {}
        for domain, windows in windows_by_domain.items():
            nll, count = 0.0, 0
            for k, ids in enumerate(windows):
                key = (domain, k)
                if replay_from > 0 and cache is not None and isinstance(cache.get(key), torch.Tensor):
                    with _Replay(model, replay_from, cache[key]):
                        n, c = window_nll(model, ids)
                elif replay_from > 0 and cache is not None and key not in cache:
                    def capture(module, args, kwargs, key=key):
                        h = args[0] if args else kwargs.get("hidden_states")
                        cache[key] = h.detach() if isinstance(h, torch.Tensor) else None
                    handle = layers[replay_from].register_forward_pre_hook(capture, with_kwargs=True)
                    try:
                        n, c = window_nll(model, ids)
                    finally:
                        handle.remove()
                else:
                    n, c = window_nll(model, ids)
                nll, count = nll + n, count + c
            out[domain] = nll / count
        return out
    finally:
        model.train(was_training)


@dataclass
class CutShrinkage:
    """The choice at one cut: ``losses[a][domain]`` (mean NLL, nats per token) for every factor tried, the
    cuts before at their chosen factors and the cuts after unpatched; ``factor`` the one kept."""

    start: int
    end: int
    factor: float
    losses: dict[float, dict[str, float]] = field(default_factory=dict)

    def worse_domains(self, factor: float) -> list[str]:
        """Domains whose loss at ``factor`` is above the unpatched cut's (``factor = 0``)."""
        base = self.losses[0.0]
        return [d for d, loss in self.losses[factor].items() if loss > base[d]]

    def perplexities(self, factor: float) -> dict[str, float]:
        return {d: math.exp(loss) for d, loss in self.losses[factor].items()}


def _check_factors(factors) -> tuple[float, ...]:
    try:
        values = sorted({float(a) for a in factors})
    except (TypeError, ValueError):
        raise ValueError(f"choose_shrinkage: factors must be numbers in [0, 1], got {factors!r}") from None
    if not values or values[0] != 0.0 or not all(0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"choose_shrinkage: factors must lie in [0, 1] and include 0 (the unpatched cut), got "
                         f"{list(factors)!r}")
    return tuple(values)


def _pick(losses: dict[float, dict[str, float]]) -> float:
    """The rule of the module docstring: the lowest mean loss among the factors no domain loses by."""
    base = losses[0.0]
    allowed = [a for a, by_domain in losses.items() if all(by_domain[d] <= base[d] for d in base)]
    return min(allowed, key=lambda a: (sum(losses[a].values()) / len(base), a))


def choose_shrinkage(model: nn.Module, windows_by_domain: dict[str, list[torch.Tensor]],
                     factors=SHRINK_FACTORS, *, apply: bool = True, log=None) -> list[CutShrinkage]:
    """Choose each cut's shrinkage factor on ``windows_by_domain`` (module docstring) for a pruned model
    whose patches hold the paper's scales; with ``apply`` (the default) the model keeps the shrunk patches.
    ``log`` (a callable) gets one line per factor tried. Returns one ``CutShrinkage`` per cut, by start."""
    factors = _check_factors(factors)
    if not isinstance(windows_by_domain, dict) or not windows_by_domain or not all(
            isinstance(w, (list, tuple)) and w for w in windows_by_domain.values()):
        raise ValueError("choose_shrinkage: windows_by_domain must be a non-empty {domain: [windows]} dict with at least "
                         "one [1, seqlen] window per domain")
    cuts = pruning_cuts(model.config.linearpatch)
    paper = get_patches(model)
    chosen = [0.0] * len(paper)
    results = []
    try:
        for k in range(len(paper)):
            set_patch(model, shrunk_patch(paper[k], 0.0), cut=k)
        baseline = None
        for k, cut in enumerate(cuts):
            losses = {0.0: baseline} if baseline is not None else {}
            # Only layers from the one carrying cut k's patch on change with its factor: their input is
            # computed once per window (on the first factor tried) and replayed for the others.
            replay_from, cache = kept_slots(cuts)[k][0], {}
            for a in factors:
                if a in losses:
                    continue
                set_patch(model, shrunk_patch(paper[k], a), cut=k)
                losses[a] = domain_losses(model, windows_by_domain, replay_from=replay_from, cache=cache)
                if log is not None:
                    log(f"cut [{cut['start']}, {cut['end']}) factor {a:g}: " +
                        ", ".join(f"{d} {math.exp(v):.3f}" for d, v in losses[a].items()))
            chosen[k] = _pick(losses)
            set_patch(model, shrunk_patch(paper[k], chosen[k]), cut=k)
            baseline = losses[chosen[k]]
            results.append(CutShrinkage(cut["start"], cut["end"], chosen[k], dict(sorted(losses.items()))))
    finally:
        final = [shrunk_patch(p, a) for p, a in zip(paper, chosen)] if apply else paper
        for k, patch in enumerate(final):
            set_patch(model, patch, cut=k)
    if apply:  # the record says how the scales were made (save_pruned writes it into config.json)
        before = model.config.linearpatch.get("calibration") or {}
        windows = {d: len(w) for d, w in windows_by_domain.items()}
        model.config.linearpatch = {**model.config.linearpatch, "calibration": calibration_record(
            "shrunk", chosen, corpus=before.get("corpus"), tokens=before.get("tokens"),
            validation={"domains": list(windows), "windows_per_domain": max(windows.values()),
                        "seqlen": int(next(iter(windows_by_domain.values()))[0].shape[-1])})}
    return results


def calibration_record(estimator: str, factors: list[float], *, corpus: str | None = None, tokens: int | None = None,
                       validation: dict | None = None) -> dict:
    """The ``"calibration"`` entry of a pruning record: how the scales were made. ``factors``: one per cut
    (by start), 1.0 everywhere for the paper's estimator; ``corpus`` and ``tokens``: the calibration text
    and its token count, where known."""
    record = {"estimator": estimator, "factors": [float(a) for a in factors],
              "corpus": None if corpus is None else str(corpus), "tokens": None if tokens is None else int(tokens)}
    if validation is not None:
        record["validation"] = validation
    return record


def check_calibration_record(value, num_cuts: int, where: str = "linearpatch record") -> dict:
    """``value`` checked as a ``"calibration"`` entry for a model of ``num_cuts`` cuts; a clear
    ``ValueError`` otherwise. (The entry is optional: records written before it existed have none.)"""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'calibration' must be an object {{estimator, factors, corpus, tokens}}, got "
                         f"{type(value).__name__}")
    if value.get("estimator") not in SCALE_ESTIMATORS:
        raise ValueError(f"{where}: calibration estimator {value.get('estimator')!r}; accepted: "
                         f"{', '.join(SCALE_ESTIMATORS)}")
    factors = value.get("factors")
    if not isinstance(factors, list) or len(factors) != num_cuts or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in factors):
        raise ValueError(f"{where}: calibration factors {factors!r}; expected a list of {num_cuts} number(s) in [0, 1], "
                         "one per cut")
    return value

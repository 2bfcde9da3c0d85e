"""Calibration without training: which block to prune and the patch's scales.

Notation: a model with ``L`` decoder layers; ``X_i`` (``0 <= i <= L``) is the residual stream that
enters layer ``i`` on the calibration tokens (``X_0`` the token embeddings, ``X_L`` the output of the
last layer, i.e. the input of the final norm). ``X_i`` is read by a forward pre-hook on layer ``i``
(and on the final norm for ``X_L``), one forward pass of the base model per batch, no LM head.

Block scores, for every legal start ``i = 0 .. L - n`` of a block ``[i, i + n)`` of ``n`` layers,
with ``cos_t(a, b) = <a_t, b_t> / max(|a_t| |b_t|, 1e-12)`` per token ``t`` and ``mean_t`` over the
tokens of one batch, then ``mean_b`` over batches (each batch weighs the same):

* ``"cosine"``:          ``S_i = mean_b mean_t cos_t(X_i, X_{i+n})``; the largest ``S_i`` wins: the
  residual stream after the block is most like the one before it.
* ``"block_influence"``: ShortGPT's Block Influence of one layer, ``BI_j = 1 - mean_b mean_t
  cos_t(X_j, X_{j+1})``, summed over the layers of the block: ``S_i = sum_{j=i}^{i+n-1} BI_j``; the
  smallest ``S_i`` wins (the block whose layers, one by one, change the stream least). This is the
  contiguous-block version of ShortGPT's rule "remove the n layers of lowest BI". (``1 - cos``
  between the block's own input and output would only be ``1 - S_i`` of "cosine" and rank the same.)

Scales (``estimate_scales``) for the block ``[start, end)``: per batch ``b`` and channel ``c``,

    r_b[c] = mean_t |(X_end H)[t, c]| / mean_t |(X_start H)[t, c]|,      s = mean_b r_b

with ``H`` the orthonormal Hadamard matrix for mode "rotate" and the identity for mode "diag"; as in
the paper's code the per-batch ratios are averaged. A channel whose denominator is not above
``1e-30`` in a batch (no signal before the cut, so no scale can be read from it) gets ratio 1 in
that batch: the patch leaves it alone rather than dividing by zero.

All statistics are computed in fp32 from the captured hidden states and accumulated over batches in
fp64, whatever the model's dtype; results come back on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops import hadamard_transform
from .surgery import decoder_layers, module_execution_device

__all__ = ["BLOCK_METHODS", "best_block_start", "block_similarities", "estimate_scales", "select_block"]

BLOCK_METHODS = ("cosine", "block_influence")
SCALE_MODES = ("rotate", "diag")
_COS_EPS = 1e-12
_DENOMINATOR_FLOOR = 1e-30


class _StopForward(Exception):
    """Raised by a hook once every needed hidden state is captured, to skip the rest of the model."""


def _check_batches(batches, caller: str) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{caller}: batches must be a list of LongTensor input_ids of shape [1, seqlen], "
                        f"got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{caller}: batches is empty; pass at least one [1, seqlen] LongTensor of input_ids")
    for k, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{caller}: batches[{k}] must be a LongTensor of input_ids, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"{caller}: batches[{k}] has shape {tuple(ids.shape)}; expected [batch, seqlen] "
                             "with seqlen >= 1, e.g. [1, 2048]")
    return batches


def _residual_inputs(model: nn.Module, input_ids: torch.Tensor, wanted: list[int]) -> dict[int, torch.Tensor]:
    """``{i: X_i}`` for ``i`` in ``wanted`` on one batch (as captured: the model's dtype and device).

    Pre-hooks on ``layers[i]`` (and on the final norm for ``i == L``) read the hidden states; the
    forward stops right after the last one needed.
    """
    layers = decoder_layers(model)
    inner = model.model
    num_layers = len(layers)
    captured: dict[int, torch.Tensor] = {}
    last = max(wanted)

    def make_hook(i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[i] = h.detach()
            if i == last:
                raise _StopForward
        return hook

    targets = {i: (layers[i] if i < num_layers else inner.norm) for i in wanted}
    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in targets.items()]
    try:
        ids = input_ids.to(module_execution_device(inner.embed_tokens))
        inner(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in wanted if i not in captured]
    if missing:
        raise RuntimeError(f"the forward pass did not reach the inputs of layers {missing}")
    return captured


def _tokenwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine similarity of ``a`` and ``b`` (``[..., d]``), in fp32."""
    a = a.float()
    b = b.to(a.device).float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_COS_EPS)
    return cos.mean()


def _check_num_prune(num_prune, num_layers: int, caller: str) -> int:
    if isinstance(num_prune, bool) or not isinstance(num_prune, int):
        raise TypeError(f"{caller}: num_prune must be an int, got {num_prune!r}")
    if not 1 <= num_prune <= num_layers - 1:
        raise ValueError(f"{caller}: num_prune={num_prune} for a model of {num_layers} layers; "
                         f"accepted: 1 .. {num_layers - 1} (at least one layer must remain)")
    return num_prune


class _EvalMode:
    """Put the model in eval mode for calibration and restore its training flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def block_similarities(model: nn.Module, batches, num_prune: int, method: str = "cosine", *,
                       progress: bool = True) -> torch.Tensor:
    """Score of every block ``[i, i + num_prune)``, ``i = 0 .. L - num_prune``: a float64 CPU tensor
    of length ``L - num_prune + 1`` (formulas in the module docstring). For "cosine" higher means
    more similar; for "block_influence" lower means less influential. ``select_block`` picks from it.
    """
    if method not in BLOCK_METHODS:
        raise ValueError(f"block_similarities: unknown method {method!r}; accepted: {', '.join(BLOCK_METHODS)}")
    num_layers = len(decoder_layers(model))
    n = _check_num_prune(num_prune, num_layers, "block_similarities")
    batches = _check_batches(batches, "block_similarities")
    num_starts = num_layers - n + 1
    # "cosine" pairs X_i with X_{i+n}; "block_influence" needs each adjacent pair X_j, X_{j+1}.
    lag = n if method == "cosine" else 1
    pair_sums = torch.zeros(num_layers - lag + 1, dtype=torch.float64)
    with _EvalMode(model):
        for ids in tqdm(batches, desc=f"block scores ({method})", disable=not progress):
            xs = _residual_inputs(model, ids, list(range(num_layers + 1)))
            for i in range(num_layers - lag + 1):
                pair_sums[i] += _tokenwise_cosine(xs[i], xs[i + lag]).double().cpu()
            del xs
    pair_means = pair_sums / len(batches)
    if method == "cosine":
        return pair_means
    influence = 1.0 - pair_means  # BI_j for j = 0 .. L-1
    return torch.stack([influence[i:i + n].sum() for i in range(num_starts)])


def select_block(model: nn.Module, batches, num_prune: int, method: str = "cosine", *,
                 progress: bool = True) -> tuple[int, int]:
    """The block ``(start, end)`` of ``num_prune`` layers to remove: the most similar residual inputs
    for "cosine", the smallest summed Block Influence for "block_influence" (ties: the earliest)."""
    scores = block_similarities(model, batches, num_prune, method, progress=progress)
    start = best_block_start(scores, method)
    return start, start + num_prune


def best_block_start(scores: torch.Tensor, method: str) -> int:
    """The start that ``select_block`` picks from ``block_similarities`` scores: the largest cosine
    similarity, or the smallest summed Block Influence; ties go to the earliest block."""
    return int(torch.argmax(scores)) if method == "cosine" else int(torch.argmin(scores))


@torch.no_grad()
def estimate_scales(model: nn.Module, batches, start: int, end: int, mode: str = "rotate", *,
                    progress: bool = True) -> torch.Tensor:
    """The patch scales ``s`` (float32, shape ``[hidden_size]``, CPU) for removing ``[start, end)``
    from ``model`` (the unpruned model): ``mean_b mean_t|X_end H| / mean_t|X_start H|`` per channel,
    without ``H`` for mode "diag" (see the module docstring, zero denominators included)."""
    if mode not in SCALE_MODES:
        raise ValueError(f"estimate_scales: unknown mode {mode!r}; accepted: {', '.join(SCALE_MODES)} "
                         "(a dense patch is trained, not estimated)")
    num_layers = len(decoder_layers(model))
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"estimate_scales: {name} must be an int, got {v!r}")
    if not 0 <= start < end <= num_layers or end - start == num_layers:
        raise ValueError(f"estimate_scales: block [start={start}, end={end}) is not prunable in a model of "
                         f"{num_layers} layers; need 0 <= start < end <= {num_layers} and one layer left")
    batches = _check_batches(batches, "estimate_scales")
    d = int(model.config.hidden_size)
    ratio_sum = torch.zeros(d, dtype=torch.float64)

    def channel_magnitude(x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(-1, d)
        if mode == "rotate":
            x = hadamard_transform(x, d ** -0.5)  # x . H, H orthonormal
        return x.abs().mean(0)

    with _EvalMode(model):
        for ids in tqdm(batches, desc=f"scales ({mode})", disable=not progress):
            xs = _residual_inputs(model, ids, [start, end])
            num = channel_magnitude(xs[end]).double().cpu()
            den = channel_magnitude(xs[start]).double().cpu()
            ok = den > _DENOMINATOR_FLOOR
            ratio_sum += torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)
            del xs
    return (ratio_sum / len(batches)).to(torch.float32)

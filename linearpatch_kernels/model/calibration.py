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

Several cuts
------------

``select_blocks(model, batches, num_prune, max_cuts)`` chooses up to ``max_cuts`` disjoint,
non-touching blocks that remove ``num_prune`` layers in total. It works on the table of every pair
``C[i, j] = mean_b mean_t cos_t(X_i, X_j)`` (``0 <= i < j <= L``), measured on the unpruned model in
one pass per batch, and minimises the summed damage of the blocks by dynamic programming:

    "cosine":          cost[i, j) = 1 - C[i, j]           (1 - the block's own "cosine" score)
    "block_influence": cost[i, j) = sum_{l=i}^{j-1} BI_l   (BI_l = 1 - C[l, l + 1])

    best(p, r, k) = least cost of removing r layers with at most k blocks among layers >= p, so that
    best(p, r, k) = min( best(p + 1, r, k),                                  layer p kept
                         min_{n=1..r} cost[p, p + n) + best(p + n + 1, r - n, k - 1) )
                                       block [p, p + n), then layer p + n kept (blocks never touch; a
                                       block may end at L)

``O(L * num_prune^2 * max_cuts)`` table lookups, nothing more on the model. With ``max_cuts=1``
it returns exactly ``[select_block(...)]`` (same scores, same tie rule). Why a table and not greedy
re-measurement (remove the best block, prune + patch, measure again, repeat): the greedy loop needs
one pass over the calibration data per step and commits to the first block's size and place before
seeing the second; the table is one pass and finds the best split of ``num_prune`` over the cuts
for this additive cost. What it cannot see is how a cut changes the stream that reaches a later
block; the patch at each cut exists to undo exactly that (and cosine similarity ignores the per-token
scale it mostly restores), and the per-cut calibration below does measure it.

``estimate_cut_scales(model, batches, blocks, mode)`` calibrates the cuts in layer order: the scales
of cut ``k`` are estimated with the blocks before it already removed and their patches applied, so
that ``X_start`` and ``X_end`` are what the pruned model really feeds cut ``k``. Removed layers are
swapped for an identity and patches applied by hooks for the duration, so indices stay original.
Cost: one forward pass per batch and per cut, each stopping at the input of layer ``end_k`` (minus
the layers removed before it): at most ``num_cuts`` passes of the model over the calibration data,
against one for a single cut. With one block it equals ``estimate_scales``.

All statistics are computed in fp32 from the captured hidden states and accumulated over batches in
fp64, whatever the model's dtype; results come back on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops import hadamard_transform
from .patch import LinearPatch, _positions
from .surgery import check_blocks, decoder_layers, module_execution_device

__all__ = ["BLOCK_METHODS", "best_block_start", "block_similarities", "estimate_cut_scales", "estimate_scales",
           "best_blocks", "block_costs", "pairwise_similarities", "select_block", "select_blocks"]

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

    where = f"estimate_scales: block [{start}, {end})"
    basis = "x H" if mode == "rotate" else "x"
    with _EvalMode(model):
        for b, ids in enumerate(tqdm(batches, desc=f"scales ({mode})", disable=not progress)):
            xs = _residual_inputs(model, ids, [start, end])
            num = channel_magnitude(xs[end]).double().cpu()
            den = channel_magnitude(xs[start]).double().cpu()
            for layer, magnitude in ((start, den), (end, num)):
                bad = ~torch.isfinite(magnitude)
                if bool(bad.any()):
                    raise ValueError(f"{where}: the residual stream entering layer {layer} is not finite in "
                                     f"calibration batch {b} (mean|{basis}| is NaN or infinite at {_positions(bad)}): "
                                     f"the model overflows in {xs[layer].dtype} on this text, so no scale can be read; "
                                     "calibrate in float32, or check the model's weights")
            ok = den > _DENOMINATOR_FLOOR
            ratio_sum += torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)
            del xs
    scales = (ratio_sum / len(batches)).to(torch.float32)
    # A scale is a ratio of magnitudes, so > 0 and finite, unless the stream after the block has no
    # signal in a channel (0) or the one before it almost none (beyond float32's range).
    if bool((scales <= 0).any()):
        raise ValueError(f"{where}: {mode} scales come out 0 at {_positions(scales <= 0)}: mean|{basis}| of the "
                         f"residual stream entering layer {end} is 0 there in every calibration batch, so the patch "
                         "would erase those channels for every later layer; calibrate on other text, or remove "
                         "another block")
    if not bool(torch.isfinite(scales).all()):
        bad = ~torch.isfinite(scales)
        raise ValueError(f"{where}: {mode} scales overflow float32 at {_positions(bad)}: mean|{basis}| of the "
                         f"residual stream entering layer {start} is so close to 0 there, against the stream entering "
                         f"layer {end}, that the ratio leaves float32's range; calibrate on other text, or remove "
                         "another block")
    return scales


# --- several cuts --------------------------------------------------------------------------------------


@torch.no_grad()
def pairwise_similarities(model: nn.Module, batches, *, progress: bool = True) -> torch.Tensor:
    """``C[i, j] = mean_b mean_t cos_t(X_i, X_j)`` for ``0 <= i, j <= L``: a float64 CPU tensor of shape
    ``[L + 1, L + 1]``, symmetric with ones on the diagonal, from one pass per batch."""
    num_layers = len(decoder_layers(model))
    batches = _check_batches(batches, "pairwise_similarities")
    sums = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    with _EvalMode(model):
        for ids in tqdm(batches, desc="pairwise block scores", disable=not progress):
            xs = _residual_inputs(model, ids, list(range(num_layers + 1)))
            for i in range(num_layers + 1):
                for j in range(i + 1, num_layers + 1):
                    sums[i, j] += _tokenwise_cosine(xs[i], xs[j]).double().cpu()
            del xs
    means = sums / len(batches)
    return means + means.T + torch.eye(num_layers + 1, dtype=torch.float64)


def block_costs(similarity: torch.Tensor, method: str) -> torch.Tensor:
    """``cost[i, j]`` of removing ``[i, j)`` (module docstring): ``1 - C[i, j]`` or the summed Block Influence."""
    if method == "cosine":
        return 1.0 - similarity
    influence = 1.0 - torch.diagonal(similarity, offset=1)  # BI_l, l = 0 .. L-1
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), influence.cumsum(0)])
    return prefix[None, :] - prefix[:, None]


def best_blocks(costs: torch.Tensor, num_prune: int, max_cuts: int, exact: bool = False) -> list[tuple[int, int]]:
    """The least-cost set of at most ``max_cuts`` (``exact``: exactly ``max_cuts``) disjoint, non-touching
    blocks removing ``num_prune`` of the ``L`` layers (``costs[i, j]``: cost of the block ``[i, j)``,
    ``[L + 1, L + 1]``); sorted by start. Ties go to the solution found first: blocks as early as possible."""
    num_layers = costs.shape[0] - 1
    cost = costs.tolist()
    inf = float("inf")
    # best[p][r][k], choice[p][r][k]: block length taken at p (0 = layer p kept).
    best = [[[inf] * (max_cuts + 1) for _ in range(num_prune + 1)] for _ in range(num_layers + 2)]
    choice = [[[0] * (max_cuts + 1) for _ in range(num_prune + 1)] for _ in range(num_layers + 2)]
    for p in range(num_layers + 1, -1, -1):
        for k in range(max_cuts + 1):
            best[p][0][k] = 0.0 if k == 0 or not exact else inf
    for p in range(num_layers - 1, -1, -1):
        for r in range(1, num_prune + 1):
            for k in range(1, max_cuts + 1):
                value, taken = inf, 0
                for n in range(1, min(r, num_layers - p) + 1):  # a block at p first: ties go to it
                    candidate = cost[p][p + n] + best[p + n + 1][r - n][k - 1]
                    if candidate < value:
                        value, taken = candidate, n
                if best[p + 1][r][k] < value:
                    value, taken = best[p + 1][r][k], 0
                best[p][r][k], choice[p][r][k] = value, taken
    if best[0][num_prune][max_cuts] == inf:
        raise ValueError(f"no {'' if exact else 'at most '}{max_cuts} disjoint, non-touching block(s) remove "
                         f"{num_prune} of {num_layers} layers")
    blocks, p, r, k = [], 0, num_prune, max_cuts
    while r > 0:
        n = choice[p][r][k]
        if n == 0:
            p += 1
            continue
        blocks.append((p, p + n))
        p, r, k = p + n + 1, r - n, k - 1
    return blocks


def _check_max_cuts(max_cuts, caller: str) -> int:
    if isinstance(max_cuts, bool) or not isinstance(max_cuts, int) or max_cuts < 1:
        raise ValueError(f"{caller}: max_cuts must be a positive int, got {max_cuts!r}")
    return max_cuts


def select_blocks(model: nn.Module, batches, num_prune: int, max_cuts: int = 1, method: str = "cosine", *,
                  exact: bool = False, progress: bool = True) -> list[tuple[int, int]]:
    """Up to ``max_cuts`` blocks ``[(start, end), ...]`` (sorted, disjoint, not touching) removing
    ``num_prune`` layers in total, by dynamic programming over the pairwise similarity table (module
    docstring); ``exact=True``: exactly ``max_cuts`` blocks (a ``ValueError`` when impossible).
    ``max_cuts=1`` gives ``[select_block(model, batches, num_prune, method)]``."""
    if method not in BLOCK_METHODS:
        raise ValueError(f"select_blocks: unknown method {method!r}; accepted: {', '.join(BLOCK_METHODS)}")
    num_layers = len(decoder_layers(model))
    n = _check_num_prune(num_prune, num_layers, "select_blocks")
    k = _check_max_cuts(max_cuts, "select_blocks")
    batches = _check_batches(batches, "select_blocks")
    if k == 1:
        return [select_block(model, batches, n, method, progress=progress)]
    similarity = pairwise_similarities(model, batches, progress=progress)
    return best_blocks(block_costs(similarity, method), n, k, exact)


class _Skipped(nn.Module):
    """Stands in for a removed decoder layer while calibrating: returns its input hidden states, in the
    form the model's decoder loop expects (a tensor in transformers 5, a 1-tuple in 4.x)."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


class _EarlierCuts:
    """Inside ``with``: ``model``'s layers of ``blocks`` replaced by ``_Skipped`` and ``patches[k]`` applied
    at cut ``k`` by a hook (on the output of layer ``start - 1``, or the input of layer ``end``)."""

    def __init__(self, model: nn.Module, blocks: list[tuple[int, int]], patches: list[LinearPatch]):
        self.layers = decoder_layers(model)
        self.blocks, self.patches = blocks, patches
        self.saved: dict[int, nn.Module] = {}
        self.handles = []

    def __enter__(self):
        import transformers

        returns_tuple = int(transformers.__version__.split(".")[0]) < 5
        for (start, end), patch in zip(self.blocks, self.patches):
            for i in range(start, end):
                self.saved[i] = self.layers[i]
                self.layers[i] = _Skipped(returns_tuple)
            if start > 0:
                patch.to(module_execution_device(self.layers[start - 1]))

                def on_output(module, args, out, patch=patch):
                    if isinstance(out, torch.Tensor):
                        return patch(out.to(patch.scale.device))
                    return (patch(out[0].to(patch.scale.device)), *out[1:])
                self.handles.append(self.layers[start - 1].register_forward_hook(on_output))
            else:
                patch.to(module_execution_device(self.layers[end]))

                def on_input(module, args, kwargs, patch=patch):
                    if args:
                        return (patch(args[0].to(patch.scale.device)), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": patch(kwargs["hidden_states"].to(patch.scale.device))}
                self.handles.append(self.layers[end].register_forward_pre_hook(on_input, with_kwargs=True))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for i, layer in self.saved.items():
            self.layers[i] = layer


def estimate_cut_scales(model: nn.Module, batches, blocks, mode: str = "rotate", *,
                        progress: bool = True) -> list[torch.Tensor]:
    """The scales of every cut of ``blocks`` (``[(start, end), ...]`` of the unpruned ``model``, any
    order), estimated in layer order, each with the earlier cuts already pruned and patched (module
    docstring); returned in the order of ``blocks``. The model is left as it was."""
    if mode not in SCALE_MODES:
        raise ValueError(f"estimate_cut_scales: unknown mode {mode!r}; accepted: {', '.join(SCALE_MODES)} "
                         "(a dense patch is trained, not estimated)")
    num_layers = len(decoder_layers(model))
    blocks = check_blocks(blocks, num_layers, "estimate_cut_scales")
    batches = _check_batches(batches, "estimate_cut_scales")
    order = sorted(range(len(blocks)), key=lambda k: blocks[k][0])
    d = int(model.config.hidden_size)
    scales: dict[int, torch.Tensor] = {}
    done_blocks, done_patches = [], []
    for k in order:
        start, end = blocks[k]
        with _EarlierCuts(model, done_blocks, done_patches):
            scales[k] = estimate_scales(model, batches, start, end, mode, progress=progress)
        done_blocks.append((start, end))
        done_patches.append(LinearPatch(d, mode=mode, scale=scales[k]))
    return [scales[k] for k in range(len(blocks))]

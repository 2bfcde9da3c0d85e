"""End-to-end benchmark: what the patch costs inside a pruned model, against the paper's hook.

A Llama model with random weights is built from a config (no download): by default LLaMA-3-8B's
shape on CUDA (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256, bf16, built
directly on the GPU) and SmolLM2-135M's on the CPU (hidden 576 = 36 x 16, a Paley size, 30 layers,
fp32). ``--small`` is a tiny model for smoke runs. Embeddings are untied in every preset. A block of
``--prune`` layers is removed, by default ``[L - n - L//10, L - L//10)`` (for LLaMA-3-8B ``[24, 29)``,
a block in the upper layers like the ones similarity-based selection picks; the timing does not
depend on which block). Four variants share the same weight tensors:

    dense         the full model
    pruned        the block deleted, nothing at the cut
    pruned+paper  the paper's baseline: a forward hook on the layer before the cut doing
                  (h.float() @ P).to(h.dtype) with P = H diag(s) H^T as a dense fp32 d x d matrix
    pruned+ours   prune_and_patch: a LinearPatch module at the cut (the hadamard_patch op, automatic
                  backend: cuda > triton > torch on a GPU, torch on the CPU)

Workloads:

    prefill BxS   one forward pass over B sequences of S tokens, no cache, logits of the last position
                  only (as generation computes them)
    decode B      a prompt of --prompt-len tokens prefilled into a static KV cache (one per variant),
                  then greedy decoding of --new-tokens tokens by a manual loop (no eos: every variant
                  produces exactly the same number of tokens, which is checked); the time of one decode
                  step (forward + argmax) is the sample

``--cuda-graph`` (CUDA only) adds, after each workload, the same workload replayed from CUDA graphs
(label ``[graph]``): per variant the prefill forward, or one decode step (forward + argmax, the token
fed back through a static input, the position through a static ``position_ids``), is captured once and
replayed; the ops alone likewise. That is the GPU time without Python and launch overhead, what a
graph-captured server pays. Decoded tokens must equal the eager decode's (checked, per variant).

The variants are interleaved at the finest grain: each prefill round runs all four back to back, and
decode steps alternate between the variants' four caches, the order rotated every time, so that drift
of the machine hits all variants alike. Every time is wall-clock with the device synchronized before
and after (what a user waits for, Python and launches included). The overhead of a variant is the
median over rounds (prefill) or steps (decode) of its time divided by the pruned model's time in the
same round or step, minus one; the interquartile range of that ratio is reported beside it.

    python benchmarks/bench_e2e.py                                  # cuda: LLaMA-3-8B shape, all workloads
    python benchmarks/bench_e2e.py --device cpu --out-dir results/cpu
    python benchmarks/bench_e2e.py --small --device cpu             # smoke run (seconds)
    python benchmarks/bench_e2e.py --cuda-graph --new-tokens 48      # eager and CUDA graphs

Profile: after each decode workload, ``--profile-steps`` more decode steps of pruned+ours run under
torch.profiler, and the share of a step spent in the patch ops (the events of the ``linearpatch*``
ops, children included, outermost only) is reported (``profile`` in the JSON): the op's cost inside
the model, as the profiler attributes it, free of the step-to-step noise of the paired ratios.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import linearpatch_kernels as lp
from linearpatch_kernels.atomic_files import atomic_write_text
from linearpatch_kernels.backends import select_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch import environment  # noqa: E402  (a sibling script, not a package)

PRESETS = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, prune=5,
                      prefill=["1x2048", "8x2048"], decode_batch=[1, 16, 64], prompt_len=512, new_tokens=128,
                      repeats=10, decode_repeats=2),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, prune=5,
                         prefill=["1x64", "1x256"], decode_batch=[1, 4], prompt_len=64, new_tokens=32,
                         repeats=8, decode_repeats=2),
    "tiny": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=512, prune=2,
                 prefill=["1x32", "2x32"], decode_batch=[1, 2], prompt_len=16, new_tokens=8,
                 repeats=3, decode_repeats=1),
}
DECODE_WARMUP_STEPS = 2  # first steps of every repeat, not counted (first-call allocations, heuristics)
PREFILL_WARMUP = 2


# ------------------------------------------------------------------------------------------------
# Models


def build_config(preset: dict, max_positions: int) -> LlamaConfig:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    return LlamaConfig(**{k: preset[k] for k in keys}, max_position_embeddings=max_positions,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_dense(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Random weights (Hugging Face's initializer), created on ``device`` directly, in ``dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if next(model.parameters()).device.type != device.type:  # a transformers that ignores the device context
        model.to(device)
    return model.eval()


def weight_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose modules and config are new objects but whose parameters and buffers
    are the same tensors: pruning the copy (deleting layers, renumbering ``layer_idx``, changing
    ``config.num_hidden_layers``) leaves ``model`` intact and costs no memory."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def build_variants(dense: LlamaForCausalLM, start: int, end: int, scale: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """``({variant: model}, P)`` with P the dense fp32 patch matrix of the paper's hook."""
    ours = lp.prune_and_patch(weight_sharing_copy(dense), start, end, scales=scale)
    p = lp.get_patch(ours).dense_matrix()  # H diag(s) H^T from the fp64 H, fp32, on the patch's device

    def plain_pruned() -> torch.nn.Module:
        # The same surgery, then the patch wrapper taken out again: nothing at the cut.
        model = lp.prune_and_patch(weight_sharing_copy(dense), start, end)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            if isinstance(layer, lp.PatchedDecoderLayer):
                layers[i] = layer.layer
        return model

    pruned, paper = plain_pruned(), plain_pruned()
    paper.model.layers[start - 1].register_forward_hook(paper_hook(p))
    return {"dense": dense, "pruned": pruned, "pruned+paper": paper, "pruned+ours": ours}, p


def paper_hook(p: torch.Tensor):
    """The paper's patch: a forward hook on the layer before the cut, ``(h.float() @ P).to(h.dtype)``."""
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):  # transformers >= 5: the hidden states alone
            return (output.float() @ p).to(output.dtype)
        return ((output[0].float() @ p).to(output[0].dtype), *output[1:])
    return hook


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: torch.nn.Module, max_len: int, kind: str):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


# ------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def patch_ops(variants: dict, p: torch.Tensor) -> dict:
    """The two patches alone, each a function of the hidden states: what the model variants add to the
    pruned model, timed in the same rounds as an estimate of the overhead free of the models' noise
    (an upper bound: each call is timed alone, with a synchronize before and after)."""
    patch = lp.get_patch(variants["pruned+ours"])  # the LinearPatch module that runs inside the model
    return {"op:ours": patch, "op:paper": lambda h: (h.float() @ p).to(h.dtype)}


def prefill_samples(variants: dict, ops: dict, ids: torch.Tensor, hidden: torch.Tensor, rounds: int,
                    device: torch.device) -> dict[str, list[float]]:
    runners = {name: (lambda m=m: m(input_ids=ids, use_cache=False, logits_to_keep=1).logits)
               for name, m in variants.items()}
    runners.update({name: (lambda op=op: op(hidden)) for name, op in ops.items()})
    names = list(runners)
    for _ in range(PREFILL_WARMUP):
        for name in names:
            timed(runners[name], device)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            samples[name].append(timed(runners[name], device)[1])
    return samples


def decode_samples(variants: dict, ops: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                   cache_kind: str, device: torch.device, vocab: int, dtype: torch.dtype
                   ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict, dict]:
    """``(step samples, prompt-prefill samples, tokens generated per sequence, the tokens of the last
    repeat)`` per variant; the ops alone are timed on one token per sequence in the same rotation as
    the decode steps."""
    names = list(variants)
    keyword = {name: cache_keyword(m) for name, m in variants.items()}
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)
    hidden = torch.randn(batch, 1, lp.get_patch(variants["pruned+ours"]).hidden_size, generator=gen).to(device, dtype)
    steps = {name: [] for name in [*names, *ops]}
    prompts = {name: [] for name in names}
    generated, last_tokens = {}, {}
    for rep in range(repeats):
        state = {}
        for name in rotated(names, rep):
            model = variants[name]
            cache = new_cache(model, prompt_len + new_tokens, cache_kind)
            token, t = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                           **{keyword[name]: cache}).logits[:, -1].argmax(-1, keepdim=True), device)
            prompts[name].append(t)
            state[name] = (cache, [token])
        # The first token came from the prompt's logits; new_tokens - 1 decode steps make the rest.
        for step in range(new_tokens - 1):
            for name in rotated([*names, *ops], step + rep):
                if name in ops:
                    t = timed(lambda: ops[name](hidden), device)[1]
                    if step >= DECODE_WARMUP_STEPS:
                        steps[name].append(t)
                    continue
                model, (cache, tokens) = variants[name], state[name]
                token, t = timed(lambda: model(input_ids=tokens[-1], use_cache=True, logits_to_keep=1,
                                               **{keyword[name]: cache}).logits[:, -1].argmax(-1, keepdim=True),
                                 device)
                tokens.append(token)
                if step >= DECODE_WARMUP_STEPS:
                    steps[name].append(t)
        for name in names:
            cache, tokens = state[name]
            last_tokens[name] = torch.cat(tokens, dim=1)
            generated[name] = last_tokens[name].shape[1]
            # A cache passed under the wrong keyword would be ignored without an error (the model makes its
            # own): the cache must hold the prompt and every token fed back.
            held = int(cache.get_seq_length())
            if held != prompt_len + new_tokens - 1:
                raise RuntimeError(f"{name}: the KV cache holds {held} positions after decoding; expected "
                                   f"{prompt_len + new_tokens - 1} (was it passed to the model?)")
        del state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return steps, prompts, generated, last_tokens


def graph_capture(fn, device: torch.device):
    """``fn`` (which writes its results into static tensors) captured once in a CUDA graph after two
    warm-up calls on a side stream; returns the replay function."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    synchronize(device)
    return graph.replay


def prefill_graph_samples(variants: dict, ops: dict, ids: torch.Tensor, hidden: torch.Tensor, rounds: int,
                          device: torch.device) -> dict[str, list[float]]:
    """``prefill_samples`` with every forward (and op) replayed from a CUDA graph captured once."""
    replays = {}
    for name, m in variants.items():
        out = {}
        replays[name] = graph_capture(lambda m=m, out=out: out.__setitem__(
            "logits", m(input_ids=ids, use_cache=False, logits_to_keep=1).logits), device)
    for name, op in ops.items():
        replays[name] = graph_capture(lambda op=op: op(hidden), device)
    names = list(replays)
    for _ in range(PREFILL_WARMUP):
        for name in names:
            timed(replays[name], device)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            samples[name].append(timed(replays[name], device)[1])
    return samples


def decode_graph_samples(variants: dict, ops: dict, batch: int, prompt_len: int, new_tokens: int,
                         cache_kind: str, device: torch.device, vocab: int, dtype: torch.dtype,
                         eager_tokens: dict | None = None) -> tuple[dict[str, list[float]], dict, dict]:
    """``decode_samples`` with one decode step per variant replayed from a CUDA graph: the step reads
    its token from a static input and its position from static ``position_ids`` (and
    ``cache_position`` where the model takes it), and writes the next token into a static output.
    The graph is captured (after two warm-up steps) on a fresh static cache, which is then reset and
    filled by the prompt's eager prefill. Returns (step samples, generated count, share of the tokens
    equal to ``eager_tokens``)."""
    if cache_kind != "static":
        raise ValueError("--cuda-graph decodes with a static KV cache (--cache static)")
    names = list(variants)
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)
    hidden = torch.randn(batch, 1, lp.get_patch(variants["pruned+ours"]).hidden_size, generator=gen).to(device, dtype)
    state = {}
    for name in names:
        model = variants[name]
        keyword = cache_keyword(model)
        cache = new_cache(model, prompt_len + new_tokens, "static")
        ids = torch.full((batch, 1), 3, dtype=torch.long, device=device)
        position_ids = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
        cache_position = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        extra = {"cache_position": cache_position} if "cache_position" in inspect.signature(type(model).forward).parameters else {}

        def step(model=model, cache=cache, ids=ids, position_ids=position_ids, token=token, extra=extra, keyword=keyword):
            logits = model(input_ids=ids, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                           **{keyword: cache}, **extra).logits
            token.copy_(logits[:, -1].argmax(-1, keepdim=True))

        replay = graph_capture(step, device)
        cache.reset()  # the warm-up steps wrote into it; the prompt comes first
        first = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits[:, -1]
        state[name] = dict(replay=replay, ids=ids, position_ids=position_ids, cache_position=cache_position,
                           token=token, cache=cache, tokens=[first.argmax(-1, keepdim=True)])
    op_replays = {name: graph_capture(lambda op=op: op(hidden), device) for name, op in ops.items()}
    steps = {name: [] for name in [*names, *ops]}
    for step_index in range(new_tokens - 1):
        position = prompt_len + step_index
        for name in rotated([*names, *ops], step_index):
            if name in ops:
                t = timed(op_replays[name], device)[1]
            else:
                s = state[name]

                def replay(s=s):
                    s["ids"].copy_(s["tokens"][-1])
                    s["position_ids"].fill_(position)
                    s["cache_position"].fill_(position)
                    s["replay"]()
                    return s["token"].clone()
                token, t = timed(replay, device)
                s["tokens"].append(token)
            if step_index >= DECODE_WARMUP_STEPS:
                steps[name].append(t)
    generated, agree = {}, {}
    for name in names:
        s = state[name]
        tokens = torch.cat(s["tokens"], dim=1)
        generated[name] = tokens.shape[1]
        # No check of the cache's length here: a cache may count positions in Python (not replayed); the
        # tokens against the eager decode's are the check that every step read and wrote its position.
        if eager_tokens and name in eager_tokens:
            agree[name] = float((tokens == eager_tokens[name]).float().mean())
    del state
    return steps, generated, agree


# ------------------------------------------------------------------------------------------------
# Statistics and rows


def profile_decode(model, batch: int, prompt_len: int, steps: int, cache_kind: str, device: torch.device,
                   vocab: int) -> dict:
    """``steps`` decode steps of ``model`` under torch.profiler: the share of their wall time that the
    profiler attributes to the patch ops (events named ``linearpatch*``; an op inside another one,
    e.g. linearpatch_cpu::hadamard_patch inside linearpatch::hadamard_patch, counted once)."""
    from torch.profiler import ProfilerActivity, profile

    keyword = cache_keyword(model)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(2)).to(device)
    cache = new_cache(model, prompt_len + steps + 2, cache_kind)
    token = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits[:, -1].argmax(-1, keepdim=True)
    token = model(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits[:, -1].argmax(-1, keepdim=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, use_cache=True, logits_to_keep=1,
                          **{keyword: cache}).logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        wall = time.perf_counter() - t0

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("linearpatch"):
                return False
            parent = parent.cpu_parent
        return True

    ours = [e for e in prof.events() if e.name.startswith("linearpatch") and outermost(e)]
    op_us = sum(e.cpu_time_total for e in ours)
    return {"steps": steps, "step_ms": wall / steps * 1e3, "patch_ops_us_per_step": op_us / steps,
            "patch_ops_share_pct": 100 * op_us * 1e-6 / wall, "patch_calls_per_step": len(ours) / steps,
            "ops": sorted({e.name for e in ours})}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, statistics.median(values), q3


def summarize(samples: dict[str, list[float]], items_per_sample: int, base: dict) -> list[dict]:
    """One row per variant: median time, items/s, and the paired overhead over "pruned" (for the ops
    alone, "op:...", their time as a share of the pruned model's time in the same round or step)."""
    pruned = samples["pruned"]
    rows = []
    for name, times in samples.items():
        q1, median, q3 = _quartiles(times)
        alone = name.startswith("op:")
        ratios = [100 * (t / p - (0 if alone else 1)) for t, p in zip(times, pruned)]
        o1, overhead, o3 = _quartiles(ratios)
        rows.append(dict(base, variant=name, median_ms=median * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
                         samples=len(times), tokens_per_s=items_per_sample / median,
                         overhead_pct=overhead, overhead_q1_pct=o1, overhead_q3_pct=o3,
                         overhead_of_medians_pct=100 * (median / statistics.median(pruned) - (0 if alone else 1))))
    return rows


def check_outputs(variants: dict, vocab: int, device: torch.device, seq: int) -> dict:
    """Relative differences of last-position logits on one short input: the paper's hook and our patch
    apply the same P (they must agree), and the patch must change the pruned model's output."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(3, vocab, (1, seq), generator=gen).to(device)
    logits = {name: m(input_ids=ids, use_cache=False, logits_to_keep=1).logits.double() for name, m in variants.items()}

    def rel(a, b):
        return float((logits[a] - logits[b]).norm() / logits[b].norm())

    return {"ours_vs_paper": rel("pruned+ours", "pruned+paper"), "ours_vs_pruned": rel("pruned+ours", "pruned"),
            "pruned_vs_dense": rel("pruned", "dense"), "tokens": seq}


def format_table(rows: list[dict]) -> str:
    head = f"{'workload':<16}{'variant':<14}{'median ms':>11}{'tokens/s':>11}   {'vs pruned: paired median [IQR]':<30}"
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        if previous is not None and r["workload"] != previous:
            lines.append("")
        first = r["workload"] != previous
        previous = r["workload"]
        if "error" in r:
            lines.append(f"{r['workload']:<16}ERROR {r['error']}")
            continue
        if r["variant"] == "pruned":
            overhead = "(baseline)"
        else:
            overhead = f"{r['overhead_pct']:+7.2f} % [{r['overhead_q1_pct']:+.2f}, {r['overhead_q3_pct']:+.2f}]"
        alone = r["variant"].startswith("op:")
        rate = "" if alone else f"{r['tokens_per_s']:.1f}"
        lines.append(f"{r['workload'] if first else '':<16}{r['variant']:<14}{r['median_ms']:>11.3f}"
                     f"{rate:>11}   {overhead}{'  (op alone, % of pruned)' if alone else ''}")
    return "\n".join(lines)


def headline(rows: list[dict]) -> str:
    """One line per workload: our overhead and the paper's, % of the pruned model's time."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows if "error" not in r):
        by = {r["variant"]: r for r in rows if r["workload"] == workload and "error" not in r}
        if "pruned+ours" in by and "pruned+paper" in by:
            ours, paper = by["pruned+ours"], by["pruned+paper"]
            verdict = "within" if ours["overhead_pct"] <= 1.0 else "ABOVE"
            line = (f"{workload:<16} ours {ours['overhead_pct']:+6.2f} % [IQR {ours['overhead_q1_pct']:+.2f}, "
                    f"{ours['overhead_q3_pct']:+.2f}] ({verdict} the 1 % target)   paper's hook "
                    f"{paper['overhead_pct']:+6.2f} % [IQR {paper['overhead_q1_pct']:+.2f}, "
                    f"{paper['overhead_q3_pct']:+.2f}]")
            if "op:ours" in by and "op:paper" in by:
                line += (f"\n{'':<16} ops alone: ours {by['op:ours']['overhead_pct']:.3f} %, "
                         f"paper's {by['op:paper']['overhead_pct']:.3f} % of the pruned model's time")
            lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=list(PRESETS), help="default: cuda llama3-8b, cpu smollm2-135m")
    parser.add_argument("--small", action="store_true", help="the tiny preset (smoke runs)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: cuda bf16, cpu fp32")
    parser.add_argument("--prune", type=int, help="number of layers removed (preset default)")
    parser.add_argument("--prune-start", type=int, help="first removed layer (default L - n - L//10)")
    parser.add_argument("--prefill", nargs="*", help="prefill workloads BxS, e.g. 1x2048 8x2048 (none: skip)")
    parser.add_argument("--decode-batch", type=int, nargs="*", help="decode batch sizes (none: skip decode)")
    parser.add_argument("--prompt-len", type=int, help="decode prompt length")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per sequence in decode")
    parser.add_argument("--repeats", type=int, help="prefill rounds")
    parser.add_argument("--decode-repeats", type=int, help="decode generations per variant")
    parser.add_argument("--cache", choices=["static", "dynamic"], default="static", help="decode KV cache")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cuda-graph", action="store_true", help="also replay every workload from CUDA graphs")
    parser.add_argument("--profile-steps", type=int, default=20,
                        help="decode steps of pruned+ours profiled after each decode workload (0: none)")
    parser.add_argument("--max-seconds", type=float, help="start no new workload after this long")
    parser.add_argument("--out-dir", help="write <name>.json, <name>.txt and <name>.png here")
    parser.add_argument("--name", default="bench_e2e")
    parser.add_argument("--json", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    if args.cuda_graph and (args.device != "cuda" or args.cache != "static"):
        parser.error("--cuda-graph needs --device cuda and --cache static")
    if args.small:
        if args.preset not in (None, "tiny"):
            parser.error("--small is the tiny preset; do not combine it with --preset")
        args.preset = "tiny"
    args.preset = args.preset or ("llama3-8b" if args.device == "cuda" else "smollm2-135m")
    preset = PRESETS[args.preset]
    for key in ("prune", "prefill", "decode_batch", "prompt_len", "new_tokens", "repeats", "decode_repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    layers = preset["num_hidden_layers"]
    if args.prune_start is None:
        args.prune_start = layers - args.prune - max(1, layers // 10)
    if not 1 <= args.prune_start < args.prune_start + args.prune <= layers:
        parser.error(f"--prune {args.prune} from --prune-start {args.prune_start}: need 1 <= start and "
                     f"start + prune <= {layers} (the paper's hook needs a layer before the cut)")
    try:
        args.prefill_shapes = [tuple(int(v) for v in w.lower().split("x")) for w in args.prefill]
        assert all(len(s) == 2 and min(s) >= 1 for s in args.prefill_shapes)
    except (ValueError, AssertionError):
        parser.error(f"--prefill takes BxS pairs like 8x2048, got {args.prefill}")
    if args.new_tokens < DECODE_WARMUP_STEPS + 2 or args.prompt_len < 1 or args.repeats < 1 or args.decode_repeats < 1:
        parser.error(f"--new-tokens must be >= {DECODE_WARMUP_STEPS + 2}; --prompt-len, --repeats and "
                     "--decode-repeats >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    preset = PRESETS[args.preset]
    env = environment(device)
    started = time.monotonic()
    max_positions = max([s for _, s in args.prefill_shapes] + [args.prompt_len + args.new_tokens, 64])
    config = build_config(preset, max_positions)
    start, end = args.prune_start, args.prune_start + args.prune

    # Built outside inference mode: the patch's scale is an nn.Parameter.
    with torch.no_grad():
        dense, build_s = timed(lambda: build_dense(config, dtype, device), device)
        torch.manual_seed(0)
        scale = 0.5 + torch.rand(config.hidden_size, device=device)
        variants, p = build_variants(dense, start, end, scale)
        ops = patch_ops(variants, p)
    sample = torch.zeros(1, config.hidden_size, dtype=dtype, device=device)
    backend = select_backend(sample).__name__.rsplit(".", 1)[-1].removesuffix("_backend")
    with torch.inference_mode():
        model_info = {"name": args.preset, "pruned_block": [start, end], "dtype": args.dtype,
                      "layers": config.num_hidden_layers, "layers_after_pruning": config.num_hidden_layers - args.prune,
                      "parameters": sum(p.numel() for p in dense.parameters()), "patch_backend": backend,
                      "build_s": round(build_s, 2), "cache": args.cache,
                      "config": {k: preset[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "intermediate_size", "vocab_size")}}
        check = check_outputs(variants, config.vocab_size, device, min(64, max_positions))
        result = {"benchmark": "bench_e2e", "env": env, "args": {k: v for k, v in vars(args).items()},
                  "model": model_info, "check": check, "rows": [], "truncated": [], "profile": {}}
        title = (f"End-to-end: {args.preset}-shaped Llama ({model_info['parameters'] / 1e9:.2f} B parameters, "
                 f"{args.dtype}, random weights), layers [{start}, {end}) pruned, patch backend {backend!r}, "
                 f"{args.cache} KV cache\n"
                 f"{env.get('gpu') or env['cpu'] + ', ' + str(env['torch_threads']) + ' threads'}; "
                 f"torch {env['torch']}, transformers {env['transformers']}; {env['date_utc']}; "
                 f"load average at start {', '.join(f'{v:.2f}' for v in env['loadavg_start'])}\n"
                 f"check (last-position logits, rel. diff.): ours vs paper's hook {check['ours_vs_paper']:.1e}, "
                 f"ours vs pruned {check['ours_vs_pruned']:.1e}")
        print(title, flush=True)

        workloads = [("prefill", b, s) for b, s in args.prefill_shapes] + [("decode", b, None) for b in args.decode_batch]
        modes = ("eager", "graph") if args.cuda_graph else ("eager",)
        eager_tokens = {}
        for kind, batch, seq, mode in [(*w, m) for w in workloads for m in modes]:
            label = (f"prefill {batch}x{seq}" if kind == "prefill" else f"decode b={batch}") + \
                (" [graph]" if mode == "graph" else "")
            if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                result["truncated"].append(label)
                continue
            base = {"workload": label, "kind": kind, "batch": batch, "mode": mode}
            try:
                if kind == "prefill":
                    gen = torch.Generator(device="cpu").manual_seed(0)
                    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen).to(device)
                    hidden = torch.randn(batch, seq, config.hidden_size, generator=gen).to(device, dtype)
                    sampler = prefill_graph_samples if mode == "graph" else prefill_samples
                    samples = sampler(variants, ops, ids, hidden, args.repeats, device)
                    rows = summarize(samples, batch * seq, dict(base, seq=seq))
                elif mode == "graph":
                    steps, generated, agree = decode_graph_samples(
                        variants, ops, batch, args.prompt_len, args.new_tokens, args.cache, device, config.vocab_size,
                        dtype, eager_tokens.get(batch))
                    if len(set(generated.values())) != 1 or generated["pruned"] != args.new_tokens:
                        raise RuntimeError(f"variants generated different numbers of tokens: {generated}")
                    rows = summarize(steps, batch, dict(base, prompt_len=args.prompt_len, new_tokens=args.new_tokens))
                    for row in rows:
                        if row["variant"] in generated:
                            row["tokens_generated"] = generated[row["variant"]]
                            row["tokens_equal_to_eager"] = agree.get(row["variant"])
                else:
                    steps, prompts, generated, tokens = decode_samples(variants, ops, batch, args.prompt_len,
                                                                       args.new_tokens, args.decode_repeats, args.cache,
                                                                       device, config.vocab_size, dtype)
                    eager_tokens[batch] = tokens
                    if len(set(generated.values())) != 1 or generated["pruned"] != args.new_tokens:
                        raise RuntimeError(f"variants generated different numbers of tokens: {generated}")
                    rows = summarize(steps, batch, dict(base, prompt_len=args.prompt_len, new_tokens=args.new_tokens))
                    if args.profile_steps > 0:
                        result["profile"][label] = profile_decode(
                            variants["pruned+ours"], batch, args.prompt_len, args.profile_steps, args.cache, device,
                            config.vocab_size)
                    for row in rows:
                        if row["variant"] in generated:
                            row["tokens_generated"] = generated[row["variant"]]
                            row["prompt_prefill_ms"] = statistics.median(prompts[row["variant"]]) * 1e3
            except Exception as e:  # out of memory, a failing kernel ...: an error row, then the next workload
                rows = [dict(base, variant="all", error=f"{type(e).__name__}: {e}")]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["rows"].extend(rows)
            for r in rows:
                if "error" in r:
                    print(f"  {label}: ERROR {r['error']}", flush=True)
                else:
                    print(f"  {label} {r['variant']}: {r['median_ms']:.3f} ms, overhead {r['overhead_pct']:+.2f} %",
                          flush=True)
            env["loadavg_end"] = list(os.getloadavg())
            env["elapsed_s"] = round(time.monotonic() - started, 1)
            write_outputs(result, args, title)  # partial results survive a kill

    paths = write_outputs(result, args, title)
    print()
    print(render_text(result, title))
    if paths.get("png"):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib not installed: no plot (render later with benchmarks/plot.py on the JSON)")
        else:
            import plot

            plot.plot_e2e(result, paths["png"])
            print(f"plot: {paths['png']}")
    return result


def render_text(result: dict, title: str) -> str:
    text = title + "\n\n" + format_table(result["rows"])
    summary = headline(result["rows"])
    if summary:
        text += "\n\noverhead over the pruned model (paired median):\n" + summary
    for label, prof in result.get("profile", {}).items():
        text += (f"\n\nprofiler, {label}, pruned+ours: {prof['patch_ops_share_pct']:.3f} % of a decode step "
                 f"({prof['patch_ops_us_per_step']:.1f} us of {prof['step_ms']:.2f} ms, "
                 f"{prof['patch_calls_per_step']:.0f} call(s): {', '.join(prof['ops'])}; {prof['steps']} steps)")
    if result["truncated"]:
        text += f"\n\nnot run (--max-seconds): {', '.join(result['truncated'])}"
    return text


def write_outputs(result: dict, args, title: str) -> dict:
    paths = {"json": args.json}
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": args.json or out / f"{args.name}.json", "txt": out / f"{args.name}.txt",
                 "png": out / f"{args.name}.png"}
    if paths.get("json"):
        atomic_write_text(paths["json"], json.dumps(result, indent=1) + "\n")
    if paths.get("txt"):
        atomic_write_text(paths["txt"], render_text(result, title) + "\n")
    return paths


if __name__ == "__main__":
    main()

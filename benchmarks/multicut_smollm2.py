"""Several cuts on SmolLM2-135M-Instruct (CPU): is removing N layers as one block worse than spreading
them over two or three blocks? Held-out perplexity with and without the patches.

1. load the embedded model (fp32); cut the calibration corpus (Emma) into --calib-samples windows of
   --seqlen tokens and the evaluation corpus (Pride and Prejudice; never used for calibration) into
   --eval-samples windows, as ``linearpatch demo`` does;
2. from one pass over the calibration windows, the table of residual-stream cosine similarities
   ``C[i, j]``; from it the best single block (``select_block``'s answer, checked against it) and the
   least-cost blocks with at most 2 and at most 3 cuts (``select_blocks``' dynamic programming), and,
   where that picks fewer cuts, the best with exactly 2 or 3;
3. for each choice: prune a copy, perplexity without patches, with rotate patches calibrated in order
   (``estimate_cut_scales``: each cut with the earlier ones pruned and patched) and, for several cuts,
   with every cut's scales calibrated on the dense model (``estimate_scales`` per block), to show what
   the in-order calibration changes.

The table and the settings go to --out (.md and .json).

    python benchmarks/multicut_smollm2.py --threads 1 --out benchmarks/results/multicut-smollm2-cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time

import torch

from linearpatch_kernels import corpus
from linearpatch_kernels.default_model import DEFAULT_MODEL_NAME, default_model_dir
from linearpatch_kernels.evaluation import perplexity
from linearpatch_kernels.model import (
    estimate_cut_scales,
    estimate_scales,
    patch_disabled,
    prune_and_patch,
    select_block,
)
from linearpatch_kernels.model.calibration import block_costs, best_blocks, pairwise_similarities


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prune", type=int, default=7, help="layers to remove in all (default 7 of 30)")
    p.add_argument("--max-cuts", type=int, nargs="+", default=[2, 3], help="cut counts to compare with one block")
    # --selection, as `linearpatch prune` calls it; --method, this script's first name for it, still works.
    p.add_argument("--selection", "--method", dest="method", choices=("cosine", "block_influence"), default="cosine",
                   help="block cost: 1 - cos(X_start, X_end), or the summed Block Influence of the layers")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return p.parse_args(argv)


def blocks_text(blocks) -> str:
    return " + ".join(f"[{s}, {e})" for s, e in blocks)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    calib = corpus.token_windows(tokenizer, corpus.calibration_text(), args.seqlen, args.calib_samples,
                                 what="calibration corpus")
    evals = corpus.token_windows(tokenizer, corpus.evaluation_text(), args.seqlen, args.eval_samples,
                                 what="evaluation corpus")

    t0 = time.perf_counter()
    similarity = pairwise_similarities(model, calib, progress=False)
    costs = block_costs(similarity, args.method)
    single = select_block(model, calib, args.num_prune, args.method, progress=False)
    if best_blocks(costs, args.num_prune, 1) != [single]:
        raise RuntimeError(f"the table's best single block {best_blocks(costs, args.num_prune, 1)} is not "
                           f"select_block's {single}")
    choices = [("1 block", [single])]
    for k in args.max_cuts:
        chosen = best_blocks(costs, args.num_prune, k)
        choices.append((f"at most {k} cuts", chosen))
        if len(chosen) < k:
            choices.append((f"exactly {k} cuts", best_blocks(costs, args.num_prune, k, exact=True)))
    selection_s = time.perf_counter() - t0
    print(f"selection ({selection_s:.0f} s): " + "; ".join(f"{name}: {blocks_text(b)}" for name, b in choices),
          flush=True)

    rows, seen = [], {}
    t0 = time.perf_counter()
    rows.append({"choice": "dense", "blocks": "-", "cost": None, "layers": num_layers,
                 "ppl_no_patch": perplexity(model, evals, progress=False), "ppl_patch": None,
                 "ppl_patch_dense_calibrated": None})
    print(f"dense: {rows[-1]['ppl_no_patch']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, blocks in choices:
        key = tuple(blocks)
        if key in seen:  # the same blocks as an earlier row: measured once
            rows.append({**seen[key], "choice": name})
            continue
        t0 = time.perf_counter()
        in_order = estimate_cut_scales(model, calib, blocks, "rotate", progress=False)
        pruned = prune_and_patch(copy.deepcopy(model), blocks=blocks, scales=in_order)
        with patch_disabled(pruned):
            ppl_plain = perplexity(pruned, evals, progress=False)
        ppl_patch = perplexity(pruned, evals, progress=False)
        ppl_dense_cal = None
        if len(blocks) > 1:
            independent = [estimate_scales(model, calib, s, e, "rotate", progress=False) for s, e in blocks]
            pruned = prune_and_patch(copy.deepcopy(model), blocks=blocks, scales=independent)
            ppl_dense_cal = perplexity(pruned, evals, progress=False)
        del pruned
        row = {"choice": name, "blocks": blocks_text(blocks), "cost": float(sum(costs[s, e] for s, e in blocks)),
               "layers": num_layers - args.num_prune, "ppl_no_patch": ppl_plain, "ppl_patch": ppl_patch,
               "ppl_patch_dense_calibrated": ppl_dense_cal, "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        seen[key] = row
        print(f"{name} {row['blocks']}: no patch {ppl_plain:.2f}, patch (in order) {ppl_patch:.2f}"
              + ("" if ppl_dense_cal is None else f", patch (dense-calibrated) {ppl_dense_cal:.2f}")
              + f" ({row['seconds']:.0f} s)", flush=True)
    total_s = time.perf_counter() - t_start

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/multicut_smollm2.py", *(argv or sys.argv[1:])])
    settings = {"model": DEFAULT_MODEL_NAME, "num_layers": num_layers, "num_prune": args.num_prune, "method": args.method,
                "seqlen": args.seqlen, "calib_samples": args.calib_samples, "eval_samples": args.eval_samples,
                "threads": torch.get_num_threads(), "selection_seconds": round(selection_s, 1),
                "total_seconds": round(total_s, 1), "torch": torch.__version__, "python": platform.python_version(),
                "command": command}
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"# Several cuts: SmolLM2-135M-Instruct, {args.num_prune} of {num_layers} layers removed",
        "",
        "```",
        command,
        "```",
        "",
        f"Perplexity on held-out text (the first {args.eval_samples} windows of {args.seqlen} tokens of the "
        "evaluation corpus, Pride and Prejudice). Blocks chosen from the cosine-similarity table of "
        f"{args.calib_samples} calibration windows (Emma) by `select_blocks`' dynamic programming (cost: "
        + ("the summed 1 - cos(X_start, X_end) of the blocks" if args.method == "cosine" else
           "the summed Block Influence 1 - cos(X_l, X_l+1) of the removed layers")
        + "); rotate patches calibrated on the same windows, in order "
        "(`estimate_cut_scales`), or each on the dense model (`estimate_scales` per block).",
        "",
        "| choice | blocks removed | table cost | layers | no patch | patch (in order) | patch (each on dense) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cost = "" if r["cost"] is None else f"{r['cost']:.4f}"
        lines.append(f"| {r['choice']} | {r['blocks']} | {cost} | {r['layers']} | {fmt(r['ppl_no_patch'])} | {fmt(r['ppl_patch'])} "
                     f"| {fmt(r['ppl_patch_dense_calibrated'])} |")
    lines += ["", f"Time: {total_s:.0f} s in all (selection table {selection_s:.0f} s), {torch.get_num_threads()} "
              f"thread(s), torch {torch.__version__}, Python {platform.python_version()}, 2 shared CPU cores."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

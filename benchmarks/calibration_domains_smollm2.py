"""Does the patch generalise across domains? SmolLM2-135M-Instruct (CPU), held-out perplexity per domain
without a patch, with the paper's scales and with the default (shrunk) scales, for the cut layouts of
issue 28: the selected blocks of 5 and 7 layers, the given blocks [14, 17), [20, 23), [14, 20) and
[14, 17) + [20, 23), and the best exactly-2 and exactly-3 cut splits of 7 layers; "rotate" and "diag".

1. load the embedded model (fp32); windows of --seqlen tokens: --calib-samples of the default mix's
   calibration split (domains interleaved), --val-samples per domain of its validation split (where the
   shrinkage factor is chosen), --test-samples per domain of its test split (reported; never used for a
   choice), the "legal" domain included, which is in no calibration data;
2. blocks: ``select_block`` for 5 and 7 layers, the given ones, and the exactly-2 / exactly-3 cut least-cost
   splits of 7 layers from one table of residual-stream similarities (``select_blocks``' cost);
3. per layout and mode: the paper's scales (``estimate_cut_scales`` on the mix, calibrated in order), a
   pruned copy, test perplexity per domain with no patch, the paper's scales, and the default: the same
   scales shrunk toward the identity by the factor ``choose_shrinkage`` picks on the validation windows
   (``linearpatch prune``'s default). For "rotate" also the paper's scales calibrated on the first
   releases' Austen corpus (the same number of windows), the setting of issue 28's table.

Reported: the perplexities, the chosen factors, whether any domain is worse than no patch, and the
gain on the calibration domains (mean over the five of the test loss drop, nats per token) of the
default relative to the paper's scales. The table and the settings go to --out (.md and .json).

    python benchmarks/calibration_domains_smollm2.py --out benchmarks/results/calibration-domains-smollm2-cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time

import torch

from linearpatch_kernels import corpus
from linearpatch_kernels.default_model import DEFAULT_MODEL_NAME, default_model_dir
from linearpatch_kernels.model import estimate_cut_scales, patch_disabled, prune_and_patch, select_block, set_patches
from linearpatch_kernels.model.calibration import best_blocks, block_costs, pairwise_similarities
from linearpatch_kernels.model.patch import LinearPatch
from linearpatch_kernels.model.shrinkage import choose_shrinkage, domain_losses

GIVEN = {"[14, 17)": [(14, 17)], "[20, 23)": [(20, 23)], "[14, 20)": [(14, 20)], "[14, 17) + [20, 23)": [(14, 17), (20, 23)]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--val-samples", type=int, default=2, help="validation windows per domain (shrinkage choice)")
    p.add_argument("--test-samples", type=int, default=2, help="test windows per domain (reported)")
    p.add_argument("--austen", action="store_true",
                   help="also the paper's scales calibrated on the first releases' Austen corpus (rotate only)")
    p.add_argument("--modes", nargs="+", default=["rotate", "diag"])
    p.add_argument("--layouts", nargs="+", default=None,
                   help="subset of: selected-5 selected-7 given:14-17 given:20-23 given:14-20 given:14-17+20-23 "
                        "cuts2-7 cuts3-7 (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return p.parse_args(argv)


def blocks_text(blocks) -> str:
    return " + ".join(f"[{s}, {e})" for s, e in blocks)


def layouts(model, calib, wanted) -> list[tuple[str, str, list]]:
    """``(key, label, blocks)`` of every layout asked for."""
    out = []
    for n in (5, 7):
        if wanted is None or f"selected-{n}" in wanted:
            out.append((f"selected-{n}", f"selected {n}", [select_block(model, calib, n, progress=False)]))
    for label, blocks in GIVEN.items():
        key = "given:" + "+".join(f"{s}-{e}" for s, e in blocks)
        if wanted is None or key in wanted:
            out.append((key, f"given {label}", blocks))
    keys = [k for k in ("cuts2-7", "cuts3-7") if wanted is None or k in wanted]
    if keys:
        costs = block_costs(pairwise_similarities(model, calib, progress=False), "cosine")
        for key in keys:
            cuts = int(key[4])
            out.append((key, f"selected 7 in {cuts} cuts", best_blocks(costs, 7, cuts, exact=True)))
    return out


def ppl(losses: dict[str, float]) -> dict[str, float]:
    return {d: math.exp(v) for d, v in losses.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d = int(model.config.hidden_size)
    calib = corpus.calibration_windows(tokenizer, args.calib_samples, args.seqlen)
    austen = corpus.calibration_windows(tokenizer, args.calib_samples, args.seqlen, corpus="austen")
    val = corpus.domain_windows(tokenizer, args.val_samples, args.seqlen, "validation")
    test = corpus.domain_windows(tokenizer, args.test_samples, args.seqlen, "test")
    cal_domains = list(corpus.MIX_DOMAINS)

    # Every pruned model below equals the dense one up to the layer before its first cut: the input of that
    # layer on each test window is stored once (per layer index) and replayed for every model and patch.
    replay: dict[int, dict] = {}

    def test_losses(pruned, blocks):
        first = min(blocks)[0] - 1
        return domain_losses(pruned, test, replay_from=max(first, 0), cache=replay.setdefault(first, {}))

    t0 = time.perf_counter()
    dense = ppl(domain_losses(model, test))
    print(f"dense: {dense} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for key, label, blocks in layouts(model, calib, args.layouts):
        unpatched = None
        for mode in args.modes:
            t0 = time.perf_counter()
            scales = estimate_cut_scales(model, calib, blocks, mode, progress=False)
            pruned = prune_and_patch(copy.deepcopy(model), blocks=blocks, scales=scales, mode=mode)
            if unpatched is None:
                with patch_disabled(pruned):
                    unpatched = test_losses(pruned, blocks)
            paper = test_losses(pruned, blocks)
            t1 = time.perf_counter()
            choices = choose_shrinkage(pruned, val)
            choose_s = time.perf_counter() - t1
            shrunk = test_losses(pruned, blocks)
            austen_losses = None
            if mode == "rotate" and args.austen:
                austen_scales = estimate_cut_scales(model, austen, blocks, mode, progress=False)
                set_patches(pruned, [LinearPatch(d, mode=mode, scale=s) for s in austen_scales])
                austen_losses = test_losses(pruned, blocks)
            del pruned

            def gain(losses):
                return sum(unpatched[c] - losses[c] for c in cal_domains) / len(cal_domains)

            row = {"layout": key, "label": label, "blocks": [list(b) for b in blocks], "mode": mode,
                   "factors": [c.factor for c in choices],
                   "validation": [{"start": c.start, "end": c.end, "factor": c.factor,
                                   "losses": {str(a): v for a, v in c.losses.items()}} for c in choices],
                   "ppl": {"none": ppl(unpatched), "paper": ppl(paper), "default": ppl(shrunk)},
                   "gain": {"paper": gain(paper), "default": gain(shrunk)},
                   "worse": {"paper": [x for x in test if paper[x] > unpatched[x]],
                             "default": [x for x in test if shrunk[x] > unpatched[x]]},
                   "choose_seconds": choose_s, "seconds": time.perf_counter() - t0}
            if austen_losses is not None:
                row["ppl"]["paper-austen"] = ppl(austen_losses)
                row["gain"]["paper-austen"] = gain(austen_losses)
                row["worse"]["paper-austen"] = [x for x in test if austen_losses[x] > unpatched[x]]
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("label", "blocks", "mode", "factors", "ppl", "gain", "worse",
                                                  "seconds")}), flush=True)
    total = time.perf_counter() - t_start
    result = {"model": DEFAULT_MODEL_NAME, "settings": vars(args), "dense": dense, "rows": rows,
              "seconds": total, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, load average at the end {os.getloadavg()[0]:.2f}"}
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    domains = list(result["dense"])
    head = "| blocks removed | mode | scales | factors | " + " | ".join(
        d + (" *" if d in corpus.HELD_OUT_DOMAINS else "") for d in domains) + " | gain vs paper |"
    lines = [head, "|" + "---|" * (5 + len(domains))]
    lines.append("| dense | | | | " + " | ".join(f"{result['dense'][d]:.2f}" for d in domains) + " | |")
    for row in result["rows"]:
        blocks = blocks_text(row["blocks"])
        variants = [("none", "no patch", "")]
        if "paper-austen" in row["ppl"]:
            variants.append(("paper-austen", "paper, Austen", ""))
        variants += [("paper", "paper", "1" if len(row["factors"]) == 1 else ", ".join("1" for _ in row["factors"])),
                     ("default", "**default**", ", ".join(f"{a:g}" for a in row["factors"]))]
        for name, label, factors in variants:
            if name == "none" and row["mode"] != "rotate" and any(r["layout"] == row["layout"] and r["mode"] == "rotate"
                                                                for r in result["rows"]):
                continue
            cells = []
            for dom in domains:
                v = row["ppl"][name][dom]
                worse = name != "none" and v > row["ppl"]["none"][dom]
                cells.append(f"**{v:.2f}** ↑" if worse else f"{v:.2f}")
            ratio = ""
            if name != "none" and row["gain"]["paper"] > 0:
                ratio = f"{row['gain'][name] / row['gain']['paper']:.2f}"
            elif name != "none":
                ratio = "paper ≤ 0"  # the paper's scales lose on average: no ratio
            mode = "" if name == "none" else row["mode"]
            lines.append(f"| {blocks} | {mode} | {label} | {factors} | " + " | ".join(cells) + f" | {ratio} |")
    s = result["settings"]
    lines.append("")
    lines.append(f"Perplexity on {s['test_samples']} test windows x {s['seqlen']} tokens per domain (* = in no "
                 f"calibration data); calibration {s['calib_samples']} windows of the mix; factors chosen on "
                 f"{s['val_samples']} validation windows per calibration domain. ↑ = worse than no patch. "
                 "gain vs paper: the mean test-loss drop over the five calibration domains relative to the paper's "
                 f"scales on the mix (1 = as much, above 1 = more). {result['seconds']:.0f} s in all; "
                 f"{result['machine']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

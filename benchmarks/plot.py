"""Plots of the benchmarks' JSON results (matplotlib, the optional ``bench`` extra).

* ``plot_op_bench(result, path)``: time per call vs tokens, one line per provider, log-log; one panel
  per (dtype, d), the copy (memory-bandwidth bound) drawn dashed. A CPU run over thread counts and
  a competing process (``--threads 1 2 --compete``) gets ``plot_scenarios`` instead.
* ``plot_scenarios(result, path)``: time per call as a multiple of the copy's, one bar per provider,
  grouped by (threads, competing process); one panel per (dtype, d, tokens).
* ``plot_e2e(result, path)``: overhead over the pruned model (% of its time) of the paper's hook and of
  our patch, end to end and as the op alone, per workload, with the interquartile range of the paired
  ratios as error bars.

The benchmarks call these when matplotlib is importable; where it is not (a GPU machine without
it), render the PNG later from the JSON:

    python benchmarks/plot.py results/<gpu>-<date>/bench_patch.json [-o out.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_STYLE = {
    "ours-cuda": dict(color="tab:red", marker="o"),
    "ours-triton": dict(color="tab:orange", marker="s"),
    "ours-torch": dict(color="tab:brown", marker="^"),
    "fht-twice": dict(color="tab:purple", marker="v"),
    "paper-fp32": dict(color="tab:blue", marker="D"),
    "dense-bf16": dict(color="tab:cyan", marker="x"),
    "dense-fp16": dict(color="tab:cyan", marker="x"),
    "dense-fp32": dict(color="tab:cyan", marker="x"),
    "ours-cpu": dict(color="tab:green", marker="o"),
    "ours-cpu-bf16": dict(color="tab:cyan", marker="o"),
    "ours-cpu-transform": dict(color="tab:olive", marker="o"),
    "ours-cpu-epilogue": dict(color="tab:pink", marker="o"),
    "clone": dict(color="tab:gray", marker="."),
    "copy": dict(color="black", marker=".", linestyle="--"),
}


def _subtitle(env: dict) -> str:
    where = env.get("gpu") or f"CPU ({env.get('cpu', '?')}, {env.get('torch_threads', '?')} threads)"
    return f"{where}; torch {env.get('torch')}; {env.get('date_utc', '')[:10]}"


def plot_op_bench(result: dict, path) -> None:
    rows = [r for r in result["rows"] if "median_us" in r]
    if any("threads" in r for r in rows):
        plot_scenarios(result, path)
        return
    panels = sorted({(r["dtype"], r["d"]) for r in rows}, key=lambda k: (k[0], k[1]))
    if not panels:
        return
    cols = min(len(panels), 5)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (dtype, d) in zip(axes.flat, panels):
        mine = [r for r in rows if r["dtype"] == dtype and r["d"] == d]
        for provider in dict.fromkeys(r["provider"] for r in mine):
            pts = sorted((r["tokens"], r["median_us"]) for r in mine if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=provider,
                    **PROVIDER_STYLE.get(provider, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{dtype}, d={d}", fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("time per call (us)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(panels)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=9)
    mode = rows[0].get("mode", "eager")
    fig.suptitle(f"LinearPatch op vs dense matmul and copy ({mode})\n{_subtitle(result['env'])}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scenarios(result: dict, path) -> None:
    rows = [r for r in result["rows"] if "median_us" in r and "threads" in r]
    panels = sorted({(r["dtype"], r["d"], r["tokens"]) for r in rows})
    if not panels:
        return
    scenario_keys = sorted({(r["threads"], r["competing"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9.0, 6.5 * len(panels)), 4.8), squeeze=False)
    for ax, (dtype, d, tokens) in zip(axes.flat, panels):
        mine = [r for r in rows if (r["dtype"], r["d"], r["tokens"]) == (dtype, d, tokens)]
        providers = [p for p in dict.fromkeys(r["provider"] for r in mine) if p != "copy"]
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, key in enumerate(scenario_keys):
                copy = [r for r in mine if r["provider"] == "copy" and (r["threads"], r["competing"]) == key]
                hit = [r for r in mine if r["provider"] == provider and (r["threads"], r["competing"]) == key]
                if copy and hit:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(hit[0]["median_us"] / copy[0]["median_us"])
            ax.bar(xs, ys, width=width, label=provider, color=PROVIDER_STYLE.get(provider, {}).get("color"))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(scenario_keys)))
        ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}\n{'+ busy process' if c else 'no competitor'}"
                            for t, c in scenario_keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("time per call / copy's time")
        ax.set_title(f"{dtype}, d={d}, {tokens} tokens", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.suptitle(f"LinearPatch ops on the CPU, as multiples of a copy into a preallocated tensor (dashed)\n"
                 f"{_subtitle(result['env'])}", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_e2e(result: dict, path) -> None:
    series = (("pruned+paper", "tab:blue", "", "paper's hook (dense fp32 P), end to end"),
              ("pruned+ours", "tab:red", "", "ours (hadamard_patch), end to end"),
              ("op:paper", "tab:blue", "//", "paper's matmul alone"),
              ("op:ours", "tab:red", "//", "our op alone"))
    names = [s[0] for s in series]
    rows = [r for r in result["rows"] if "overhead_pct" in r and r["variant"] in names]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    if not workloads:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(workloads) + 2), 4.2))
    width = 0.2
    for i, (variant, color, hatch, label) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            match = [r for r in rows if r["workload"] == w and r["variant"] == variant]
            if match:
                r = match[0]
                xs.append(j + (i - 1.5) * width)
                ys.append(r["overhead_pct"])
                lo.append(max(0.0, r["overhead_pct"] - r["overhead_q1_pct"]))
                hi.append(max(0.0, r["overhead_q3_pct"] - r["overhead_pct"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], color=color if not hatch else "white", edgecolor=color, hatch=hatch,
               label=label, capsize=3)
    ax.axhline(1.0, color="gray", linestyle=":", label="1 % target")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, fontsize=9)
    ax.set_ylabel("% of the pruned model's time")
    model = result.get("model", {})
    ax.set_title(f"Patch overhead: {model.get('name', 'model')}-shaped Llama, layers {model.get('pruned_block')} "
                 f"pruned\n{_subtitle(result['env'])} (bars: paired median, whiskers: IQR)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a bench_patch or bench_e2e JSON result")
    parser.add_argument("-o", "--output", help="PNG path (default: the JSON's path with .png)")
    args = parser.parse_args(argv)
    result = json.loads(Path(args.json).read_text())
    out = args.output or str(Path(args.json).with_suffix(".png"))
    kinds = {"bench_patch": plot_op_bench, "bench_e2e": plot_e2e}
    kind = result.get("benchmark")
    if kind not in kinds:
        raise SystemExit(f"{args.json}: 'benchmark' is {kind!r}; expected one of {', '.join(kinds)}")
    kinds[kind](result, out)
    print(out)


if __name__ == "__main__":
    main()

"""The results writer of the GPU run: one comparable record per run, measured beside modelled.

A record is a folder ``benchmarks/results/<gpu>-<date>/`` (``h200-2026-12-01``) holding

    record.json      every kernel timed (measured time, ratio to a copy of the same tensor, and the
                     SASS model's ratio beside it), the comparisons (dense bf16 matmul, the paper's fp32
                     matmul, fast-hadamard-transform twice, the public op), the end-to-end rows, the
                     steps and their status, the card, driver, clocks and versions, the exact commands
    table.md         generated from record.json: measured beside modelled per kernel, the model's error
    copy_ratio.png   ratio to a copy per hidden size and backend (bf16, prefill-sized tensors), the
                     modelled ratios dashed
    decode.png       decode latency (1 and 64 rows) per provider, eager and replayed from a CUDA graph
    e2e_share.png    end to end: the patch's share of the step, ours and the paper's hook
    commands.txt     the exact commands of the run

It reads a run folder written by ``benchmarks/gpu_check.sh`` ($OUT: gpu_timings.json, steps.json,
environment.txt, clocks.csv, bench_e2e.json, sass_model.json) or the first run's layout (``run1/``,
``run2/`` with the old gpu_timings.json and the model of its time as a table, sass_model.txt).

Modelled ratios: the CUDA kernels' from the SASS model (``benchmarks/sass_budget.py``), the Triton
kernels' from the ahead-of-time compile report under triton 3.6 (``scripts/triton_aot.py``, the same
pipe model on the compiled SASS). The run's own model (the one built for the kernels it timed: the
run's ``sass_model.json`` and, when the bundle carried one, ``triton_model.json``) gives the error
column; the committed models (``benchmarks/results/sass-budget/budget.json`` and
``benchmarks/results/triton-aot/triton-3.6/report.json``, today's kernels) are shown beside it as the
prediction for the next run. Both models are for 16,384 rows, so only
prefill-sized tensors (16,384 rows or more, or 2^26 elements) get a modelled column. Every model file
is read by ``model_rows``, the one function to adapt when the model's JSON changes.

    python benchmarks/gpu_record.py --run OUT_FOLDER --out benchmarks/results/<gpu>-<date> \
        [--previous benchmarks/results/h200-2026-12-01]    # an earlier record of the same kind of GPU
    python benchmarks/gpu_record.py --legacy benchmarks/results/h200-2026-12-01 --out benchmarks/results/h200-2026-12-01
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_SASS = ROOT / "benchmarks" / "results" / "sass-budget" / "budget.json"
TRITON_AOT = ROOT / "benchmarks" / "results" / "triton-aot" / "triton-3.6" / "report.json"
OPS = {"patch": "hadamard_patch", "transform": "hadamard_transform", "epilogue": "patch_add_rmsnorm"}
MODEL_ELEMENTS = 1 << 26  # the model's tensor: 16,384 rows of 4096; compared from this size (or 16,384 rows) up
FORMAT = 1


# ------------------------------------------------------------------------------------------------
# The model, read through one function


def model_rows(source) -> list[dict]:
    """Rows ``{backend, op, dtype, d, gpu, ratio, lower_bound, kernel}`` of a model file: the SASS model's
    JSON (``sass_budget.py --json``: a list of rows with op/dtype/d/gpu/ratio/lower_bound/kernel), its
    markdown table (``sass_budget.py`` stdout: "gpu | op | dtype | d | kernel | ... | model x copy"), or
    the Triton AOT report (``{"rows": [...]}`` with ``model: {gpu, ratio}`` per prefill row). ``source`` is
    a path or already-parsed JSON. This is the place to adapt when the model's output format changes."""
    if isinstance(source, (str, Path)):
        text = Path(source).read_text()
        try:
            data = json.loads(text)
        except ValueError:
            return _rows_from_table(text)
    else:
        data = source
    out = []
    if isinstance(data, dict) and "rows" in data:  # the Triton AOT report
        for r in data["rows"]:
            m = r.get("model")
            if m and r.get("regime") == "prefill" and "refused" not in r:
                dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(r["dtype"], r["dtype"])
                out.append(dict(backend="triton", op=r["op"], dtype=dtype, d=int(r["d"]), gpu=m["gpu"], ratio=m["ratio"],
                                lower_bound=False, kernel=f"{r['config']['BLOCK_M']}x{r['config']['K_PAD']}x"
                                f"{r['config']['N']}/{r['config']['num_warps']}" + (" adds" if r["config"]["NETWORK"] else "")))
        return out
    for r in data:
        if r.get("ratio") is None or r.get("op") not in OPS.values():
            continue
        out.append(dict(backend="cuda", op=r["op"], dtype=r["dtype"], d=int(r["d"]), gpu=r.get("gpu", "H200"),
                        ratio=float(r["ratio"]), lower_bound=bool(r.get("lower_bound")), kernel=r.get("kernel")))
    return out


def _rows_from_table(text: str) -> list[dict]:
    """The SASS model's markdown table (the first run kept only that): its last column is the ratio."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 6 or cells[1] not in OPS.values() or not cells[3].isdigit():
            continue
        ratio = cells[-1]
        if not re.fullmatch(r"(>=)?[0-9.]+", ratio):
            continue
        out.append(dict(backend="cuda", op=cells[1], dtype=cells[2], d=int(cells[3]), gpu=cells[0],
                        ratio=float(ratio.removeprefix(">=")), lower_bound=ratio.startswith(">="), kernel=cells[4]))
    return out


def model_index(rows: list[dict], gpu: str = "H200") -> dict:
    return {(r["backend"], r["op"], r["dtype"], r["d"]): r for r in rows if r["gpu"] == gpu}


# ------------------------------------------------------------------------------------------------
# Reading a run


_LEGACY_CASES = {  # the first run's case names -> (impl, op)
    "copy": ("copy", "copy"), "cuda patch": ("cuda", "patch"), "triton patch": ("triton", "patch"),
    "cuda transform": ("cuda", "transform"), "triton transform": ("triton", "transform"),
    "public op, auto backend": ("op", "patch"), "dense bf16 matmul": ("dense-matmul", "patch"),
    "paper: fp32 matmul + casts": ("paper-fp32", "patch"), "epilogue: cuda fused": ("cuda", "epilogue"),
    "epilogue: triton fused": ("triton", "epilogue"), "epilogue: separate (cuda)": ("separate (cuda)", "epilogue"),
    "epilogue: public op, auto": ("op", "epilogue"),
    # the copy-ratio sweep's op names
    "patch": ("cuda", "patch"), "transform": ("cuda", "transform"), "patch_add_rmsnorm": ("cuda", "epilogue"),
    "triton patch_add_rmsnorm": ("triton", "epilogue"),
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def legacy_measurements(folder: Path) -> tuple[list[dict], list[str]]:
    """Rows of the first run's gpu_timings.json files (run1/, run2/), in the record's form."""
    rows, sources = [], []
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "gpu_timings.json").is_file()):
        data = json.loads((run / "gpu_timings.json").read_text())
        sources.append(str((run / "gpu_timings.json").relative_to(folder)))
        for r in data.get("results", []):
            case = r["case"].removesuffix(" (CUDA graph)")
            impl, op = _LEGACY_CASES.get(case, (case, "other"))
            rows.append(dict(run=run.name, phase="core", impl=impl, op=op, dtype=r["dtype"], d=r["d"], rows=r["rows"],
                             mode="graph" if r["case"].endswith("(CUDA graph)") else "eager",
                             median_us=r["median_ms"] * 1e3 if _finite(r.get("median_ms")) else None,
                             ratio_to_copy=r.get("ratio_to_copy") if _finite(r.get("ratio_to_copy")) else None))
        for r in data.get("copy_ratios", []):
            impl, op = _LEGACY_CASES.get(r["op"], (r["op"], "other"))
            ok = _finite(r.get("median_ms"))
            rows.append(dict(run=run.name, phase="sweep", impl=impl, op=op, dtype=r["dtype"], d=r["d"], rows=r["rows"],
                             mode="eager", median_us=r["median_ms"] * 1e3 if ok else None,
                             copy_us=r["copy_ms"] * 1e3 if _finite(r.get("copy_ms")) else None,
                             ratio_to_copy=r["ratio_to_copy"] if ok else None,
                             **({} if ok else {"error": "not measured (the run's error list)"})))
        for x in rows:  # the copy each row was divided by (the epilogue part timed a copy of its own)
            if x.get("copy_us") is None and x["median_us"] is not None and x.get("ratio_to_copy"):
                x["copy_us"] = x["median_us"] / x["ratio_to_copy"]
    return rows, sources


def run_measurements(folder: Path) -> tuple[list[dict], list[str]]:
    """Rows of a gpu_check.sh run's gpu_timings.json in the record's form."""
    path = folder / "gpu_timings.json"
    if not path.is_file():
        return [], []
    data = json.loads(path.read_text())
    rows = []
    # the copy of the same group (phase, dtype, d, rows): groups of two phases may share a shape
    copies = {(r["phase"], r["dtype"], r["d"], r["rows"], r["mode"]): r["median_ms"] * 1e3 for r in data["rows"]
              if r.get("impl") == "copy" and "median_ms" in r}
    for r in data["rows"]:
        row = dict(run=folder.name, phase=r["phase"], impl=r["impl"], op=r["op"], dtype=r["dtype"], d=r["d"],
                   rows=r["rows"], mode=r["mode"], median_us=r["median_ms"] * 1e3 if "median_ms" in r else None,
                   rounds_us=[v * 1e3 for v in r.get("rounds_ms", [])], ratio_to_copy=r.get("ratio_to_copy"),
                   copy_us=copies.get((r["phase"], r["dtype"], r["d"], r["rows"], r["mode"]),
                                      copies.get((r["phase"], r["dtype"], r["d"], r["rows"], "eager"))),
                   rel_error=r.get("rel_error"))
        if "error" in r or "skipped" in r:
            row["error" if "error" in r else "skipped"] = r.get("error") or r.get("skipped")
        rows.append(row)
    return rows, ["gpu_timings.json"]


# ------------------------------------------------------------------------------------------------
# Machine facts


def machine_from_text(text: str) -> dict:
    """Card, driver, memory and clocks from nvidia-smi's CSV lines and the versions printed by the run."""
    out = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("name,") and i + 1 < len(lines):
            keys = [k.strip().split(" [")[0] for k in line.split(",")]
            values = [v.strip() for v in lines[i + 1].split(",")]
            # values without their units ("143771 MiB" -> "143771"): the key names them
            out.update({k.replace(".", "_"): v.split()[0] if re.fullmatch(r"[0-9.]+ \S+", v) else v
                        for k, v in zip(keys, values)})
        for key in ("python", "torch", "triton"):
            if line.startswith(key + " ") and key not in out:
                out[key] = line.split()[1]
        if m := re.search(r"sm_(\d+) (\d+) SMs", line):
            out.setdefault("arch", f"sm_{m.group(1)}")
            out.setdefault("sms", int(m.group(2)))
        if m := re.search(r"release ([0-9.]+), (V[0-9.]+)", line):
            out.setdefault("nvcc", m.group(2))
    return out


def clock_summary(path: Path) -> dict | None:
    """SM and memory clocks over the run (nvidia-smi -lms): min / median / max, MHz."""
    if not path.is_file():
        return None
    sm, mem = [], []
    with open(path) as f:
        for row in csv.reader(f):
            try:
                sm.append(float(row[1].split()[0]))
                mem.append(float(row[2].split()[0]))
            except (IndexError, ValueError):
                continue
    if not sm:
        return None
    stat = lambda v: dict(min=min(v), median=statistics.median(v), max=max(v))  # noqa: E731
    return dict(samples=len(sm), sm_mhz=stat(sm), mem_mhz=stat(mem))


# ------------------------------------------------------------------------------------------------
# The record


def attach_model(rows: list[dict], run_model: dict, now_model: dict) -> None:
    """``model_run`` / ``model_now`` (ratio to a copy, kernel) and ``model_error`` (measured ratio / run's
    modelled ratio - 1) for the kernels of prefill-sized tensors."""
    for r in rows:
        if r["impl"] not in ("cuda", "triton") or r["op"] not in OPS or r.get("mode") != "eager":
            continue
        if not (r["rows"] >= 16384 or r["rows"] * r["d"] >= MODEL_ELEMENTS):
            continue
        key = (r["impl"], OPS[r["op"]], r["dtype"], r["d"])
        for name, model in (("model_run", run_model), ("model_now", now_model)):
            m = model.get(key)
            if m:
                r[name] = dict(ratio=m["ratio"], lower_bound=m["lower_bound"], kernel=m["kernel"])
        if r.get("model_run") and r.get("ratio_to_copy"):
            r["model_error"] = r["ratio_to_copy"] / r["model_run"]["ratio"] - 1


def build_record(measurements: list[dict], machine: dict, *, slug: str, commands: list[str], sources: list[str],
                 run_model_rows: list[dict], now_model_rows: list[dict], e2e: dict | None, steps: list | None,
                 clocks: dict | None, notes: list[str]) -> dict:
    run_model, now_model = model_index(run_model_rows), model_index(now_model_rows)
    attach_model(measurements, run_model, now_model)
    kernels = [r for r in measurements if r["impl"] in ("cuda", "triton") or r["impl"].startswith("triton (")]
    others = [r for r in measurements if r not in kernels]
    return dict(format=FORMAT, slug=slug, gpu=machine.get("name"), machine=machine, clocks=clocks, commands=commands,
                sources=sources, model_sources=dict(run=len(run_model_rows), now=len(now_model_rows)),
                kernels=kernels, comparisons=others, e2e=(e2e or {}).get("rows", []),
                e2e_model=(e2e or {}).get("model"), steps=steps or [], notes=notes)


def attach_previous(record: dict, previous: dict) -> None:
    """``previous_ratio``: the same kernel's ratio to a copy in an earlier record. Only records of the same
    kind of GPU are compared (a copy ratio depends on the card's bandwidth and issue rate)."""
    if previous.get("gpu") != record.get("gpu"):
        raise ValueError(f"compare runs on the same kind of GPU only: the earlier record is of {previous.get('gpu')!r}, "
                         f"this one of {record.get('gpu')!r}")
    key = lambda r: (r["impl"], r["op"], r["dtype"], r["d"], r["rows"], r.get("mode"))  # noqa: E731
    earlier = {key(r): r["ratio_to_copy"] for r in previous["kernels"] if r.get("ratio_to_copy") is not None}
    record["previous"] = previous.get("slug")
    for r in record["kernels"]:
        if key(r) in earlier:
            r["previous_ratio"] = earlier[key(r)]


def latest_record(gpu: str | None, slug: str) -> Path | None:
    """The committed record (``benchmarks/results/*/record.json``) of the same GPU with the latest date
    before ``slug``'s, or None."""
    found = []
    for path in (ROOT / "benchmarks" / "results").glob("*/record.json"):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if other.get("gpu") == gpu and other.get("slug", "")[-10:] < slug[-10:]:
            found.append((other["slug"][-10:], path.parent))
    return max(found)[1] if found else None


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def table_markdown(record: dict) -> str:
    lines = [f"# {record['gpu']} ({record['slug']}): measured beside modelled", "",
             "Generated by `benchmarks/gpu_record.py` from `record.json`. `x copy`: the median time over the median "
             "time of a copy of the same tensor (read + write), measured in the same run. `model (run)`: the SASS "
             "model of the kernels that ran (CUDA: `benchmarks/sass_budget.py`; Triton: `scripts/triton_aot.py`), "
             "`modelled us`: that ratio times the measured copy, `error`: measured / modelled - 1 (positive: "
             "slower than modelled). `model (now)`: the committed "
             "model of today's kernels, the prediction for the next run. Modelled only for prefill-sized tensors "
             "(the model's 16,384 rows). The fused epilogue moves two tensors each way: its floor is 2.", "",
             "| backend | op | dtype | d | rows | measured us | modelled us | x copy | model (run) | error | model (now) | kernel (run) |"
             + (f" {record['previous']} x copy |" if record.get("previous") else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if record.get("previous") else "")]
    for r in record["kernels"]:
        if r.get("median_us") is None or r.get("mode") != "eager":
            continue
        run, now = r.get("model_run"), r.get("model_now")
        cell = lambda m: "-" if not m else (">=" if m["lower_bound"] else "") + f"{m['ratio']:.2f}"  # noqa: E731
        err = "-" if r.get("model_error") is None else f"{100 * r['model_error']:+.0f} %"
        modelled = f"{run['ratio'] * r['copy_us']:.1f}" if run and r.get("copy_us") else "-"
        lines.append(f"| {r['impl']} | {r['op']} | {r['dtype']} | {r['d']} | {r['rows']} | {r['median_us']:.1f} | "
                     f"{modelled} | {_fmt(r.get('ratio_to_copy'))} | {cell(run)} | {err} | {cell(now)} | {(run or {}).get('kernel') or '-'} |"
                     + (f" {_fmt(r.get('previous_ratio'))} |" if record.get("previous") else ""))
    errors = [r["model_error"] for r in record["kernels"] if r.get("model_error") is not None]
    if errors:
        lines += ["", f"Model error over {len(errors)} kernels: median {100 * statistics.median(errors):+.0f} %, "
                      f"range {100 * min(errors):+.0f} % to {100 * max(errors):+.0f} %."]
    missing = {}
    for r in record["kernels"]:
        if r.get("median_us") is None:
            missing.setdefault(f"{r['impl']} {r['op']}", set()).add((r["dtype"], r["d"]))
    if missing:
        lines += ["", "Not measured (a failed or skipped case of the run): " + "; ".join(
            f"{k} at {len(v)} (dtype, d) pairs" for k, v in sorted(missing.items())) + "."]
    comp = [r for r in record["comparisons"] if r.get("median_us") is not None and r["impl"] != "copy"]
    if comp:
        lines += ["", "## Beside the kernels", "", "| provider | op | dtype | d | rows | mode | measured us | x copy |",
                  "|---|---|---|---:|---:|---|---:|---:|"]
        for r in comp:
            lines.append(f"| {r['impl']} | {r['op']} | {r['dtype']} | {r['d']} | {r['rows']} | {r['mode']} | "
                         f"{r['median_us']:.1f} | {_fmt(r.get('ratio_to_copy'))} |")
    graph = [r for r in record["kernels"] if r.get("mode") == "graph" and r.get("median_us") is not None]
    if graph:
        lines += ["", "## Decode sizes replayed from CUDA graphs", "", "| backend | op | dtype | d | rows | us |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['impl']} | {r['op']} | {r['dtype']} | {r['d']} | {r['rows']} | {r['median_us']:.2f} |" for r in graph]
    e2e = [r for r in record["e2e"] if "error" not in r and r.get("variant") in ("pruned+ours", "pruned+paper", "op:ours")]
    if e2e:
        lines += ["", "## End to end (overhead over the pruned model, paired median)", "",
                  "| workload | variant | median ms | tokens/s | overhead |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['workload']} | {r['variant']} | {r['median_ms']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['overhead_pct']:+.2f} % |" for r in e2e]
    if record["steps"]:
        lines += ["", "## Steps", "", "| step | status | seconds | Triton kernels compiled during it |", "|---|---|---:|---:|"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('triton_kernels_compiled_here', '-')} |"
                  for s in record["steps"]]
    m = record["machine"]
    lines += ["", "## Machine", "", f"{m.get('name')}, driver {m.get('driver_version')}, {m.get('memory_total')} "
              f"MiB, max SM clock {m.get('clocks_max_sm')} MHz; python {m.get('python')}, torch {m.get('torch')}, "
              f"triton {m.get('triton')}, nvcc {m.get('nvcc')}."]
    if record.get("clocks"):
        c = record["clocks"]
        lines.append(f"SM clock during the run ({c['samples']} samples): {c['sm_mhz']['min']:.0f} / "
                     f"{c['sm_mhz']['median']:.0f} / {c['sm_mhz']['max']:.0f} MHz (min / median / max).")
    lines += ["", "Commands:", ""] + [f"    {c}" for c in record["commands"]]
    if record["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib; skipped with a note where it is not installed)


def plots(record: dict, out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib not installed: no plots (rerun gpu_record.py where it is)"]
    written = []
    title = f"{record['gpu']} ({record['slug']})"
    # 1. ratio to a copy per size and backend, bf16, prefill-sized tensors, modelled dashed
    rows = [r for r in record["kernels"] if r.get("mode") == "eager" and r["dtype"] == "bfloat16"
            and r.get("ratio_to_copy") is not None and (r["rows"] >= 16384 or r["rows"] * r["d"] >= MODEL_ELEMENTS)]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        several = len({r["run"] for r in rows}) > 1  # one line per run: runs are not averaged
        for impl, op, run in sorted({(r["impl"], r["op"], r["run"]) for r in rows}):
            mine = [r for r in rows if (r["impl"], r["op"], r["run"]) == (impl, op, run)]
            pts = sorted({r["d"]: r["ratio_to_copy"] for r in mine}.items())
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{impl} {op}" + (f" ({run})" if several else ""))
            model = sorted({r["d"]: r["model_run"]["ratio"] for r in mine if r.get("model_run")}.items())
            if model:
                ax.plot([p[0] for p in model], [p[1] for p in model], linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("hidden size d")
        ax.set_ylabel("time / copy time")
        ax.set_title(f"Ratio to a copy, bf16, prefill-sized (dashed: modelled)\n{title}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "copy_ratio.png", dpi=110)
        plt.close(fig)
        written.append("copy_ratio.png")
    # 2. decode latency: 1 and 64 rows, every provider, eager and graph
    dec = [r for r in record["kernels"] + record["comparisons"]
           if r["rows"] in (1, 64) and r.get("median_us") is not None and r["op"] in ("patch", "transform", "epilogue")]
    if dec:
        labels = sorted({(r["dtype"], r["d"], r["rows"]) for r in dec})
        series = sorted({(r["impl"], r["op"], r["mode"]) for r in dec})
        fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(labels) + 3), 4.5))
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            xs, ys = [], []
            for j, lab in enumerate(labels):
                v = [r["median_us"] for r in dec if (r["dtype"], r["d"], r["rows"]) == lab and (r["impl"], r["op"], r["mode"]) == s]
                if v:
                    xs.append(j + (i - len(series) / 2) * width)
                    ys.append(v[0])
            ax.bar(xs, ys, width, label=f"{s[0]} {s[1]} ({s[2]})", hatch="//" if s[2] == "graph" else "")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{d}\n{dt}\n{n} row{'s' if n > 1 else ''}" for dt, d, n in labels], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("us per call")
        ax.set_title(f"Decode latency\n{title}", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "decode.png", dpi=110)
        plt.close(fig)
        written.append("decode.png")
    # 3. end to end: the patch's share
    if record["e2e"]:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import plot
        plot.plot_e2e({"rows": record["e2e"], "env": {"gpu": record["gpu"], "date_utc": record["slug"][-10:]},
                       "model": record.get("e2e_model") or {}}, out / "e2e_share.png")
        written.append("e2e_share.png")
    else:
        written.append("no e2e_share.png: the run has no end-to-end rows")
    return written


# ------------------------------------------------------------------------------------------------
# Main


def slug_of(gpu: str | None, date: str) -> str:
    name = (gpu or "gpu").lower().replace("nvidia", "").strip().split()[0]
    return f"{name}-{date}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a gpu_check.sh results folder ($OUT)")
    source.add_argument("--legacy", type=Path, help="the first run's folder (run1/, run2/, sass_model.txt)")
    parser.add_argument("--out", type=Path, required=True, help="the record folder (benchmarks/results/<gpu>-<date>)")
    parser.add_argument("--command", action="append", default=[], help="the exact command(s) of the run")
    parser.add_argument("--date", help="YYYY-MM-DD of the run (default: from the folder name or today)")
    parser.add_argument("--previous", type=Path, help="an earlier record of the same kind of GPU: its ratios beside")
    parser.add_argument("--compare-latest", action="store_true",
                        help="--previous: the latest committed record of the same kind of GPU, if any")
    args = parser.parse_args(argv)
    folder = args.run or args.legacy
    if not folder.is_dir():
        parser.error(f"{folder}: not a folder")
    notes = []
    if args.legacy:
        measurements, sources = legacy_measurements(folder)
        logs = "\n".join((p / "gpu_check.log").read_text() for p in sorted(folder.iterdir())
                         if (p / "gpu_check.log").is_file())
        machine = machine_from_text(logs)
        model_file = folder / "sass_model.txt"
        run_model = model_rows(model_file) if model_file.is_file() else []
        commands = args.command or _legacy_commands(folder)
        steps, e2e, clocks = None, None, None
        notes.append("converted from the first run's files; clocks were not logged, the SM clock is its maximum")
    else:
        measurements, sources = run_measurements(folder)
        text = (folder / "environment.txt").read_text() if (folder / "environment.txt").is_file() else ""
        machine = machine_from_text(text)
        run_model = model_rows(folder / "sass_model.json") if (folder / "sass_model.json").is_file() else []
        commands = args.command
        steps = json.loads((folder / "steps.json").read_text()) if (folder / "steps.json").is_file() else None
        e2e = json.loads((folder / "bench_e2e.json").read_text()) if (folder / "bench_e2e.json").is_file() else None
        clocks = clock_summary(folder / "clocks.csv")
    if args.run and (folder / "triton_model.json").is_file():  # the bundle's report of the kernels it carried
        run_model += model_rows(folder / "triton_model.json")
    now_model = model_rows(COMMITTED_SASS) + (model_rows(TRITON_AOT) if TRITON_AOT.is_file() else [])
    date = args.date or (re.search(r"\d{4}-\d{2}-\d{2}", folder.name) or re.search(r"\d{4}-\d{2}-\d{2}", str(args.out)))
    date = date if isinstance(date, str) or date is None else date.group(0)
    date = date or datetime.date.today().isoformat()
    slug = slug_of(machine.get("name"), date)
    record = build_record(measurements, machine, slug=slug, commands=commands, sources=sources,
                          run_model_rows=run_model, now_model_rows=now_model, e2e=e2e, steps=steps, clocks=clocks,
                          notes=notes)
    if args.compare_latest and not args.previous:
        args.previous = latest_record(record["gpu"], record["slug"])
    if args.previous:
        try:
            attach_previous(record, json.loads((args.previous / "record.json").read_text()))
        except (OSError, ValueError) as e:
            parser.error(f"--previous {args.previous}: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "table.md").write_text(table_markdown(record))
    (args.out / "commands.txt").write_text("\n".join(commands) + "\n")
    written = plots(record, args.out)
    timed = sum(r.get("median_us") is not None for r in record["kernels"])
    print(f"gpu_record: {args.out}: {timed} kernel timings ({sum('model_error' in r for r in record['kernels'])} "
          f"beside the model), {len(record['comparisons'])} comparison rows, {len(record['e2e'])} end-to-end rows; "
          + ", ".join(written))
    return 0


def _legacy_commands(folder: Path) -> list[str]:
    """The commands quoted in the first run's README (```bash blocks)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return []
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    return [line for block in blocks for line in block.strip().splitlines() if line and not line.startswith("#")]


if __name__ == "__main__":
    sys.exit(main())

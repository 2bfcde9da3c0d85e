"""Serving benchmark: dense, pruned and pruned + patch under vLLM (offline batch generation).

Three checkpoints are written from one dense model (default: the embedded SmolLM2-135M-Instruct,
converted once by ``linearpatch_kernels.default_model``; ``--model`` any Llama/Mistral/Qwen2/Qwen3
folder): the model itself, the model with layers ``[start, end)`` deleted (a plain checkpoint of the
family), and the same with a rotate LinearPatch at the cut (``save_pruned``: vLLM runs it through this
package's plugin). The patch's scales are random around 1 (``--scale-spread``): timing does not depend
on their values, and no calibration is needed.

Each variant is served by ``vllm.LLM`` in a fresh subprocess (one engine per process) and measured
on two workloads, after ``--warmup`` untimed runs:

    batch     --batch prompts of --prompt-len random tokens, --new-tokens generated each (ignore_eos,
              greedy): throughput = generated tokens / wall time of ``llm.generate``
    latency   one such prompt alone: wall time of the request (prefill + --new-tokens decode steps)

Each is repeated ``--repeats`` times; the JSON keeps every sample and the medians. The variants run
one after another (one engine per process), ``--rounds`` times in rotated order, so slow drift of a
shared machine is spread over all of them. Run it in the environment that has vLLM and this package
(``.ci/vllm_check.sh`` builds one for the CPU):

    python benchmarks/bench_vllm.py --device cpu --out-dir benchmarks/results/vllm-cpu-<date>   # small CPU run
    python benchmarks/bench_vllm.py --dtype bfloat16 --batch 64 --prompt-len 512 --new-tokens 128   # a GPU
    python benchmarks/bench_vllm.py --plot RESULT.json        # the PNG from a JSON (needs matplotlib)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("dense", "pruned", "pruned+patch")


def write_checkpoints(model_dir: Path, start: int, end: int, spread: float, out: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    import linearpatch_kernels as lp
    from linearpatch_kernels.model import plain_layers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    paths = {"dense": model_dir, "pruned": out / "pruned", "pruned+patch": out / "pruned-patch"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    lp.prune_and_patch(model, start, end, 1 + spread * (2 * torch.rand(d, generator=g) - 1), fuse=False)
    lp.save_pruned(model, paths["pruned+patch"], tokenizer=tokenizer)
    record = model.config.linearpatch
    with plain_layers(model):
        del model.config.linearpatch  # a plain checkpoint of the family: the pruned model, nothing at the cut
        try:
            # transformers' own save on purpose (a pruned model's save_pretrained writes the patched checkpoint)
            PreTrainedModel.save_pretrained(model, paths["pruned"])
        finally:
            model.config.linearpatch = record
    tokenizer.save_pretrained(paths["pruned"])
    return paths


def serve_and_time(args) -> dict:
    """In the worker subprocess: one engine for one checkpoint, the two workloads."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=args.checkpoint, dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_model_len=args.prompt_len + args.new_tokens, seed=0,
              gpu_memory_utilization=args.memory_fraction, max_num_seqs=max(args.batch, 1))
    load_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(1)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(10, vocab - 10, args.prompt_len).tolist())
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)

    def run(batch):
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        return elapsed, [list(o.outputs[0].token_ids) for o in outs]

    for _ in range(args.warmup):
        run(prompts)
    batch_s, latency_s = [], []
    tokens = None
    for _ in range(args.repeats):
        elapsed, tokens = run(prompts)
        batch_s.append(elapsed)
        latency_s.append(run(prompts[:1])[0])
    return {"load_s": load_s, "batch_s": batch_s, "latency_s": latency_s, "first_tokens": tokens[0][:16]}


def environment(device: str) -> dict:
    import torch
    import vllm

    import linearpatch_kernels as lp

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "vllm": vllm.__version__, "linearpatch_kernels": lp.__version__,
            "git_commit": commit, "device": device, "loadavg_start": list(os.getloadavg()),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None}


def summarize(samples: dict, args) -> list[dict]:
    rows = []
    for name in VARIANTS:
        runs = samples[name]
        batch = [s for r in runs for s in r["batch_s"]]
        latency = [s for r in runs for s in r["latency_s"]]
        rows.append({
            "variant": name,
            "throughput_tok_s": args.batch * args.new_tokens / statistics.median(batch),
            "batch_median_s": statistics.median(batch),
            "latency_median_s": statistics.median(latency),
            "latency_ms_per_token": 1000 * statistics.median(latency) / args.new_tokens,
            "samples": len(batch),
        })
    base = {r["variant"]: r for r in rows}["pruned"]
    for r in rows:
        r["throughput_vs_pruned"] = r["throughput_tok_s"] / base["throughput_tok_s"]
        r["latency_vs_pruned"] = r["latency_median_s"] / base["latency_median_s"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'variant':<14} {'throughput tok/s':>17} {'vs pruned':>10} {'latency s':>10} {'ms/token':>9} {'vs pruned':>10}"]
    for r in rows:
        lines.append(f"{r['variant']:<14} {r['throughput_tok_s']:>17.1f} {r['throughput_vs_pruned']:>10.3f} "
                     f"{r['latency_median_s']:>10.3f} {r['latency_ms_per_token']:>9.2f} {r['latency_vs_pruned']:>10.3f}")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["variant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.bar(names, [r["throughput_tok_s"] for r in rows], color=["tab:gray", "tab:blue", "tab:red"])
    a.set_ylabel("generated tokens / s")
    a.set_title(f"batch {result['settings']['batch']}", fontsize=10)
    b.bar(names, [r["latency_median_s"] for r in rows], color=["tab:gray", "tab:blue", "tab:red"])
    b.set_ylabel("s per request")
    b.set_title("one request", fontsize=10)
    s, env = result["settings"], result["env"]
    fig.suptitle(f"vLLM {env['vllm']} on {env.get('gpu') or 'CPU'}: {Path(s['model']).name}, layers "
                 f"[{s['start']}, {s['end']}) pruned; prompt {s['prompt_len']}, {s['new_tokens']} new tokens",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="dense model folder (default: the embedded SmolLM2-135M-Instruct, converted)")
    p.add_argument("--start", type=int, default=20)
    p.add_argument("--end", type=int, default=25)
    p.add_argument("--scale-spread", type=float, default=0.2)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="vLLM's gpu_memory_utilization (on the CPU: the share of RAM for the KV cache); "
                        "default 0.85 on cuda, 0.1 on cpu")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (always on the CPU)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="bench_vllm")
    p.add_argument("--plot", metavar="JSON", help="only render the PNG of an earlier result")
    p.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "OUT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.memory_fraction = args.memory_fraction or (0.85 if args.device == "cuda" else 0.1)
    if args.device == "cpu":
        args.enforce_eager = True
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        plot(result, Path(args.plot).with_suffix(".png"))
        return result
    if args.worker:
        args.checkpoint, out = args.worker
        Path(out).write_text(json.dumps(serve_and_time(args)))
        return None

    from linearpatch_kernels.default_model import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    env = environment(args.device)
    samples = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as scratch:
        paths = write_checkpoints(model_dir, args.start, args.end, args.scale_spread, Path(scratch))
        forwarded = [a for a in argv if a not in ("--worker",)]
        for r in range(args.rounds):
            for name in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
                out = Path(scratch) / f"{name}-{r}.json"
                cmd = [sys.executable, __file__, *forwarded, "--worker", str(paths[name]), str(out)]
                print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
                subprocess.run(cmd, check=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                samples[name].append(json.loads(out.read_text()))
    env["loadavg_end"] = list(os.getloadavg())
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "plot", "checkpoint")}
    settings["model"] = str(model_dir)
    result = {"env": env, "settings": settings, "rows": summarize(samples, args), "samples": samples}
    # The patch changes the model: its greedy tokens differ from the unpatched pruned model's.
    result["patched_tokens_differ_from_pruned"] = (samples["pruned+patch"][0]["first_tokens"]
                                                   != samples["pruned"][0]["first_tokens"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    table = format_table(result["rows"])
    (out_dir / f"{args.name}.txt").write_text(
        f"python benchmarks/bench_vllm.py {' '.join(argv)}\n{env['date_utc']}, vLLM {env['vllm']}, torch {env['torch']}, "
        f"load {env['loadavg_start']} -> {env['loadavg_end']}\n\n{table}\n")
    print(table)
    try:
        plot(result, out_dir / f"{args.name}.png")
    except ImportError:
        print(f"matplotlib not installed: render the PNG later with --plot {out_dir / (args.name + '.json')}")
    return result


if __name__ == "__main__":
    main()

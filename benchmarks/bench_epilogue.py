"""Interface-epilogue benchmark: the fused op against the separate ops it replaces at a pruning cut.

At the cut a Llama-family model computes ``h = residual + update`` (the last residual add before the
cut), the patch ``h' = h . P`` and the next layer's RMSNorm. Providers, per backend ``B`` that can run
(the triton backend is left out on the CPU, where it is only Triton's interpreter):

    fused-B      linearpatch::patch_add_rmsnorm(residual, update, s, w, eps) with backend B forced:
                 reads residual and update once, writes h' and the normed output
    separate-B   residual + update, then linearpatch::hadamard_patch with backend B forced, then
                 Hugging Face's RMSNorm formula (w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)),
                 i.e. what an unfused patched model runs

Every provider is first checked against an fp64 reference of both outputs on sampled rows; one that
disagrees loudly, or fails, gets an error row and is not timed. Timing is bench_patch.py's: warm-up
calls, then rounds in which the providers run interleaved (order rotated each round), inputs rotated
over buffers of about four times the last-level cache; median seconds per call over the rounds,
CUDA events on a GPU, perf_counter on the CPU.

Columns: time per call, GB/s of the fused op's minimum traffic (read residual and update, write h'
and normed: 4 tensors), speed-up of fused-B over separate-B and over the fastest separate provider,
and the relative Frobenius errors of h' and of the normed output vs fp64.

    python benchmarks/bench_epilogue.py --device cpu                        # small CPU run
    python benchmarks/bench_epilogue.py --device cuda --out-dir benchmarks/results/h200
    python benchmarks/bench_epilogue.py --device cuda --tokens 1 8 64 --cuda-graph

The GPU target: fused at least 1.3x faster than the separate ops at >= 4096 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch import (  # noqa: E402
    environment,
    format_cell,
    last_level_cache_bytes,
    synchronize,
    time_providers,
)

import linearpatch_kernels as lp  # noqa: E402
from linearpatch_kernels import hadamard_matrix  # noqa: E402
from linearpatch_kernels.atomic_files import atomic_write_text  # noqa: E402
from linearpatch_kernels.backends import get_backend  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DECODE_TOKENS = (1, 8, 64)
PREFILL_TOKENS = (4096, 16384)
SWEEP_D = (576, 2048, 4096)
CPU_DEFAULT = {"tokens": (1, 8, 64, 4096), "d": SWEEP_D, "dtype": ("fp32",)}
CUDA_DEFAULT = {"tokens": DECODE_TOKENS + PREFILL_TOKENS, "d": SWEEP_D, "dtype": ("bf16",)}
BACKENDS = ("cuda", "triton", "torch")
EPS = 1e-6
LOUD_ERROR = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
CHECK_ROWS = 256
MAX_BUFFERS = 256


# ------------------------------------------------------------------------------------------------
# Providers


def rms_norm_hf(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward, as an unfused model runs it."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused(backend: str, scale: torch.Tensor, weight: torch.Tensor):
    def run(residual, update):
        with lp.use_backend(backend):
            return torch.ops.linearpatch.patch_add_rmsnorm(residual, update, scale, weight, EPS)
    return run


def separate(backend: str, scale: torch.Tensor, weight: torch.Tensor):
    def run(residual, update):
        with lp.use_backend(backend):
            h = torch.ops.linearpatch.hadamard_patch(residual + update, scale)
        return h, rms_norm_hf(h, weight, EPS)
    return run


def build_providers(device: torch.device, scale: torch.Tensor, weight: torch.Tensor) -> tuple[dict, dict]:
    """``({name: fn(residual, update) -> (h, normed)}, {name: why it is left out})``."""
    providers, absent = {}, {}
    available = lp.available_backends(device)
    for backend in BACKENDS:
        for kind, make, op in (("fused", fused, "patch_add_rmsnorm"), ("separate", separate, "hadamard_patch")):
            name = f"{kind}-{backend}"
            if backend not in available:
                absent[name] = f"backend {backend!r} not available on {device.type}"
            elif backend == "triton" and device.type == "cpu":
                absent[name] = "triton runs on the CPU only under its interpreter (a correctness tool, not timed)"
            elif not hasattr(get_backend(backend), op):
                absent[name] = f"backend {backend!r} has no {op} kernel"
            else:
                providers[name] = make(backend, scale, weight)
    return providers, absent


def input_pool(tokens: int, d: int, dtype: torch.dtype,
               device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(residual, update) pairs to cycle through: together about 4x the last-level cache, at least 2."""
    nbytes = 2 * tokens * d * torch.finfo(dtype).bits // 8
    count = max(2, min(MAX_BUFFERS, math.ceil(4 * last_level_cache_bytes(device) / nbytes)))
    g = torch.Generator(device=device).manual_seed(0)
    residual = torch.randn(count, tokens, d, device=device, dtype=dtype, generator=g)
    update = 0.5 * torch.randn(count, tokens, d, device=device, dtype=dtype, generator=g)
    return [(residual[i], update[i]) for i in range(count)]


def relative_errors(fn, residual, update, p64, weight) -> tuple[float, float]:
    """||out - ref|| / ||ref|| for h' and for the normed output, over up to CHECK_ROWS rows."""
    h, normed = fn(residual, update)
    for name, out in (("h", h), ("normed", normed)):
        if out.shape != residual.shape or out.dtype != residual.dtype:
            raise ValueError(f"{name} is {tuple(out.shape)} {out.dtype}; "
                             f"expected {tuple(residual.shape)} {residual.dtype}")
    rows = torch.linspace(0, residual.shape[0] - 1, min(residual.shape[0], CHECK_ROWS),
                          device=residual.device).round().long().unique()
    h_ref = (residual[rows].double() + update[rows].double()) @ p64
    n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    err_h = float((h[rows].double() - h_ref).norm() / h_ref.norm())
    err_n = float((normed[rows].double() - n_ref).norm() / n_ref.norm())
    return err_h, err_n


# ------------------------------------------------------------------------------------------------
# One configuration


def bench_config(device: torch.device, dtype: torch.dtype, d: int, tokens: int, repeats: int,
                 budget_s: float | None, cuda_graph: bool) -> list[dict]:
    torch.manual_seed(0)
    scale = 0.5 + torch.rand(d, device=device)
    weight = (1.0 + 0.1 * torch.randn(d, device=device)).to(dtype)
    h64 = hadamard_matrix(d, dtype=torch.float64, device=device)
    p64 = (h64 * scale.double()) @ h64.T
    providers, absent = build_providers(device, scale, weight)
    pool = input_pool(tokens, d, dtype, device)
    base = {"device": device.type, "dtype": DTYPE_NAMES[dtype], "d": d, "tokens": tokens,
            "mode": "cuda-graph" if cuda_graph else "eager"}
    rows = [dict(base, provider=name, skipped=why) for name, why in absent.items()]

    errors, checked = {}, {}
    for name, fn in providers.items():
        try:
            checked[name] = relative_errors(fn, *pool[0], p64, weight)
        except Exception as e:  # a failing provider gets an error row; the others are still timed
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        if not max(checked[name]) <= LOUD_ERROR[dtype]:
            errors[name] = f"relative error {max(checked[name]):.2e} vs fp64 exceeds {LOUD_ERROR[dtype]:.0e}: not timed"
    synchronize(device)
    timed = {n: f for n, f in providers.items() if n not in errors}
    samples, calls, capture_errors = time_providers(timed, pool, device, repeats, budget_s, cuda_graph)
    errors.update(capture_errors)

    median = {n: statistics.median(t) for n, t in samples.items()}
    separate_times = [t for n, t in median.items() if n.startswith("separate-")]
    best_separate = min(separate_times) if separate_times else None
    traffic = 4 * tokens * d * torch.finfo(dtype).bits // 8
    for name in providers:
        err_h, err_n = checked.get(name, (None, None))
        row = dict(base, provider=name, rel_error_h=err_h, rel_error_normed=err_n)
        if name in errors:
            rows.append(dict(row, error=errors[name]))
            continue
        t = median[name]
        q = statistics.quantiles(samples[name], n=4) if len(samples[name]) > 1 else [t, t, t]
        row.update({"median_us": t * 1e6, "q1_us": q[0] * 1e6, "q3_us": q[2] * 1e6, "rounds": len(samples[name]),
                    "calls_per_round": calls[name], "buffers": len(pool), "GB/s": traffic / t / 1e9})
        if name.startswith("fused-"):
            twin = "separate-" + name.split("-", 1)[1]
            row["speedup"] = median[twin] / t if twin in median else None
            row["speedup_vs_best_separate"] = best_separate / t if best_separate else None
        rows.append(row)
    del pool
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# Output


def _row_key(row: dict) -> tuple:
    kind, _, backend = row["provider"].partition("-")
    return (list(DTYPES).index(row["dtype"]), row["d"], row["tokens"],
            BACKENDS.index(backend) if backend in BACKENDS else len(BACKENDS), kind != "fused")


def format_table(rows: list[dict]) -> str:
    head = (f"{'dtype':<6}{'d':>6}{'tokens':>8}  {'provider':<17}{'time us':>11}{'GB/s':>9}{'x separate':>12}"
            f"{'x best sep':>12}{'err h':>10}{'err norm':>10}")
    lines = [head, "-" * len(head)]
    previous = None
    skipped = set()
    for r in sorted(rows, key=_row_key):
        if "skipped" in r:
            skipped.add(f"{r['provider']}: {r['skipped']}")
            continue
        key = (r["dtype"], r["d"], r["tokens"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        lead = f"{r['dtype']:<6}{r['d']:>6}{r['tokens']:>8}  {r['provider']:<17}"
        if "error" in r:
            lines.append(f"{lead}ERROR {r['error']}")
            continue
        lines.append(lead + f"{r['median_us']:>11.2f}{r['GB/s']:>9.1f}{format_cell(r.get('speedup'), 12, '.2f', 'x')}"
                     f"{format_cell(r.get('speedup_vs_best_separate'), 12, '.2f', 'x')}"
                     f"{format_cell(r['rel_error_h'], 10, '.1e')}{format_cell(r['rel_error_normed'], 10, '.1e')}")
    if skipped:
        lines += ["", "not run: " + "; ".join(sorted(skipped))]
    return "\n".join(lines)


def header(env: dict, args) -> str:
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    load = ", ".join(f"{v:.2f}" for v in env["loadavg_start"])
    return (f"Interface epilogue benchmark (fused patch_add_rmsnorm vs add + hadamard_patch + RMSNorm) on "
            f"{env['device']} ({where}); torch {env['torch']}, triton {env['triton']}; {env['date_utc']}; "
            f"load average at start {load}\n"
            f"median time per call over up to {args.repeats} interleaved rounds "
            f"({'CUDA graphs' if args.cuda_graph else 'eager'}), inputs rotated over ~4x the last-level cache")


def write_outputs(result: dict, args, table: str) -> None:
    json_path, txt_path = args.json, args.table
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = json_path or out / f"{args.name}.json"
        txt_path = txt_path or out / f"{args.name}.txt"
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    if txt_path:
        atomic_write_text(txt_path, table + "\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: cpu 1 8 64 4096, "
                        "cuda 1 8 64 4096 16384)")
    parser.add_argument("--d", type=int, nargs="+", help="hidden sizes (default: 576 2048 4096)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: cpu fp32, cuda bf16")
    parser.add_argument("--repeats", type=int, help="timed rounds, at most (default: cpu 10, cuda 30)")
    parser.add_argument("--budget", type=float, help="seconds of timing per configuration (rounds >= 5)")
    parser.add_argument("--max-seconds", type=float, help="stop starting new configurations after this long")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out-dir", help="write <name>.json and <name>.txt here")
    parser.add_argument("--name", default="bench_epilogue", help="file stem inside --out-dir")
    parser.add_argument("--json", help="write the JSON here")
    parser.add_argument("--table", help="write the table text here")
    args = parser.parse_args(argv)
    defaults = CPU_DEFAULT if args.device == "cpu" else CUDA_DEFAULT
    args.tokens = args.tokens or list(defaults["tokens"])
    args.d = args.d or list(defaults["d"])
    args.dtype = args.dtype or list(defaults["dtype"])
    args.repeats = args.repeats or (10 if args.device == "cpu" else 30)
    if args.cuda_graph and args.device == "cpu":
        parser.error("--cuda-graph needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    for d in args.d:
        if not lp.is_supported_size(d):
            parser.error(f"--d {d}: no Hadamard matrix of that size (see linearpatch_kernels.hadamard)")
    if any(t < 1 for t in args.tokens) or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--tokens, --repeats and --threads must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(device)
    started = time.monotonic()
    result = {"benchmark": "bench_epilogue", "env": env, "args": vars(args), "rows": [], "truncated": []}
    head = header(env, args)
    print(head, flush=True)
    for dt in args.dtype:
        for d in args.d:
            for tokens in args.tokens:
                if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                    result["truncated"].append({"dtype": dt, "d": d, "tokens": tokens})
                    continue
                try:
                    rows = bench_config(device, DTYPES[dt], d, tokens, args.repeats, args.budget, args.cuda_graph)
                except torch.cuda.OutOfMemoryError as e:
                    rows = [{"device": device.type, "dtype": dt, "d": d, "tokens": tokens, "provider": "all",
                             "mode": "eager", "error": f"out of memory: {e}"}]
                    torch.cuda.empty_cache()
                result["rows"].extend(rows)
                for r in sorted(rows, key=_row_key):
                    if "median_us" in r:
                        ratio = f" ({r['speedup']:.2f}x separate)" if r.get("speedup") else ""
                        print(f"  {dt} d={d} tokens={tokens} {r['provider']}: {r['median_us']:.2f} us{ratio}",
                              flush=True)
                    elif "error" in r:
                        print(f"  {dt} d={d} tokens={tokens} {r['provider']}: ERROR {r['error']}", flush=True)
                result["env"]["loadavg_end"] = list(os.getloadavg())
                result["env"]["elapsed_s"] = round(time.monotonic() - started, 1)
                # Written after every configuration, so partial results survive a kill.
                write_outputs(result, args, head + "\n\n" + format_table(result["rows"]))
    if result["truncated"]:
        print(f"--max-seconds {args.max_seconds}: {len(result['truncated'])} configurations not run", flush=True)
    table = head + "\n\n" + format_table(result["rows"])
    print()
    print(table)
    write_outputs(result, args, table)
    return result


if __name__ == "__main__":
    main()

"""Op microbenchmark: the LinearPatch op against the paper's dense formulation and the copy bound.

Providers, each only where it can run:

    ours-cuda, ours-triton, ours-torch, linearpatch::hadamard_patch with that backend forced
    ours-cpu                            (triton is left out on the CPU: there it is the interpreter;
                                        cpu is the C++ CPU kernels of csrc/cpu/)
    ours-cpu-transform                  linearpatch::hadamard_transform(x, d**-0.5) on the cpu backend
    ours-cpu-epilogue                   linearpatch::patch_add_rmsnorm(x, y, s, w) on the cpu backend: two
                                        tensors in, two out, so its floor is two copies
    ours-cpu-bf16                       (fp32 rows) the cpu patch on bf16 copies of the same inputs, in the
                                        same rounds: time per element of bf16 against fp32
    fht-twice                           fast-hadamard-transform (optional package; CUDA, powers of two only,
                                        its H is Sylvester's): H(H(x, d**-0.5) * s, d**-0.5), three launches
    paper-fp32                          the paper's formulation (x.float() @ P).to(x.dtype), P dense fp32 d x d
    dense-bf16 / dense-fp16             x @ P with P in x's dtype: a plain dense matmul (half dtypes only)
    copy                                y.copy_(x): one read and one write of x, the memory-bandwidth bound
    clone                               x.clone() (CPU): the same copy into a freshly allocated tensor, the
                                        floor of any op that returns a new tensor (page faults included)

Every provider is first checked against an fp64 reference (x.double() @ P64 on sampled rows); one
that disagrees loudly, or fails, gets an error row and is not timed. Timing: warm-up calls excluded;
then rounds in which every provider runs a block of calls back to back, the providers interleaved
(their order rotated each round) so that drift of the machine hits all of them alike; the median
time per call over the rounds is reported. On CUDA a block is timed with CUDA events (one
synchronize per round), on the CPU with perf_counter. The inputs rotate through several buffers
holding together about four times the last-level cache (GPU L2, CPU L3), so that a small input is
not served from cache by the previous call.

Columns: time per call, GB/s of one read + one write of x, that as % of the copy's bandwidth (=
copy time / time), speed-up over paper-fp32 and over the dense matmul in x's dtype, and the
relative Frobenius error vs fp64.

    python benchmarks/bench_patch.py --device cpu                       # headline: d=4096, 2048 tokens, fp32
    python benchmarks/bench_patch.py --device cpu --tokens 1 64 512 --d 576 4096
    python benchmarks/bench_patch.py --device cuda --out-dir results/h200  # full sweep, bf16 and fp16
    python benchmarks/bench_patch.py --device cuda --tokens 1 8 64 --d 4096 --dtype bf16 --cuda-graph

``--cuda-graph`` captures each block of calls in a CUDA graph and times its replay: the GPU time
without Python and launch overhead (what a compiled, graph-captured decode step would pay).

On the CPU, ``--threads 1 2`` runs every configuration once per thread count, and ``--compete`` once
more with a competing process (one busy Python loop, started before and killed after that run) beside
it: how the ops behave on a machine that is busy with something else. The CPU targets' command:

    python benchmarks/bench_patch.py --device cpu --dtype fp32 bf16 --threads 1 2 --compete --repeats 15 \
        --out-dir benchmarks/results/cpu-kernels --name bench_patch_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import linearpatch_kernels as lp
from linearpatch_kernels import hadamard_matrix
from linearpatch_kernels.atomic_files import atomic_write_text
from linearpatch_kernels.backends import get_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SWEEP_TOKENS = (1, 8, 64, 512, 4096, 16384, 65536)
SWEEP_D = (576, 2048, 4096, 5120, 8192)
HEADLINE = {"tokens": (2048,), "d": (4096,), "dtype": ("fp32",)}  # the CPU default
OUR_BACKENDS = ("cuda", "triton", "torch", "cpu")
# "Disagrees loudly": ten times the project's accuracy target in fp32 (1e-5), twice it in half
# precision (1e-2). Every row records its measured error, so the real accuracy is in the JSON.
LOUD_ERROR = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
CHECK_ROWS = 512  # rows sampled for the fp64 check (the providers treat rows independently)
MAX_BUFFERS = 1024
MAX_POOL_BYTES = 1 << 30  # per tensor set (x and y): a CPU's reported L3 can be the whole host's
WARMUP_CALLS = 3
MIN_ROUNDS = 5
TARGET_BLOCK_S = {"cuda": 1e-3, "cpu": 2e-3}  # one timed block of calls lasts at least this long
MAX_BLOCK_CALLS = 256


# ------------------------------------------------------------------------------------------------
# Environment


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    """HEAD, with "+modified" when the package or the benchmarks differ from it (no git: None)."""
    head = _git("rev-parse", "HEAD")
    if head and _git("status", "--porcelain", "--", ":/linearpatch_kernels", ":/csrc", ":/benchmarks/*.py"):
        head += "+modified"
    return head or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    """The installed version of a distribution, without importing it (None when absent)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Versions, hardware and load of this run (the JSON's "env")."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fast_hadamard_transform": _version("fast-hadamard-transform"),
        "linearpatch_kernels": lp.__version__,
        "git_commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()),
        "device": str(device),
        "backends_available": lp.available_backends(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name,
            "gpu_capability": list(torch.cuda.get_device_capability(device)),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
            "cudnn": torch.backends.cudnn.version(),
            "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        })
        if "cuda" in env["backends_available"]:
            env["cuda_backend_loaded_from"] = get_backend("cuda").loaded_from()
    return env


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or 50 * 2**20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 32 * 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Providers


def dense_patch_matrix(scale: torch.Tensor) -> torch.Tensor:
    """P = H diag(s) H^T as a dense fp64 d x d matrix on ``scale``'s device (the reference)."""
    h = hadamard_matrix(scale.shape[0], dtype=torch.float64, device=scale.device)
    return (h * scale.double()) @ h.T


@functools.lru_cache(maxsize=2)
def patch_setup(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, P64)`` for hidden size d: fixed scales in [0.5, 1.5) and their dense fp64 P, built once per
    d (the fp64 d x d product is the slow part of a configuration on a CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(d)
    scale = (0.5 + torch.rand(d, generator=gen)).to(device)
    return scale, dense_patch_matrix(scale)


def _fht_function():
    try:
        from fast_hadamard_transform import hadamard_transform
    except Exception:  # optional peer: absent or unusable here
        return None
    return hadamard_transform


def ours(backend: str, scale: torch.Tensor):
    def run(x, y):
        with lp.use_backend(backend):
            return torch.ops.linearpatch.hadamard_patch(x, scale)
    return run


def ours_transform(backend: str, d: int):
    def run(x, y):
        with lp.use_backend(backend):
            return torch.ops.linearpatch.hadamard_transform(x, d**-0.5)
    return run


def ours_epilogue(backend: str, scale: torch.Tensor):
    weight = torch.linspace(0.5, 1.5, scale.shape[0], device=scale.device)

    def run(x, y):  # y (the copy's output buffer, so finite values) is the update
        with lp.use_backend(backend):
            return torch.ops.linearpatch.patch_add_rmsnorm(x, y, scale, weight, 1e-6)[0]
    return run


def ours_bf16(backend: str, scale: torch.Tensor, pool: list[tuple[torch.Tensor, torch.Tensor]]):
    """The patch on bf16 copies of the pool's fp32 inputs (made once), the copy chosen by x."""
    copies = {x.data_ptr(): x.to(torch.bfloat16) for x, _ in pool}

    def run(x, y):
        with lp.use_backend(backend):
            return torch.ops.linearpatch.hadamard_patch(copies[x.data_ptr()], scale)
    return run


# What each provider computes, for the fp64 check (default: the patch x P).
CHECK_KIND = {"ours-cpu-transform": "transform", "ours-cpu-epilogue": "epilogue", "ours-cpu-bf16": "bf16-patch",
              "copy": None, "clone": None}


def build_providers(device: torch.device, dtype: torch.dtype, scale: torch.Tensor, p64: torch.Tensor,
                    wanted: list[str] | None, skip_dense: bool = False) -> tuple[dict, dict]:
    """``({name: fn(x, y) -> Tensor}, {name: why it is left out})`` for one (d, dtype)."""
    d = scale.shape[0]
    providers, absent = {}, {}
    available = lp.available_backends(device)
    for backend in OUR_BACKENDS:
        name = f"ours-{backend}"
        if backend not in available:
            absent[name] = f"backend {backend!r} not available on {device.type}"
        elif backend == "triton" and device.type == "cpu":
            absent[name] = "triton runs on the CPU only under its interpreter (a correctness tool, not timed)"
        else:
            providers[name] = ours(backend, scale)
            if backend == "cpu":
                providers["ours-cpu-transform"] = ours_transform(backend, d)
                providers["ours-cpu-epilogue"] = ours_epilogue(backend, scale)
    fht = _fht_function() if device.type == "cuda" else None
    if fht is None:
        absent["fht-twice"] = "fast_hadamard_transform not importable" if device.type == "cuda" else "CUDA only"
    elif d & (d - 1):
        absent["fht-twice"] = f"d={d} is not a power of two (its H is Sylvester's only)"
    else:
        s_x = scale.to(dtype)  # the scale in x's dtype keeps the output in x's dtype
        providers["fht-twice"] = lambda x, y: fht(fht(x, d**-0.5) * s_x, d**-0.5)
    p32 = p64.float()
    providers["paper-fp32"] = lambda x, y: (x.float() @ p32).to(x.dtype)
    if dtype != torch.float32:
        p_low = p64.to(dtype)
        providers[f"dense-{DTYPE_NAMES[dtype]}"] = lambda x, y: x @ p_low
    providers["copy"] = lambda x, y: y.copy_(x)
    if device.type == "cpu":
        providers["clone"] = lambda x, y: x.clone()
    if wanted:
        # The denominators of the ratio columns always stay (the dense ones unless --skip-dense).
        keep = set(wanted) | {"copy"} | (set() if skip_dense else {"paper-fp32", f"dense-{DTYPE_NAMES[dtype]}"})
        providers = {k: v for k, v in providers.items() if k in keep}
    return providers, absent


def input_pool(tokens: int, d: int, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) buffer pairs to cycle through: together about 4x the last-level cache, at least 2."""
    nbytes = tokens * d * torch.finfo(dtype).bits // 8
    count = max(2, min(MAX_BUFFERS, math.ceil(4 * last_level_cache_bytes(device) / nbytes), MAX_POOL_BYTES // nbytes))
    xs = torch.randn(count, tokens, d, device=device, dtype=dtype)
    ys = torch.empty_like(xs)
    return [(xs[i], ys[i]) for i in range(count)]


def relative_error(fn, x: torch.Tensor, y: torch.Tensor, p64: torch.Tensor, kind: str = "patch") -> float:
    """||fn(x) - ref|| / ||ref|| (Frobenius) over up to CHECK_ROWS rows spread over x; ref = x P64 (the
    patch), x H (the orthonormal transform) or (x + y) P64 (the epilogue's h), all in fp64."""
    out = fn(x, y)
    expected = torch.bfloat16 if kind == "bf16-patch" else x.dtype
    if out.shape != x.shape or out.dtype != expected:
        raise ValueError(f"returned {tuple(out.shape)} {out.dtype}; expected {tuple(x.shape)} {expected}")
    rows = torch.linspace(0, x.shape[0] - 1, min(x.shape[0], CHECK_ROWS), device=x.device).round().long().unique()
    if kind == "transform":
        ref = x[rows].double() @ hadamard_matrix(x.shape[-1], device=x.device)
    elif kind == "epilogue":
        ref = (x[rows].double() + y[rows].double()) @ p64
    elif kind == "bf16-patch":
        ref = x[rows].bfloat16().double() @ p64
    else:
        ref = x[rows].double() @ p64
    return float((out[rows].double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------------
# Timing


def _call_block(fn, pool, cursor: int, count: int) -> int:
    for i in range(count):
        fn(*pool[(cursor + i) % len(pool)])
    return cursor + count


def _capture_graph(fn, pool, cursor: int, count: int, device: torch.device) -> torch.cuda.CUDAGraph:
    # Warm-up on a side stream before capture, as CUDA graph capture requires.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        _call_block(fn, pool, cursor, 2)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call_block(fn, pool, cursor, count)
    synchronize(device)
    return graph


def run_rounds(providers: dict, pool, device: torch.device, calls: dict[str, int], rounds: int,
               graphs: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each provider, one sample per round (providers interleaved, order rotated)."""
    names = list(providers)
    samples = {name: [] for name in names}
    cursor = {name: 0 for name in names}
    cuda = device.type == "cuda"
    for r in range(rounds if names else 0):
        order = names[r % len(names):] + names[:r % len(names)]
        events = []
        for name in order:
            fn, count = providers[name], calls[name]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                if graphs is not None:
                    graphs[name].replay()
                else:
                    cursor[name] = _call_block(fn, pool, cursor[name], count)
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                cursor[name] = _call_block(fn, pool, cursor[name], count)
                samples[name].append((time.perf_counter() - t0) / count)
        if cuda:
            torch.cuda.synchronize(device)
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) * 1e-3 / calls[name])
    return samples


def time_providers(providers: dict, pool, device: torch.device, repeats: int, budget_s: float | None,
                   cuda_graph: bool = False) -> tuple[dict[str, list[float]], dict[str, int], dict[str, str]]:
    """``(samples, calls per block, errors)``: warm-up, a short calibration, then the timed rounds.

    A block holds enough calls to last ``TARGET_BLOCK_S`` (timer resolution, launch jitter); the
    number of rounds is ``repeats``, lowered to fit ``budget_s`` seconds but never below MIN_ROUNDS.
    """
    for fn in providers.values():
        _call_block(fn, pool, 0, WARMUP_CALLS)
    synchronize(device)
    single = run_rounds(providers, pool, device, {n: 1 for n in providers}, 3)
    per_call = {n: statistics.median(t) for n, t in single.items()}
    target = TARGET_BLOCK_S[device.type]
    calls = {n: max(1, min(MAX_BLOCK_CALLS, math.ceil(target / max(t, 1e-9)))) for n, t in per_call.items()}
    rounds = repeats
    if budget_s is not None:
        round_s = sum(calls[n] * per_call[n] for n in providers)
        rounds = min(repeats, max(MIN_ROUNDS, int(budget_s / max(round_s, 1e-9))))
    errors, graphs = {}, None
    if cuda_graph:
        graphs = {}
        for name in list(providers):
            try:
                graphs[name] = _capture_graph(providers[name], pool, 0, calls[name], device)
            except Exception as e:  # a provider that cannot be captured is reported, the rest still timed
                errors[name] = f"CUDA graph capture failed: {type(e).__name__}: {e}"
                torch.cuda.synchronize(device)
        providers = {n: f for n, f in providers.items() if n not in errors}
    return run_rounds(providers, pool, device, calls, rounds, graphs), calls, errors


# ------------------------------------------------------------------------------------------------
# One configuration


def _quartiles(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return q[0], q[2]


def bench_config(device: torch.device, dtype: torch.dtype, d: int, tokens: int, repeats: int,
                 budget_s: float | None, wanted: list[str] | None, cuda_graph: bool, skip_dense: bool = False) -> list[dict]:
    torch.manual_seed(0)
    scale, p64 = patch_setup(d, device)
    providers, absent = build_providers(device, dtype, scale, p64, wanted, skip_dense)
    pool = input_pool(tokens, d, dtype, device)
    if "ours-cpu" in providers and dtype == torch.float32 and not (wanted and "ours-cpu-bf16" not in wanted):
        providers["ours-cpu-bf16"] = ours_bf16("cpu", scale, pool)
    base = {"device": device.type, "dtype": DTYPE_NAMES[dtype], "d": d, "tokens": tokens,
            "mode": "cuda-graph" if cuda_graph else "eager"}
    rows = [dict(base, provider=name, skipped=why) for name, why in absent.items()
            if not (wanted and name not in wanted)]

    # Same answer first: every provider computes one map (copy excepted).
    errors = {}
    checked = {}
    x0, y0 = pool[0]
    y0.copy_(x0.flip(0))  # finite values for the epilogue's update
    for name, fn in providers.items():
        if name in CHECK_KIND and CHECK_KIND[name] is None:
            continue
        try:
            err = relative_error(fn, x0, y0, p64, CHECK_KIND.get(name, "patch"))
        except Exception as e:  # a failing provider gets an error row; the others are still timed
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        checked[name] = err
        limit = LOUD_ERROR[torch.bfloat16 if CHECK_KIND.get(name) == "bf16-patch" else dtype]
        if not err <= limit:
            errors[name] = f"relative error {err:.2e} vs fp64 exceeds {limit:.0e}: not timed"
    synchronize(device)
    timed = {n: f for n, f in providers.items() if n not in errors}
    samples, calls, capture_errors = time_providers(timed, pool, device, repeats, budget_s, cuda_graph)
    errors.update(capture_errors)

    median = {n: statistics.median(t) for n, t in samples.items()}
    nbytes = 2 * tokens * d * torch.finfo(dtype).bits // 8  # one read of x, one write of y
    dense_name = f"dense-{DTYPE_NAMES[dtype]}"
    for name in providers:
        row = dict(base, provider=name, rel_error=checked.get(name))
        if name in errors:
            rows.append(dict(row, error=errors[name]))
            continue
        t = median[name]
        q1, q3 = _quartiles(samples[name])
        row.update({
            "median_us": t * 1e6, "q1_us": q1 * 1e6, "q3_us": q3 * 1e6, "rounds": len(samples[name]),
            "calls_per_round": calls[name], "buffers": len(pool),
            "GB/s": nbytes / t / 1e9,
            "pct_of_copy": 100 * median["copy"] / t if "copy" in median else None,
            "speedup_vs_paper": median["paper-fp32"] / t if "paper-fp32" in median else None,
            "speedup_vs_dense": median[dense_name] / t if dense_name in median else None,
        })
        rows.append(row)
    del pool
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# Output


def format_cell(value, width: int, spec: str, suffix: str = "") -> str:
    text = "-" if value is None else f"{value:{spec}}{suffix}"
    return f"{text:>{width}}"


PROVIDER_ORDER = ("ours-cuda", "ours-triton", "ours-cpu", "ours-cpu-bf16", "ours-cpu-transform", "ours-cpu-epilogue",
                  "ours-torch",
                  "fht-twice", "paper-fp32", "dense-bf16", "dense-fp16", "copy", "clone")


def _scenario(row: dict) -> tuple:
    return (row.get("threads") or 0, bool(row.get("competing")))


def _row_key(row: dict) -> tuple:
    order = PROVIDER_ORDER.index(row["provider"]) if row["provider"] in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return (_scenario(row), list(DTYPES).index(row["dtype"]), row["d"], row["tokens"], order)


def format_table(rows: list[dict]) -> str:
    head = (f"{'dtype':<6}{'d':>6}{'tokens':>8}  {'provider':<19}{'time us':>11}{'GB/s':>9}{'% copy':>8}"
            f"{'x paper':>9}{'x dense':>9}{'rel err':>10}")
    lines = [head, "-" * len(head)]
    previous = None
    for r in sorted(rows, key=_row_key):
        key = (_scenario(r), r["dtype"], r["d"], r["tokens"])
        if previous is not None and key != previous:
            lines.append("")
        if "threads" in r and (previous is None or key[0] != previous[0]):
            lines.append(f"{r['threads']} thread(s), " + ("with a competing busy process" if r["competing"] else "no competing process"))
        previous = key
        lead = f"{r['dtype']:<6}{r['d']:>6}{r['tokens']:>8}  {r['provider']:<19}"
        if "skipped" in r:
            continue  # listed once under the table
        if "error" in r:
            lines.append(f"{lead}ERROR {r['error']}")
            continue
        lines.append(lead + f"{r['median_us']:>11.2f}{r['GB/s']:>9.1f}{format_cell(r['pct_of_copy'], 8, '.0f', '%')}"
                     f"{format_cell(r['speedup_vs_paper'], 9, '.1f', 'x')}{format_cell(r['speedup_vs_dense'], 9, '.1f', 'x')}"
                     f"{format_cell(r['rel_error'], 10, '.1e')}")
    skipped = {}
    for r in rows:
        if "skipped" in r:
            skipped.setdefault(f"{r['provider']}: {r['skipped']}", []).append(r["d"])
    if skipped:
        lines.append("")
        lines.append("not run: " + "; ".join(sorted(skipped)))
    return "\n".join(lines)


def header(env: dict, args) -> str:
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    load = ", ".join(f"{v:.2f}" for v in env["loadavg_start"])
    return (f"LinearPatch op benchmark on {env['device']} ({where}); torch {env['torch']}, CUDA {env['cuda']}, "
            f"triton {env['triton']}; {env['date_utc']}; load average at start {load}\n"
            f"median time per call over up to {args.repeats} interleaved rounds "
            f"({'CUDA graphs' if args.cuda_graph else 'eager'}), inputs rotated over ~4x the last-level cache")


def write_outputs(result: dict, args, table: str) -> dict:
    paths = {"json": args.json, "txt": args.table, "png": args.png}
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = args.name
        paths = {"json": paths["json"] or out / f"{stem}.json", "txt": paths["txt"] or out / f"{stem}.txt",
                 "png": paths["png"] or out / f"{stem}.png"}
    if paths["json"]:
        atomic_write_text(paths["json"], json.dumps(result, indent=1) + "\n")
    if paths["txt"]:
        atomic_write_text(paths["txt"], table + "\n")
    return paths


def plot_if_possible(result: dict, png) -> str | None:
    """Write the PNG when matplotlib is importable; otherwise say so (plot.py renders it later)."""
    if not png:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib not installed: no plot (render later with benchmarks/plot.py on the JSON)"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plot

    plot.plot_op_bench(result, png)
    return f"plot: {png}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: cpu 2048, cuda the sweep)")
    parser.add_argument("--d", type=int, nargs="+", help="hidden sizes (default: cpu 4096, cuda the sweep)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: cpu fp32, cuda bf16 fp16")
    parser.add_argument("--providers", nargs="+", help="only these (paper-fp32, dense-* and copy always run: the ratio columns divide by them)")
    parser.add_argument("--skip-dense", action="store_true",
                        help="with --providers: leave out paper-fp32 and dense-* too (their seconds per call dominate CPU runs)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (at most; see --budget)")
    parser.add_argument("--budget", type=float, help="seconds of timing per configuration (rounds >= 5)")
    parser.add_argument("--max-seconds", type=float, help="stop starting new configurations after this long")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="torch CPU threads; several: every configuration once per count (default: torch's choice)")
    parser.add_argument("--compete", action="store_true",
                        help="CPU: run every thread count again beside a competing busy process")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    parser.add_argument("--out-dir", help="write <name>.json, <name>.txt and <name>.png here")
    parser.add_argument("--name", default="bench_patch", help="file stem inside --out-dir")
    parser.add_argument("--json", help="write the JSON here")
    parser.add_argument("--table", help="write the table text here")
    parser.add_argument("--png", help="write the plot here")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.tokens = args.tokens or list(HEADLINE["tokens"] if cpu else SWEEP_TOKENS)
    args.d = args.d or list(HEADLINE["d"] if cpu else SWEEP_D)
    args.dtype = args.dtype or list(HEADLINE["dtype"] if cpu else ("bf16", "fp16"))
    if args.cuda_graph and cpu:
        parser.error("--cuda-graph needs --device cuda")
    if args.compete and not cpu:
        parser.error("--compete is a CPU option")
    if args.threads and any(t < 1 for t in args.threads):
        parser.error("--threads must be positive")
    if not cpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    for d in args.d:
        if not lp.is_supported_size(d):
            parser.error(f"--d {d}: no Hadamard matrix of that size (see linearpatch_kernels.hadamard)")
    if any(t < 1 for t in args.tokens) or args.repeats < 1:
        parser.error("--tokens and --repeats must be positive")
    return args


@contextlib.contextmanager
def competing_process(active: bool):
    """One busy Python loop beside the benchmark while active (killed, by its pid, afterwards)."""
    if not active:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it get going
        yield
    finally:
        proc.kill()
        proc.wait()


def scenarios(args) -> list[tuple[int | None, bool]]:
    """(threads or None for torch's choice, competing) pairs, in the order they run."""
    threads = args.threads or [None]
    return [(t, c) for t in threads for c in ((False, True) if args.compete else (False,))]


def main(argv=None) -> dict:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads[0])
    device = torch.device(args.device)
    env = environment(device)
    started = time.monotonic()
    result = {"benchmark": "bench_patch", "env": env, "args": vars(args), "rows": [], "truncated": []}
    head = header(env, args)
    print(head, flush=True)
    configs = [(dt, d, t) for dt in args.dtype for d in args.d for t in args.tokens]
    several = len(scenarios(args)) > 1 or args.compete
    for (threads, competing), (dt, d, tokens) in [(sc, c) for sc in scenarios(args) for c in configs]:
        if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
            result["truncated"].append({"dtype": dt, "d": d, "tokens": tokens, "threads": threads, "competing": competing})
            continue
        torch.set_num_threads(threads or default_threads)
        with competing_process(competing):
            try:
                rows = bench_config(device, DTYPES[dt], d, tokens, args.repeats, args.budget, args.providers,
                                    args.cuda_graph, args.skip_dense)
            except Exception as e:  # out of memory, a crashed kernel ...: an error row, then the next configuration
                rows = [{"device": device.type, "dtype": dt, "d": d, "tokens": tokens, "provider": "all",
                         "mode": "cuda-graph" if args.cuda_graph else "eager", "error": f"{type(e).__name__}: {e}"}]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if several:
            for r in rows:
                r.update(threads=torch.get_num_threads(), competing=competing)
        result["rows"].extend(rows)
        for r in sorted(rows, key=_row_key):
            if "median_us" in r:
                where = f" threads={r['threads']}{' +busy' if r['competing'] else ''}" if "threads" in r else ""
                print(f"  {dt} d={d} tokens={tokens}{where} {r['provider']}: {r['median_us']:.2f} us", flush=True)
            elif "error" in r:
                print(f"  {dt} d={d} tokens={tokens} {r['provider']}: ERROR {r['error']}", flush=True)
        result["env"]["loadavg_end"] = list(os.getloadavg())
        result["env"]["elapsed_s"] = round(time.monotonic() - started, 1)
        write_outputs(result, args, head + "\n\n" + format_table(result["rows"]))  # partial results survive a kill
    if result["truncated"]:
        print(f"--max-seconds {args.max_seconds}: {len(result['truncated'])} configurations not run", flush=True)
    table = head + "\n\n" + format_table(result["rows"])
    print()
    print(table)
    paths = write_outputs(result, args, table)
    note = plot_if_possible(result, paths["png"])
    if note:
        print(note)
    return result


if __name__ == "__main__":
    main()

"""Step 1 of the prepared GPU run: kernel timings, most valuable first, saved after every case group.

The case groups come from ``benchmarks/gpu_plan.py`` (``timing_groups``): per (dtype, d, rows) every
provider runs side by side on the same tensors:

    copy                 y.copy_(x): one read and one write of x (the ratio's denominator)
    cuda / triton        patch, transform and fused epilogue, the backend module called directly
    op                   the public ops (lp.hadamard_patch, lp.patch_add_rmsnorm; automatic backend):
                         beside the direct call, the op's dispatch cost
    dense-matmul         x @ P with P = H diag(s) H^T in x's dtype (bf16/fp16 tensor cores)
    paper-fp32           (x.float() @ P32).to(x.dtype): the paper's hook
    fht-twice            fast-hadamard-transform: fht(fht(x, d^-1/2) * s, d^-1/2), its sizes only
                         (powers of two, and 12/20/28 x 2^m through its _12N/_20N/_28N kernels)

Method: every provider is first checked against the fp64 reference (the torch backend in fp64 on
a few rows; a provider off by more than 2e-2 is an error row, not timed). Then ``REPEATS`` rounds,
the providers interleaved in a rotated order; in a round a provider runs ``calls`` times, each call
between two CUDA events, after a read of a buffer twice the L2's size (a reduction over it: reading,
unlike writing, leaves no dirty lines whose write-back would land inside the next timed call). The
round's value is the median of its calls, the reported time the median of the rounds (the rounds'
values are kept). At decode sizes (64 and 1 rows) the same calls are also captured once in a CUDA
graph and replayed (mode "graph"): the kernel time without the host's Python and launch overhead.
The SM and memory clocks, temperature and power are read from nvidia-smi after every group.

``--dry-run`` runs the same code on the CPU in seconds (CI): small sizes of the same kinds (K = 1,
K = 36 and K = 20 rows), a few rows, the torch backend standing in for "cuda" and "triton" and the
torch transform (same contract) for fast-hadamard-transform, perf_counter instead of CUDA events,
no graphs (those rows are skipped with the reason).

    python benchmarks/gpu_timings.py --out DIR [--seconds 140] [--phases core,extra,other-h-k,sweep]
    python benchmarks/gpu_timings.py --out DIR --dry-run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_plan  # noqa: E402  (a sibling script)

import linearpatch_kernels as lp  # noqa: E402
from linearpatch_kernels.atomic_files import atomic_write_text  # noqa: E402
from linearpatch_kernels.backends import get_backend  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EPS = 1e-6
LOUD_ERROR = 2e-2  # twice the half-precision accuracy target: "computes something else"
CHECK_ROWS = 4
TARGET_ROUND_S = 2e-3  # calls per round: about this long, between MIN_CALLS and MAX_CALLS
MIN_CALLS, MAX_CALLS = 3, 25
# Dry run: the same kinds of rows at CPU sizes (K = 1, K = 20 and K = 36 as in 4096/8192, 5120, 576).
DRY_SIZES = {4096: 256, 8192: 512, 5120: 320, 576: 576, 2304: 144, 16384: 1024}
DRY_ROWS = 3


# ------------------------------------------------------------------------------------------------
# Clocks and environment


def gpu_clocks() -> dict:
    """SM and memory clocks (MHz), temperature (C) and power (W) now, from nvidia-smi (empty without it)."""
    tool = shutil.which("nvidia-smi")
    if not tool:
        return {}
    fields = ("clocks.sm", "clocks.mem", "temperature.gpu", "power.draw")
    try:
        out = subprocess.run([tool, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        values = [v.strip() for v in out.strip().splitlines()[0].split(",")]
        return {k.replace(".", "_"): float(v) for k, v in zip(fields, values)}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def kernels_commit() -> str | None:
    """The commit whose kernels are timed (benchmarks/sass_backtest.py refits the speed model to every
    run against that commit's kernels): GPU_CHECK_COMMIT, else the commit the bundle was built from
    (its manifest.json; GPU_BUNDLE, default .gpu-bundle), else the checkout's HEAD, else None."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    manifest = Path(os.environ.get("GPU_BUNDLE") or root / ".gpu-bundle") / "manifest.json"
    try:
        commit = json.loads(manifest.read_text()).get("commit")
        if commit:
            return commit
    except (OSError, ValueError):
        pass
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def environment(device: torch.device, dry_run: bool) -> dict:
    env = dict(date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               device=str(device), dry_run=dry_run, loadavg_start=list(os.getloadavg()),
               linearpatch_kernels=lp.__version__, commit=kernels_commit())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(device)), sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", None))
        cuda = get_backend("cuda")
        env["cuda_backend_loaded_from"] = cuda.loaded_from() if cuda.is_available(device) else None
    return env


# ------------------------------------------------------------------------------------------------
# fast-hadamard-transform: its kernels behind our torch.ops.fht registration (the bundle), else the
# package itself, else absent


def load_fht(dry_run: bool):
    """``(functions by K, where from)``: {1: transform of powers of two, 12/20/28: its K x 2^m kernels}
    with fast-hadamard-transform's contract ``f(x, scale) = x H_unnormalized * scale``."""
    if dry_run:
        torch_backend = get_backend("torch")
        return {1: torch_backend.hadamard_transform}, "torch backend (dry run stand-in)"
    library = os.environ.get("FHT_OPS_LIBRARY")
    if library and os.path.exists(library):
        try:
            torch.ops.load_library(library)
            ops = torch.ops.fht
            return {1: ops.hadamard_transform, 12: ops.hadamard_transform_12N, 20: ops.hadamard_transform_20N,
                    28: ops.hadamard_transform_28N}, library
        except (OSError, RuntimeError, AttributeError) as e:
            return {}, f"{library} did not load: {e}"
    try:
        import fast_hadamard_transform as fht
        return {1: fht.hadamard_transform, 12: fht.hadamard_transform_12N, 20: fht.hadamard_transform_20N,
                28: fht.hadamard_transform_28N}, f"fast_hadamard_transform {getattr(fht, '__version__', '?')}"
    except Exception as e:  # noqa: BLE001 -- an absent optional comparison
        return {}, f"not available ({type(e).__name__}: {e})"


def fht_kernel(fht: dict, d: int):
    """(K, function) of fast-hadamard-transform for d = K x 2^m, or None where it has no kernel."""
    for k in (1, 12, 20, 28):
        n = d // k
        if d % k == 0 and n & (n - 1) == 0 and k in fht and (k == 1 or n >= 2):
            return k, fht[k]
    return None


# ------------------------------------------------------------------------------------------------
# Providers


def other_h_k(triton_backend, fn, d: int, capability):
    """(name, ``fn`` with the Triton launcher's other form of H_K than the one it picks here): the add
    network where it picks the padded tensor-core dot (MAX_TILE_DOT = 1), the dot where NETWORK_PREFERRED
    picks the network (emptied). The prefill model chose per architecture; this measures both."""
    picks_network = triton_backend.launch_config(d, 1 << 14, 132, torch.bfloat16, "hadamard_patch", None,
                                                 capability).NETWORK

    def run():
        saved = triton_backend.MAX_TILE_DOT, triton_backend.NETWORK_PREFERRED
        if picks_network:
            triton_backend.NETWORK_PREFERRED = {}
        else:
            triton_backend.MAX_TILE_DOT = 1
        try:
            return fn()
        finally:
            triton_backend.MAX_TILE_DOT, triton_backend.NETWORK_PREFERRED = saved
    return ("triton (H_K on the padded dot)" if picks_network else "triton (H_K as adds)"), run


def unsupported(backend, x, op: str) -> str | None:
    """The backend's refusal of ``x`` for ``op`` (backends whose limits differ per op take ``op=``)."""
    try:
        return backend.unsupported_reason(x, op=op)
    except TypeError:
        return backend.unsupported_reason(x)


def build_cases(group: dict, x, u, s, w, backends: dict, fht: dict, dry_run: bool) -> tuple[dict, dict]:
    """``({(impl, op): (fn, reference)}, {(impl, op): why absent})`` for one group. ``reference`` says
    what the output is compared with: "patch", "transform", "epilogue" or None (copy)."""
    d = x.shape[-1]
    y = torch.empty_like(x)
    cases, absent = {("copy", "copy"): (lambda: y.copy_(x), None)}, {}
    sweep = group["phase"] == "sweep"
    for impl, backend in backends.items():
        if backend is None:
            absent[(impl, "patch")] = f"backend {impl} not available here"
            continue
        for op, name in (("patch", "hadamard_patch"), ("transform", "hadamard_transform"),
                         ("epilogue", "patch_add_rmsnorm")):
            reason = unsupported(backend, x, name)
            if reason:
                absent[(impl, op)] = reason
            elif group["phase"] == "other-h-k" and impl == "triton" and op == "patch":
                label, fn = other_h_k(backend, lambda b=backend: b.hadamard_patch(x, s), d,
                                      torch.cuda.get_device_capability() if x.is_cuda else None)
                cases[(label, op)] = (fn, "patch")
            elif group["phase"] == "other-h-k":
                continue
            elif op == "patch":
                cases[(impl, op)] = (lambda b=backend: b.hadamard_patch(x, s), "patch")
            elif op == "transform":
                cases[(impl, op)] = (lambda b=backend: b.hadamard_transform(x, d ** -0.5), "transform")
            else:
                cases[(impl, op)] = (lambda b=backend: b.patch_add_rmsnorm(x, u, s, w, EPS), "epilogue")
        if sweep:  # the sweep: the CUDA kernels' copy ratios only
            break
    if sweep or group["phase"] == "other-h-k":
        return cases, absent
    cases[("op", "patch")] = (lambda: lp.hadamard_patch(x, s), "patch")
    cases[("op", "epilogue")] = (lambda: lp.patch_add_rmsnorm(x, u, s, w, EPS), "epilogue")
    h = lp.hadamard_matrix(d, dtype=torch.float64, device=x.device)
    p64 = (h * s.double()) @ h.T
    p32, p_low = p64.float(), p64.to(x.dtype)
    del h, p64
    cases[("dense-matmul", "patch")] = (lambda: x @ p_low, "patch")
    cases[("paper-fp32", "patch")] = (lambda: (x.float() @ p32).to(x.dtype), "patch")
    kernel = fht_kernel(fht, d)
    if kernel is None:
        absent[("fht-twice", "patch")] = (f"d = {d}: no fast-hadamard-transform kernel (powers of two and "
                                          f"12/20/28 x 2^m only)" if fht else "fast-hadamard-transform not available")
    else:
        k, f = kernel
        s_x = s.to(x.dtype)
        if k == 1:
            cases[("fht-twice", "patch")] = (lambda: f(f(x, d ** -0.5) * s_x, d ** -0.5), "patch")
        else:  # its H_K is its own (not ours): timed, not compared
            cases[("fht-twice", "patch")] = (lambda: f(f(x, d ** -0.5) * s_x, d ** -0.5), None)
    return cases, absent


def reference(kind: str, x, u, s, w, rows) -> torch.Tensor | tuple:
    """The fp64 answer on the sampled rows: the torch backend (the reference backend) in fp64."""
    with lp.use_backend("torch"):
        xs = x[rows].double()
        if kind == "patch":
            return lp.hadamard_patch(xs, s.double())
        if kind == "transform":
            return lp.hadamard_transform(xs, x.shape[-1] ** -0.5)
        return lp.patch_add_rmsnorm(xs, u[rows].double(), s.double(), w.double(), EPS)


def rel_error(out, ref, rows) -> float:
    if isinstance(ref, tuple):
        return max(rel_error(o, r, rows) for o, r in zip(out, ref))
    o = out[rows].double()
    return float((o - ref).norm() / ref.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Per-call times in ms: CUDA events around each call (the L2 flushed by a read before it), or
    perf_counter on the CPU (dry run)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flush = None
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
            # Twice the L2, read by a reduction: every line the timed call could find is evicted, and
            # the evicted lines are clean (a write-flush would leave the write-back to the timed call).
            self.flush = torch.ones(2 * l2 // 4, dtype=torch.float32, device=device)
            self.sink = torch.empty((), dtype=torch.float32, device=device)

    def times(self, fn, calls: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        events = []
        for _ in range(calls):
            torch.sum(self.flush, out=self.sink)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in events]


def graphed(fn):
    """``fn`` captured once in a CUDA graph; the returned function replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_group(group: dict, device: torch.device, backends: dict, fht: dict, timer: Timer, dry_run: bool,
               errors: list) -> list[dict]:
    dtype = DTYPES[group["dtype"]]
    d, rows = group["d"], group["rows"]
    if dry_run:
        d, rows = DRY_SIZES.get(d, 128), min(rows, DRY_ROWS)  # the sweep sizes: 128
    gen = torch.Generator(device="cpu").manual_seed(d + rows)
    x = torch.randn(rows, d, generator=gen).to(device, dtype)
    u = (0.1 * torch.randn(rows, d, generator=gen)).to(device, dtype)
    s = (0.5 + torch.rand(d, generator=gen)).to(device)
    w = (0.5 + torch.rand(d, generator=gen)).to(device, dtype)
    base = dict(phase=group["phase"], dtype=group["dtype"], d=d, rows=rows)
    out = []
    cases, absent = build_cases(group, x, u, s, w, backends, fht, dry_run)
    for (impl, op), why in absent.items():
        out.append(dict(base, impl=impl, op=op, mode="eager", skipped=why))
    sample = torch.linspace(0, rows - 1, min(rows, CHECK_ROWS), device=device).round().long().unique()
    refs = {}
    checked = {}
    for key, (fn, kind) in list(cases.items()):
        if kind is None:
            continue
        try:
            refs.setdefault(kind, reference(kind, x, u, s, w, sample))
            checked[key] = rel_error(fn(), refs[kind], sample)
            if not checked[key] <= LOUD_ERROR:
                raise AssertionError(f"relative error {checked[key]:.2e} vs fp64 > {LOUD_ERROR}: not timed")
        except Exception as e:  # noqa: BLE001 -- an error row; the other providers are still timed
            errors.append(f"{group['dtype']} d={d} rows={rows} {key[0]} {key[1]}: {type(e).__name__}: {e}"[:500])
            out.append(dict(base, impl=key[0], op=key[1], mode="eager", error=errors[-1]))
            del cases[key]
    modes = {key: {"eager": fn} for key, (fn, _) in cases.items()}
    if group["graph"]:
        for key, (fn, _) in cases.items():
            if key[0] in ("paper-fp32",) or "H_K" in key[0]:
                continue
            if not timer.cuda:
                out.append(dict(base, impl=key[0], op=key[1], mode="graph", skipped="CPU: no CUDA graphs"))
                continue
            try:
                modes[key]["graph"] = graphed(fn)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{group['dtype']} d={d} rows={rows} {key[0]} {key[1]} graph capture: {e!r}"[:500])
                out.append(dict(base, impl=key[0], op=key[1], mode="graph", error=errors[-1]))
    # calls per round from one warm call (the slow paper matmul gets few, the fast kernels many)
    calls = {}
    for key, fns in modes.items():
        for mode, fn in list(fns.items()):
            try:
                t = statistics.median(timer.times(fn, 2))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{group['dtype']} d={d} rows={rows} {key[0]} {key[1]} {mode}: {e!r}"[:500])
                out.append(dict(base, impl=key[0], op=key[1], mode=mode, error=errors[-1]))
                del fns[mode]
                continue
            calls[(key, mode)] = 2 if dry_run else max(MIN_CALLS, min(MAX_CALLS, math.ceil(TARGET_ROUND_S / max(t * 1e-3, 1e-7))))
    order = [(key, mode) for key, fns in modes.items() for mode in fns]
    rounds = {k: [] for k in order}
    for r in range(gpu_plan.REPEATS):
        k = r % len(order)
        for item in order[k:] + order[:k]:
            key, mode = item
            rounds[item].append(statistics.median(timer.times(modes[key][mode], calls[item])))
    copy_ms = {mode: statistics.median(rounds[(("copy", "copy"), mode)])
               for mode in ("eager", "graph") if (("copy", "copy"), mode) in rounds}
    nbytes = 2 * x.numel() * x.element_size()
    for (key, mode), values in rounds.items():
        ms = statistics.median(values)
        moved = 2 * nbytes if key[1] == "epilogue" else nbytes
        copy = copy_ms.get(mode, copy_ms.get("eager"))
        out.append(dict(base, impl=key[0], op=key[1], mode=mode, median_ms=ms, rounds_ms=values, calls=calls[(key, mode)],
                        gb_per_s=moved / (ms * 1e-3) / 1e9, ratio_to_copy=ms / copy if copy else None,
                        rel_error=checked.get(key)))
    del x, u, cases, modes
    if timer.cuda:
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Output


def format_table(result: dict) -> str:
    lines = [f"{'dtype':<9}{'d':>6}{'rows':>7}  {'impl':<32}{'op':<10}{'mode':<6}{'median us':>11}{'x copy':>8}"
             f"{'rounds (us)':>24}{'rel err':>9}"]
    for r in result["rows"]:
        lead = f"{r['dtype']:<9}{r['d']:>6}{r['rows']:>7}  {r['impl']:<32}{r['op']:<10}{r['mode']:<6}"
        if "skipped" in r or "error" in r:
            continue
        rounds = "/".join(f"{v * 1e3:.1f}" for v in r["rounds_ms"])
        ratio = "-" if r["ratio_to_copy"] is None else f"{r['ratio_to_copy']:.2f}"
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        lines.append(f"{lead}{r['median_ms'] * 1e3:>11.2f}{ratio:>8}{rounds:>24}{err:>9}")
    skipped = sorted({f"{r['impl']} {r['op']}: {r['skipped']}" for r in result["rows"] if "skipped" in r})
    lines += ["", f"not timed ({len(skipped)} kinds):"] + [f"  {s}" for s in skipped]
    lines += [f"errors: {len(result['errors'])}"] + [f"  {e}" for e in result["errors"]]
    if result["not_run"]:
        lines.append(f"groups not run for lack of time: {len(result['not_run'])}")
    return "\n".join(lines)


def save(result: dict, out: Path) -> None:
    atomic_write_text(out / "gpu_timings.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "gpu_timings.txt", format_table(result) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_timings.json / .txt")
    parser.add_argument("--seconds", type=float, default=next(s.budget_s for s in gpu_plan.STEPS if s.name == "timings"),
                        help="start no group after this many seconds (the step's deadline)")
    parser.add_argument("--phases", default="core,extra,other-h-k,sweep", help="comma-separated phases to run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes, torch backend: checks the code")
    parser.add_argument("--max-groups", type=int, help="stop after this many groups")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    known = {g["phase"] for g in gpu_plan.timing_groups()}
    if set(phases) - known:
        parser.error(f"--phases {','.join(sorted(set(phases) - known))}: known are {', '.join(sorted(known))}")
    started = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
        torch_backend = get_backend("torch")
        backends = {"cuda": torch_backend, "triton": torch_backend}
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run on a machine without a GPU")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the paper's fp32 matmul in fp32
        cuda, triton_b = get_backend("cuda"), get_backend("triton")
        backends = {"cuda": cuda if cuda.is_available(device) else None,
                    "triton": triton_b if triton_b.is_available(device) else None}
    fht, fht_from = load_fht(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    groups = [g for g in gpu_plan.timing_groups() if g["phase"] in phases]
    if args.dry_run:  # each kind of row (K = 1, 20, 36), prefill and decode, both dtypes; the sweep's code
        # path once (the other-H_K rows need the Triton launcher's GPU configuration: not in a dry run)
        groups = [g for g in groups if (g["phase"] == "core" and g["d"] in (4096, 5120, 576) and g["rows"] in (4096, 1)
                                        and (g["dtype"] == "bfloat16" or g["d"] == 4096))] + \
                 [g for g in groups if g["phase"] == "sweep"][:1]
    if args.max_groups:
        groups = groups[:args.max_groups]
    timer = Timer(device)
    result = dict(meta=dict(environment(device, args.dry_run), fht=fht_from, repeats=gpu_plan.REPEATS,
                            method="median over rounds of the median per round of CUDA-event times per call; "
                                   "providers interleaved, order rotated per round; L2 flushed before every call "
                                   "by reading a buffer twice its size",
                            deadline_s=args.seconds, clocks_start=gpu_clocks()),
                  groups=[], rows=[], errors=[], not_run=[])
    for i, group in enumerate(groups):
        if time.monotonic() - started > args.seconds:
            result["not_run"] = groups[i:]
            break
        t0 = time.monotonic()
        rows = time_group(group, device, backends, fht, timer, args.dry_run, result["errors"])
        result["rows"].extend(rows)
        result["groups"].append(dict(group, seconds=round(time.monotonic() - t0, 2), clocks=gpu_clocks()))
        result["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        save(result, args.out)
        print(f"[{time.monotonic() - started:6.1f} s] {group['phase']} {group['dtype']} d={group['d']} "
              f"rows={group['rows']}: {sum('median_ms' in r for r in rows)} timed", flush=True)
    result["meta"]["loadavg_end"] = list(os.getloadavg())
    save(result, args.out)
    print(format_table(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

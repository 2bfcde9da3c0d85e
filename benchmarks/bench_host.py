"""Host cost of an eager call of the public ops, on the CPU, against a bare C++ op call and torch.add.

What a decode step pays per op call before any kernel runs: the Python of ``lp.hadamard_patch`` &
co. (the checks that can change per call, the cached backend choice) and the dispatcher. Measured on
one row of d = 64 so that the kernel itself is a few dozen nanoseconds:

    torch.add            torch.add(x, x): a plain PyTorch call of the same tensor
    bare C++ op          torch.ops.linearpatch_cpu.<op>.default(x, H_K, ...): one call of a stable-ABI
                         C++ op with its arguments ready, the floor of any op that reaches C++
    public, cuda path    lp.<op>(...) with the backend choice made for a CUDA tensor on an sm_90 GPU
                         (the cuda backend's availability, coverage and launch plan), the launch
                         stubbed: the chosen kernel is the bare C++ op above
    public, cpu path     lp.<op>(...) as it runs here (cpu backend)
    op                   torch.ops.linearpatch.<op>(...): the torch.library custom op (autograd, fake
                         kernels, torch.compile), what callers of torch.ops pay

Rounds interleave the variants (order rotated), each round timing a block of calls; the median and
the minimum over rounds of the time per call are reported. On a shared machine a block that shares
its core with another process takes several times longer, whatever it runs (the bare op too), so the
minimum is the host cost itself and the median says how busy the machine was. Target: public <=
bare C++ op + 5 us.

    python benchmarks/bench_host.py --out-dir benchmarks/results/host-cpu --name bench_host
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import linearpatch_kernels as lp
from linearpatch_kernels import backends
from linearpatch_kernels.atomic_files import atomic_write_text
from linearpatch_kernels.backends import cpu_backend, cuda_backend
from linearpatch_kernels.hadamard import kernel_h_k

D = 64
OPS = ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm")
TARGET_US = 5.0


def _stubbed_cuda_runner(op: str, device, d: int):
    """cuda_backend.runner line for line, with the CPU C++ op in place of the CUDA one: the same host work
    (H_K bound once, the prepared s / d and norm weight: a cache hit after the first call), then a
    call of the CPU op with those arguments, standing in for the launch. Timing only: the prepared
    scale is in the CUDA kernel's register order, so the values computed are not the patch's."""
    h_k = kernel_h_k(d, torch.device("cpu"))
    kernel = getattr(torch.ops.linearpatch_cpu, op).default
    if op == "hadamard_transform":
        return lambda x, scale: kernel(x, h_k, float(scale))
    if op == "hadamard_patch":
        return lambda x, scale: kernel(x, h_k, cuda_backend.prepared_scale(scale, x.dtype, d))

    def epilogue(residual, update, scale, norm_weight, eps):
        return kernel(residual, update, h_k, *cuda_backend.prepared_epilogue_operands(scale, norm_weight,
                                                                                      residual.dtype, d), float(eps))
    return epilogue


@contextlib.contextmanager
def cuda_path_with_stubbed_launch():
    """The backend choice a CUDA tensor gets on an sm_90 GPU with the extension built (the real
    coverage and launch-plan code of the cuda backend), made for CPU tensors; the kernel it then
    calls is the bare CPU C++ op, standing in for the launch (after the CUDA runner's own host work:
    ``_stubbed_cuda_runner``)."""
    saved = (backends.AUTO_ORDER.get("cpu"), cuda_backend.is_available, cuda_backend.unsupported_reason,
             cuda_backend.runner)
    backends.AUTO_ORDER["cpu"] = ("cuda", "triton", "torch")
    cuda_backend.is_available = lambda device: True
    cuda_backend.unsupported_reason = lambda x, op="hadamard_patch": cuda_backend.unsupported_reason_for(
        x.dtype, int(x.shape[-1]), (9, 0), op, rows=max(1, x.numel() // max(int(x.shape[-1]), 1)))
    cuda_backend.runner = _stubbed_cuda_runner
    backends.clear_plans()
    try:
        yield
    finally:
        backends.AUTO_ORDER["cpu"], cuda_backend.is_available, cuda_backend.unsupported_reason, cuda_backend.runner = saved
        backends.clear_plans()


def variants(op: str) -> dict:
    x = torch.randn(1, D)
    u = torch.randn(1, D)
    s = torch.rand(D) + 0.5
    w = torch.rand(D) + 0.5
    h_k = kernel_h_k(D, torch.device("cpu"))
    bare = getattr(torch.ops.linearpatch_cpu, op).default
    public = getattr(lp, op)
    custom = getattr(torch.ops.linearpatch, op)
    if op == "hadamard_transform":
        args, bare_args = (x, 0.5), (x, h_k, 0.5)
    elif op == "hadamard_patch":
        args, bare_args = (x, s), (x, h_k, s)
    else:
        args, bare_args = (x, u, s, w, 1e-6), (x, u, h_k, s, w, 1e-6)
    return {
        "torch.add": lambda: torch.add(x, x),
        "bare C++ op": lambda: bare(*bare_args),
        "public, cuda path": lambda: public(*args),
        "public, cpu path": lambda: public(*args),
        "op": lambda: custom(*args),
    }


def measure(fns: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if name == "public, cuda path":
                with cuda_path_with_stubbed_launch():
                    assert backends.select_backend(torch.randn(1, D)).NAME == "cuda"
                    fn()  # the choice is made once, outside the timing
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    samples[name].append((time.perf_counter() - t0) / calls * 1e6)
                continue
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return samples


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block (short blocks: some fall between other processes)")
    parser.add_argument("--out-dir")
    parser.add_argument("--name", default="bench_host")
    args = parser.parse_args(argv)
    if not cpu_backend.load_library():
        raise SystemExit(f"bench_host: the C++ CPU kernels are needed ({cpu_backend.load_error()})")
    torch.set_num_threads(1)
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "loadavg_start": list(os.getloadavg()), "cpu_backend": lp.build_info()["cpu_backend"]}
    rows = []
    with torch.no_grad():
        for op in OPS:
            samples = measure(variants(op), args.rounds, args.calls)
            med = {n: statistics.median(v) for n, v in samples.items()}
            low = {n: min(v) for n, v in samples.items()}
            for name in samples:
                rows.append({"op": op, "variant": name, "median_us": med[name], "min_us": low[name],
                             "over_bare_median_us": med[name] - med["bare C++ op"],
                             "over_bare_min_us": low[name] - low["bare C++ op"]})
    env["loadavg_end"] = list(os.getloadavg())
    lines = [f"Host cost per eager call, 1 x {D} fp32 on the CPU (torch {env['torch']}, 1 thread, no_grad); "
             f"{env['date_utc']}; load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end",
             f"{args.rounds} interleaved rounds of {args.calls} calls; target: public <= bare C++ op + {TARGET_US:.0f} us", "",
             f"{'op':<20}{'variant':<20}{'median us':>11}{'min us':>9}{'over bare (median)':>21}{'over bare (min)':>17}"]
    for r in rows:
        lines.append(f"{r['op']:<20}{r['variant']:<20}{r['median_us']:>11.2f}{r['min_us']:>9.2f}"
                     f"{r['over_bare_median_us']:>21.2f}{r['over_bare_min_us']:>17.2f}")
    table = "\n".join(lines)
    print(table)
    result = {"benchmark": "bench_host", "env": env, "args": vars(args), "rows": rows}
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(out / f"{args.name}.txt", table + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

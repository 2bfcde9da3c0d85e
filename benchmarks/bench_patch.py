"""Op microbenchmark: the LinearPatch op against the paper's dense formulation.

CPU (this file's default device): the torch backend's Kronecker-factored patch vs the paper's
``x @ P`` with a dense fp32 ``P`` (d x d), at d = 4096 and 2048 tokens unless told otherwise.
Every provider is timed in the same run, interleaved round by round, and the median is reported,
so that the ratio is not skewed by drift of the machine between providers.

    python benchmarks/bench_patch.py --device cpu [--d 4096] [--tokens 2048] [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import linearpatch_kernels as lp
from linearpatch_kernels import hadamard_matrix


def dense_patch_matrix(scale: torch.Tensor) -> torch.Tensor:
    """The paper's P = H diag(s) H^T as a dense fp32 d x d matrix."""
    h = hadamard_matrix(scale.shape[0])
    return ((h * scale.double()) @ h.T).float()


def cpu_providers(x: torch.Tensor, scale: torch.Tensor) -> dict:
    p = dense_patch_matrix(scale)
    out = torch.empty_like(x)

    def ours_torch():
        with lp.use_backend("torch"):
            return lp.hadamard_patch(x, scale)

    return {
        "ours-torch": ours_torch,
        "paper-dense-fp32": lambda: torch.matmul(x, p, out=out),
        "copy": lambda: out.copy_(x),
    }


def time_interleaved(providers: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d)
    scale = 0.5 + torch.rand(args.d)
    providers = cpu_providers(x, scale)
    # Same answer first: the benchmark compares two formulations of one map.
    ref = providers["paper-dense-fp32"]().clone()
    got = providers["ours-torch"]()
    rel = float((got.double() - ref.double()).norm() / ref.double().norm())

    times = time_interleaved(providers, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    bytes_moved = 2 * x.numel() * x.element_size()
    rows = []
    for name, t in median.items():
        rows.append({
            "provider": name, "device": "cpu", "dtype": "float32", "d": args.d, "tokens": args.tokens,
            "median_ms": t * 1e3, "GB/s": bytes_moved / t / 1e9,
            "speedup_vs_paper": median["paper-dense-fp32"] / t,
        })
    print(f"LinearPatch op, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}), d={args.d}, tokens={args.tokens}, fp32, median of {args.repeats}")
    print(f"max relative difference ours vs dense: {rel:.2e}")
    print(f"{'provider':<20}{'median ms':>12}{'GB/s':>10}{'vs paper':>10}")
    for r in rows:
        print(f"{r['provider']:<20}{r['median_ms']:>12.3f}{r['GB/s']:>10.2f}{r['speedup_vs_paper']:>9.2f}x")
    result = {"rows": rows, "relative_difference": rel, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine()}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

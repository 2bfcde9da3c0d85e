"""Small cases of every CUDA kernel family, for compute-sanitizer and for the JIT fallback check.

Every family on small inputs, all dtypes, the transform, the patch and the fused epilogue: row_kernel
(64 and 4096; a block per row with s read through L1 at 16384; the lane-shuffle stage at 32768),
kfast_kernel (K > 1 at 576 and 5120: a partial row tile), kron_kernel (24576); 3 rows (a partial
block). References in fp64 on the CPU (the torch backend, the reference backend), so that the only
GPU work under the sanitizer is ours and the copies.

    compute-sanitizer --tool memcheck python benchmarks/gpu_small_cases.py
    python benchmarks/gpu_small_cases.py --jit    # from a source tree without the compiled library:
                                                  # the CUDA backend must build csrc/ at first use
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import linearpatch_kernels as lp

SIZES = (64, 576, 4096, 5120, 16384, 32768, 24576)
JIT_SIZES = (5120,)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu().double() - b).norm() / b.norm())


def worst_error(sizes, dtypes, rows: int = 3) -> float:
    worst = 0.0
    for d in sizes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(d)
            x = torch.randn(rows, d, generator=gen).to(dtype)
            u = (0.1 * torch.randn(rows, d, generator=gen)).to(dtype)
            s = 0.5 + torch.rand(d, generator=gen)
            w = 0.5 + torch.rand(d, generator=gen)
            with lp.use_backend("cuda"):
                y = lp.hadamard_patch(x.cuda(), s.cuda())
                t = lp.hadamard_transform(x.cuda(), 0.5)
                h, n = lp.patch_add_rmsnorm(x.cuda(), u.cuda(), s.cuda(), w.cuda(), EPS)
            with lp.use_backend("torch"):
                ref = lp.hadamard_patch(x.double(), s.double())
                ref_t = lp.hadamard_transform(x.double(), 0.5)
                ref_h, ref_n = lp.patch_add_rmsnorm(x.double(), u.double(), s.double(), w.double(), EPS)
            errors = (rel(y, ref), rel(t, ref_t), rel(h, ref_h), rel(n, ref_n))
            worst = max(worst, *errors)
            print(f"d={d:>6} {str(dtype).removeprefix('torch.'):<9} rel. errors patch/transform/h/normed "
                  + " ".join(f"{e:.1e}" for e in errors), flush=True)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jit", action="store_true", help="check that the library comes from a JIT build")
    args = parser.parse_args(argv)
    from linearpatch_kernels.backends import cuda_backend

    if args.jit:
        if cuda_backend.prebuilt_library() is not None:
            raise SystemExit(f"--jit: a prebuilt library is present ({cuda_backend.prebuilt_library()}); run from a "
                             "source tree without one")
        start = time.time()
        if not cuda_backend.is_available(torch.device("cuda")):
            raise SystemExit(f"the JIT build failed: {cuda_backend.load_error()}")
        print(f"JIT: {cuda_backend.loaded_from()} in {time.time() - start:.0f} s", flush=True)
        worst = worst_error(JIT_SIZES, (torch.bfloat16,), rows=7)
    else:
        worst = worst_error(SIZES, DTYPES)
    print(f"small cases: worst rel. error {worst:.1e} (limit 1e-2)")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

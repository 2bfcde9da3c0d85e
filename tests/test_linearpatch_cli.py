"""The ``linearpatch`` entry point (``linearpatch_cli``): help and usage errors never import torch.

Importing torch, transformers and the kernels takes seconds (13-25 s on a busy 2-core machine), so
``linearpatch --help`` and an argument error must answer without them. Checked by what a fresh
interpreter has imported (``sys.modules``), not by a clock.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from linearpatch_kernels import cli
from linearpatch_kernels.model import distill

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "triton", "numpy", "safetensors", "linearpatch_kernels")

# Runs the entry point on each argv in one fresh interpreter and reports, per argv, its exit status,
# the first line it wrote to stderr, and which heavy modules were imported by then.
PROBE = """
import contextlib, io, json, sys
import linearpatch_cli
heavy = {heavy!r}
report = []
for argv in {argvs!r}:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = linearpatch_cli.main(argv)
        except SystemExit as e:
            code = e.code
    report.append({{"argv": argv, "code": code, "err": err.getvalue().strip(),
                   "imported": sorted(m for m in heavy if m in sys.modules)}})
print(json.dumps(report))
"""


def probe(argvs):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = PROBE.format(heavy=HEAVY, argvs=argvs)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_and_usage_errors_import_nothing_heavy():
    argvs = [["--help"], ["prune", "--help"], ["eval", "--help"], ["distill", "--help"], ["demo", "--help"],
             [], ["frobnicate"], ["prune"], ["eval", "--samples", "0"], ["prune", "--out", ""],
             ["prune", "--out", "o"], ["prune", "--out", "o", "--blocks", "1:3", "--start", "2"],
             ["distill", "--model", "m", "--teacher", "t"],
             ["distill", "--model", "m", "--teacher", "t", "--out", "o", "--topk", "0"],
             ["distill", "--model", "m", "--teacher", "t", "--out", "o", "--lr", "-1"],
             ["prune", "--out", "o", "--num-prune", "2", "--start", "-1"]]
    report = probe(argvs)
    for entry in report:
        assert entry["imported"] == [], entry
    codes = {" ".join(e["argv"]): e["code"] for e in report}
    assert [codes[k] for k in ("--help", "prune --help", "eval --help", "distill --help", "demo --help")] == [0] * 5
    errors = {" ".join(e["argv"]): e["err"] for e in report if e["code"] != 0}
    assert all(code == 2 for argv, code in codes.items() if argv in errors)
    assert errors["prune"] == ("linearpatch prune: error: the following arguments are required: --out "
                               "(see 'linearpatch prune --help')")
    assert errors["prune --out o"] == ("linearpatch prune: error: give --num-prune N (layers to remove) or --blocks "
                                       "S:E,S:E (the blocks themselves)")
    assert "--blocks gives the blocks itself" in errors["prune --out o --blocks 1:3 --start 2"]
    assert "invalid choice: 'frobnicate'" in errors["frobnicate"]
    assert "argument --topk: expected a positive int, got '0'" in errors["distill --model m --teacher t --out o --topk 0"]
    assert "argument --lr: expected a positive number, got '-1'" in errors["distill --model m --teacher t --out o --lr -1"]
    assert "argument --start: expected a non-negative int, got '-1'" in errors["prune --out o --num-prune 2 --start -1"]
    assert all(len(err.splitlines()) == 1 for err in errors.values()), errors


def test_a_command_imports_the_package_once_and_shares_the_cli_module():
    """After the entry point has loaded ``cli.py`` on its own, importing the package (as a command does)
    finds that same module, so there is one ``linearpatch_kernels.cli``."""
    code = ("import linearpatch_cli, sys; cli = linearpatch_cli.load_cli(); import linearpatch_kernels as lp; "
            "import linearpatch_kernels.cli as again; from linearpatch_kernels import cli as attr; "
            "assert again is cli and attr is cli and 'torch' in sys.modules; print(lp.hadamard_matrix(4).shape)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "torch.Size([4, 4])" in result.stdout, result.stderr


def test_the_installed_command_is_the_light_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["linearpatch"] == "linearpatch_cli:main"
    assert "linearpatch_cli" in project["tool"]["setuptools"]["py-modules"]


def test_the_help_shows_the_distill_settings_of_the_model_layer():
    """cli.py keeps its own copy of distill's modes and learning rates (importing model.distill imports torch)."""
    assert cli.DISTILL_TRAIN_MODES == distill.TRAIN_MODES
    assert cli.DISTILL_DEFAULT_LR == distill.DEFAULT_LR

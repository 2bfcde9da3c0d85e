"""The command line never loses work or data: each case runs ``linearpatch`` in a subprocess, as a user would.

Outputs are checked before any work (an unwritable or non-empty ``--out``, an output that is an input,
missing lm-eval task data), defaults work on the shipped corpus, and usage errors are one line.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluation import char_tokenizer, tiny_char_model

from linearpatch_kernels import get_patch, load_pruned
from linearpatch_kernels.cli import PAPER_DISTILL_SAMPLES, _distill_windows, build_parser

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. ") * 40
NUM_LAYERS = 6


def run_cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "linearpatch_kernels.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny dense model folder (with text) and a pruned checkpoint made from it by ``linearpatch prune``."""
    root = tmp_path_factory.mktemp("cli-safety")
    dense = root / "dense"
    tiny_char_model(num_layers=NUM_LAYERS, seed=11).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    pruned = root / "pruned"
    result = run_cli("prune", "--model", dense, "--num-prune", 2, "--start", 2, "--calib-text", root / "text.txt",
                     "--samples", 2, "--seqlen", 32, "--out", pruned)
    assert result.returncode == 0, result.stderr
    return root, dense, pruned


def distill_args(student, teacher, text, out, *extra):
    return ("distill", "--model", student, "--teacher", teacher, "--text", text, "--samples", 4, "--val-samples", 2,
            "--seqlen", 32, "--topk", 8, "--device", "cpu", "--out", out, *extra)


def test_distill_never_writes_over_its_input(folders):
    root, dense, pruned = folders
    before = tree_digest(pruned)
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", pruned))
    assert result.returncode == 2
    assert "is or contains the student checkpoint" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", pruned, "--overwrite"))
    assert result.returncode == 2 and "an input is never overwritten" in result.stderr
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", dense, "--overwrite"))
    assert result.returncode == 2 and "is or contains the teacher" in result.stderr
    assert tree_digest(pruned) == before
    assert "loading the teacher" not in result.stdout + result.stderr


def test_distill_refuses_a_non_empty_out_then_overwrites_cleanly(folders, tmp_path):
    root, dense, pruned = folders
    out = tmp_path / "nonempty"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", out))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert "loading the teacher" not in result.stdout + result.stderr  # refused before any work

    result = run_cli(*distill_args(pruned, dense, root / "text.txt", out, "--overwrite"))
    assert result.returncode == 0, result.stderr
    assert not (out / "notes.txt").exists()  # replaced, never mixed in
    assert (out / "distill.json").is_file() and (tmp_path / "nonempty.teacher-cache").is_dir()
    distilled = load_pruned(out)
    assert get_patch(distilled).scale.shape == (64,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nonempty", "nonempty.teacher-cache"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (an unwritable place)")
def test_unwritable_out_fails_before_loading(folders):
    root, dense, pruned = folders
    result = run_cli("prune", "--model", dense, "--num-prune", 2, "--calib-text", root / "text.txt",
                     "--samples", 2, "--seqlen", 32, "--out", "/proc/x")
    assert result.returncode == 2, result.stderr
    assert "cannot write the --out /proc/x" in result.stderr and "Traceback" not in result.stderr
    assert "model:" not in result.stdout  # nothing was loaded
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", "/proc/x"))
    assert result.returncode == 2 and "cannot write" in result.stderr and "/proc/x" in result.stderr
    assert "loading the teacher" not in result.stdout + result.stderr


def test_eval_checks_task_data_before_scoring(folders):
    pytest.importorskip("lm_eval")
    root, dense, pruned = folders
    result = run_cli("eval", "--model", pruned, "--dense-model", dense, "--text", root / "text.txt", "--seqlen", 32,
                     "--samples", 2, "--tasks", "arc_easy,hellaswag")
    assert result.returncode == 2
    assert "could not load the data of arc_easy, hellaswag" in result.stderr, result.stderr
    assert "perplexity" not in result.stdout and "model:" not in result.stdout  # no model was loaded or scored


def test_usage_errors_are_one_line(folders, tmp_path):
    root, dense, _ = folders
    result = run_cli("prune", "--model", dense, "--num-prune", 0, "--out", tmp_path / "o")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in result.stderr, result.stderr
    assert "--num-prune: expected a positive int, got '0'" in lines[0] and "linearpatch prune --help" in lines[0]


def test_messages(folders, tmp_path):
    root, dense, pruned = folders
    result = run_cli("distill", "--model", pruned, "--teacher", "meta-llama/Llama-3-8B", "--out", tmp_path / "d")
    assert result.returncode == 2 and "looks like a Hugging Face Hub id" in result.stderr
    help_text = run_cli("distill", "--help").stdout
    seed_help = help_text[help_text.index("--seed"):]
    assert "order in which the training windows" in " ".join(seed_help.split())
    assert "the paper used 5000" in " ".join(help_text.split())

    one_layer = tmp_path / "one-layer"
    result = run_cli("prune", "--model", dense, "--num-prune", 5, "--start", 0, "--calib-text", root / "text.txt",
                     "--samples", 2, "--seqlen", 32, "--out", one_layer)
    assert result.returncode == 0, result.stderr
    assert "(1 layer," in result.stdout and "1 layers" not in result.stdout
    assert "warning: removing 5 of 6 layers (83 %)" in result.stderr  # most of the model: warned
    quiet = run_cli("prune", "--model", dense, "--num-prune", 2, "--start", 0, "--calib-text", root / "text.txt",
                    "--samples", 2, "--seqlen", 32, "--out", tmp_path / "two")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr


def test_load_pruned_on_a_missing_gpu_is_a_clear_error(folders, monkeypatch):
    _, _, pruned = folders
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is available here; use 'cpu'"):
        load_pruned(pruned, device="cuda")
    with pytest.raises(ValueError, match="only CPU and CUDA devices"):
        load_pruned(pruned, device="meta")
    assert next(load_pruned(pruned, device="auto").parameters()).device.type == "cpu"


def test_one_device_rule_for_every_command():
    parser = build_parser()
    commands = {"prune": ["--num-prune", "2", "--out", "o"], "eval": [], "demo": [],
                "distill": ["--model", "m", "--teacher", "t", "--out", "o"]}
    for command, extra in commands.items():
        assert parser.parse_args([command, *extra]).device == "auto", command


def test_distill_default_samples_work_on_the_text(tmp_path):
    """No --samples: every window the text holds after the validation ones, capped at the paper's 5000."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    tok = char_tokenizer()
    available = len(tok(TEXT).input_ids) // 32
    args = build_parser().parse_args(["distill", "--model", "m", "--teacher", "t", "--out", "o", "--text", str(text),
                                      "--seqlen", "32", "--val-samples", "3"])
    assert args.samples is None
    windows = _distill_windows(tok, args)
    assert len(windows) == min(available, PAPER_DISTILL_SAMPLES + 3)
    assert torch.equal(windows[1][0], torch.tensor(tok(TEXT).input_ids[32:64]))
    args.val_samples = available
    with pytest.raises(ValueError, match=f"holds {available} windows"):
        _distill_windows(tok, args)

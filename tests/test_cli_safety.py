"""The command line never loses work or data: each case runs ``linearpatch`` in a subprocess, as a user would.

Outputs are checked before any work (an unwritable or non-empty ``--out``, an output that is an input,
missing lm-eval task data), defaults work on the shipped corpus, and usage errors are one line.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_evaluation import char_tokenizer, tiny_char_model

from linearpatch_kernels import get_patch, load_pruned
from linearpatch_kernels.cli import PAPER_DISTILL_SAMPLES, _default_windows, _distill_windows, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. ") * 40
NUM_LAYERS = 6


def run_cli(*args, timeout=300, umask=None, env=None):
    """``linearpatch ARGS`` through the entry point's module, as the installed command runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "linearpatch_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


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
    assert "is the student checkpoint" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", pruned, "--overwrite"))
    assert result.returncode == 2 and "an input is never overwritten" in result.stderr
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", dense, "--overwrite"))
    assert result.returncode == 2 and "is the teacher" in result.stderr
    assert tree_digest(pruned) == before
    assert "loading the teacher" not in result.stdout + result.stderr


def test_distill_refuses_a_non_empty_out_then_overwrites_cleanly(folders, tmp_path):
    root, dense, pruned = folders
    out = tmp_path / "nonempty"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", out))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert "overwrite=True" not in result.stderr  # the command line's option, not the Python argument
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


def test_an_output_inside_an_input_is_refused_by_every_command(folders, tmp_path, monkeypatch, capsys):
    """``--out`` may not be, contain, or lie inside any input: the model (the default model's converted
    folder included), the teacher, the teacher cache, the text files; nor may the teacher cache a run
    writes lie inside the student or the teacher. Refused before anything is loaded or written: the
    first case as a user runs it, the others through the same ``main`` in this process."""
    root, dense, pruned = folders
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "t.txt").write_text(TEXT, encoding="utf-8")
    inputs = (dense, pruned, texts)
    before = {folder: tree_digest(folder) for folder in inputs}
    result = run_cli("prune", "--model", dense, "--num-prune", 2, "--samples", 2, "--seqlen", 32, "--calib-text",
                     root / "text.txt", "--out", dense / "sub", "--overwrite")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "model:" not in result.stdout
    assert re.search(r"error: --out \S+/sub is inside the --model folder \S+; write to a folder outside every input: "
                     r"an input is never overwritten or written into$", result.stderr.strip().splitlines()[-1])

    default_cache = tmp_path / "lp-cache"
    monkeypatch.setenv("LINEARPATCH_CACHE", str(default_cache))
    cache = tmp_path / "cache"
    prune = ("prune", "--model", dense, "--num-prune", 2, "--samples", 2, "--seqlen", 32)
    cases = [
        ((*prune, "--calib-text", texts / "t.txt", "--out", texts, "--overwrite"), r"contains the --calib-text file"),
        (("prune", "--model", "default", "--num-prune", 2, "--out", default_cache / "SmolLM2-135M-Instruct" / "p"),
         r"is inside the --model default \(the converted default model\)"),
        (("demo", "--model", dense, "--out", dense / "a" / "b"), r"is inside the --model folder"),
        (distill_args(pruned, dense, root / "text.txt", pruned / "sub"), r"is inside the student checkpoint"),
        (distill_args(pruned, dense, root / "text.txt", dense / "sub", "--overwrite"), r"is inside the teacher"),
        (distill_args(pruned, dense, texts / "t.txt", texts, "--overwrite"), r"contains the text file"),
        (distill_args(pruned, dense, root / "text.txt", tmp_path / "d", "--cache", dense / "cache"),
         r"distill: teacher cache \S+ is inside the teacher"),
        (distill_args(pruned, dense, root / "text.txt", cache / "d", "--cache", cache), r"is inside the teacher cache"),
    ]
    for args, message in cases:
        assert main([str(a) for a in args]) == 2, args
        captured = capsys.readouterr()
        assert re.search(message, captured.err) and "never overwritten or written into" in captured.err, captured.err
        assert "model:" not in captured.out and "loading the teacher" not in captured.err + captured.out
        assert "converting" not in captured.err
    assert {folder: tree_digest(folder) for folder in inputs} == before
    assert not (dense / "sub").exists() and not (dense / "a").exists() and not cache.exists()
    assert not default_cache.exists()


def test_outputs_get_the_permissions_of_an_ordinary_write(folders, tmp_path):
    """Under umask 027 every file a command writes is 0o640 and every folder 0o750, as ``open`` and
    ``mkdir`` give: not safetensors' private 0o600 (a serving account in the group could not read it)."""
    root, dense, pruned = folders
    out = tmp_path / "p"
    result = run_cli("prune", "--model", dense, "--num-prune", 2, "--start", 2, "--calib-text", root / "text.txt",
                     "--samples", 2, "--seqlen", 32, "--out", out, umask=0o027)
    assert result.returncode == 0, result.stderr
    result = run_cli(*distill_args(pruned, dense, root / "text.txt", tmp_path / "d"), umask=0o027)
    assert result.returncode == 0, result.stderr
    folders_written = (out, tmp_path / "d", tmp_path / "d.teacher-cache")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "d.teacher-cache").iterdir())
    for folder in folders_written:
        entries = [folder] + sorted(folder.rglob("*"))
        modes = {str(p): oct(p.stat().st_mode & 0o777) for p in entries}
        assert modes == {str(p): oct(0o750 if p.is_dir() else 0o640) for p in entries}


def test_messages_point_the_right_way(folders, tmp_path, capsys):
    root, dense, pruned = folders
    result = run_cli("prune", "--num-prune", 2, "--out", "")
    assert result.returncode == 2 and result.stderr.strip() == ("linearpatch prune: error: argument --out: expected a "
                                                                "path, got '' (see 'linearpatch prune --help')")
    for args in (("demo", "--out", " "), ("eval", "--model", ""), distill_args(pruned, dense, root / "text.txt", "")):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and re.search(r"argument --(out|model): expected a path, got '\s*'", err), err
        assert "not empty" not in err

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dense.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama", "hidden')
    result = run_cli("eval", "--model", broken, "--text", root / "text.txt", "--seqlen", 32, "--samples", 2)
    assert result.returncode == 2, result.stderr
    assert re.search(r"error: --model \S+broken: \S+broken/config.json is not valid JSON \(.*\); the model's config is "
                     r"corrupt or truncated", result.stderr) and "tokenizer" not in result.stderr
    for text, message in [("[1, 2]", r"broken/config.json holds a JSON list; expected a Hugging Face model config"),
                          ('{"hidden_size": 64}', r'holds no "model_type"'),
                          ('{"model_type": "llama", "hidden', "is not valid JSON")]:
        (broken / "config.json").write_text(text)
        for option, args in (("--model", ("eval", "--model", broken, "--text", root / "text.txt", "--seqlen", 32)),
                             ("--teacher", distill_args(pruned, broken, root / "text.txt", tmp_path / "d-broken"))):
            assert main([str(a) for a in args]) == 2
            err = capsys.readouterr().err
            assert re.search(message, err) and "tokenizer" not in err and f"error: {option} {broken}: " in err, err

    # The rest through the same `main` in this process (a subprocess would only add the package's import time).
    assert main(["eval", "--model", str(dense), "--text", str(root / "text.txt"), "--seqlen", "200", "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: --seqlen 200 is beyond the model's context of 128 tokens (max_position_embeddings)" in err
    assert "use --seqlen 128 or less" in err
    assert main(["eval", "--model", str(dense), "--text", str(root / "text.txt"), "--seqlen", "128", "--samples", "1"]) == 0
    assert "warning" not in capsys.readouterr().err

    # One block chosen under --max-cuts 2: "1 cut", never "1 cuts".
    assert main(["prune", "--model", str(dense), "--num-prune", "1", "--max-cuts", "2", "--calib-text",
                 str(root / "text.txt"), "--samples", "2", "--seqlen", "32", "--out", str(tmp_path / "one-cut")]) == 0
    out = capsys.readouterr().out
    assert "at most 2 cuts" in out and "(5 layers, 1 cut, patch rotate" in out and "1 cuts" not in out


def test_an_interrupted_distill_says_the_teacher_cache_is_kept(folders, tmp_path):
    root, dense, pruned = folders
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 30, encoding="utf-8")
    cache = tmp_path / "d.teacher-cache"
    args = ("distill", "--model", pruned, "--teacher", dense, "--text", text, "--samples", 4000, "--val-samples", 2,
            "--seqlen", 32, "--topk", 8, "--chunk-size", 1, "--device", "cpu", "--out", tmp_path / "d")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "linearpatch_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not list(cache.glob("chunk-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("linearpatch distill: interrupted; no partial checkpoint was left behind; the teacher cache")
    assert f"{cache} is kept (its finished chunks and their manifest): run the same command again to resume" in last
    assert "no partial output was left behind" not in stderr
    assert (cache / "manifest.json").is_file() and not (tmp_path / "d").exists()


def test_cpu_defaults_and_the_time_estimate(folders, tmp_path, capsys):
    """Without --samples/--seqlen the CPU takes 16 windows of 512 tokens to prune (the paper's 128 x 2048 take
    minutes per pass of SmolLM2 on two idle cores, half an hour on shared ones) and 4 per text to evaluate,
    says so, and prints how long the work will take before doing it. (The runs give --seqlen 64, short enough for the tiny model's context
    and a quick test.)"""
    root, dense, pruned = folders
    result = run_cli("prune", "--model", dense, "--num-prune", 2, "--calib-text", root / "text.txt", "--seqlen", 64,
                     "--device", "cpu", "--out", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    assert "calibration: 16 windows x 64 tokens" in result.stdout
    assert "(--samples: the CPU default; on a GPU: --samples 128 --seqlen 2048)" in result.stdout
    estimate = re.search(r"estimated time: (about \d+ s|under a second) for the selection pass and the scales pass "
                         r"over 16 windows and the shrinkage choice \([\d.]+ s per window of 64 tokens on this CPU, \d+ threads?\); fewer "
                         r"--samples or a shorter --seqlen make it faster", result.stderr)
    assert estimate, result.stderr
    assert result.stderr.index("estimated time") < result.stderr.index("block scores")  # before the work

    assert main(["eval", "--model", str(dense), "--text", str(root / "text.txt"), "--seqlen", "64", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "perplexity on 1 text, 4 windows of 64 tokens" in captured.out
    assert "(--samples: the CPU default; on a GPU: --samples 32 --seqlen 2048)" in captured.out
    assert re.search(r"estimated time: (about \d+ s|under a second) for 1 perplexity pass over 4 windows", captured.err)
    main(["eval", "--model", str(pruned), "--dense-model", str(dense), "--text", str(root / "text.txt"), "--seqlen",
          "64", "--samples", "2", "--device", "cpu"])
    assert "for 3 perplexity passes over 2 windows" in capsys.readouterr().err

    for argv, command, device, want, note in [
        (["prune", "--num-prune", "2", "--out", "o"], "prune", "cpu", (16, 512),
         " (--samples and --seqlen: the CPU default; on a GPU: --samples 128 --seqlen 2048)"),
        (["prune", "--num-prune", "2", "--out", "o", "--seqlen", "256"], "prune", "cuda", (128, 256), ""),
        (["eval"], "eval", "cpu", (4, 512), " (--samples and --seqlen: the CPU default; on a GPU: --samples 32 "
                                            "--seqlen 2048)"),
        (["eval", "--samples", "all"], "eval", "cuda:1", (None, 2048), ""),
        (["distill", "--model", "m", "--teacher", "t", "--out", "o"], "distill", "cpu", (32, 512),
         " (--samples and --seqlen: the CPU default; on a GPU: --seqlen 2048 and every window the text holds)"),
        (["distill", "--model", "m", "--teacher", "t", "--out", "o", "--samples", "all"], "distill", "cuda:0",
         (None, 2048), ""),
    ]:
        args = build_parser().parse_args(argv)
        assert _default_windows(args, command, device) == note
        assert (args.samples, args.seqlen) == want, argv

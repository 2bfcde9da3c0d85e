"""The patched architectures of a format-2 checkpoint, loaded by transformers itself: with the package
imported (Auto classes), with ``trust_remote_code`` and no package (the modeling file saved in the
checkpoint, plain PyTorch Hadamard), and with neither (refused); lm-eval's ``hf`` model on it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import random_batches, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from linearpatch_kernels import hadamard_matrix, load_pruned, patch_disabled, prune_and_patch, save_pruned
from linearpatch_kernels.model.modeling_linearpatch import fwht, hadamard_rotate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("d", [1, 2, 16, 48, 64, 576, 1536])
def test_plain_pytorch_rotation_is_the_packages_hadamard_matrix(d):
    from linearpatch_kernels.hadamard import hadamard_factors

    x = torch.randn(5, d, dtype=torch.float64)
    want = x @ hadamard_matrix(d, dtype=torch.float64)  # fp64 dense reference
    got = hadamard_rotate(x, hadamard_factors(d).h_k)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    n = 1 << (d.bit_length() - 1)
    if n == d:  # a power of two: Sylvester's matrix, unnormalised
        assert torch.allclose(fwht(x), x @ hadamard_matrix(d, normalized=False), atol=1e-9)


def pruned(family, d=48, start=2, end=4, mode="rotate", seed=0):
    model = tiny_model(family, num_layers=6, hidden_size=d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if mode == "dense":
        return prune_and_patch(model, start, end, mode="dense", weight=torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
    return prune_and_patch(model, start, end, torch.rand(d, generator=g) * 1.5 + 0.25, mode=mode)


@pytest.mark.parametrize("family, start, end, mode", [
    ("llama", 2, 4, "rotate"), ("mistral", 0, 2, "rotate"), ("qwen2", 4, 6, "diag"), ("qwen3", 1, 3, "dense"),
])
def test_auto_classes_give_the_patched_model(tmp_path, family, start, end, mode):
    model = pruned(family, start=start, end=end, mode=mode)
    save_pruned(model, tmp_path)
    ids = random_batches(1, seqlen=12, seed=4)[0]
    with torch.no_grad():
        want = model(ids).logits
        with patch_disabled(model):
            unpatched = model(ids).logits
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == f"linearpatch_{family}"
    auto, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(auto).__name__ == config.architectures[0]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        got = auto(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unpatched, rtol=1e-3, atol=1e-3)
    # bf16 weights, patch kept in fp32 (the patched classes keep ``linearpatch`` modules fp32).
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in bf16.model.linearpatch.parameters())


NO_PACKAGE = textwrap.dedent("""
    import sys, torch
    sys.modules["linearpatch_kernels"] = None  # as if the package were not installed
    from transformers import AutoModelForCausalLM
    path, ids_file, out_file, trust = sys.argv[1:5]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust == "1")
    except Exception as e:
        print("REFUSED:", type(e).__name__, e)
        sys.exit(3)
    assert model.model.linearpatch[0]._op is None  # the plain PyTorch path
    with torch.no_grad():
        torch.save(model(torch.load(ids_file)).logits, out_file)
""")


def run_without_package(path, ids_file, out_file, trust):
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", NO_PACKAGE, str(path), str(ids_file), str(out_file), trust],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.parametrize("family, d", [("llama", 48), ("qwen3", 64)])
def test_trust_remote_code_without_the_package(tmp_path, family, d):
    model = pruned(family, d=d)
    save_pruned(model, tmp_path / "ckpt")
    ids = random_batches(1, seqlen=12, seed=5)[0]
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = model(ids).logits
    result = run_without_package(tmp_path / "ckpt", tmp_path / "ids.pt", tmp_path / "out.pt", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    got = torch.load(tmp_path / "out.pt")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_resaving_an_auto_loaded_model_copies_the_modeling_file(tmp_path):
    """A model from the Auto classes (package imported), saved again with save_pretrained: the copy
    carries auto_map *and* the modeling file, so it loads with the package and without it (with
    trust_remote_code); before, without the file, it failed with OSError."""
    model = pruned("llama")
    save_pruned(model, tmp_path / "ckpt")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    auto.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "modeling_linearpatch.py").read_bytes() == (tmp_path / "ckpt" / "modeling_linearpatch.py").read_bytes()
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearpatch.LinearPatchLlamaForCausalLM"
    ids = random_batches(1, seqlen=12, seed=5)[0]
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "copy")(ids).logits, want, atol=1e-5)
        assert torch.allclose(load_pruned(tmp_path / "copy")(ids).logits, want, atol=1e-5)
    result = run_without_package(tmp_path / "copy", tmp_path / "ids.pt", tmp_path / "out.pt", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.allclose(torch.load(tmp_path / "out.pt"), want, rtol=1e-4, atol=1e-4)


def test_without_package_or_trust_remote_code_loading_is_refused(tmp_path):
    save_pruned(pruned("llama"), tmp_path / "ckpt")
    torch.save(random_batches(1, seqlen=4)[0], tmp_path / "ids.pt")
    result = run_without_package(tmp_path / "ckpt", tmp_path / "ids.pt", tmp_path / "out.pt", "0")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "REFUSED" in result.stdout and "trust_remote_code=True" in result.stdout
    # transformers' refusal points at the folder, whose README names the package.
    assert "linearpatch-kernels" in (tmp_path / "ckpt" / "README.md").read_text()


def test_lm_eval_hf_model_scores_the_patched_checkpoint(tmp_path):
    pytest.importorskip("lm_eval")
    from test_evaluation import char_tokenizer, tiny_char_model, write_mc_task

    docs = write_mc_task(tmp_path)
    model = prune_and_patch(tiny_char_model(num_layers=4, seed=7), 1, 3,
                            torch.rand(64, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.25)
    save_pruned(model, tmp_path / "ckpt", tokenizer=char_tokenizer())
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={tmp_path / 'ckpt'},trust_remote_code=True,dtype=float32",
           "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--device", "cpu",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    check_lm_eval_samples(tmp_path / "out", tmp_path / "ckpt", docs, tolerance=1e-4)


def choice_loglikelihoods(model, doc) -> list[float]:
    """sum log p(" " + choice | question) per choice, in fp64 from the model's logits (lm-eval's
    multiple-choice score, with the character tokenizer of test_evaluation)."""
    from test_evaluation import char_ids

    out = []
    with torch.no_grad():
        for choice in doc["choices"]:
            context, continuation = char_ids(doc["question"]), char_ids(" " + choice)
            logp = torch.log_softmax(model(input_ids=torch.tensor([context + continuation])).logits[0].double(), -1)
            out.append(sum(float(logp[len(context) + k - 1, t]) for k, t in enumerate(continuation)))
    return out


def check_lm_eval_samples(out_dir, checkpoint, docs, tolerance):
    """lm-eval's logged per-choice log-likelihoods are those of the patched model (``load_pruned``)
    and not those of the same model without its patch."""
    samples = [json.loads(line) for f in sorted(Path(out_dir).rglob("samples_tiny_mc_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(samples) == len(docs)
    model = load_pruned(checkpoint)
    for sample in samples:
        doc = docs[sample["doc_id"]]
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(choice_loglikelihoods(model, doc), rel=tolerance, abs=tolerance)
        with patch_disabled(model):
            assert got != pytest.approx(choice_loglikelihoods(model, doc), rel=tolerance, abs=tolerance)

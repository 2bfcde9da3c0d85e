"""vLLM serves a format-2 checkpoint with its patch: greedy tokens from vLLM equal those of
``load_pruned`` (transformers) and differ from the unpatched model's.

vLLM runs in its own virtual environment (its CPU build pins another torch), as subprocesses of
``tests/vllm_scripts/generate.py``; the transformers side runs here. The environment is
``$LINEARPATCH_VLLM_PYTHON`` or ``~/.cache/linearpatch/vllm-venv`` (what ``.ci/vllm_check.sh`` builds);
without it these tests skip.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from linearpatch_kernels import load_pruned, patch_disabled, prune_and_patch, save_pruned
from linearpatch_kernels.integrations.vllm import TESTED_VLLM, check_vllm_version

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "vllm_scripts" / "generate.py"
DEFAULT_VENV_PYTHON = Path.home() / ".cache" / "linearpatch" / "vllm-venv" / "bin" / "python"


def vllm_python() -> str:
    python = Path(os.environ.get("LINEARPATCH_VLLM_PYTHON", DEFAULT_VENV_PYTHON))
    if not python.is_file():
        pytest.skip(f"no vLLM environment at {python} (bash .ci/vllm_check.sh builds it)")
    return str(python)


def vllm_env(**extra) -> dict:
    # The checkout's package first (the environment has it installed editable, with the plugin's
    # entry point); the engine in this process.
    return {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
            **extra}


def run_vllm(checkpoint, prompts, max_tokens, tmp_path, tp=1, env=None, compile=False):
    out = tmp_path / f"vllm-{tp}.json"
    cmd = [vllm_python(), str(SCRIPT), str(checkpoint), str(out), "--prompts", json.dumps(prompts),
           "--max-tokens", str(max_tokens), "--tp", str(tp)] + (["--compile"] if compile else [])
    result = subprocess.run(cmd, capture_output=True, text=True, env=env or vllm_env(), timeout=600)
    return result, (json.loads(out.read_text()) if out.is_file() else None)


def hf_greedy(model, prompts, max_tokens):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                               eos_token_id=None)[0, len(p):].tolist() for p in prompts]


def check_against_transformers(checkpoint, prompts, max_tokens, tmp_path, tp=1, env=None, compile=False):
    result, out = run_vllm(checkpoint, prompts, max_tokens, tmp_path, tp=tp, env=env, compile=compile)
    assert result.returncode == 0 and out is not None, result.stdout[-4000:] + result.stderr[-4000:]
    model = load_pruned(checkpoint)
    want = hf_greedy(model, prompts, max_tokens)
    with patch_disabled(model):
        unpatched = hf_greedy(model, prompts, max_tokens)
    assert out["tokens"] == want
    assert unpatched != want  # the prompts are ones where the patch changes the greedy tokens
    return out


def tiny_qwen3_checkpoint(directory):
    """A random 6-layer Qwen3 (d=48: a Paley Hadamard size; head_dim 32, which vLLM's CPU attention
    supports), layers [2, 4) cut with a rotate patch: a fused cut in vLLM."""
    config = Qwen3Config(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=128, initializer_range=0.2,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM._from_config(config, dtype=torch.float32).eval()
    prune_and_patch(model, 2, 4, torch.rand(48) * 2 + 0.2)
    save_pruned(model, directory)
    return directory


def test_version_range_is_checked():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.3+cpu")
    low = ".".join(map(str, TESTED_VLLM[0]))
    with pytest.raises(RuntimeError, match=f"needs vLLM >= {low}, < 0.33.0.*this is vLLM 0.31.2"):
        check_vllm_version("0.31.2")
    with pytest.warns(UserWarning, match="tested with vLLM >= 0.32.0, < 0.33.0; this is vLLM 0.34.0"):
        check_vllm_version("0.34.0")


def test_importing_the_package_does_not_import_vllm():
    code = "import sys, linearpatch_kernels; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_tiny_qwen3_fused_cut(tmp_path):
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "qwen3")
    out = check_against_transformers(checkpoint, [[5, 6, 7, 8], [10, 20, 30]], 8, tmp_path)
    assert out["cuts"] == [["fused: patch_add_rmsnorm with the next layer's input_layernorm"]]


def test_tiny_qwen3_fused_cut_under_torch_compile(tmp_path):
    """vLLM's torch.compile mode (the CPU build compiles the model ahead of time): the cut's layers
    and the patch_add_rmsnorm op trace (the op has a fake kernel) and give the same tokens."""
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "qwen3")
    env = vllm_env(VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))  # compile from scratch, not from a cache
    out = check_against_transformers(checkpoint, [[5, 6, 7, 8], [10, 20, 30]], 8, tmp_path, env=env, compile=True)
    assert out["cuts"] == [["fused: patch_add_rmsnorm with the next layer's input_layernorm"]]


def test_tiny_llama_cut_after_the_last_layer(tmp_path):
    """A diag patch on the last kept layer: the unfused path (the final norm is the model's)."""
    vllm_python()
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128, initializer_range=0.2,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()
    prune_and_patch(model, 4, 6, torch.rand(64) * 2 + 0.2, mode="diag")
    save_pruned(model, tmp_path / "llama")
    out = check_against_transformers(tmp_path / "llama", [[5, 6, 7, 8], [40, 41, 3]], 8, tmp_path)
    assert out["cuts"] == [["unfused: the cut is after the last layer (the final norm runs in the model's forward)"]]


def test_tiny_mistral_three_cuts(tmp_path):
    """Several cuts in one model (a Mistral of 10 layers, d=64): one at the very start (input of kept
    layer 0, unfused), a rotate cut in the middle (fused), a diag cut after the last kept layer."""
    vllm_python()
    config = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=10,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                           initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, sliding_window=None)
    torch.manual_seed(2)
    model = MistralForCausalLM._from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(2)
    scales = [torch.rand(64, generator=g) * 2 + 0.2 for _ in range(3)]
    prune_and_patch(model, blocks=[(4, 6), (0, 1), (8, 10)], scales=[scales[1], scales[0], scales[2]],
                    mode=["rotate", "rotate", "diag"])
    save_pruned(model, tmp_path / "mistral")
    out = check_against_transformers(tmp_path / "mistral", [[5, 6, 7, 8], [40, 41, 3], [9, 60, 61, 17, 4]], 8, tmp_path)
    notes = out["cuts"][0]
    assert len(notes) == 3 and notes[1] == "fused: patch_add_rmsnorm with the next layer's input_layernorm", notes
    assert notes[0].startswith("unfused") and notes[2].startswith("unfused: the cut is after the last layer"), notes


def test_record_naming_a_missing_layer_is_refused(tmp_path):
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "bad")
    config = json.loads((checkpoint / "config.json").read_text())
    config["linearpatch"]["cuts"][0]["kept_index"] = 9
    (checkpoint / "config.json").write_text(json.dumps(config))
    result, out = run_vllm(checkpoint, [[5, 6]], 2, tmp_path)
    assert result.returncode != 0 and out is None
    assert "records kept_index 9" in result.stdout + result.stderr


def test_a_nan_patch_is_refused(tmp_path):
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "nan")
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.linearpatch.0.scale"][7] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    result, out = run_vllm(checkpoint, [[5, 6]], 2, tmp_path)
    assert result.returncode != 0 and out is None
    assert ("checkpoint: cut [2, 4): the rotate patch's scale has 1 non-finite values (1 NaN, 0 infinite) at "
            "channel 7") in result.stdout + result.stderr


@pytest.mark.slow
def test_default_model_pruned_and_patched(tmp_path):
    """SmolLM2-135M (d=576 = 36 * 16, Paley): layers [20, 25) cut, rotate scales calibrated on the
    package's corpus; vLLM and transformers give the same greedy continuation of English prompts."""
    vllm_python()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearpatch_kernels import estimate_scales
    from linearpatch_kernels.corpus import calibration_text, token_windows
    from linearpatch_kernels.default_model import default_model_dir

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = token_windows(tokenizer, calibration_text(), 128, 8)
    scales = estimate_scales(model, windows, 20, 25, "rotate")
    prune_and_patch(model, 20, 25, scales)
    save_pruned(model, tmp_path / "smollm2", tokenizer=tokenizer)
    prompts = [tokenizer(t)["input_ids"] for t in (
        "The capital of France is", "It is a truth universally acknowledged that",
        "Once upon a time, in a small village,")]
    check_against_transformers(tmp_path / "smollm2", prompts, 12, tmp_path)


def test_tiny_qwen3_tensor_parallel_2(tmp_path):
    """TP=2 on the CPU build: each rank applies the whole patch to its replicated residual stream.
    (vLLM binds each CPU worker's threads to its own NUMA node by default; one node here, so the two
    ranks get one core each by hand.)"""
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "qwen3")
    check_against_transformers(checkpoint, [[5, 6, 7, 8], [10, 20, 30]], 8, tmp_path, tp=2,
                               env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1"))


def test_pipeline_parallel_cut_placement(tmp_path):
    """The patch is applied by the rank that holds the layer before the cut, and a cut at a rank
    boundary is not fused (the next norm's weight is on the other rank). Checked on the plugin's
    placement code directly: pipeline parallel on vLLM's CPU build fails inside vLLM's own runner
    here, with or without this plugin."""
    result = subprocess.run([vllm_python(), str(ROOT / "tests" / "vllm_scripts" / "check_pipeline_cuts.py")],
                            capture_output=True, text=True, env=vllm_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    boundary = ["unfused: the cut is at a pipeline-parallel rank boundary"]
    assert report["rank0"]["notes"] == report["rank1"]["notes"] == boundary
    assert report["rank0"]["patched_here"] and not report["rank1"]["patched_here"]
    assert report["rank0"]["handoff_is_patched_stream"]
    # Both ranks hold the (small) patch tensors, so the checkpoint loads the same everywhere.
    assert report["rank0"]["patch_tensors"] == report["rank1"]["patch_tensors"] == ["model.linearpatch.0.scale"]


def test_lm_eval_vllm_model_scores_the_patched_checkpoint(tmp_path):
    """``lm_eval --model vllm`` on the checkpoint (in the vLLM environment, offline, on a task this
    test writes): its per-choice log-likelihoods are the patched model's, not the unpatched one's."""
    python = vllm_python()
    if subprocess.run([python, "-c", "import lm_eval"], capture_output=True).returncode != 0:
        pytest.skip("lm_eval is not installed in the vLLM environment")
    from test_architectures import check_lm_eval_samples
    from test_evaluation import CHAR_VOCAB_SIZE, char_tokenizer, write_mc_task

    docs = write_mc_task(tmp_path)
    # Two heads of 32: vLLM's CPU attention has no kernel for the usual tiny head size of 16.
    config = LlamaConfig(vocab_size=CHAR_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=0.2, tie_word_embeddings=False, pad_token_id=2, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(7)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()
    prune_and_patch(model, 1, 3, torch.rand(64, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.25)
    save_pruned(model, tmp_path / "ckpt", tokenizer=char_tokenizer())
    model_args = (f"pretrained={tmp_path / 'ckpt'},dtype=float32,enforce_eager=True,max_model_len=128,"
                  "gpu_memory_utilization=0.08")
    cmd = [python, str(ROOT / "tests" / "vllm_scripts" / "lm_eval_cli.py"), "run", "--model", "vllm", "--model_args", model_args, "--tasks", "tiny_mc",
           "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = vllm_env(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # fp32 in both; vLLM's CPU kernels sum in another order than PyTorch's
    check_lm_eval_samples(tmp_path / "out", tmp_path / "ckpt", docs, tolerance=1e-3)

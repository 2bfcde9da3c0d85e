"""vLLM serves a format-2 checkpoint with its patch: greedy tokens from vLLM equal those of
``load_pruned`` (transformers) and differ from the unpatched model's -- offline, over ``vllm serve``'s
HTTP API, under compile, tensor parallel, prefix caching and EAGLE-3 speculative decoding; every
tampered checkpoint and LoRA are refused; the plugin leaves another vLLM version working.

vLLM runs in its own virtual environment (its CPU build pins another torch), as subprocesses of the
scripts in ``tests/vllm_scripts/``; the transformers side runs here. The environment is
``$LINEARPATCH_VLLM_PYTHON`` or ``~/.cache/linearpatch/vllm-venv`` (what ``.ci/vllm_check.sh`` builds);
without it these tests skip (the plugin's own version logic is tested without vLLM, on a stand-in).
"""

import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from linearpatch_kernels import load_pruned, patch_disabled, prune_and_patch, save_pruned
from linearpatch_kernels.integrations import vllm as plugin

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


def run_vllm(checkpoint, prompts, max_tokens, tmp_path, tp=1, env=None, compile=False, prefix_caching=False):
    out = tmp_path / f"vllm-{tp}.json"
    cmd = [vllm_python(), str(SCRIPT), str(checkpoint), str(out), "--prompts", json.dumps(prompts),
           "--max-tokens", str(max_tokens), "--tp", str(tp)] + (["--compile"] if compile else []) + (
           ["--prefix-caching"] if prefix_caching else [])
    result = subprocess.run(cmd, capture_output=True, text=True, env=env or vllm_env(), timeout=600)
    return result, (json.loads(out.read_text()) if out.is_file() else None)


def hf_greedy(model, prompts, max_tokens):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                               eos_token_id=None)[0, len(p):].tolist() for p in prompts]


def check_against_transformers(checkpoint, prompts, max_tokens, tmp_path, tp=1, env=None, compile=False,
                               prefix_caching=False):
    result, out = run_vllm(checkpoint, prompts, max_tokens, tmp_path, tp=tp, env=env, compile=compile,
                           prefix_caching=prefix_caching)
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


class FakeRegistry:
    def __init__(self, fail=False):
        self.registered, self.fail = {}, fail

    def get_supported_archs(self):
        if self.fail:
            raise RuntimeError("registry unavailable")
        return list(self.registered)

    def register_model(self, arch, target):
        self.registered[arch] = target


def fake_vllm(monkeypatch, version, registry):
    """A stand-in ``vllm`` module of the given version, so that the plugin's own decision is tested
    without vLLM installed (the real one: test_plugin_on_another_vllm_version_lets_vllm_run)."""
    module = types.ModuleType("vllm")
    module.__version__ = version
    module.ModelRegistry = registry
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(plugin, "_warned", False)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3+cpu", "0.32.1.dev4+g1234abc", "0.32"])
def test_plugin_registers_on_a_supported_vllm(monkeypatch, caplog, version):
    registry = FakeRegistry()
    fake_vllm(monkeypatch, version, registry)
    plugin.register()
    assert sorted(registry.registered) == sorted(plugin.VLLM_ARCHITECTURES)
    assert registry.registered["LinearPatchQwen3ForCausalLM"] == (
        "linearpatch_kernels.integrations.vllm_models:LinearPatchQwen3ForCausalLM")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.34.0rc1", "unknown"])
def test_plugin_on_an_unsupported_vllm_warns_once_and_registers_nothing(monkeypatch, caplog, version):
    """An older or newer vLLM than the supported range: vLLM calls the plugin for every model it
    serves, so it must not raise (that stops vLLM altogether), and registers nothing (vLLM then
    refuses LinearPatch checkpoints as an unknown architecture)."""
    registry = FakeRegistry()
    fake_vllm(monkeypatch, version, registry)
    with caplog.at_level(logging.WARNING, logger=plugin.__name__):
        plugin.register()
        plugin.register()  # vLLM may call it again in the same process
    assert registry.registered == {}
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_) == 1, warnings_
    assert f"vLLM {version} is outside the range the vLLM plugin supports (>= 0.32.0, < 0.33.0" in warnings_[0]
    assert "\n" not in warnings_[0]


def test_plugin_that_fails_to_register_warns_instead_of_raising(monkeypatch, caplog):
    fake_vllm(monkeypatch, "0.32.0", FakeRegistry(fail=True))
    with caplog.at_level(logging.WARNING, logger=plugin.__name__):
        plugin.register()
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "registered nothing (RuntimeError: registry unavailable)" in message


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


def test_tiny_qwen3_fused_cut_with_prefix_caching(tmp_path):
    """Prefix caching: later prompts that share the first prompt's 72-token prefix reuse its cached
    blocks of 32 tokens (computed through the patched layers) and still give load_pruned's tokens."""
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "qwen3")
    prefix = [(7 * i) % 90 + 3 for i in range(72)]
    out = check_against_transformers(checkpoint, [prefix, prefix + [11, 12], prefix + [50]], 6, tmp_path,
                                     prefix_caching=True)
    assert out["cached_tokens"][0] == 0 and min(out["cached_tokens"][1:]) >= 64, out["cached_tokens"]


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


def mistral_three_cuts(directory):
    """A Mistral of 10 layers (d=64, heads of 32) with three cuts: [0, 1) rotate at the very start
    (input of kept layer 0, unfused), [4, 6) rotate in the middle (fused), [8, 10) diag after the last
    kept layer (unfused). Returns the checkpoint folder."""
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
    save_pruned(model, directory)
    return directory


def test_tiny_mistral_three_cuts(tmp_path):
    """Several cuts in one model: the input cut and the cut after the last layer unfused, the middle
    one fused."""
    vllm_python()
    checkpoint = mistral_three_cuts(tmp_path / "mistral")
    out = check_against_transformers(checkpoint, [[5, 6, 7, 8], [40, 41, 3], [9, 60, 61, 17, 4]], 8, tmp_path)
    notes = out["cuts"][0]
    assert len(notes) == 3 and notes[1] == "fused: patch_add_rmsnorm with the next layer's input_layernorm", notes
    assert notes[0].startswith("unfused") and notes[2].startswith("unfused: the cut is after the last layer"), notes


def eagle3_draft(directory, target_config, layer_ids):
    """A random EAGLE-3 draft for the target (one decoder layer whose attention reads the normed
    embedding and hidden state side by side, ``fc`` mapping the concatenated auxiliary hidden states
    to the hidden size), in the layout of published EAGLE-3 checkpoints. Its proposals are random;
    greedy speculative decoding still gives the target's own tokens."""
    d, ff, vocab = target_config.hidden_size, target_config.intermediate_size, target_config.vocab_size
    heads, kv_heads, head_dim = 2, 1, 32
    g = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    tensors = {
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * d),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * d),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * d),
        "midlayer.self_attn.o_proj.weight": rand(d, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(ff, d), "midlayer.mlp.up_proj.weight": rand(ff, d),
        "midlayer.mlp.down_proj.weight": rand(d, ff),
        "midlayer.input_layernorm.weight": torch.ones(d), "midlayer.hidden_norm.weight": torch.ones(d),
        "midlayer.post_attention_layernorm.weight": torch.ones(d),
        "fc.weight": rand(d, len(layer_ids) * d), "norm.weight": torch.ones(d), "lm_head.weight": rand(vocab, d),
    }
    directory.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": d, "intermediate_size": ff,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": 1,
        "vocab_size": vocab, "draft_vocab_size": vocab, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": list(layer_ids)}))
    return directory


def streams_entering_kept_layers(model, ids):
    """The residual stream entering each kept layer of a ``load_pruned`` model (and, last, the stream
    after the last layer): the embedding through the input patch for kept layer 0, then the output of
    each slot (the patched stream; for a fused cut, the hand-off's ``hidden_states``, h')."""
    from linearpatch_kernels import get_patches
    from linearpatch_kernels.model.surgery import CutHandoff

    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out.hidden_states if isinstance(out, CutHandoff)
                                                                           else out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
        first = get_patches(model)[0]
        embedded = model.model.embed_tokens(ids)
        stream0 = first(embedded) if model.config.linearpatch["cuts"][0]["start"] == 0 else embedded
    for h in hooks:
        h.remove()
    return [stream0[0]] + [o[0] for o in outputs]


def test_eagle3_receives_the_stream_entering_each_kept_layer(tmp_path):
    """EAGLE-3 speculative decoding on the three-cut Mistral: the auxiliary hidden states vLLM hands
    the draft at kept positions 0 (after the input cut), 3 (after the fused cut) and 5 (after the last
    layer's cut) are the residual streams entering those layers, as transformers computes them (not
    the fused hand-off's ``normed + stream``, not the embedding before the input patch), and the
    greedy tokens are load_pruned's."""
    python = vllm_python()
    checkpoint = mistral_three_cuts(tmp_path / "mistral")
    model = load_pruned(checkpoint)
    layer_ids = [0, 3, 5]
    draft = eagle3_draft(tmp_path / "draft", model.config, layer_ids)
    prompt = [9, 60, 61, 17, 4, 33]
    cmd = [python, str(ROOT / "tests" / "vllm_scripts" / "eagle3.py"), str(checkpoint), str(draft),
           str(tmp_path / "out.pt"), "--prompt", json.dumps(prompt), "--max-tokens", "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["tokens"] == hf_greedy(model, [prompt], 8)[0]
    streams = streams_entering_kept_layers(model, torch.tensor([prompt]))
    want = torch.cat([streams[i] for i in layer_ids], dim=-1)
    assert out["aux"].shape == want.shape
    assert torch.allclose(out["aux"], want, rtol=1e-3, atol=1e-3), (out["aux"] - want).abs().amax(0).view(3, -1).amax(-1)


def test_record_naming_a_missing_layer_is_refused(tmp_path):
    vllm_python()
    checkpoint = tiny_qwen3_checkpoint(tmp_path / "bad")
    config = json.loads((checkpoint / "config.json").read_text())
    config["linearpatch"]["cuts"][0]["kept_index"] = 9
    (checkpoint / "config.json").write_text(json.dumps(config))
    result, out = run_vllm(checkpoint, [[5, 6]], 2, tmp_path)
    assert result.returncode != 0 and out is None
    assert "records kept_index 9" in result.stdout + result.stderr


def test_every_tampered_checkpoint_is_refused(tmp_path):
    """The record check of tests/test_record_check.py, in vLLM: every tampered checkpoint is refused
    with the same one-line message as load_pruned's (one vLLM process loads them all), the untampered
    one loads, and LoRA is refused up front with the reason."""
    from test_record_check import TAMPERS, good_checkpoint, tampered

    python = vllm_python()
    good = good_checkpoint(tmp_path / "good")
    paths = {name: str(tampered(good, tmp_path, name)) for name in TAMPERS}
    paths["good"] = paths["lora"] = str(good)
    result = subprocess.run([python, str(ROOT / "tests" / "vllm_scripts" / "load_each.py"), json.dumps(paths),
                             json.dumps({"lora": {"enable_lora": True, "max_lora_rank": 8},
                                         # vLLM itself refuses fp8 with float32 activations, before the model
                                         "quantization_config": {"dtype": "bfloat16"}})],
                            capture_output=True, text=True, env=vllm_env(), timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    assert results.pop("good") == "LOADED"
    assert "do not support LoRA adapters in vLLM: an adapter addresses layers by index" in results.pop("lora")
    for name, message in results.items():
        assert re.search(TAMPERS[name][1], message) and "\n" not in message, (name, message)


def test_plugin_on_another_vllm_version_lets_vllm_run(tmp_path):
    """The real vLLM, told it is 0.31 before it loads its plugins: the plugin warns once and registers
    nothing, vLLM serves a plain model, and refuses the pruned checkpoint as an unknown architecture
    instead of running it without its patch. (Older and newer versions against a stand-in vLLM:
    test_plugin_on_an_unsupported_vllm_warns_once_and_registers_nothing.)"""
    python, version = vllm_python(), "0.31.0"
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128, initializer_range=0.2,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(4)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "plain")
    want = hf_greedy(model, [[5, 6, 7]], 4)[0]
    save_pruned(prune_and_patch(model, 1, 2, torch.rand(64) + 0.5), tmp_path / "pruned")
    result = subprocess.run([python, str(ROOT / "tests" / "vllm_scripts" / "other_version.py"), version,
                             str(tmp_path / "plain"), str(tmp_path / "pruned")],
                            capture_output=True, text=True, env=vllm_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["registered"] == []
    assert report["plain_tokens"] == want
    assert "LinearPatchLlamaForCausalLM" in report["pruned"] and "LOADED" != report["pruned"]
    warning = f"vLLM {version} is outside the range the vLLM plugin supports (>= 0.32.0, < 0.33.0"
    assert (result.stdout + result.stderr).count(warning) == 1, result.stderr[-3000:]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def start_server(checkpoint, log_path):
    """``vllm serve CHECKPOINT`` on a free local port; returns the process and the base URL once
    /health answers (vLLM's CPU build starts in about 30 s)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = [vllm_python(), str(ROOT / "tests" / "vllm_scripts" / "serve.py")]  # `vllm serve` (see the script)
    log = open(log_path, "w")
    server = subprocess.Popen([*serve, str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
                               "--served-model-name", "pruned", "--dtype", "float32", "--max-model-len", "128",
                               "--enforce-eager", "--seed", "0", "--gpu-memory-utilization", "0.08"],
                              stdout=log, stderr=subprocess.STDOUT, env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode}:\n" + Path(log_path).read_text()[-4000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(1)
    server.terminate()
    raise AssertionError("vllm serve did not answer /health in 600 s:\n" + Path(log_path).read_text()[-4000:])


def test_vllm_serve_over_http_gives_load_pruned_tokens(tmp_path):
    """``vllm serve CHECKPOINT`` and its OpenAI-compatible HTTP API: a completion and a chat request
    with greedy sampling return the tokens of ``load_pruned``'s ``generate`` on the same prompt ids
    (the chat prompt rendered by the checkpoint's chat template), which the unpatched model does not."""
    vllm_python()
    from test_evaluation import CHAR_VOCAB_SIZE, char_tokenizer

    config = LlamaConfig(vocab_size=CHAR_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=0.2, tie_word_embeddings=False, pad_token_id=2, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(8)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()
    prune_and_patch(model, 2, 4, torch.rand(64, generator=torch.Generator().manual_seed(8)) * 1.5 + 0.25)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    server, url = start_server(tmp_path / "ckpt", tmp_path / "server.log")
    try:
        common = {"model": "pruned", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        completion = post(url + "/v1/completions", {**common, "prompt": "It was the best of times"})
        messages = [{"role": "user", "content": "Hello, who are you?"}]
        chat = post(url + "/v1/chat/completions", {**common, "messages": messages})
    finally:
        server.terminate()
        server.wait(timeout=60)
    loaded = load_pruned(tmp_path / "ckpt")
    prompt = tokenizer("It was the best of times")["input_ids"]
    chat_prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    assert completion["choices"][0]["prompt_token_ids"] == prompt and chat["prompt_token_ids"] == chat_prompt
    want = hf_greedy(loaded, [prompt, chat_prompt], 12)
    assert completion["choices"][0]["token_ids"] == want[0]
    assert chat["choices"][0]["token_ids"] == want[1]
    assert chat["choices"][0]["message"]["content"] == tokenizer.decode(want[1])
    with patch_disabled(loaded):
        assert hf_greedy(loaded, [prompt, chat_prompt], 12) != want


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

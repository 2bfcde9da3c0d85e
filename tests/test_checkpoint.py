"""save_pruned / load_pruned: round trips with identical logits, plain Hugging Face loading, bad checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import random_batches, tiny_model
from transformers import AutoModelForCausalLM

from linearpatch_kernels import (
    __version__,
    get_patch,
    load_pruned,
    patch_disabled,
    prune_and_patch,
    save_pruned,
)


def pruned_model(family, d, start, end, mode, dtype=torch.float32, seed=0):
    model = tiny_model(family, num_layers=6, hidden_size=d, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if mode == "dense":
        return prune_and_patch(model, start, end, mode="dense", weight=torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
    return prune_and_patch(model, start, end, torch.rand(d, generator=g) + 0.5, mode=mode)


@pytest.mark.parametrize(
    "family, d, start, end, mode, dtype",
    [
        ("llama", 48, 2, 4, "rotate", torch.float32),
        ("qwen2", 64, 0, 2, "rotate", torch.bfloat16),
        ("mistral", 64, 3, 6, "dense", torch.float32),
        ("qwen3", 48, 1, 3, "diag", torch.bfloat16),
    ],
)
def test_round_trip_gives_identical_logits(tmp_path, family, d, start, end, mode, dtype):
    model = pruned_model(family, d, start, end, mode, dtype)
    ids = random_batches(1, seqlen=14, seed=1)[0]
    with torch.no_grad():
        logits = model(ids).logits
        with patch_disabled(model):
            plain_logits = model(ids).logits
        generated = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)

    save_pruned(model, tmp_path)
    assert {"config.json", "model.safetensors", "linearpatch.json", "linearpatch.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    meta = json.loads((tmp_path / "linearpatch.json").read_text())
    assert meta["start"] == start and meta["end"] == end and meta["mode"] == mode
    assert meta["num_layers_original"] == 6 and meta["num_layers"] == 6 - (end - start)
    assert meta["hidden_size"] == d and meta["model_family"] == family
    assert meta["package_version"] == __version__
    if mode == "rotate":
        assert meta["hadamard"]["construction"] == ("sylvester" if d == 64 else "paley1(q=11)")
    else:  # only the rotated patch depends on a Hadamard matrix
        assert meta["hadamard"] is None

    loaded = load_pruned(tmp_path)
    name = "weight" if mode == "dense" else "scale"
    assert getattr(get_patch(loaded), name).dtype == torch.float32
    assert torch.equal(getattr(get_patch(loaded), name), getattr(get_patch(model), name))
    assert loaded.config.linearpatch == model.config.linearpatch
    assert loaded.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert torch.equal(loaded.generate(ids[:, :5], max_new_tokens=6, do_sample=False), generated)

    # The weights are a plain Hugging Face checkpoint: from_pretrained loads the pruned model
    # (without the patch) with no missing or unexpected keys.
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(plain.model.layers) == 6 - (end - start)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, plain_logits)


def test_load_with_another_dtype_keeps_the_patch_fp32(tmp_path):
    model = pruned_model("llama", 64, 1, 3, "rotate")
    save_pruned(model, tmp_path)
    loaded = load_pruned(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert loaded.model.layers[0].layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert get_patch(loaded).scale.dtype == torch.float32
    assert torch.equal(get_patch(loaded).scale, get_patch(model).scale)
    ids = random_batches(1, seqlen=8)[0]
    with torch.no_grad():
        out = loaded(ids).logits
        ref = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 3e-2


def test_tokenizer_is_saved_with_the_model(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    save_pruned(pruned_model("llama", 64, 1, 2, "rotate"), tmp_path, tokenizer=tokenizer)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"] == [3, 4]


def test_save_refuses_an_unpruned_model(tmp_path):
    with pytest.raises(ValueError, match="expected exactly one patched layer"):
        save_pruned(tiny_model("llama", num_layers=4), tmp_path)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    save_pruned(pruned_model("llama", 48, 2, 4, "rotate"), directory)
    return directory


@pytest.fixture
def checkpoint_copy(good_checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, directory)
    return directory


def edit_metadata(directory, **changes):
    path = directory / "linearpatch.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def test_good_checkpoint_loads(good_checkpoint):
    assert len(load_pruned(good_checkpoint).model.layers) == 4


def test_missing_directory_and_files(tmp_path, checkpoint_copy):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_pruned(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="linearpatch.json not found.*not a LinearPatch checkpoint"):
        load_pruned(tmp_path)
    (checkpoint_copy / "linearpatch.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="linearpatch.safetensors not found"):
        load_pruned(checkpoint_copy)


def test_missing_model_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_pruned(checkpoint_copy)


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pruned(checkpoint_copy)


@pytest.mark.parametrize("name", ["linearpatch.safetensors", "model.safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_safetensors(checkpoint_copy, name, keep):
    truncate(checkpoint_copy / name, keep)
    with pytest.raises(ValueError, match=f"{name}: .*(truncated|too short)"):
        load_pruned(checkpoint_copy)


def test_garbled_safetensors_header(checkpoint_copy):
    path = checkpoint_copy / "linearpatch.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="linearpatch.safetensors: unreadable safetensors header"):
        load_pruned(checkpoint_copy)


def test_bad_metadata_json(checkpoint_copy):
    (checkpoint_copy / "linearpatch.json").write_text('{"format": "linearpatch", "start": 2,')
    with pytest.raises(ValueError, match="linearpatch.json: not valid JSON"):
        load_pruned(checkpoint_copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "other"}, '"format": "linearpatch"'),
        ({"format_version": 7}, "format_version 7; this package reads 1"),
        ({"mode": "hadamard"}, "field 'mode' is 'hadamard'"),
        ({"start": "2"}, "field 'start' is '2'; expected a non-negative int"),
        ({"end": 5}, "inconsistent block"),
        ({"hidden_size": 64}, "hidden_size 64 but config.json has hidden_size 48"),
        ({"model_family": "qwen2"}, "model_family 'qwen2' but config.json has model_type 'llama'"),
        ({"hadamard": {"construction": "sylvester", "k": 1, "n": 48}}, "calibrated with Hadamard matrix"),
    ],
)
def test_inconsistent_metadata(checkpoint_copy, changes, message):
    edit_metadata(checkpoint_copy, **changes)
    with pytest.raises(ValueError, match=message):
        load_pruned(checkpoint_copy)


def test_patch_of_the_wrong_hidden_size(checkpoint_copy):
    save_file({"scale": torch.ones(64)}, str(checkpoint_copy / "linearpatch.safetensors"))
    with pytest.raises(ValueError, match=r"'scale' is torch.float32 of shape \(64,\); expected float32 of shape \(48,\)"):
        load_pruned(checkpoint_copy)
    save_file({"weight": torch.eye(48)}, str(checkpoint_copy / "linearpatch.safetensors"))
    with pytest.raises(ValueError, match=r"holds tensors \['weight'\]; expected exactly 'scale'"):
        load_pruned(checkpoint_copy)


def test_diag_patch_saves_for_a_size_without_a_hadamard_matrix(tmp_path):
    # d = 52 has no Hadamard matrix here: a diag patch must still save and load, complete.
    from linearpatch_kernels import is_supported_size

    assert not is_supported_size(52)
    from transformers import LlamaConfig, LlamaForCausalLM

    # Two heads of 26 (RoPE needs an even head size).
    config = LlamaConfig(vocab_size=96, hidden_size=52, intermediate_size=104, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prune_and_patch(model, 1, 2, torch.full((52,), 1.5), mode="diag")
    save_pruned(model, tmp_path / "ckpt")
    loaded = load_pruned(tmp_path / "ckpt")
    ids = random_batches(1, seqlen=8, seed=2)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

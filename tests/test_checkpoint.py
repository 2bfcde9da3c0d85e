"""save_pruned / load_pruned: round trips with identical logits, the stored format, format-1 checkpoints, bad checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from pathlib import Path

from tiny_models import edit_tensors, random_batches, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from linearpatch_kernels import (
    __version__,
    get_patch,
    get_patches,
    load_pruned,
    prune_and_patch,
    save_pruned,
)
from linearpatch_kernels.model import is_pruned_checkpoint, plain_layers, upgrade_checkpoint


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
        generated = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)

    save_pruned(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "modeling_linearpatch.py"}
    assert not (tmp_path / "linearpatch.json").exists()  # format 2: config.json is the only record
    config = json.loads((tmp_path / "config.json").read_text())
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    assert config["model_type"] == f"linearpatch_{family}"
    assert config["architectures"] == [f"LinearPatch{arch}ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_linearpatch.LinearPatch{arch}ForCausalLM"
    record = config["linearpatch"]
    kept_index, position = (0, "input") if start == 0 else (start - 1, "output")
    assert record["cuts"] == [{"start": start, "end": end, "mode": mode, "kept_index": kept_index, "position": position}]
    assert record["num_layers_original"] == 6 and config["num_hidden_layers"] == 6 - (end - start)
    assert record["hidden_size"] == d and record["base_model_type"] == family
    assert record["format_version"] == 2 and record["package_version"] == __version__
    if mode == "rotate":
        assert record["hadamard"]["construction"] == ("sylvester" if d == 64 else "paley1(q=11)")
    else:  # only the rotated patch depends on a Hadamard matrix
        assert record["hadamard"] is None
    # The patch is an ordinary named fp32 tensor of the model's safetensors (and for rotate, the
    # Hadamard factor it was calibrated with).
    name = "weight" if mode == "dense" else "scale"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.linearpatch.")}
    assert torch.equal(stored[f"model.linearpatch.0.{name}"], getattr(get_patch(model), name))
    assert set(stored) == {f"model.linearpatch.0.{name}"} | ({"model.linearpatch.0.hadamard_k"} if mode == "rotate" else set())

    loaded = load_pruned(tmp_path)
    assert getattr(get_patch(loaded), name).dtype == torch.float32
    assert torch.equal(getattr(get_patch(loaded), name), getattr(get_patch(model), name))
    assert loaded.config.linearpatch == model.config.linearpatch
    assert loaded.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert torch.equal(loaded.generate(ids[:, :5], max_new_tokens=6, do_sample=False), generated)


def write_format_1(model, directory):
    """A checkpoint as the first release wrote it (a plain family checkpoint, the patch and its
    metadata in linearpatch.safetensors / linearpatch.json), to test reading and upgrading it.
    With several cuts, as the version with the list of cuts wrote it: ``"cuts"`` in both records and
    tensors ``cuts.{k}.scale`` / ``.weight``."""
    record = model.config.linearpatch
    cuts = record["cuts"]
    patches = get_patches(model)
    names = ["weight" if p.mode == "dense" else "scale" for p in patches]
    one = len(cuts) == 1
    fields = cuts[0] if one else {"cuts": cuts}
    with plain_layers(model):
        model.config.linearpatch = {"record_version": 1 if one else 2, **fields,
                                    "num_layers_original": record["num_layers_original"], "hidden_size": record["hidden_size"]}
        try:
            PreTrainedModel.save_pretrained(model, directory)  # the family's layout (save_pretrained writes format 2)
        finally:
            model.config.linearpatch = record
    tensors = {name if one else f"cuts.{k}.{name}": getattr(p, name).detach().contiguous()
               for k, (p, name) in enumerate(zip(patches, names))}
    save_file(tensors, str(directory / "linearpatch.safetensors"))
    d = record["hidden_size"]
    hadamard = None
    if any(p.mode == "rotate" for p in patches):
        from linearpatch_kernels.hadamard import hadamard_factors

        f = hadamard_factors(d)
        hadamard = {"construction": f.construction, "k": f.k, "n": f.n}
    meta = {"format": "linearpatch", "format_version": 1, **fields, "num_layers_original": record["num_layers_original"],
            "num_layers": len(model.model.layers), "hidden_size": d, "model_family": model.config.model_type,
            "hadamard": hadamard, "package_version": "0.1.0"}
    (directory / "linearpatch.json").write_text(json.dumps(meta))


def test_format_1_checkpoint_loads_and_upgrades(tmp_path):
    model = pruned_model("llama", 48, 2, 4, "rotate")
    ids = random_batches(1, seqlen=10, seed=3)[0]
    with torch.no_grad():
        logits = model(ids).logits
    write_format_1(model, tmp_path / "v1")
    loaded = load_pruned(tmp_path / "v1")
    assert loaded.config.linearpatch == model.config.linearpatch  # migrated to the list of cuts
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    upgrade_checkpoint(tmp_path / "v1", tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["model_type"] == "linearpatch_llama"
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "v2")(ids).logits, logits)
    # Without its metadata, a format-1 checkpoint whose config.json records the pruning is refused
    # (load_pruned, and so the CLI, which loads any checkpoint that records a pruning with it).
    (tmp_path / "v1" / "linearpatch.json").unlink()
    assert is_pruned_checkpoint(tmp_path / "v1")
    with pytest.raises(FileNotFoundError, match="linearpatch.json not found, but config.json records a pruning"):
        load_pruned(tmp_path / "v1")


def test_format_1_checkpoint_with_several_cuts_loads_and_upgrades(tmp_path):
    model = tiny_model("qwen3", num_layers=8, hidden_size=64, seed=1)
    g = torch.Generator().manual_seed(0)
    prune_and_patch(model, blocks=[(5, 7), (1, 3)], scales=[torch.rand(64, generator=g) + 0.5 for _ in range(2)],
                    mode=["diag", "rotate"])
    ids = random_batches(1, seqlen=9, seed=2)[0]
    with torch.no_grad():
        logits = model(ids).logits
    write_format_1(model, tmp_path / "v1")
    assert "cuts" in json.loads((tmp_path / "v1" / "linearpatch.json").read_text())
    loaded = load_pruned(tmp_path / "v1")
    assert loaded.config.linearpatch == model.config.linearpatch
    upgrade_checkpoint(tmp_path / "v1", tmp_path / "v2")
    cuts = json.loads((tmp_path / "v2" / "config.json").read_text())["linearpatch"]["cuts"]
    assert [(c["start"], c["end"], c["mode"], c["kept_index"], c["position"]) for c in cuts] == \
        [(1, 3, "rotate", 0, "output"), (5, 7, "diag", 2, "output")]
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "v2")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert torch.equal(load_pruned(tmp_path / "v2")(ids).logits, logits)
        torch.testing.assert_close(auto(ids).logits, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is the source checkpoint"):
        upgrade_checkpoint(tmp_path / "v1", tmp_path / "v1")


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
    with pytest.raises(ValueError, match="model.config.linearpatch is missing"):
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


def edit_record(directory, cut=None, **changes):
    """Change fields of config.json's linearpatch record (``cut``: fields of its first cut)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["linearpatch"].update(changes)
    if cut:
        config["linearpatch"]["cuts"][0].update(cut)
    path.write_text(json.dumps(config))


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def test_good_checkpoint_loads(good_checkpoint):
    assert len(load_pruned(good_checkpoint).model.layers) == 4


def test_missing_directory_and_files(tmp_path, checkpoint_copy):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_pruned(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="load_pruned: the checkpoint path is empty"):
        load_pruned("")  # not "config.json not found" in the current folder
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pruned(tmp_path)
    model = tiny_model("llama", num_layers=3)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not a LinearPatch checkpoint.*model_type 'llama'"):
        load_pruned(tmp_path / "plain")


def test_missing_model_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_pruned(checkpoint_copy)


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pruned(checkpoint_copy)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_safetensors(checkpoint_copy, keep):
    truncate(checkpoint_copy / "model.safetensors", keep)
    with pytest.raises(ValueError, match="model.safetensors: .*(truncated|too short)"):
        load_pruned(checkpoint_copy)


def test_garbled_safetensors_header(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors header"):
        load_pruned(checkpoint_copy)


# Records and patch tensors that disagree: tests/test_record_check.py, for every loader.


def test_rotate_record_for_a_size_without_a_hadamard_matrix_is_refused(tmp_path):
    _, directory = save_diag_52(tmp_path)
    # 52 = 13 * 4: K = 13 is no Hadamard order (13 = 12 + 1 with 12 not prime).
    edit_record(directory, {"mode": "rotate"}, hadamard={"construction": "paley1(q=12)", "k": 13, "n": 4})
    with pytest.raises(ValueError, match="a rotate patch with hidden_size 52: no Hadamard matrix of size 52"):
        load_pruned(directory)


def save_diag_52(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Two heads of 26 (RoPE needs an even head size).
    config = LlamaConfig(vocab_size=96, hidden_size=52, intermediate_size=104, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prune_and_patch(model, 1, 2, torch.full((52,), 1.5), mode="diag")
    save_pruned(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_diag_patch_saves_for_a_size_without_a_hadamard_matrix(tmp_path):
    # d = 52 has no Hadamard matrix here: a diag patch must still save and load, complete.
    from linearpatch_kernels import is_supported_size

    assert not is_supported_size(52)
    model, directory = save_diag_52(tmp_path)
    loaded = load_pruned(directory)
    ids = random_batches(1, seqlen=8, seed=2)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cut_slots_follow_from_the_original_indices():
    """Where each patch sits among the kept layers, derived from the original indices: the kept
    index of layer start - 1 (earlier cuts shift it), or the input of kept layer 0. The package and
    the standalone modeling file saved in checkpoints derive the same."""
    from linearpatch_kernels.model.modeling_linearpatch import kept_slots
    from linearpatch_kernels.model.surgery import cut_positions, pruning_cuts, pruning_record

    for cuts, want in [
        ([(10, 15)], [(9, "output")]),
        ([(10, 15), (20, 22)], [(9, "output"), (14, "output")]),
        ([(0, 2), (5, 7), (9, 10)], [(0, "input"), (2, "output"), (4, "output")]),
        ([(0, 2), (3, 5)], [(0, "input"), (0, "output")]),
    ]:
        cut_dicts = pruning_cuts(pruning_record([(s, e, "rotate") for s, e in reversed(cuts)], 30, 576))
        # the package's own placement: the patch of a cut at kept position p is on the output of
        # kept layer p - 1, or on the input of kept layer 0 when p == 0
        assert [(0, "input") if p == 0 else (p - 1, "output") for p in cut_positions(cut_dicts)] == want
        assert kept_slots(cut_dicts) == want


# --- save_pretrained / push_to_hub of a pruned model, pickling, the model card ------------------------


def pruned_from(source, tmp_path):
    """A pruned Llama (two cuts: rotate fused, diag) as ``prune_and_patch`` returns it, or as
    ``load_pruned`` returns its checkpoint."""
    model = tiny_model("llama", num_layers=8, hidden_size=48, seed=4)
    g = torch.Generator().manual_seed(4)
    prune_and_patch(model, blocks=[(2, 4), (6, 7)], scales=[torch.rand(48, generator=g) + 0.5] * 2,
                    mode=["rotate", "diag"])
    if source == "load_pruned":
        save_pruned(model, tmp_path / "source")
        model = load_pruned(tmp_path / "source")
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("source", ["prune_and_patch", "load_pruned"])
def test_save_pretrained_of_a_pruned_model_writes_the_pruned_checkpoint(tmp_path, source):
    """transformers' own save_pretrained used to write the family's architecture with the wrapped
    layers' names (model.layers.0.layer.*), which plain transformers loads with those layers random."""
    model = pruned_from(source, tmp_path)
    ids = random_batches(1, seqlen=12, seed=6)[0]
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["LinearPatchLlamaForCausalLM"] and config["linearpatch"]["format_version"] == 2
    assert (tmp_path / "saved" / "modeling_linearpatch.py").is_file()
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert not any(".layer." in n for n in names) and "model.layers.0.self_attn.q_proj.weight" in names
    want = logits(model, ids)
    assert torch.equal(logits(load_pruned(tmp_path / "saved"), ids), want)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), ids), want, atol=1e-5)


def test_save_pretrained_into_an_existing_folder_keeps_other_files_and_replaces_the_weights(tmp_path):
    from test_evaluation import char_tokenizer

    model = pruned_from("prune_and_patch", tmp_path)
    folder = tmp_path / "saved"
    char_tokenizer().save_pretrained(folder)  # the usual order: tokenizer first, then the model
    model.save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    ids = random_batches(1, seqlen=12, seed=6)[0]
    want = logits(model, ids)
    assert torch.equal(logits(load_pruned(folder), ids), want)  # the patch tensors from whichever shard
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(folder), ids), want, atol=1e-5)
    model.save_pretrained(folder)  # unsharded this time: no shard of the earlier save may remain
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists() and (folder / "tokenizer.json").is_file()
    assert torch.equal(logits(load_pruned(folder), ids), want)


@pytest.mark.parametrize("kwargs, what", [
    ({"state_dict": {}}, "state_dict"), ({"variant": "fp32"}, "variant"),
    ({"safe_serialization": False}, "safe_serialization=False"),
])
def test_save_pretrained_refuses_what_would_not_be_the_pruned_checkpoint(tmp_path, kwargs, what):
    model = pruned_from("prune_and_patch", tmp_path)
    with pytest.raises(TypeError, match=f"save_pretrained of a pruned model: {what} is not supported.*save_pruned"):
        model.save_pretrained(tmp_path / "saved", **kwargs)
    assert not (tmp_path / "saved").exists()


class FakeHub:
    """Stands in for the Hub: ``create_repo`` answers, ``create_commit`` (which upload_folder and
    transformers' own upload both end in) copies the committed files into a folder."""

    def __init__(self, monkeypatch, folder):
        from huggingface_hub import HfApi

        self.folder, self.commits = folder, []
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: type("Url", (), {"repo_id": repo_id})())
        monkeypatch.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: self.create_commit(*args, **kwargs))

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        self.commits.append((repo_id, commit_message))
        self.folder.mkdir(parents=True, exist_ok=True)
        for op in operations:
            source = op.path_or_fileobj
            data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
            (self.folder / op.path_in_repo).write_bytes(data)
        return "commit"


@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained(push_to_hub=True)"])
def test_push_to_hub_of_a_pruned_model_uploads_the_pruned_checkpoint(tmp_path, monkeypatch, how):
    model = pruned_from("load_pruned", tmp_path)
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    if how == "push_to_hub":
        model.push_to_hub("someone/pruned", commit_message="pruned", tags=["demo"])
    else:
        model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/pruned", commit_message="pruned")
    assert hub.commits == [("someone/pruned", "pruned")]
    ids = random_batches(1, seqlen=12, seed=6)[0]
    assert torch.equal(logits(load_pruned(tmp_path / "hub"), ids), logits(model, ids))
    card = (tmp_path / "hub" / "README.md").read_text()
    assert card.startswith("---\n") and "pruned, with LinearPatch" in card  # the model card, not a generic one
    assert 'from_pretrained("someone/pruned")' in card and "vllm serve someone/pruned" in card
    if how == "push_to_hub":
        assert "- demo\n" in card


@pytest.mark.parametrize("source", ["prune_and_patch", "load_pruned"])
def test_a_pruned_model_pickles_and_copies(tmp_path, source):
    """The class behind save_pretrained is made at run time under the family's name; torch.save of
    the whole model and deepcopy still work (load_pruned's failed to pickle before)."""
    import copy
    import io

    from linearpatch_kernels.model.surgery import PrunedModel

    model = pruned_from(source, tmp_path)
    ids = random_batches(1, seqlen=12, seed=6)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert isinstance(other, PrunedModel) and type(other).__name__ == "LlamaForCausalLM"
        assert torch.equal(logits(other, ids), logits(model, ids))
        other.save_pretrained(tmp_path / f"copy-{id(other)}")
        assert json.loads((tmp_path / f"copy-{id(other)}" / "config.json").read_text())["model_type"] == "linearpatch_llama"


def test_model_card_states_base_licence_cuts_calibration_and_survives_a_resave(tmp_path):
    from huggingface_hub.repocard import metadata_load

    model = pruned_from("prune_and_patch", tmp_path)
    save_pruned(model, tmp_path / "a", base_model="someone/base-7b", license="apache-2.0",
                calibration="8 windows x 512 tokens of some text")
    card = (tmp_path / "a" / "README.md").read_text()
    meta = metadata_load(tmp_path / "a" / "README.md")
    assert meta["base_model"] == "someone/base-7b" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and "linearpatch" in meta["tags"]
    assert ("| [2, 4) | rotate: `P = H diag(s) Hᵀ`, `H ∝ H_12 ⊗ H_4` (paley1(q=11) ⊗ Sylvester) | output of kept "
            "layer 1 |") in card
    assert "| [6, 7) | diag: `P = diag(s)` | output of kept layer 3 |" in card
    assert "**Calibration data**: 8 windows x 512 tokens of some text." in card
    assert "vllm serve" in card and "trust_remote_code=True" in card and "curl http://localhost:8000/v1/completions" in card
    load_pruned(tmp_path / "a").save_pretrained(tmp_path / "b")  # the record carries it through a re-save
    assert metadata_load(tmp_path / "b" / "README.md")["license"] == "apache-2.0"
    assert "**Calibration data**: 8 windows x 512 tokens of some text." in (tmp_path / "b" / "README.md").read_text()


def test_model_card_finds_the_base_model_and_its_licence(tmp_path, monkeypatch):
    """Without arguments: from the Hub cache folder the base was loaded from (its id in the path, its
    licence in its card), or the embedded default model; never a local path."""
    from linearpatch_kernels import default_model
    from huggingface_hub.repocard import metadata_load

    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    model = pruned_from("prune_and_patch", tmp_path)
    model.config._name_or_path = str(snapshot)
    save_pruned(model, tmp_path / "a")
    meta = metadata_load(tmp_path / "a" / "README.md")
    assert meta["base_model"] == "someorg/tiny-llama" and meta["license"] == "mit"

    monkeypatch.setenv("LINEARPATCH_CACHE", str(tmp_path / "cache"))
    converted = default_model.cached_model_dir()
    converted.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (converted / name).write_text("{}")
    model.config._name_or_path = str(converted)
    save_pruned(model, tmp_path / "b")
    meta = metadata_load(tmp_path / "b" / "README.md")
    assert (meta["base_model"], meta["license"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")

    model.config._name_or_path = str(tmp_path / "somewhere")  # a local folder that says nothing
    save_pruned(model, tmp_path / "c")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "base_model" not in metadata_load(tmp_path / "c" / "README.md") and str(tmp_path) not in card
    assert "**Licence**: not recorded; the base model's licence applies." in card


def test_save_refuses_a_quantized_model(tmp_path):
    model = pruned_from("prune_and_patch", tmp_path)
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4, "modules_in_block_to_quantize": [
        ["model.layers.5.self_attn.q_proj"]]}
    with pytest.raises(ValueError, match=r"save_pruned: the model is quantized \(gptq\); .*prune the unquantized model"):
        save_pruned(model, tmp_path / "q")


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"scale has 1 non-finite values \(1 NaN, 0 infinite\) at channel 5"),
    (float("-inf"), r"scale has 1 non-finite values \(0 NaN, 1 infinite\) at channel 5"),
    (0.0, r"scale is <= 0 at channel 5 \(smallest 0\)"),
    (-2.0, r"scale is <= 0 at channel 5 \(smallest -2\)"),
])
def test_a_nan_zero_or_negative_patch_is_refused_at_load(checkpoint_copy, value, message):
    scale = torch.rand(48) + 0.5
    scale[5] = value
    edit_tensors(checkpoint_copy, **{"model.linearpatch.0.scale": scale})
    with pytest.raises(ValueError, match=r"load_pruned: .*ckpt: cut \[2, 4\): the rotate patch's " + message):
        load_pruned(checkpoint_copy)
    with pytest.raises(ValueError, match=r"LinearPatchLlamaForCausalLM: cut \[2, 4\): the rotate patch has 1 "):
        AutoModelForCausalLM.from_pretrained(checkpoint_copy)  # the Auto classes (package registered) too


def test_a_nan_patch_is_refused_at_load_of_a_format_1_checkpoint(tmp_path):
    model = pruned_model("llama", 48, 2, 4, "dense")
    with torch.no_grad():
        get_patch(model).weight[1, 2] = float("nan")
    write_format_1(model, tmp_path / "v1")
    with pytest.raises(ValueError, match=r"load_pruned: .*v1: cut \[2, 4\): the dense patch's weight has 1 non-finite"):
        load_pruned(tmp_path / "v1")


def test_a_nan_or_negative_patch_is_refused_at_save(tmp_path):
    model = pruned_model("qwen2", 64, 1, 3, "diag")
    with torch.no_grad():
        get_patch(model).scale[10] = float("nan")
    with pytest.raises(ValueError, match=r"save_pruned: cut \[1, 3\): the diag patch's scale has 1 non-finite values"):
        save_pruned(model, tmp_path / "out")
    with torch.no_grad():
        get_patch(model).scale[10] = -0.5
    with pytest.raises(ValueError, match=r"save_pruned: cut \[1, 3\): the diag patch's scale is <= 0 at channel 10"):
        save_pruned(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written

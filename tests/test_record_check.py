"""The one record check every loader runs (``modeling_linearpatch.check_record`` and
``check_patch_tensors``): a checkpoint tampered in any field of its record or its patch tensors is
refused, with one line naming the field, by ``load_pruned``, by the Auto classes with the package
imported, and by the checkpoint's own modeling file as remote code without the package (the vLLM
models run the same check: ``tests/test_vllm.py``)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import edit_tensors, random_batches, tiny_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from linearpatch_kernels import load_pruned, prune_and_patch, save_pruned
from linearpatch_kernels.hadamard import MAX_K, hadamard_factors, is_supported_size
from linearpatch_kernels.model.modeling_linearpatch import hadamard_factor

ROOT = Path(__file__).resolve().parents[1]
D = 48  # 12 * 4: a Paley size, so the rotate cut stores a 12 x 12 hadamard_k


def good_checkpoint(directory: Path) -> Path:
    """A Llama of 8 layers with three cuts, one per mode and per slot: [0, 1) diag (input of kept
    layer 0), [3, 4) rotate (output of kept layer 1), [6, 7) dense (output of kept layer 3). Heads of
    32 (vLLM's CPU attention has kernels for that size, not for 48 / 4 = 12)."""
    config = tiny_config("llama", num_layers=8, hidden_size=D)
    config.head_dim = 32
    torch.manual_seed(3)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    prune_and_patch(model, blocks=[(0, 1), (3, 4), (6, 7)], mode=["diag", "rotate", "dense"],
                    scales=[torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5, None],
                    weight=[None, None, torch.eye(D) + 0.05 * torch.randn(D, D, generator=g)])
    save_pruned(model, directory)
    return directory


def edit_record(directory: Path, cut: int | None = None, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    target = config["linearpatch"] if cut is None else config["linearpatch"]["cuts"][cut]
    target.update(changes)
    path.write_text(json.dumps(config))


def edit_record_config(directory: Path, **fields) -> None:
    """Set top-level fields of config.json (beside the record)."""
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def flipped_hadamard() -> torch.Tensor:
    """``S H S`` with ``S`` the sign flip of row and column 0: still a symmetric Hadamard matrix (so a
    structural check passes it), but not the one the scales were calibrated with."""
    h = hadamard_factors(D).h_k.clone()
    h[0, :] *= -1
    h[:, 0] *= -1
    return h.float()


# name -> (tamper, regex of the refusal with the package, regex without it (None: the same))
TAMPERS = {
    "format_version": (lambda p: edit_record(p, format_version=7), r"format_version 7; this code reads 2", None),
    "base_model_type": (lambda p: edit_record(p, base_model_type="qwen2"),
                        r"base_model_type 'qwen2' but model_type is 'linearpatch_llama'", None),
    "hidden_size": (lambda p: edit_record(p, hidden_size=64), r"hidden_size 64 but the config has 48", None),
    "num_layers_original": (lambda p: edit_record(p, num_layers_original=9), r"leave 6, but num_hidden_layers is 5",
                            None),
    "cut moved": (lambda p: edit_record(p, 1, start=2, end=3),
                  r"cut \[2, 3\) records kept_index 1.*put the patch at kept_index 0", None),
    "cut grown": (lambda p: edit_record(p, 1, end=5), r"leave 4, but num_hidden_layers is 5", None),
    "cuts overlap": (lambda p: edit_record(p, 2, start=3, end=4), r"overlap or touch", None),
    "kept_index": (lambda p: edit_record(p, 1, kept_index=7), r"records kept_index 7", None),
    "position": (lambda p: edit_record(p, 0, position="output"), r"records kept_index 0, position 'output'", None),
    "unknown mode": (lambda p: edit_record(p, 1, mode="hadamard"), r"mode 'hadamard'; accepted", None),
    "mode rotate -> diag": (lambda p: edit_record(p, 1, mode="diag"),
                            r"names a Hadamard matrix .* but no cut has mode 'rotate'", None),
    "mode diag -> rotate": (lambda p: edit_record(p, 0, mode="rotate"),
                            r"missing \['model.linearpatch.0.hadamard_k'\], unexpected \[\]", None),
    "mode dense -> diag": (lambda p: edit_record(p, 2, mode="diag"),
                           r"missing \['model.linearpatch.2.scale'\], unexpected \['model.linearpatch.2.weight'\]", None),
    "hadamard construction": (lambda p: edit_record(p, hadamard={"construction": "paley2(q=5)", "k": 12, "n": 4}),
                              r"calibrated with Hadamard matrix .*paley2\(q=5\)",
                              r"'model.linearpatch.1.hadamard_k' is not the Hadamard factor paley2\(q=5\)"),
    "hadamard size": (lambda p: edit_record(p, hadamard={"construction": "sylvester", "k": 1, "n": 48}),
                      r"n a power of two and k \* n = hidden_size 48", None),
    "hadamard null": (lambda p: edit_record(p, hadamard=None), r"a rotate patch needs the record's hadamard", None),
    "quantization_config": (lambda p: edit_record_config(p, quantization_config={
        "quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["model.layers.7.mlp.down_proj"]}),
        r"has a quantization_config \(fp8\); checkpoints of pruned quantized models are not supported", None),
    "tensor missing": (lambda p: edit_tensors(p, drop=["model.linearpatch.1.scale"]),
                       r"missing \['model.linearpatch.1.scale'\], unexpected \[\]", None),
    "tensor unexpected": (lambda p: edit_tensors(p, **{"model.linearpatch.3.scale": torch.ones(D)}),
                          r"missing \[\], unexpected \['model.linearpatch.3.scale'\]", None),
    "tensor shape": (lambda p: edit_tensors(p, **{"model.linearpatch.1.scale": torch.ones(64)}),
                     r"'model.linearpatch.1.scale' is torch.float32 of shape \(64,\); the record's cut \[3, 4\) mode "
                     r"'rotate' needs torch.float32 of shape \(48,\)", None),
    "tensor dtype": (lambda p: edit_tensors(p, **{"model.linearpatch.2.weight": torch.eye(D, dtype=torch.bfloat16)}),
                     r"'model.linearpatch.2.weight' is torch.bfloat16 of shape \(48, 48\)", None),
    "hadamard_k missing": (lambda p: edit_tensors(p, drop=["model.linearpatch.1.hadamard_k"]),
                           r"missing \['model.linearpatch.1.hadamard_k'\]", None),
    "hadamard_k changed": (lambda p: edit_tensors(p, **{"model.linearpatch.1.hadamard_k": flipped_hadamard()}),
                           r"'model.linearpatch.1.hadamard_k' is not the Hadamard factor paley1\(q=11\)", None),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return good_checkpoint(tmp_path_factory.mktemp("record") / "good")


def tampered(good: Path, where: Path, name: str) -> Path:
    directory = where / re.sub(r"\W+", "_", name)
    shutil.copytree(good, directory)
    TAMPERS[name][0](directory)
    return directory


def test_the_good_checkpoint_loads_in_every_loader(good):
    ids = random_batches(1, seqlen=10, seed=5)[0]
    with torch.no_grad():
        want = load_pruned(good)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(good)(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(TAMPERS))
def test_load_pruned_and_the_auto_classes_refuse(good, tmp_path, name):
    directory = tampered(good, tmp_path, name)
    regex = TAMPERS[name][1]
    for load in (load_pruned, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError) as refused:
            load(directory)
        message = str(refused.value)
        assert re.search(regex, message) and "\n" not in message, (load, message)
        assert message.startswith(str(directory)), message  # names the checkpoint


REMOTE_CODE = textwrap.dedent("""
    import json, sys
    sys.modules["linearpatch_kernels"] = None  # as if the package were not installed
    from transformers import AutoModelForCausalLM
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        try:
            AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            results[name] = "LOADED"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(results))
""")


def test_remote_code_without_the_package_refuses(good, tmp_path):
    """The modeling file saved in each checkpoint, run by transformers without the package: the same
    refusals (one subprocess for every tampered checkpoint)."""
    paths = {name: str(tampered(good, tmp_path, name)) for name in TAMPERS}
    paths["good"] = str(good)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE, json.dumps(paths)], capture_output=True, text=True,
                            env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    assert results.pop("good") == "LOADED"
    for name, message in results.items():
        regex = TAMPERS[name][2] or TAMPERS[name][1]
        assert message.startswith("ValueError: ") and re.search(regex, message) and "\n" not in message, (name, message)


PALEY_ORDERS = [k for k in range(2, MAX_K + 1) if is_supported_size(k) and hadamard_factors(k).k == k]


@pytest.mark.parametrize("d", [1, 576, 5376] + PALEY_ORDERS)
def test_the_modeling_files_hadamard_factor_is_the_packages(d):
    """The standalone construction of ``H_K`` in the modeling file (what remote code checks
    ``hadamard_k`` against) equals the package's, for every Paley order up to MAX_K."""
    f = hadamard_factors(d)
    h = hadamard_factor(f.construction, f.k)
    assert torch.equal(h, f.h_k)
    assert torch.equal(h @ h.T, f.k * torch.eye(f.k, dtype=torch.float64))


@pytest.mark.parametrize("construction, k, message", [
    ("paley1(q=15)", 16, r"not a Hadamard matrix \(Q must be a prime"),
    ("paley1(q=11)", 24, r"has order 12, but the record says K=24"),
    ("walsh", 12, r"Hadamard construction 'walsh' of order K=12; accepted"),
])
def test_the_modeling_file_refuses_unknown_hadamard_constructions(construction, k, message):
    with pytest.raises(ValueError, match=message):
        hadamard_factor(construction, k)


def test_stored_patch_tensors_of_a_hub_repository(good, tmp_path, monkeypatch):
    """For a Hub id the Auto classes read the patch tensors through transformers' file cache, shard by
    shard as the index names them (here a fake cache: a sharded copy of the checkpoint)."""
    import transformers.utils

    from linearpatch_kernels.model.modeling_linearpatch import stored_patch_tensors

    sharded = tmp_path / "sharded"
    load_pruned(good).save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    asked = []

    def cached_file(repo, name, subfolder="", _raise_exceptions_for_missing_entries=True, **kwargs):
        asked.append((repo, name, kwargs.get("revision")))
        return str(sharded / name) if (sharded / name).is_file() else None

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    found = stored_patch_tensors("someone/pruned", revision="v1")
    stored = load_file(str(good / "model.safetensors"))
    want = {n: t for n, t in stored.items() if n.startswith("model.linearpatch.")}
    assert sorted(found) == sorted(want) and all(torch.equal(found[n], want[n]) for n in want)
    assert asked[0] == ("someone/pruned", "model.safetensors.index.json", "v1")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert {name for _, name, _ in asked[1:]} == set(index.values())

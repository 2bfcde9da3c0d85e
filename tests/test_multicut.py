"""Several cuts in one model: prune_and_patch(blocks=[...]) against a plain formulation on the unpruned model.

The reference (``reference_logits_cuts`` of test_surgery) keeps every layer of an untouched copy, makes
the removed layers return their input and multiplies the residual stream at each cut by a dense fp64
``P_i`` with forward hooks: after the layer before the cut, or before the first kept layer when a block
starts at layer 0. No layer is deleted or renumbered there.
"""

import copy
import json
import re

import pytest
import torch
from test_surgery import check_generate_with_kv_cache, reference_logits_cuts, rel_err, rotate_p64
from tiny_models import random_batches, tiny_model
from transformers import AutoModelForCausalLM

from linearpatch_kernels import (
    LinearPatch,
    PatchedDecoderLayer,
    estimate_cut_scales,
    fusion_status,
    fusion_statuses,
    get_patch,
    get_patches,
    load_pruned,
    patch_disabled,
    prune_and_patch,
    save_pruned,
    set_fused,
    set_patch,
    set_patch_enabled,
)
from linearpatch_kernels.model import pruning_cuts, pruning_record

EYE64 = torch.eye(64, dtype=torch.float64)

# Blocks of a 10-layer model (original indices): two separated cuts; three cuts with a block at the
# start and one at the end; one kept layer between two cuts (it carries the second patch and follows
# the first cut); a block at layer 0 then one kept layer (two patches on that layer, input and output).
BLOCK_SETS = {
    "two": [(2, 4), (6, 8)],
    "three": [(0, 2), (4, 5), (7, 10)],
    "one-layer-between": [(1, 3), (4, 6), (8, 9)],
    "nested": [(0, 2), (3, 5)],
}


def scales_for(blocks, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(d, generator=g) + 0.5 for _ in blocks]


def kept_layers(blocks, num_layers):
    removed = {i for s, e in blocks for i in range(s, e)}
    return [i for i in range(num_layers) if i not in removed]


@pytest.mark.parametrize("family, which, fuse", [
    *[(family, which, True) for family in ("llama", "qwen3") for which in BLOCK_SETS],
    ("llama", "three", False),  # unfused: every cut a plain PatchedDecoderLayer
    ("qwen3", "one-layer-between", False),
])
def test_logits_match_plain_formulation(family, which, fuse):
    blocks = BLOCK_SETS[which]
    model = tiny_model(family, num_layers=10, hidden_size=64, seed=1)
    unpruned = copy.deepcopy(model)
    ids = random_batches(1, seqlen=16, seed=2)[0]
    scales = scales_for(blocks)
    # Blocks in any order: the scales follow the order of the blocks.
    prune_and_patch(model, blocks=blocks[::-1], scales=scales[::-1], fuse=fuse)
    assert len(model.model.layers) == len(kept_layers(blocks, 10))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    expected = reference_logits_cuts(unpruned, ids, [(s, e, rotate_p64(x)) for (s, e), x in zip(blocks, scales)])
    assert rel_err(logits, expected) <= 1e-5
    # Every patch matters: with any one of them the identity, the logits differ visibly.
    for k in range(len(blocks)):
        ps = [EYE64 if j == k else rotate_p64(x) for j, x in enumerate(scales)]
        other = reference_logits_cuts(unpruned, ids, [(s, e, p) for (s, e), p in zip(blocks, ps)])
        assert rel_err(other, expected) > 1e-3
    with torch.no_grad(), patch_disabled(model):
        plain = model(ids, use_cache=False).logits
    assert rel_err(plain, reference_logits_cuts(unpruned, ids, [(s, e, EYE64) for s, e in blocks])) <= 1e-5


def test_structure_indices_record_and_fusion_per_cut():
    model = tiny_model("qwen3", num_layers=10, hidden_size=64, seed=3)
    old_types = list(model.config.layer_types)
    old_attn = [layer.self_attn for layer in model.model.layers]
    blocks = BLOCK_SETS["one-layer-between"]
    prune_and_patch(model, blocks=blocks, scales=scales_for(blocks), mode=["rotate", "rotate", "diag"])
    kept = kept_layers(blocks, 10)  # [0, 3, 6, 7, 9]
    attn = [layer.self_attn for layer in model.model.layers]
    assert attn == [old_attn[i] for i in kept]
    assert [a.layer_idx for a in attn] == list(range(len(kept)))
    assert model.config.num_hidden_layers == len(kept)
    assert model.config.layer_types == [old_types[i] for i in kept]
    assert model.config.linearpatch == {
        "record_version": 2, "num_layers_original": 10, "hidden_size": 64,
        "cuts": [{"start": 1, "end": 3, "mode": "rotate"}, {"start": 4, "end": 6, "mode": "rotate"},
                 {"start": 8, "end": 9, "mode": "diag"}],
    }
    # Patches after kept layers 0 (old 0), 1 (old 3) and 3 (old 7).
    wrapped = [i for i, layer in enumerate(model.model.layers) if isinstance(layer, PatchedDecoderLayer)]
    assert wrapped == [0, 1, 3]
    statuses = fusion_statuses(model)
    assert not statuses[0].fused and "carries the next cut's patch" in statuses[0].reason
    assert statuses[1] == (True, None)
    assert not statuses[2].fused and "mode 'diag'" in statuses[2].reason
    assert fusion_status(model, cut=1) == (True, None)
    assert [p.mode for p in get_patches(model)] == ["rotate", "rotate", "diag"]
    assert set_fused(model, False) == [(False, "fuse=False")] * 3
    assert [s.fused for s in set_fused(model, True)] == [False, True, False]


def test_nested_patches_on_one_layer():
    model = tiny_model("llama", num_layers=10, hidden_size=64, seed=4)
    prune_and_patch(model, blocks=BLOCK_SETS["nested"], scales=scales_for(BLOCK_SETS["nested"]))
    outer = model.model.layers[0]
    assert isinstance(outer, PatchedDecoderLayer) and outer.position == "output"
    assert isinstance(outer.layer, PatchedDecoderLayer) and outer.layer.position == "input"
    statuses = fusion_statuses(model)
    assert not statuses[0].fused and "start == 0" in statuses[0].reason
    assert not statuses[1].fused and "block starting at layer 0" in statuses[1].reason
    assert "model.layers.0.patch.scale" in model.state_dict() and "model.layers.0.layer.patch.scale" in model.state_dict()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_with_kv_cache_matches_without(family):
    model = tiny_model(family, num_layers=10, hidden_size=64, seed=5)
    blocks = BLOCK_SETS["three"]
    prune_and_patch(model, blocks=blocks, scales=scales_for(blocks, seed=5))
    check_generate_with_kv_cache(model)


@pytest.mark.parametrize("family, which", [("llama", "two"), ("qwen3", "three"), ("llama", "nested")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, family, which):
    blocks = BLOCK_SETS[which]
    model = tiny_model(family, num_layers=10, hidden_size=64, seed=6)
    modes = ["rotate", "diag", "dense"][:len(blocks)]
    g = torch.Generator().manual_seed(6)
    weights = [torch.eye(64) + 0.05 * torch.randn(64, 64, generator=g) if m == "dense" else None for m in modes]
    scales = [None if m == "dense" else s for m, s in zip(modes, scales_for(blocks, seed=6))]
    prune_and_patch(model, blocks=blocks, scales=scales, mode=modes, weight=weights)
    ids = random_batches(1, seqlen=14, seed=6)[0]

    @torch.no_grad()
    def outputs(m):  # logits with and without the patches, greedy tokens
        with patch_disabled(m):
            plain = m(ids).logits
        return m(ids).logits, plain, m.generate(ids[:, :5], max_new_tokens=6, do_sample=False)

    before = outputs(model)
    save_pruned(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    meta = config["linearpatch"]
    assert [{k: c[k] for k in ("start", "end", "mode")} for c in meta["cuts"]] == \
        [{"start": s, "end": e, "mode": m} for (s, e), m in zip(blocks, modes)]
    assert config["model_type"] == f"linearpatch_{family}" and config["num_hidden_layers"] == len(kept_layers(blocks, 10))

    loaded = load_pruned(tmp_path)
    assert loaded.config.linearpatch == model.config.linearpatch
    for a, b in zip(get_patches(loaded), get_patches(model)):
        name = "weight" if a.mode == "dense" else "scale"
        assert a.mode == b.mode and torch.equal(getattr(a, name), getattr(b, name))
    assert fusion_statuses(loaded) == fusion_statuses(model)
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded), before))
    # The Auto classes give the patched model too (every cut from a hook, unfused).
    auto, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, before[0], rtol=1e-5, atol=1e-5)


def test_bad_blocks_fail_before_any_change():
    model = tiny_model("llama", num_layers=6, hidden_size=64)
    cases = [
        (dict(blocks=[(1, 3), (2, 4)]), ValueError, r"blocks \[1, 3\) and \[2, 4\) overlap"),
        (dict(blocks=[(1, 3), (3, 4)]), ValueError, r"touch, which makes one cut; pass \[1, 4\) as one block"),
        (dict(blocks=[(0, 2), (3, 6), (2, 2)]), ValueError, r"block \[start=2, end=2\) is empty"),
        (dict(blocks=[(0, 3), (3, 6)]), ValueError, "touch"),
        (dict(blocks=[(0, 6)]), ValueError, "removes all 6 layers"),
        (dict(blocks=[(1, 2), (3, 4)], scales=[torch.ones(64)] * 3), ValueError, r"3 scales for 2 block\(s\)"),
        (dict(blocks=[(1, 2), (3, 4)], scales=[torch.ones(64)]), ValueError, r"1 scales for 2 block\(s\)"),
        (dict(blocks=[(1, 2), (3, 4)], mode=["rotate"]), ValueError, r"1 modes for 2 block\(s\)"),
        (dict(blocks=[(1, 2), (3, 4)], mode=["rotate", "hadamard"]), ValueError, "unknown mode 'hadamard'"),
        (dict(blocks=[(1, 2), (3, 4)], scales=[torch.ones(64), torch.ones(48)]), ValueError, r"expected \(64,\)"),
        (dict(blocks=[(1, 2), (3, 7)]), ValueError, "need 0 <= start < end <= 6"),
        (dict(blocks=[]), ValueError, "blocks is empty"),
        (dict(blocks=[(1, 2.0)]), TypeError, "end must be an int"),
        (dict(blocks=[3]), TypeError, r"each block must be a \(start, end\) pair"),
        (dict(blocks=[(1, 2)], start=1, end=2), TypeError, "either start and end"),
        (dict(start=[(1, 2), (3, 4)]), TypeError, r"for several blocks pass blocks=\[\(start, end\), ...\]"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            prune_and_patch(model, **kwargs)
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    assert getattr(model.config, "linearpatch", None) is None
    assert not any(isinstance(layer, PatchedDecoderLayer) for layer in model.model.layers)


def test_single_and_plural_accessors():
    model = tiny_model("llama", num_layers=10, hidden_size=64, seed=7)
    blocks = BLOCK_SETS["two"]
    prune_and_patch(model, blocks=blocks, scales=scales_for(blocks, seed=7))
    ids = random_batches(1, seqlen=12, seed=7)[0]
    with pytest.raises(ValueError, match="found 2; this model has several cuts: pass cut=k"):
        get_patch(model)
    with pytest.raises(ValueError, match=r"cut=2: this model has 2 cut\(s\); accepted: 0 .. 1"):
        get_patch(model, cut=2)
    assert get_patches(model) == [get_patch(model, cut=0), get_patch(model, cut=1)]
    with torch.no_grad():
        before = model(ids).logits
        dense = LinearPatch(64, "dense", weight=get_patch(model, cut=1).dense_matrix())
        set_patch(model, dense, cut=1)
        assert get_patch(model, cut=1) is dense
        assert [c["mode"] for c in pruning_cuts(model.config.linearpatch)] == ["rotate", "dense"]
        assert fusion_statuses(model)[0].fused and not fusion_statuses(model)[1].fused
        assert rel_err(model(ids).logits, before) <= 1e-5
        set_patch_enabled(model, False)
        assert not any(p.enabled for p in get_patches(model))
        set_patch_enabled(model, True)
        assert rel_err(model(ids).logits, before) <= 1e-5


def test_pruning_record_reads_the_single_cut_form():
    old = {"record_version": 1, "start": 10, "end": 15, "mode": "rotate", "num_layers_original": 30, "hidden_size": 576}
    assert pruning_cuts(old) == [{"start": 10, "end": 15, "mode": "rotate"}]
    record = pruning_record([(20, 22, "diag"), {"start": 10, "end": 15, "mode": "rotate"}], 30, 576)
    assert record["cuts"] == [{"start": 10, "end": 15, "mode": "rotate"}, {"start": 20, "end": 22, "mode": "diag"}]
    assert pruning_cuts(record) == record["cuts"]
    with pytest.raises(ValueError, match="overlap"):
        pruning_cuts({**record, "cuts": [{"start": 10, "end": 15, "mode": "rotate"}, {"start": 12, "end": 16, "mode": "diag"}]})
    with pytest.raises(ValueError, match="neither a 'cuts' list"):
        pruning_cuts({"num_layers_original": 30})


@pytest.mark.parametrize("train, lr", [("s", 0.1), ("dense", 1e-2)])
def test_all_patches_are_distilled_jointly(tmp_path, train, lr):
    from test_distill import quiet, validation_kl_fp64

    from linearpatch_kernels.model.distill import train_patch
    from linearpatch_kernels.model.teacher_cache import build_teacher_cache

    torch.set_num_threads(1)
    teacher = tiny_model("llama", num_layers=8, hidden_size=64, seed=8)
    ids = torch.randint(3, 96, (28, 24), generator=torch.Generator().manual_seed(8))
    cache = build_teacher_cache(teacher, ids, tmp_path / "cache", topk=8, chunk_size=16, progress=False, log=quiet)
    blocks = [(2, 3), (5, 6)]
    # Training-free scales pushed away by log-normal factors, so that both cuts have much to learn.
    scales = estimate_cut_scales(teacher, [ids[i:i + 1] for i in range(8)], blocks, progress=False)
    g = torch.Generator().manual_seed(9)
    student = prune_and_patch(copy.deepcopy(teacher), blocks=blocks,
                              scales=[s * torch.exp(0.7 * torch.randn(64, generator=g)) for s in scales])
    before = [p.dense_matrix().clone() for p in get_patches(student)]
    patch_ids = {id(t) for p in get_patches(student) for t in p.parameters()}
    frozen = [(t, t.detach().clone()) for t in student.parameters() if id(t) not in patch_ids]
    val = list(range(20, 28))
    kl_before = validation_kl_fp64(student, cache, val)
    result = train_patch(student, cache, train=train, lr=lr, epochs=4, batch_size=4, val_samples=8, patience=4,
                         progress=False, log=quiet)
    patches = get_patches(student)
    assert [p.mode for p in patches] == ["dense" if train == "dense" else "rotate"] * 2
    assert all(not torch.allclose(p.dense_matrix(), b) for p, b in zip(patches, before))  # both cuts trained
    assert all(torch.equal(t, t0) for t, t0 in frozen)
    kl_after = validation_kl_fp64(student, cache, val)
    assert abs(result.best_val_loss - kl_after) < 1e-4 * kl_after
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)


# --- command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_model_folder(tmp_path_factory):
    from test_cli import TEXT
    from test_evaluation import char_tokenizer, tiny_char_model

    folder = tmp_path_factory.mktemp("tiny-char-llama")
    tiny_char_model(num_layers=8, seed=12).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def test_cli_prune_blocks_then_eval(char_model_folder, tmp_path, capsys):
    from test_calibration import in_order_reference_scales
    from test_cli import TEXT
    from test_evaluation import char_tokenizer, direct_perplexity, tiny_char_model

    from linearpatch_kernels.cli import main

    out = tmp_path / "two-cuts"
    text = char_model_folder / "text.txt"
    assert main(["prune", "--model", str(char_model_folder), "--blocks", "4:6,1:3", "--calib-text", str(text),
                 "--samples", "2", "--seqlen", "32", "--scales", "paper", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "blocks: [1, 3) + [4, 6) of 8 (given by --blocks" in stdout and "calibrated in order" in stdout
    pruned = load_pruned(out)
    assert pruning_cuts(pruned.config.linearpatch) == [{"start": 1, "end": 3, "mode": "rotate"},
                                                        {"start": 4, "end": 6, "mode": "rotate"}]
    ids = torch.tensor([char_tokenizer()(TEXT).input_ids])
    windows = [ids[:, k * 32:(k + 1) * 32] for k in range(2)]
    want = in_order_reference_scales(tiny_char_model(num_layers=8, seed=12), windows, [(1, 3), (4, 6)], rotate=True)
    for patch, w in zip(get_patches(pruned), want):
        torch.testing.assert_close(patch.scale.double(), w, rtol=1e-4, atol=1e-6)

    assert main(["eval", "--model", str(out), "--text", str(text), "--seqlen", "32", "--samples", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "pruned [1, 3) + [4, 6), 4 layers: with its patch and without" in stdout
    row = re.search(rf"{re.escape(str(text))}\s+2\s+([\d.]+)", stdout)
    assert row, stdout
    assert float(row.group(1)) == pytest.approx(direct_perplexity(pruned, windows), abs=1e-3)

    # distill trains both patches of the checkpoint together (the dense model is the teacher).
    distilled = tmp_path / "distilled"
    assert main(["distill", "--model", str(out), "--teacher", str(char_model_folder), "--text", str(text),
                 "--samples", "6", "--val-samples", "2", "--seqlen", "32", "--epochs", "2", "--batch-size", "2",
                 "--train", "s", "--lr", "0.05", "--device", "cpu", "--out", str(distilled)]) == 0
    after = load_pruned(distilled)
    assert pruning_cuts(after.config.linearpatch) == pruning_cuts(pruned.config.linearpatch)
    assert all(not torch.equal(a.scale, b.scale) for a, b in zip(get_patches(after), get_patches(pruned)))
    record = json.loads((distilled / "distill.json").read_text())["result"]
    assert record["best_val_loss"] <= record["initial_val_loss"]


def test_cli_prune_selects_several_cuts(char_model_folder, tmp_path, capsys):
    from test_calibration import brute_force_best_cost, mean_token_cosine, residual_inputs_fp64
    from test_cli import TEXT
    from test_evaluation import char_tokenizer, tiny_char_model

    from linearpatch_kernels.cli import main

    out = tmp_path / "selected"
    text = char_model_folder / "text.txt"
    assert main(["prune", "--model", str(char_model_folder), "--num-prune", "3", "--max-cuts", "2",
                 "--calib-text", str(text), "--samples", "2", "--seqlen", "32", "--out", str(out)]) == 0
    assert "at most 2 cuts" in capsys.readouterr().out
    cuts = pruning_cuts(load_pruned(out).config.linearpatch)
    assert sum(c["end"] - c["start"] for c in cuts) == 3 and 1 <= len(cuts) <= 2
    # The least summed 1 - cos(X_start, X_end) over every choice of at most two blocks, from fp64 states.
    ids = torch.tensor([char_tokenizer()(TEXT).input_ids])
    model = tiny_char_model(num_layers=8, seed=12)
    xs = [residual_inputs_fp64(model, ids[:, k * 32:(k + 1) * 32]) for k in range(2)]
    costs = torch.tensor([[1.0 - sum(mean_token_cosine(x[i], x[j]) for x in xs) / 2 for j in range(9)]
                          for i in range(9)], dtype=torch.float64)
    chosen = sum(costs[c["start"], c["end"]].item() for c in cuts)
    assert chosen == pytest.approx(brute_force_best_cost(costs, 3, 2, exact=False), abs=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--blocks", "1:3,2:4"], r"blocks \[1, 3\) and \[2, 4\) overlap"),
    (["--blocks", "0:8"], "removes all 8 layers"),
    (["--blocks", "1:3", "--num-prune", "2"], "leave out --start, --num-prune and --max-cuts"),
    (["--num-prune", "2", "--max-cuts", "2", "--start", "1"], "--start gives one block"),
    ([], "give --num-prune N"),
])
def test_cli_prune_bad_blocks(char_model_folder, tmp_path, capsys, argv, message):
    from linearpatch_kernels.cli import main

    out = tmp_path / "never"
    assert main(["prune", "--model", str(char_model_folder), "--out", str(out), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_cli_blocks_syntax_error(capsys):
    from linearpatch_kernels.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "--blocks", "1-3", "--out", "x"])
    assert "expected blocks as START:END[,START:END...]" in capsys.readouterr().err

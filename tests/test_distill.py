"""Teacher cache (round trip, resume, corruption), the top-k KL loss against fp64, distillation of the
patch on tiny models (s and dense), the saved result, the command-line handler and bad inputs.

The references are written plainly here: the teacher's top-k from its full fp64 log-softmax, the KL
from its definition with explicit renormalisation over the k tokens.
"""

import argparse
import copy
import hashlib
import json

import pytest
import torch
from tiny_models import tiny_model

from linearpatch_kernels import estimate_scales, get_patch, load_pruned, prune_and_patch, save_pruned
from linearpatch_kernels.cli import add_distill_subcommand
from linearpatch_kernels.model.distill import (
    SCALE_FLOOR,
    distill_patch,
    student_support_logits,
    support_kl_loss,
    topk_kl_loss,
    train_patch,
)
from linearpatch_kernels.model.teacher_cache import (
    MANIFEST_FILE,
    TeacherCache,
    build_teacher_cache,
    cache_bytes,
    format_bytes,
)

VOCAB = 96
TOPK = 8
SEQLEN = 24


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a loaded 2-core machine: a second BLAS thread only adds waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_ids(num, seqlen=SEQLEN, seed=0):
    return torch.randint(3, VOCAB, (num, seqlen), generator=torch.Generator().manual_seed(seed))


def teacher_topk_fp64(teacher, ids, k):
    with torch.no_grad():
        logits = teacher(input_ids=ids, use_cache=False).logits.double()
    return torch.log_softmax(logits, dim=-1).topk(k, dim=-1)


class ForwardCounter:
    """Counts the teacher's forward calls (one per sample with batch size 1); raises after ``fail_after``."""

    def __init__(self, model, fail_after=None):
        self.calls, self.fail_after = 0, fail_after
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1

    def remove(self):
        self.handle.remove()


def quiet(*args, **kwargs):
    pass


def read_chunks(directory):
    from safetensors.torch import load_file

    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    # Cloned: the loaded tensors may map the file, which a test then damages in place.
    return [{k: v.clone() for k, v in load_file(str(directory / e["file"])).items()} for e in manifest["chunks"]]


# --- teacher cache ------------------------------------------------------------------------------


def test_cache_round_trip_matches_fp64_teacher(tmp_path):
    teacher = tiny_model("llama", num_layers=4, hidden_size=64, seed=0)
    ids = sample_ids(10)
    messages = []
    cache = build_teacher_cache(teacher, ids, tmp_path, topk=TOPK, chunk_size=4, progress=False, log=messages.append)
    assert isinstance(cache, TeacherCache)
    assert (cache.num_samples, cache.seqlen, cache.topk, cache.vocab_size) == (10, SEQLEN, TOPK, VOCAB)

    values, indices = teacher_topk_fp64(teacher, ids, TOPK)
    for i in range(10):
        s = cache.sample(i)
        assert torch.equal(s.input_ids, ids[i])
        assert torch.equal(s.topk_ids, indices[i])
        assert torch.allclose(s.topk_logprobs.double(), values[i], rtol=1e-3, atol=1e-3)  # fp16 storage

    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert [e["num_samples"] for e in manifest["chunks"]] == [4, 4, 2]
    assert manifest["topk"] == TOPK and manifest["seqlen"] == SEQLEN and manifest["vocab_size"] == VOCAB
    assert manifest["model"]["hidden_size"] == 64 and manifest["model"]["model_type"] == "llama"
    for entry in manifest["chunks"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)

    # The advertised disk use is the stored tensors' bytes, and it is logged before the pass.
    stored = sum(t.numel() * t.element_size() for chunk in read_chunks(tmp_path) for t in chunk.values())
    assert cache_bytes(10, SEQLEN, TOPK) == stored == manifest["bytes_total"]
    assert format_bytes(stored) in messages[0] and "to write" in messages[0]
    assert cache_bytes(5000, 2048, 50) == 5000 * 2048 * 4 + 5000 * 2048 * 50 * (4 + 2)


def test_resume_after_interruption_computes_only_the_rest(tmp_path):
    teacher = tiny_model("llama", num_layers=4, hidden_size=64, seed=0)
    ids = sample_ids(10)
    reference = tmp_path / "uninterrupted"
    build_teacher_cache(teacher, ids, reference, topk=TOPK, chunk_size=3, progress=False, log=quiet)

    target = tmp_path / "interrupted"
    counter = ForwardCounter(teacher, fail_after=7)  # dies inside the third chunk (samples 6..8)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, ids, target, topk=TOPK, chunk_size=3, progress=False, log=quiet)
    counter.remove()
    with pytest.raises(ValueError, match="incomplete: 2 of 4 chunks"):
        TeacherCache(target)

    counter = ForwardCounter(teacher)
    cache = build_teacher_cache(teacher, ids, target, topk=TOPK, chunk_size=3, progress=False, log=quiet)
    counter.remove()
    assert counter.calls == 4  # samples 6..9 only
    for a, b in zip(read_chunks(target), read_chunks(reference)):
        assert all(torch.equal(a[name], b[name]) for name in b)
    assert len(cache) == 10

    # A finished cache is not recomputed.
    counter = ForwardCounter(teacher)
    build_teacher_cache(teacher, ids, target, topk=TOPK, chunk_size=3, progress=False, log=quiet)
    counter.remove()
    assert counter.calls == 0


def test_max_chunks_spreads_the_pass_over_calls(tmp_path):
    teacher = tiny_model("llama", num_layers=2, hidden_size=64, seed=0)
    ids = sample_ids(5)
    assert build_teacher_cache(teacher, ids, tmp_path, topk=TOPK, chunk_size=2, max_chunks=2, progress=False,
                               log=quiet) is None
    assert len(json.loads((tmp_path / MANIFEST_FILE).read_text())["chunks"]) == 2
    cache = build_teacher_cache(teacher, ids, tmp_path, topk=TOPK, chunk_size=2, max_chunks=2, progress=False, log=quiet)
    assert cache is not None and len(cache) == 5


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_chunk_is_detected_and_redone(tmp_path, damage):
    teacher = tiny_model("llama", num_layers=2, hidden_size=64, seed=0)
    ids = sample_ids(6)
    build_teacher_cache(teacher, ids, tmp_path, topk=TOPK, chunk_size=2, progress=False, log=quiet)
    good = read_chunks(tmp_path)
    path = tmp_path / "chunk-00001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":  # same size, different data: only the checksum sees it
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        error, match = ValueError, "SHA-256"
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-100]))
        error, match = ValueError, "bytes"
    else:
        path.unlink()
        error, match = FileNotFoundError, "missing"
    with pytest.raises(error, match=match):
        TeacherCache(tmp_path)

    messages = []
    counter = ForwardCounter(teacher)
    build_teacher_cache(teacher, ids, tmp_path, topk=TOPK, chunk_size=2, progress=False, log=messages.append)
    counter.remove()
    assert counter.calls == 2  # the two samples of chunk 1
    assert any("redoing chunk 1" in m for m in messages)
    for a, b in zip(read_chunks(tmp_path), good):
        assert all(torch.equal(a[name], b[name]) for name in b)
    TeacherCache(tmp_path)


def test_cache_refuses_another_setting(tmp_path):
    teacher = tiny_model("llama", num_layers=2, hidden_size=64, seed=0)
    ids = sample_ids(4)
    build_teacher_cache(teacher, ids, tmp_path, topk=TOPK, chunk_size=2, max_chunks=1, progress=False, log=quiet)
    with pytest.raises(ValueError, match="topk"):
        build_teacher_cache(teacher, ids, tmp_path, topk=TOPK + 1, chunk_size=2, progress=False, log=quiet)
    with pytest.raises(ValueError, match="input_ids_sha256"):
        build_teacher_cache(teacher, sample_ids(4, seed=5), tmp_path, topk=TOPK, chunk_size=2, progress=False, log=quiet)
    other = tiny_model("llama", num_layers=2, hidden_size=64, seed=1)
    with pytest.raises(ValueError, match="embedding_sha256"):
        build_teacher_cache(other, ids, tmp_path, topk=TOPK, chunk_size=2, progress=False, log=quiet)


# --- the loss -----------------------------------------------------------------------------------


def kl_reference_fp64(student_logits, topk_ids, teacher_logprobs):
    """Mean over tokens of sum_i q_i log(q_i / r_i), q and r renormalised over the k tokens, in fp64."""
    z = student_logits.double().reshape(-1, student_logits.shape[-1])
    ids = topk_ids.reshape(-1, topk_ids.shape[-1])
    a = teacher_logprobs.double().reshape(-1, teacher_logprobs.shape[-1])
    total = 0.0
    for t in range(z.shape[0]):
        p_teacher = a[t].exp()
        q = p_teacher / p_teacher.sum()
        e = torch.exp(z[t, ids[t]] - z[t].max())
        r = e / e.sum()
        total += float((q * torch.log(q / r)).sum())
    return total / z.shape[0]


def test_topk_kl_loss_matches_fp64_definition():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, VOCAB, generator=g) * 3
    teacher_full = torch.log_softmax(torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64) * 3, -1)
    values, ids = teacher_full.topk(TOPK, dim=-1)
    loss = topk_kl_loss(student, ids, values.to(torch.float16))
    expected = kl_reference_fp64(student, ids, values.to(torch.float16))
    assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected)

    # Gradient w.r.t. the student's logits: (r - q) / num_tokens on the support, 0 elsewhere.
    student.requires_grad_(True)
    topk_kl_loss(student, ids, values).backward()
    q = torch.softmax(values, -1)
    r = torch.softmax(student.detach().double().gather(-1, ids), -1)
    expected_grad = torch.zeros(2, 5, VOCAB, dtype=torch.float64).scatter(-1, ids, (r - q) / 10)
    assert torch.allclose(student.grad.double(), expected_grad, atol=1e-6)

    # Identical distributions on the support give zero, whatever the rest of the vocabulary holds.
    same = torch.full((1, 1, VOCAB), -50.0)
    same[0, 0, ids[0, 0]] = values[0, 0].float() + 7.0
    assert abs(float(topk_kl_loss(same, ids[:1, :1], values[:1, :1]))) < 1e-6


def test_support_logits_equal_the_full_head():
    model = tiny_model("qwen2", num_layers=3, hidden_size=64, seed=2)
    ids = sample_ids(2, seqlen=10)
    topk_ids = torch.randint(0, VOCAB, (2, 10, TOPK), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.double().gather(-1, topk_ids)
        support = student_support_logits(model, ids, topk_ids)
    assert support.shape == (2, 10, TOPK)
    assert torch.allclose(support.double(), full, rtol=1e-5, atol=1e-5)


# --- distillation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A dense teacher, its cache (40 samples, the last 8 held out), and training-free scales for [2, 4)."""
    torch.set_num_threads(1)
    teacher = tiny_model("llama", num_layers=6, hidden_size=64, seed=0)
    ids = sample_ids(40, seqlen=32, seed=1)
    directory = tmp_path_factory.mktemp("cache")
    cache = build_teacher_cache(teacher, ids, directory, topk=TOPK, chunk_size=16, progress=False, log=quiet)
    scales = estimate_scales(teacher, [ids[i:i + 1] for i in range(8)], 2, 4, progress=False)
    return teacher, cache, scales


def validation_kl_fp64(model, cache, indices):
    """The validation loss recomputed with the full logits and the fp64 reference KL."""
    total = 0.0
    for i in indices:
        s = cache.sample(i)
        with torch.no_grad():
            logits = model(input_ids=s.input_ids[None], use_cache=False).logits
        total += kl_reference_fp64(logits, s.topk_ids[None], s.topk_logprobs[None])
    return total / len(indices)


@pytest.mark.parametrize("train, lr", [("s", 0.1), ("dense", 1e-2)])
def test_distillation_lowers_validation_loss(tiny_setup, train, lr):
    teacher, cache, scales = tiny_setup
    # On a random tiny model the training-free scales from 8 samples are already close to the best
    # patch the 32 training samples can find, so start from scales pushed away from them (log-normal
    # factors): distillation must bring the validation loss well down again.
    factors = torch.exp(0.7 * torch.randn(64, generator=torch.Generator().manual_seed(7)))
    student = prune_and_patch(copy.deepcopy(teacher), 2, 4, scales * factors)
    patch_params = {id(p) for p in get_patch(student).parameters()}
    frozen_before = [(p, p.detach().clone()) for p in student.parameters() if id(p) not in patch_params]
    val = list(range(32, 40))
    before = validation_kl_fp64(student, cache, val)

    result = train_patch(student, cache, train=train, lr=lr, epochs=4, batch_size=4, val_samples=8, patience=4,
                         progress=False, log=quiet)
    patch = get_patch(student)
    assert patch.mode == ("dense" if train == "dense" else "rotate")
    after = validation_kl_fp64(student, cache, val)
    assert abs(result.initial_val_loss - before) < 1e-4 * before
    assert abs(result.best_val_loss - after) < 1e-4 * after  # the kept patch is the one that scored best
    assert after < 0.9 * before, (before, after)
    assert min(h["val_loss"] for h in result.history) == result.best_val_loss
    # Only the patch moved (a dense patch replaces the rotate one; every other weight is the same tensor).
    patch_params = {id(p) for p in get_patch(student).parameters()}
    assert {id(p) for p in student.parameters() if id(p) not in patch_params} == {id(p) for p, _ in frozen_before}
    assert all(torch.equal(p, before_value) for p, before_value in frozen_before)
    assert all(p.requires_grad for p in student.parameters())  # the flags are restored afterwards


def test_trained_scales_stay_positive_and_save(tiny_setup, tmp_path):
    """Adam moves each parameter by about lr per step: from scales of 0.01 a step of lr = 1 would take
    about half of them below zero, which no patch may hold. Training projects them onto s >= SCALE_FLOOR,
    so the result still saves and loads."""
    teacher, cache, _ = tiny_setup
    student = prune_and_patch(copy.deepcopy(teacher), 2, 4, torch.full((64,), 0.01))
    train_patch(student, cache, train="s", lr=1.0, epochs=1, batch_size=8, val_samples=8, patience=4, eval_every=1,
                progress=False, log=quiet)
    scale = get_patch(student).scale.detach()
    assert scale.min() >= SCALE_FLOOR and (scale == SCALE_FLOOR).any()  # trained, and the floor was reached
    save_pruned(student, tmp_path / "out")
    assert torch.equal(get_patch(load_pruned(tmp_path / "out")).scale, scale)


def test_dense_starts_from_the_structured_patch(tiny_setup):
    teacher, cache, scales = tiny_setup
    student = prune_and_patch(copy.deepcopy(teacher), 2, 4, scales)
    ids = cache.sample(0).input_ids[None]
    with torch.no_grad():
        expected = student(input_ids=ids).logits.double()
    # lr so small that one step changes nothing visible: the dense patch must compute H diag(s) H^T.
    train_patch(student, cache, train="dense", lr=1e-12, epochs=1, val_samples=39, progress=False, log=quiet)
    with torch.no_grad():
        got = student(input_ids=ids).logits.double()
    assert get_patch(student).mode == "dense"
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_distill_patch_end_to_end_saves_a_loadable_patch(tiny_setup, tmp_path):
    teacher, _, scales = tiny_setup
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    student_dir = tmp_path / "student"
    start_scales = scales * torch.exp(0.7 * torch.randn(64, generator=torch.Generator().manual_seed(7)))
    save_pruned(prune_and_patch(copy.deepcopy(teacher), 2, 4, start_scales), student_dir)
    out = tmp_path / "out"
    ids = sample_ids(40, seqlen=32, seed=1)
    model, result = distill_patch(student_dir, teacher_dir, out, input_ids=ids, topk=TOPK, chunk_size=16, train="s",
                                  lr=0.1, epochs=2, val_samples=8, batch_size=4, patience=2, device="cpu",
                                  progress=False, log=quiet)
    assert result.best_val_loss < result.initial_val_loss, result.history
    assert TeacherCache(tmp_path / "out.teacher-cache").num_samples == 40
    record = json.loads((out / "distill.json").read_text())
    assert record["result"]["best_val_loss"] == result.best_val_loss and record["topk"] == TOPK

    loaded = load_pruned(out)
    assert get_patch(loaded).mode == "rotate"
    assert torch.equal(get_patch(loaded).scale, get_patch(model).scale)
    assert not torch.equal(get_patch(loaded).scale, start_scales)
    x = ids[:1]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)

    # The command-line handler, reusing the cache as the teacher (no tokenizer needed).
    parser = argparse.ArgumentParser()
    add_distill_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", "--model", str(student_dir), "--teacher", str(tmp_path / "out.teacher-cache"),
                              "--out", str(tmp_path / "cli"), "--train", "dense", "--lr", "1e-2", "--val-samples", "8",
                              "--epochs", "2", "--batch-size", "4", "--device", "cpu"])
    assert args.func(args) == 0
    dense = load_pruned(tmp_path / "cli")
    assert get_patch(dense).mode == "dense" and get_patch(dense).weight.shape == (64, 64)
    cli_record = json.loads((tmp_path / "cli" / "distill.json").read_text())["result"]
    assert cli_record["best_val_loss"] < cli_record["initial_val_loss"]

    (tmp_path / "empty").mkdir()
    for model_arg, teacher_arg, match in [(student_dir, tmp_path / "nowhere", "--teacher .*no such folder"),
                                          (student_dir, tmp_path / "empty", "neither a model"),
                                          (teacher_dir, tmp_path / "out.teacher-cache", "not a pruned checkpoint")]:
        bad = parser.parse_args(["distill", "--model", str(model_arg), "--teacher", str(teacher_arg), "--out",
                                 str(tmp_path / "bad")])
        with pytest.raises(FileNotFoundError, match=match):
            bad.func(bad)


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(tiny_setup, tmp_path):
    teacher, cache, scales = tiny_setup
    with pytest.raises(ValueError, match="larger than the teacher's vocabulary of 96"):
        build_teacher_cache(teacher, sample_ids(2), tmp_path / "big", topk=97, progress=False, log=quiet)
    with pytest.raises(ValueError, match="vocabulary is 0 .. 95"):
        build_teacher_cache(teacher, torch.full((1, 4), 500), tmp_path / "ids", topk=4, progress=False, log=quiet)
    with pytest.raises(TypeError, match="integer tensor"):
        build_teacher_cache(teacher, torch.zeros(1, 4), tmp_path / "float", topk=4, progress=False, log=quiet)

    other_vocab = prune_and_patch(tiny_model("llama", num_layers=6, hidden_size=64, vocab_size=128), 2, 4)
    with pytest.raises(ValueError, match="vocabulary of 96 tokens but the student has 128"):
        train_patch(other_vocab, cache, progress=False, log=quiet)

    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        TeacherCache(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TeacherCache(tmp_path / "nowhere")

    student = prune_and_patch(copy.deepcopy(teacher), 2, 4, scales)
    with pytest.raises(ValueError, match="leaves no training samples"):
        train_patch(student, cache, val_samples=40, progress=False, log=quiet)
    with pytest.raises(ValueError, match="accepted: s, dense"):
        train_patch(student, cache, train="full", progress=False, log=quiet)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        train_patch(student, cache, lr=-1.0, progress=False, log=quiet)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    with pytest.raises(ValueError, match="cannot be loaded next to it"):
        distill_patch(student, teacher_dir, tmp_path / "out", input_ids=sample_ids(4), progress=False, log=quiet)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        distill_patch(tmp_path / "no-student", cache, progress=False, log=quiet)

    dense = prune_and_patch(copy.deepcopy(teacher), 2, 4, mode="dense")
    with pytest.raises(ValueError, match="train='s' trains the scales"):
        train_patch(dense, cache, train="s", progress=False, log=quiet)

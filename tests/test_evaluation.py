"""Perplexity, token windows, the shipped corpus, retained performance and the lm-eval bridge.

References are written out directly: fp64 log-softmax sums per token for perplexity, slices of one
tokenization for the windows, and per-choice log-likelihood sums for the lm-eval task.
"""

import json
import math

import pytest
import torch
from tiny_models import tiny_model

from linearpatch_kernels import corpus
from linearpatch_kernels.evaluation import paper_metric, perplexity, retained_performance

# --- a character-level tokenizer for tiny models (shared with test_cli) -----------------------

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
SPECIAL = ["<unk>", "<s>", "</s>"]
CHAR_VOCAB_SIZE = len(SPECIAL) + len(CHARS)


def char_tokenizer():
    """One token per character of printable ASCII and newline; no BOS is added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def char_ids(text: str) -> list[int]:
    return [len(SPECIAL) + CHARS.index(c) for c in text]


def tiny_char_model(num_layers: int = 4, seed: int = 0, dtype=torch.float32):
    return tiny_model("llama", num_layers=num_layers, vocab_size=CHAR_VOCAB_SIZE, seed=seed, dtype=dtype)


# --- perplexity ------------------------------------------------------------------------------


def direct_perplexity(model, windows) -> float:
    """exp(mean over every predicted token of -log softmax(logits)[next token]), in fp64, token by token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(input_ids=ids, use_cache=False).logits[0].double()
            for t in range(ids.shape[1] - 1):
                log_probs = logits[t] - torch.logsumexp(logits[t], dim=0)
                total -= float(log_probs[ids[0, t + 1]])
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-4)])
def test_perplexity_matches_direct_computation(dtype, rtol):
    model = tiny_char_model(dtype=dtype)
    g = torch.Generator().manual_seed(3)
    windows = [torch.randint(3, CHAR_VOCAB_SIZE, (1, 24), generator=g) for _ in range(3)]
    got = perplexity(model, windows, progress=False)
    want = direct_perplexity(model, windows)
    assert got == pytest.approx(want, rel=rtol)
    # A random model over ~100 tokens is near-uniform: the value is about the vocabulary size.
    assert 10 < got < 10 * CHAR_VOCAB_SIZE


def test_perplexity_rejects_empty_and_short_windows():
    model = tiny_char_model(num_layers=2)
    with pytest.raises(ValueError, match="no windows"):
        perplexity(model, [], progress=False)
    with pytest.raises(ValueError, match="seqlen >= 2"):
        perplexity(model, [torch.tensor([[5]])], progress=False)


# --- windows and corpus --------------------------------------------------------------------------


def test_token_windows_are_consecutive_slices_of_one_tokenization():
    tok = char_tokenizer()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune."
    ids = torch.tensor(char_ids(text))
    windows = corpus.token_windows(tok, text, seqlen=10, num_windows=3)
    assert [w.shape for w in windows] == [torch.Size([1, 10])] * 3
    assert all(w.dtype == torch.int64 for w in windows)
    assert torch.equal(torch.cat(windows, dim=1)[0], ids[:30])
    every = corpus.token_windows(tok, text, seqlen=10)
    assert len(every) == len(text) // 10
    assert torch.equal(torch.cat(every, dim=1)[0], ids[: 10 * len(every)])


def test_token_windows_bad_requests_say_what_is_available():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match=r"holds 4 windows of 10 tokens \(45 tokens\); asked for 5"):
        corpus.token_windows(tok, "x" * 45, seqlen=10, num_windows=5)
    with pytest.raises(ValueError, match="fewer than one window"):
        corpus.token_windows(tok, "short", seqlen=10)
    with pytest.raises(ValueError, match="seqlen must be an int >= 2"):
        corpus.token_windows(tok, "text", seqlen=1)


def _paragraphs(text: str) -> set[str]:
    return {p for p in text.split("\n\n") if len(p) > 200}


def test_shipped_corpus_is_prose_and_calibration_is_disjoint_from_evaluation():
    calibration = corpus.calibration_text()
    evaluation = corpus.evaluation_text()
    assert len(calibration) > 1_500_000 and len(evaluation) > 1_000_000
    assert "It is a truth universally acknowledged" in evaluation[:2000]
    assert calibration.startswith("EMMA")
    # Split by document: no long paragraph appears on both sides.
    calib_paragraphs, eval_paragraphs = _paragraphs(calibration), _paragraphs(evaluation)
    assert len(calib_paragraphs) > 1000 and len(eval_paragraphs) > 700
    assert not calib_paragraphs & eval_paragraphs
    # Reflowed prose: paragraphs are single lines, the Gutenberg italics underscores are gone.
    assert "_" not in calibration + evaluation
    assert max(len(p) for p in eval_paragraphs) > 1000
    with pytest.raises(ValueError, match="unknown corpus document"):
        corpus.read_document("ulysses")


def test_read_text_files(tmp_path):
    import gzip

    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("second".encode("utf-8")))
    assert corpus.read_text_files([tmp_path / "a.txt", tmp_path / "b.txt.gz"]) == "first\n\nsecond"
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        corpus.read_text_files([tmp_path / "missing.txt"])
    with pytest.raises(IsADirectoryError, match=r"is a folder; pass the text files in it \(e.g. .*/\*.txt\)"):
        corpus.read_text_files([tmp_path])  # not "not found": it is there, and it is not a file
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        corpus.read_text_files(tmp_path / "c.txt")


# --- retained performance --------------------------------------------------------------------


def test_retained_performance_uses_the_papers_metric_per_task():
    dense = {"arc_easy": {"acc": 0.80, "acc_norm": 0.75}, "boolq": {"acc": 0.60}}
    pruned = {"arc_easy": {"acc": 0.40, "acc_norm": 0.60}, "boolq": {"acc": 0.45}}
    mean, ratios = retained_performance(pruned, dense)
    assert ratios == pytest.approx({"arc_easy": 0.60 / 0.75, "boolq": 0.45 / 0.60})
    assert mean == pytest.approx((0.8 + 0.75) / 2)
    assert [paper_metric(t) for t in ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")] == \
        ["acc_norm"] * 4 + ["acc"] * 2
    with pytest.raises(ValueError, match="no dense result"):
        retained_performance({"piqa": {"acc_norm": 0.5}}, dense)
    with pytest.raises(ValueError, match="lacks acc_norm"):
        retained_performance({"arc_easy": {"acc": 0.5}}, dense)


# --- lm-eval bridge ----------------------------------------------------------------------------

MC_QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "made of cheese"]),
    ("Two plus two equals", ["four", "five"]),
    ("The opposite of hot is", ["cold", "warm", "lukewarm water"]),
    ("A cat says", ["meow", "woof", "moo"]),
    ("Snow is", ["white", "black"]),
    ("The sun rises in the", ["east", "west", "north", "south"]),
    ("Fish live in", ["water", "trees", "the desert"]),
    ("A week has seven", ["days", "hours"]),
]


def write_mc_task(folder, name: str = "tiny_mc") -> list[dict]:
    """A local multiple-choice lm-eval task (JSON lines + task YAML) in ``folder``; returns its docs."""
    docs = [{"question": q, "choices": c, "answer": i % len(c)} for i, (q, c) in enumerate(MC_QUESTIONS)]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
    )
    return docs


def direct_mc_accuracy(model, docs) -> dict[str, float]:
    """acc / acc_norm from first principles: each choice scores sum log p(" " + choice | question);
    acc takes the argmax of the sums, acc_norm of the sums divided by the choice's length in characters."""
    hits = {"acc": 0, "acc_norm": 0}
    with torch.no_grad():
        for doc in docs:
            sums = []
            for choice in doc["choices"]:
                context, continuation = char_ids(doc["question"]), char_ids(" " + choice)
                ids = torch.tensor([context + continuation])
                log_probs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), dim=-1)
                sums.append(sum(float(log_probs[len(context) + k - 1, tok]) for k, tok in enumerate(continuation)))
            sums = torch.tensor(sums)
            lengths = torch.tensor([float(len(c)) for c in doc["choices"]])
            hits["acc"] += int(torch.argmax(sums)) == doc["answer"]
            hits["acc_norm"] += int(torch.argmax(sums / lengths)) == doc["answer"]
    return {k: v / len(docs) for k, v in hits.items()}


def test_lm_eval_bridge_on_a_local_multiple_choice_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    from linearpatch_kernels.evaluation import run_lm_eval

    docs = write_mc_task(tmp_path)
    model = tiny_char_model(num_layers=3, seed=5)
    got = run_lm_eval(model, char_tokenizer(), ["tiny_mc"], include_path=tmp_path)
    want = direct_mc_accuracy(model, docs)
    assert set(got) == {"tiny_mc"}
    assert got["tiny_mc"]["acc"] == pytest.approx(want["acc"])
    assert got["tiny_mc"]["acc_norm"] == pytest.approx(want["acc_norm"])


def test_lm_eval_task_without_local_data_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    from linearpatch_kernels.evaluation import TaskDataUnavailable, run_lm_eval

    (tmp_path / "hub_mc.yaml").write_text(
        "task: hub_mc\n"
        "dataset_path: linearpatch-nonexistent/no-such-dataset\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
    )
    with pytest.raises(TaskDataUnavailable, match="could not load the data of hub_mc.*--include-path"):
        run_lm_eval(tiny_char_model(num_layers=2), char_tokenizer(), ["hub_mc"], include_path=tmp_path)

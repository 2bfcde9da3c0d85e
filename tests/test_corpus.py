"""The default calibration mix: every domain and split loads, the splits share no text, the manifest
and the licences describe the shipped files, and the windows are what the definitions say (slices of
one tokenization per domain, interleaved domain by domain)."""

import gzip
import hashlib
import json
import re
from importlib import resources

import pytest
import torch
from test_evaluation import char_tokenizer

from linearpatch_kernels import corpus

DATA = resources.files("linearpatch_kernels").joinpath("data", "mix")


def manifest():
    return json.loads(DATA.joinpath("manifest.json").read_text())


def test_every_domain_and_split_loads_and_matches_the_manifest():
    files = manifest()["files"]
    for domain in corpus.MIX_DOMAINS:
        for split in corpus.SPLITS:
            text = corpus.domain_text(domain, split)
            name = f"{domain}.{split}.txt.gz"
            assert len(text) == files[name]["characters"] > 20_000, name
            assert hashlib.sha256(text.encode()).hexdigest() == files[name]["sha256"], name
    legal = corpus.domain_text("legal", "test")
    assert "GNU GENERAL PUBLIC LICENSE" in legal and hashlib.sha256(legal.encode()).hexdigest() == \
        files["legal.test.txt.gz"]["sha256"]
    assert set(files) == {f"{d}.{s}.txt.gz" for d in corpus.MIX_DOMAINS for s in corpus.SPLITS} | {"legal.test.txt.gz"}


def test_shipped_size_is_a_few_megabytes():
    total = sum(len(DATA.joinpath(name).read_bytes()) for name in manifest()["files"])
    assert total < 3_000_000


def test_splits_share_no_paragraph_and_held_out_domain_is_in_no_calibration_text():
    """A paragraph (of 200+ characters) of a validation or test split never occurs in any calibration split."""
    calibration = "\n\n".join(corpus.domain_text(d, "calibration") for d in corpus.MIX_DOMAINS)
    for domain in corpus.DOMAINS_ALL:
        for split in ("validation", "test"):
            if domain in corpus.HELD_OUT_DOMAINS and split == "validation":
                continue
            paragraphs = [p for p in re.split(r"\n\s*\n", corpus.domain_text(domain, split)) if len(p) >= 200]
            assert paragraphs, (domain, split)
            shared = [p[:60] for p in paragraphs if p in calibration]
            assert not shared, (domain, split, shared[:3])


def test_every_source_has_a_licence_and_notices_ship():
    m = manifest()
    domains = {s["domain"] for s in m["sources"]}
    assert domains == set(corpus.DOMAINS_ALL)
    for domain in corpus.MIX_DOMAINS:
        assert sum(s["domain"] == domain for s in m["sources"]) >= 2, domain  # several sources each
    readme = DATA.joinpath("README.md").read_text()
    notices = DATA.joinpath("LICENSES.txt").read_text()
    for s in m["sources"]:
        assert s["licence"] and s["version"]
        assert s["package"].split(":")[1] in readme, s["package"]
        # The MIT, BSD and CC BY licences ask for their notice to travel with the material; the public-domain
        # texts (whatever licence their package's code has) need none.
        if not s["licence"].startswith("public domain") and any(w in s["licence"] for w in ("MIT", "BSD", "CC BY")):
            assert f"==== {s['package']} " in notices, s["package"]


def test_domain_windows_are_slices_of_one_tokenization():
    tok = char_tokenizer()
    got = corpus.domain_windows(tok, samples=3, seqlen=40, split="validation")
    assert list(got) == list(corpus.MIX_DOMAINS)
    for domain, windows in got.items():
        text = corpus.domain_text(domain, "validation")
        ids = tok(text[:120], return_tensors="pt").input_ids  # one token per character
        want = [ids[:, k * 40:(k + 1) * 40] for k in range(3)]
        assert len(windows) == 3
        for w, v in zip(windows, want):
            assert torch.equal(w, v), domain
    test = corpus.domain_windows(tok, samples=1, seqlen=16, split="test")
    assert list(test) == list(corpus.DOMAINS_ALL)  # the held-out-only domain joins the test split


def test_mix_windows_interleave_domains_balanced():
    tok = char_tokenizer()
    by_domain = corpus.domain_windows(tok, samples=3, seqlen=32, split="calibration")
    mixed = corpus.calibration_windows(tok, samples=13, seqlen=32)
    order = [d for k in range(3) for d in corpus.MIX_DOMAINS][:13]  # 3, 3, 3, 2, 2 windows per domain
    want = [by_domain[d][sum(1 for e in order[:i] if e == d)] for i, d in enumerate(order)]
    assert len(mixed) == 13
    for got, expected in zip(mixed, want):
        assert torch.equal(got, expected)
    assert corpus.interleave({"a": [1, 2, 3], "b": [4]}) == [1, 4, 2, 3]


def test_austen_corpus_still_available_and_evaluation_windows_by_domain():
    tok = char_tokenizer()
    austen = corpus.calibration_windows(tok, samples=2, seqlen=20, corpus="austen")
    assert torch.equal(austen[0], tok(corpus.calibration_text()[:40], return_tensors="pt").input_ids[:, :20])
    legal = corpus.evaluation_windows(tok, samples=1, seqlen=20, domain="legal")
    assert torch.equal(legal[0], tok(corpus.domain_text("legal")[:20], return_tensors="pt").input_ids)
    old = corpus.evaluation_windows(tok, samples=1, seqlen=20, domain="austen")
    assert torch.equal(old[0], tok(corpus.evaluation_text()[:20], return_tensors="pt").input_ids)
    # Pride and Prejudice and Persuasion are in neither corpus's calibration text.
    opening = corpus.read_document("pride_and_prejudice")[:300]
    assert all(opening not in corpus.domain_text(d, "calibration") for d in corpus.MIX_DOMAINS)


@pytest.mark.parametrize("call, message", [
    (lambda: corpus.domain_text("poetry", "test"), "unknown corpus domain 'poetry'; accepted: prose"),
    (lambda: corpus.domain_text("prose", "train"), "unknown corpus split 'train'; accepted: calibration"),
    (lambda: corpus.domain_text("legal", "calibration"), "in no calibration data: it has a 'test' split only"),
    (lambda: corpus.calibration_windows(char_tokenizer(), 2, 16, corpus="wiki"), "unknown corpus 'wiki'; accepted: mix"),
    (lambda: corpus.domain_windows(char_tokenizer(), 0, 16), "samples per domain must be a positive int"),
    (lambda: corpus.domain_windows(char_tokenizer(), 10_000, 512, "validation"), "holds"),
])
def test_bad_requests_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_files_are_reproducible_gzip():
    """mtime 0 in every gzip header: a rebuild from the same packages gives the same bytes."""
    for name in manifest()["files"]:
        raw = DATA.joinpath(name).read_bytes()
        assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0", name
        assert gzip.decompress(raw)


def _builder():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "build_calibration_corpus.py"
    spec = importlib.util.spec_from_file_location("build_calibration_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builder_cuts_pieces_deals_splits_and_drops_repeats():
    b = _builder()
    paragraphs = [f"paragraph {k} " + "x" * 40 for k in range(10)]
    parts = b.pieces(["\n\n".join(paragraphs)], piece_chars=100)
    assert "\n\n".join(parts) == "\n\n".join(paragraphs)  # nothing lost, cut at paragraph boundaries
    assert all(len(p) >= 100 for p in parts[:-1])
    table = "\n".join(f"row {k}\t" + "y" * 30 for k in range(20))  # one paragraph: cut at line ends
    rows = b.pieces([table], piece_chars=200)
    assert len(rows) > 1 and "\n".join(rows) == table
    dealt = b.split_pieces([str(k) for k in range(20)], held_out_only=False, first=3)
    assert [len(dealt[s]) for s in ("calibration", "validation", "test")] == [14, 2, 4]
    assert sorted(sum(dealt.values(), []), key=int) == [str(k) for k in range(20)]
    assert b.split_pieces(["a", "b"], held_out_only=True) == {"calibration": [], "validation": [], "test": ["a", "b"]}
    seen = set()
    long = "z" * 120
    assert b.without_repeats(f"{long}\n\nshort\n\nshort", seen) == f"{long}\n\nshort\n\nshort"
    assert b.without_repeats(f"new\n\n{long}", seen) == "new"
    assert b.capped(["a" * 10] * 10, cap=30) == ["a" * 10] * 3
    assert b.reflow("A hard-\nwrapped _line_\n\n\nnext  para") == "A hard- wrapped line\n\nnext para"

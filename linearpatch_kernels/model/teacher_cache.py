"""The teacher's top-k next-token distributions, computed once and kept on disk for distillation.

A cache directory holds ``manifest.json`` and chunk files ``chunk-00000.safetensors``, ... Chunk ``c``
covers samples ``[c * chunk_size, min((c + 1) * chunk_size, N))`` and stores, for its ``n`` samples of
``T`` tokens and the teacher's ``k`` most likely next tokens at every position:

* ``input_ids``      int32   ``[n, T]``      the sample's tokens;
* ``topk_ids``       int32   ``[n, T, k]``   the k token ids, most likely first;
* ``topk_logprobs``  float16 ``[n, T, k]``   their log-probabilities under the teacher's full softmax
  (computed in fp32, then rounded; values below fp16's range are clamped to -65504).

So the cache takes ``N * T * (4 + 6 k)`` bytes of tensor data: 3.11 GB (2.90 GiB) for the paper's
5000 samples x 2048 tokens x top-50, 0.08 GB for 250 x 512 x 50.

The manifest (JSON) records what the cache is: the teacher's identity (``name_or_path``,
``model_type``, layer count, hidden size, vocabulary size and a SHA-256 of its input embedding rounded
to bf16, so an fp32 and a bf16 copy of one model agree), ``topk``, ``seqlen``, ``vocab_size``,
``num_samples``, ``chunk_size``, a SHA-256 of all the input ids, and the list of finished chunks, each
with its file name, sample range, byte size and SHA-256.

Building is resumable: a chunk is written to a temporary file and renamed into place, then the
manifest is rewritten (also by rename), so an interruption at any point leaves every listed chunk
whole. A re-run with the same teacher and samples keeps every listed chunk whose file still has the
recorded size, checksum and tensor shapes, and computes the rest (including any chunk found corrupt).
A re-run with a different teacher, samples, ``topk`` or ``chunk_size`` is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic_files import atomic_write_text, ordinary_permissions
from .surgery import module_execution_device

__all__ = [
    "CACHE_FORMAT",
    "MANIFEST_FILE",
    "TeacherCache",
    "build_teacher_cache",
    "cache_bytes",
    "format_bytes",
    "model_identity",
]

CACHE_FORMAT = "linearpatch-teacher-cache"
CACHE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_DTYPES = {"input_ids": torch.int32, "topk_ids": torch.int32, "topk_logprobs": torch.float16}
_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16"}  # as a safetensors header names them
_FP16_MIN = float(torch.finfo(torch.float16).min)


def cache_bytes(num_samples: int, seqlen: int, topk: int) -> int:
    """Bytes of tensor data in a cache: ``N T`` int32 ids + ``N T k`` int32 top-k ids + ``N T k`` fp16
    log-probs (the safetensors headers and the manifest add a few KB)."""
    return num_samples * seqlen * (4 + topk * (4 + 2))


def format_bytes(n: int) -> str:
    """``3110400000 -> '3.11 GB (2.90 GiB)'``."""
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB ({n / 2**30:.2f} GiB)"
    return f"{n / 1e6:.1f} MB ({n / 2**20:.1f} MiB)"


def _chunk_file(index: int) -> str:
    return f"chunk-{index:05d}.safetensors"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tensor(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def model_identity(model: nn.Module) -> dict:
    """What identifies a teacher: config fields plus a SHA-256 of the input embedding rounded to bf16.

    The student shares the teacher's embedding (pruning removes layers, not the embedding), so the
    fingerprint also tells whether a student comes from this teacher. Rounding to bf16 first makes an
    fp32 and a bf16 load of the same checkpoint agree.
    """
    config = model.config
    embedding = model.get_input_embeddings().weight
    if embedding.device.type == "meta":
        fingerprint = None  # offloaded: the weights are not at hand
    else:
        fingerprint = _sha256_tensor(embedding.detach().to(torch.bfloat16))
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "embedding_sha256_bf16": fingerprint,
    }


def _as_id_matrix(input_ids) -> torch.Tensor:
    """``[N, T]`` int64 CPU tensor from a ``[N, T]`` tensor or a list of ``[1, T]`` / ``[T]`` tensors."""
    what = "input_ids must be an integer tensor [num_samples, seqlen] or a list of [1, seqlen] tensors"
    if isinstance(input_ids, torch.Tensor):
        rows = input_ids
    elif isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise ValueError(f"{what}; got an empty list")
        if not all(isinstance(t, torch.Tensor) for t in input_ids):
            raise TypeError(f"{what}; the list holds non-tensors")
        lengths = {t.shape[-1] for t in input_ids}
        if len(lengths) != 1 or any(t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] != 1) for t in input_ids):
            raise ValueError(f"{what}; got shapes {sorted({tuple(t.shape) for t in input_ids})} (all must be [1, T])")
        rows = torch.cat([t.reshape(1, -1) for t in input_ids])
    else:
        raise TypeError(f"{what}; got {type(input_ids).__name__}")
    if rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what}; got dtype {rows.dtype}")
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{what}; got shape {tuple(rows.shape)}")
    return rows.to(device="cpu", dtype=torch.int64)


def _write_json_atomically(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a teacher cache written by build_teacher_cache "
                                f"(a {MANIFEST_FILE} and chunk-*.safetensors files)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the teacher cache in an empty directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a teacher-cache manifest (format {CACHE_FORMAT!r} expected)")
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}; this package reads version "
                         f"{CACHE_FORMAT_VERSION}; rebuild the cache")
    return manifest


def _comparable(key: str, value):
    if key == "model" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name_or_path"}
    return value


def _expected_shapes(num: int, seqlen: int, topk: int) -> dict[str, tuple[int, ...]]:
    return {"input_ids": (num, seqlen), "topk_ids": (num, seqlen, topk), "topk_logprobs": (num, seqlen, topk)}


def _chunk_problem(directory: Path, entry: dict, manifest: dict, checksum: bool) -> str | None:
    """Why the chunk ``entry`` is unusable (missing, wrong size, checksum, tensor names/shapes), or None."""
    from safetensors import safe_open

    path = directory / entry["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} has {size} bytes; the manifest records {entry['bytes']}"
    if checksum and _sha256_file(path) != entry["sha256"]:
        return f"{path} does not match its SHA-256 checksum in the manifest"
    expected = _expected_shapes(entry["num_samples"], manifest["seqlen"], manifest["topk"])
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                return f"{path} holds tensors {sorted(names)}; expected {sorted(expected)}"
            for name, shape in expected.items():
                piece = f.get_slice(name)
                got = tuple(piece.get_shape())
                dtype = piece.get_dtype()
                want_dtype = _SAFETENSORS_DTYPES[TENSOR_DTYPES[name]]
                if got != shape or dtype != want_dtype:
                    return f"{path}: {name} is {dtype} {got}; expected {want_dtype} {shape}"
    except Exception as e:  # a garbled header
        return f"{path} is not a readable safetensors file ({e})"
    return None


@torch.no_grad()
def _teacher_topk(teacher: nn.Module, ids: torch.Tensor, topk: int, autocast_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_ids int32, topk_logprobs fp16)`` of ``[b, T]`` ids; the log-softmax is taken in fp32."""
    device = module_execution_device(teacher.get_input_embeddings())
    ids = ids.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = teacher(input_ids=ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.topk(logprobs, topk, dim=-1, sorted=True)
    return indices.to(torch.int32).cpu(), values.clamp_min(_FP16_MIN).to(torch.float16).cpu()


def _default_autocast(teacher: nn.Module):
    """bf16 (fp16 where bf16 is unsupported) autocast for a fp32 teacher on a GPU; none on the CPU."""
    device = module_execution_device(teacher.get_input_embeddings())
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_teacher_cache(teacher: nn.Module, input_ids, directory: str | os.PathLike, *, topk: int = 50,
                        chunk_size: int = 64, batch_size: int = 1, max_chunks: int | None = None,
                        progress: bool = True, log=print) -> TeacherCache | None:
    """Run ``teacher`` over ``input_ids`` (``[N, T]`` or a list of ``[1, T]``) and store its top-``topk``
    next-token log-probs in ``directory`` (layout in the module docstring); resumes a partial cache.

    The teacher runs on its own device; on a GPU in bf16 autocast when its weights are fp32. The disk
    space needed is logged before anything is computed, and checked against the free space.
    ``max_chunks`` computes at most that many missing chunks in this call and returns ``None`` if the
    cache is still incomplete (a way to spread the pass over several runs); otherwise the finished,
    verified ``TeacherCache`` is returned.
    """
    if not isinstance(teacher, nn.Module) or not hasattr(teacher, "config"):
        raise TypeError(f"build_teacher_cache: teacher must be a Hugging Face *ForCausalLM, got {type(teacher).__name__}")
    for name, v in (("topk", topk), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"build_teacher_cache: {name} must be a positive int, got {v!r}")
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 0):
        raise ValueError(f"build_teacher_cache: max_chunks must be None or an int >= 0, got {max_chunks!r}")
    ids = _as_id_matrix(input_ids)
    num_samples, seqlen = ids.shape
    identity = model_identity(teacher)
    vocab_size = identity["vocab_size"]
    if topk > vocab_size:
        raise ValueError(f"build_teacher_cache: topk={topk} is larger than the teacher's vocabulary of {vocab_size} "
                         f"tokens; accepted: 1 .. {vocab_size}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"build_teacher_cache: input_ids hold ids in [{int(ids.min())}, {int(ids.max())}]; the "
                         f"teacher's vocabulary is 0 .. {vocab_size - 1}")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "model": identity,
        "topk": topk,
        "seqlen": seqlen,
        "vocab_size": vocab_size,
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        "num_chunks": math.ceil(num_samples / chunk_size),
        "input_ids_sha256": _sha256_tensor(ids.to(torch.int32)),
        "dtypes": {name: str(dtype).removeprefix("torch.") for name, dtype in TENSOR_DTYPES.items()},
        "bytes_total": cache_bytes(num_samples, seqlen, topk),
    }
    manifest = dict(plan, chunks=[])
    if (directory / MANIFEST_FILE).exists():
        found = _read_manifest(directory)
        # The path a teacher was loaded from is recorded but not compared: a moved copy is the same teacher.
        different = [key for key in plan if _comparable(key, found.get(key)) != _comparable(key, plan[key])]
        if different:
            details = "; ".join(f"{key}: cache has {found.get(key)!r}, asked {plan[key]!r}" for key in different)
            raise ValueError(f"build_teacher_cache: {directory} holds a teacher cache for another setting ({details}); "
                             "use an empty directory, or delete this one to rebuild it")
        manifest["chunks"] = found.get("chunks", [])

    # Keep the listed chunks that verify; everything else is (re)computed.
    kept = {}
    for entry in manifest["chunks"]:
        problem = _chunk_problem(directory, entry, manifest, checksum=True)
        if problem is None:
            kept[entry["index"]] = entry
        else:
            log(f"teacher cache: redoing chunk {entry['index']}: {problem}")
    manifest["chunks"] = [kept[i] for i in sorted(kept)]
    for stale in directory.glob("*.tmp"):
        stale.unlink()

    todo = [c for c in range(plan["num_chunks"]) if c not in kept]
    remaining = sum(min(chunk_size, num_samples - c * chunk_size) for c in todo) * seqlen * (4 + 6 * topk)
    log(f"teacher cache: {num_samples} samples x {seqlen} tokens x top-{topk} = {format_bytes(plan['bytes_total'])} "
        f"on disk in {directory} (input ids int32, top-k ids int32, log-probs fp16); "
        f"{len(kept)} of {plan['num_chunks']} chunks done, {format_bytes(remaining)} to write")
    free = shutil.disk_usage(directory).free
    if remaining > free:
        raise OSError(f"build_teacher_cache: {format_bytes(remaining)} still to write but only {format_bytes(free)} "
                      f"free in {directory}; free some space or choose fewer samples, a shorter seqlen or a smaller topk")
    _write_json_atomically(directory / MANIFEST_FILE, manifest)

    if max_chunks is not None:
        todo_now = todo[:max_chunks]
    else:
        todo_now = todo
    if todo_now:
        from safetensors.torch import save_file

        was_training = teacher.training
        teacher.eval()
        autocast_dtype = _default_autocast(teacher)
        bar = tqdm(total=sum(min(chunk_size, num_samples - c * chunk_size) for c in todo_now),
                   desc="teacher top-k", unit="sample", disable=not progress)
        try:
            for c in todo_now:
                first = c * chunk_size
                rows = ids[first:first + chunk_size]
                top_ids, top_logprobs = [], []
                for b in range(0, rows.shape[0], batch_size):
                    i, v = _teacher_topk(teacher, rows[b:b + batch_size], topk, autocast_dtype)
                    top_ids.append(i)
                    top_logprobs.append(v)
                    bar.update(i.shape[0])
                tensors = {"input_ids": rows.to(torch.int32).contiguous(),
                           "topk_ids": torch.cat(top_ids).contiguous(),
                           "topk_logprobs": torch.cat(top_logprobs).contiguous()}
                name = _chunk_file(c)
                tmp = directory / (name + ".tmp")
                save_file(tensors, str(tmp), metadata={"format": "pt"})
                ordinary_permissions(tmp)  # safetensors creates it 0o600, whatever the umask
                os.replace(tmp, directory / name)
                entry = {"index": c, "file": name, "first_sample": first, "num_samples": int(rows.shape[0]),
                         "bytes": (directory / name).stat().st_size, "sha256": _sha256_file(directory / name)}
                manifest["chunks"] = sorted(manifest["chunks"] + [entry], key=lambda e: e["index"])
                _write_json_atomically(directory / MANIFEST_FILE, manifest)
        finally:
            bar.close()
            teacher.train(was_training)
    if len(manifest["chunks"]) < plan["num_chunks"]:
        return None
    return TeacherCache(directory, verify=False)  # every chunk was verified or written just now


@dataclass(frozen=True)
class CacheSample:
    """One cached sample: ``input_ids [T]`` int64, ``topk_ids [T, k]`` int64, ``topk_logprobs [T, k]`` fp32."""

    input_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor


class TeacherCache:
    """Read access to a finished teacher cache (see the module docstring).

    Opening checks that the manifest is complete and every chunk file is present with the recorded
    size, tensor names and shapes; ``verify=True`` (the default) also checks each file's SHA-256.
    Samples are read lazily from the memory-mapped chunk files.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"teacher cache {self.directory} is not a directory; build one with "
                                    "build_teacher_cache (or `linearpatch distill --teacher MODEL_DIR`)")
        manifest = _read_manifest(self.directory)
        self.manifest = manifest
        chunks = manifest.get("chunks", [])
        if [e["index"] for e in chunks] != list(range(manifest["num_chunks"])):
            raise ValueError(f"teacher cache {self.directory} is incomplete: {len(chunks)} of {manifest['num_chunks']} "
                             "chunks written; run build_teacher_cache again with the same teacher and samples to finish it")
        for entry in chunks:
            problem = _chunk_problem(self.directory, entry, manifest, checksum=verify)
            if problem is not None:
                if not (self.directory / entry["file"]).is_file():
                    raise FileNotFoundError(f"teacher cache: {problem}; run build_teacher_cache again to redo it")
                raise ValueError(f"teacher cache: {problem}; run build_teacher_cache again to redo it")
        self._chunks = chunks
        self._open: dict[int, object] = {}

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def seqlen(self) -> int:
        return int(self.manifest["seqlen"])

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def model(self) -> dict:
        """The teacher's identity recorded at build time (see ``model_identity``)."""
        return dict(self.manifest["model"])

    def __len__(self) -> int:
        return self.num_samples

    def _handle(self, chunk: int):
        from safetensors import safe_open

        if chunk not in self._open:
            self._open[chunk] = safe_open(str(self.directory / self._chunks[chunk]["file"]), framework="pt")
        return self._open[chunk]

    def sample(self, index: int) -> CacheSample:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_samples:
            raise IndexError(f"teacher cache sample {index!r} out of range 0 .. {self.num_samples - 1}")
        chunk, row = divmod(index, int(self.manifest["chunk_size"]))
        f = self._handle(chunk)
        return CacheSample(
            input_ids=f.get_slice("input_ids")[row:row + 1][0].to(torch.int64),
            topk_ids=f.get_slice("topk_ids")[row:row + 1][0].to(torch.int64),
            topk_logprobs=f.get_slice("topk_logprobs")[row:row + 1][0].to(torch.float32),
        )

    def batch(self, indices) -> CacheSample:
        """The samples ``indices`` stacked: ``[b, T]``, ``[b, T, k]``, ``[b, T, k]``."""
        samples = [self.sample(int(i)) for i in indices]
        return CacheSample(*(torch.stack([getattr(s, name) for s in samples])
                             for name in ("input_ids", "topk_ids", "topk_logprobs")))

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.directory)!r}, num_samples={self.num_samples}, seqlen={self.seqlen}, "
                f"topk={self.topk}, vocab_size={self.vocab_size})")

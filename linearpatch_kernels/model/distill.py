"""Offline distillation of the patch: train only ``P`` so the pruned model matches the dense teacher.

The teacher's top-k next-token log-probs are cached on disk first (``teacher_cache``); the student is
the pruned + patched model with every weight frozen but the patch's. Two things can be trained:

* ``train="s"``: the Hadamard-domain scales ``s`` of a "rotate" patch (or the channel scales of a
  "diag" patch), ``d`` numbers; the gradient flows through ``linearpatch::hadamard_patch``'s autograd,
  and the result is still a fast structured patch.
* ``train="dense"``: a free ``d x d`` matrix ``P`` (the paper's distilled patch), initialised from the
  current patch's ``H diag(s) H^T`` (``LinearPatch.dense_matrix()``), i.e. a ``LinearPatch`` in
  mode "dense".

Loss, per token, with ``a_1..a_k`` the teacher's cached log-probs of its top-k tokens ``v_1..v_k`` and
``z_v`` the student's logits:

    q_i     = exp(a_i) / sum_j exp(a_j)                 (teacher, renormalised over its k tokens)
    log r_i = z_{v_i} - log sum_j exp(z_{v_j})          (student log-softmax restricted to the same k
                                                         tokens; the full-vocabulary normaliser cancels)
    KL_t    = sum_i q_i (log q_i - log r_i)

and the loss is the mean of ``KL_t`` over all tokens of the batch (every position of every sample).
Since only ``z`` at the k cached tokens enters, the student's LM head is evaluated on those k rows
alone (``h_t . W[v_i]``), not on the whole vocabulary: on a CPU that is most of the head's cost saved.

Training: AdamW (no weight decay: it would pull the scales and ``P`` towards 0, not towards the
identity), linear warm-up over the first 5 % of the steps then a cosine decay to 0, bf16 autocast on
a GPU (fp16 with loss scaling where bf16 is unsupported), plain fp32 on the CPU. The validation loss
(the same KL on the last ``val_samples`` cached samples, never trained on) is measured before training
and after every epoch (or every ``eval_every`` steps); training stops early after ``patience``
validations without improvement, and the patch with the lowest validation loss is kept.

A model with several cuts has its patches distilled jointly: every cut's ``s`` (or ``P``) is a
parameter of the one optimizer, trained on the same loss at the model's output, and the kept state is
the set of patches at the step of lowest validation loss. (Training them one at a time would fit each
patch to a model whose other patches are still the training-free ones.)
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic_files import check_new_directory, check_not_an_input
from ..devices import resolve_device
from .checkpoint import load_pruned, save_pruned
from .patch import LinearPatch
from .surgery import get_patches, module_execution_device, set_patch
from .teacher_cache import MANIFEST_FILE, TeacherCache, build_teacher_cache, model_identity

__all__ = [
    "DEFAULT_LR",
    "TRAIN_MODES",
    "DistillResult",
    "distill_patch",
    "is_teacher_cache_dir",
    "student_support_logits",
    "support_kl_loss",
    "topk_kl_loss",
    "train_patch",
]

TRAIN_MODES = ("s", "dense")
# Adam moves every parameter by about lr per step. The scales are O(1) numbers, one per channel; the
# dense P has d^2 entries whose changes add up over the d channels of every output, so it takes a
# smaller step. Chosen by the validation KL on SmolLM2-135M with a few dozen steps (the CPU setting of
# benchmarks/distill_smollm2.py: s best near 3e-2, dense near 1e-3 at 16 steps); runs of thousands of
# steps may want less.
DEFAULT_LR = {"s": 2e-2, "dense": 5e-4}
WARMUP_FRACTION = 0.05
# train="s" keeps every scale at or above this: a scale is a ratio of channel magnitudes, and a patch
# with a scale <= 0 is refused by set_patch, save_pruned and every loader (check_patch_values). A step
# that would cross it stops there instead (projected gradient descent onto s >= SCALE_FLOOR).
SCALE_FLOOR = 1e-4
RESULT_FILE = "distill.json"


# --- the loss -----------------------------------------------------------------------------------


def support_kl_loss(student_support_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(q || r)`` on the teacher's top-k support (formula in the module docstring).

    ``student_support_logits``: ``[..., k]`` the student's logits at the teacher's k tokens;
    ``teacher_logprobs``: ``[..., k]`` the teacher's log-probs of those tokens. Computed in fp32.
    """
    if student_support_logits.shape != teacher_logprobs.shape:
        raise ValueError(f"support_kl_loss: student logits {tuple(student_support_logits.shape)} and teacher "
                         f"log-probs {tuple(teacher_logprobs.shape)} must have the same shape [..., k]")
    log_q = torch.log_softmax(teacher_logprobs.float(), dim=-1)
    log_r = torch.log_softmax(student_support_logits.float(), dim=-1)
    return (log_q.exp() * (log_q - log_r)).sum(-1).mean()


def topk_kl_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``support_kl_loss`` from the student's full logits ``[..., V]`` and the teacher's ``topk_ids [..., k]``."""
    if topk_ids.shape != teacher_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"topk_kl_loss: shapes student_logits {tuple(student_logits.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}, teacher_logprobs {tuple(teacher_logprobs.shape)} do not line up; "
                         "expected [..., V], [..., k], [..., k]")
    if topk_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"topk_kl_loss: top-{topk_ids.shape[-1]} is more than the student's {student_logits.shape[-1]} "
                         "vocabulary entries")
    return support_kl_loss(student_logits.gather(-1, topk_ids.to(student_logits.device)), teacher_logprobs)


def student_support_logits(model: nn.Module, input_ids: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The student's logits at ``topk_ids`` (``[b, T, k]``): the last hidden state times the k rows of the
    LM head, without the ``[b, T, V]`` logits. Models whose logits are not a plain linear head of the
    last hidden state (soft-capped or scaled logits) go through the full logits instead."""
    head = model.get_output_embeddings()
    config = model.config
    plain_head = (isinstance(head, nn.Linear) and getattr(config, "final_logit_softcapping", None) is None
                  and getattr(config, "logit_scale", None) is None)
    if not plain_head:
        logits = model(input_ids=input_ids, use_cache=False).logits
        return logits.gather(-1, topk_ids.to(logits.device))
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    ids = topk_ids.to(head.weight.device)
    rows = head.weight[ids]  # [b, T, k, d], frozen
    logits = torch.einsum("btd,btkd->btk", hidden.to(rows.device), rows.to(hidden.dtype))
    if head.bias is not None:
        logits = logits + head.bias[ids]
    return logits


# --- training -----------------------------------------------------------------------------------


@dataclass
class DistillResult:
    """What ``train_patch`` did: settings, the validation loss before and at the kept patch, history."""

    train: str
    lr: float
    epochs: int
    batch_size: int
    train_samples: int
    val_samples: int
    steps: int
    initial_val_loss: float
    best_val_loss: float
    best_step: int
    stopped_early: bool
    seconds: float
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_cache_matches(cache: TeacherCache, model: nn.Module, log=print) -> None:
    """A clear error when the cache's teacher cannot be this student's teacher (vocabulary, hidden size,
    family); a warning when the input embeddings differ (the student is not a pruned copy of it)."""
    config = model.config
    head = model.get_output_embeddings()
    student_vocab = int(getattr(head, "out_features", None) or config.vocab_size)
    if student_vocab != cache.vocab_size or int(config.vocab_size) != cache.vocab_size:
        raise ValueError(f"teacher cache {cache.directory} has a vocabulary of {cache.vocab_size} tokens but the student "
                         f"has {student_vocab} (config.vocab_size {config.vocab_size}); the teacher must be the dense "
                         "model the student was pruned from")
    teacher = cache.model
    if teacher.get("hidden_size") != int(config.hidden_size) or teacher.get("model_type") != config.model_type:
        raise ValueError(f"teacher cache {cache.directory} comes from a {teacher.get('model_type')} model with hidden size "
                         f"{teacher.get('hidden_size')}; the student is a {config.model_type} model with hidden size "
                         f"{config.hidden_size}; the teacher must be the dense model the student was pruned from")
    student_fp = model_identity(model)["embedding_sha256_bf16"]
    if None not in (student_fp, teacher.get("embedding_sha256_bf16")) and student_fp != teacher["embedding_sha256_bf16"]:
        log(f"warning: the student's input embedding differs from the teacher's in {cache.directory} "
            f"({teacher.get('name_or_path') or 'unnamed teacher'}); was the student pruned from another model?")


def _check_positive_int(name: str, value, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}")
    return value


def _autocast_dtype(device: torch.device):
    if device.type != "cuda":
        return None  # fp32 on the CPU: bf16 matmuls there are slow and the patch is tiny
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _prepare_patches(model: nn.Module, train: str) -> list[LinearPatch]:
    """The patch of every cut, ready to train: as they are for ``train="s"``, made dense for "dense"."""
    patches = get_patches(model)
    if train == "s":
        if any(patch.mode == "dense" for patch in patches):
            raise ValueError("train_patch: train='s' trains the scales of a 'rotate' or 'diag' patch, but this model's "
                             "patch is 'dense'; use train='dense' or start from a rotate/diag patch")
        return patches
    for cut, patch in enumerate(patches):
        if patch.mode != "dense":
            dense = LinearPatch(patch.hidden_size, mode="dense", weight=patch.dense_matrix())
            dense.enabled = patch.enabled
            set_patch(model, dense, cut=cut)
    return get_patches(model)


def _cosine_with_warmup(total_steps: int):
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:  # step = number of optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batch_loss(model, cache: TeacherCache, indices, device, autocast_dtype) -> torch.Tensor:
    batch = cache.batch(indices)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = student_support_logits(model, batch.input_ids.to(device), batch.topk_ids)
    return support_kl_loss(logits, batch.topk_logprobs.to(logits.device))


@torch.no_grad()
def _validation_loss(model, cache, indices, batch_size, device, autocast_dtype) -> float:
    # Every sample has the same number of tokens, so the mean of the batch means is the token mean
    # when the batches are equal; weight by batch length for the last, shorter one.
    total, count = 0.0, 0
    for b in range(0, len(indices), batch_size):
        part = indices[b:b + batch_size]
        total += float(_batch_loss(model, cache, part, device, autocast_dtype)) * len(part)
        count += len(part)
    return total / count


def train_patch(model: nn.Module, cache: TeacherCache, *, train: str = "s", lr: float | None = None,
                epochs: int = 1, batch_size: int = 1, val_samples: int = 16, patience: int = 2,
                eval_every: int | None = None, max_train_samples: int | None = None, seed: int = 0,
                progress: bool = True, log=print) -> DistillResult:
    """Distil the patch of the pruned ``model`` (in place) against ``cache`` (see the module docstring).

    The last ``val_samples`` samples of the cache are held out for validation; the others are the
    training set (``max_train_samples`` takes only the first ones). ``train="dense"`` replaces a
    rotate/diag patch by a dense one initialised from it. The model keeps the patch with the lowest
    validation loss (the starting patch if training never improved on it).
    """
    caller = "train_patch"
    if train not in TRAIN_MODES:
        raise ValueError(f"{caller}: unknown train={train!r}; accepted: {', '.join(TRAIN_MODES)}")
    if not isinstance(cache, TeacherCache):
        raise TypeError(f"{caller}: cache must be a TeacherCache, got {type(cache).__name__}")
    epochs = _check_positive_int("epochs", epochs, caller)
    batch_size = _check_positive_int("batch_size", batch_size, caller)
    val_samples = _check_positive_int("val_samples", val_samples, caller)
    patience = _check_positive_int("patience", patience, caller)
    if eval_every is not None:
        _check_positive_int("eval_every", eval_every, caller)
    lr = DEFAULT_LR[train] if lr is None else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{caller}: lr must be a positive number, got {lr!r}")
    if val_samples >= cache.num_samples:
        raise ValueError(f"{caller}: val_samples={val_samples} leaves no training samples in a cache of "
                         f"{cache.num_samples}; accepted: 1 .. {cache.num_samples - 1}")
    check_cache_matches(cache, model, log)
    num_train = cache.num_samples - val_samples
    if max_train_samples is not None:
        num_train = min(num_train, _check_positive_int("max_train_samples", max_train_samples, caller))
    train_indices = list(range(num_train))
    val_indices = list(range(cache.num_samples - val_samples, cache.num_samples))

    params = [patch.scale if train == "s" else patch.weight for patch in _prepare_patches(model, train)]
    device = module_execution_device(model.get_input_embeddings())
    autocast_dtype = _autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    model.eval()  # no dropout: the student must compute what it will compute at inference

    steps_per_epoch = math.ceil(num_train / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total_steps))
    generator = torch.Generator().manual_seed(seed)
    start_time = time.perf_counter()
    history = []
    step = 0
    stopped_early = False
    try:
        initial = _validation_loss(model, cache, val_indices, batch_size, device, autocast_dtype)
        best, best_step, best_state, bad = initial, 0, [p.detach().clone() for p in params], 0
        history.append({"step": 0, "epoch": 0, "train_loss": None, "val_loss": initial, "lr": 0.0})
        log(f"distill ({train}): {num_train} training and {val_samples} validation samples of {cache.seqlen} tokens, "
            f"{total_steps} steps of {batch_size}, lr {lr:g}; validation loss before training {initial:.5f}")
        bar = tqdm(total=total_steps, desc=f"distill {train}", unit="step", disable=not progress)
        running, running_count = 0.0, 0
        for epoch in range(1, epochs + 1):
            order = torch.randperm(num_train, generator=generator).tolist()
            for b in range(0, num_train, batch_size):
                indices = [train_indices[i] for i in order[b:b + batch_size]]
                loss = _batch_loss(model, cache, indices, device, autocast_dtype)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if train == "s":
                    with torch.no_grad():
                        for param in params:
                            param.clamp_(min=SCALE_FLOOR)
                schedule.step()
                step += 1
                running += float(loss.detach())
                running_count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running / running_count:.4f}", best_val=f"{best:.4f}")
                end_of_epoch = b + batch_size >= num_train
                if not (end_of_epoch or (eval_every is not None and step % eval_every == 0)):
                    continue
                val = _validation_loss(model, cache, val_indices, batch_size, device, autocast_dtype)
                history.append({"step": step, "epoch": epoch, "train_loss": running / running_count, "val_loss": val,
                                "lr": optimizer.param_groups[0]["lr"]})
                running, running_count = 0.0, 0
                if val < best:
                    best, best_step, best_state, bad = val, step, [p.detach().clone() for p in params], 0
                else:
                    bad += 1
                bar.set_postfix(val=f"{val:.4f}", best_val=f"{best:.4f}")
                if bad >= patience:
                    stopped_early = True
                    break
            if stopped_early:
                log(f"distill ({train}): stopped early at step {step}: {patience} validations without improvement")
                break
        bar.close()
        with torch.no_grad():
            for param, state in zip(params, best_state):
                param.copy_(state)
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    result = DistillResult(train=train, lr=float(lr), epochs=epochs, batch_size=batch_size, train_samples=num_train,
                           val_samples=val_samples, steps=step, initial_val_loss=initial, best_val_loss=best,
                           best_step=best_step, stopped_early=stopped_early,
                           seconds=time.perf_counter() - start_time, history=history)
    log(f"distill ({train}): validation loss {initial:.5f} -> {best:.5f} (kept the patch of step {best_step})")
    return result


# --- the whole flow -----------------------------------------------------------------------------


def is_teacher_cache_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() and not (path / "config.json").is_file()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def distill_patch(student, teacher, out_dir: str | os.PathLike | None = None, *, input_ids=None,
                  cache_dir: str | os.PathLike | None = None, topk: int = 50, chunk_size: int = 64,
                  teacher_batch_size: int = 1, train: str = "s", lr: float | None = None, epochs: int = 1,
                  val_samples: int = 16, batch_size: int = 1, patience: int = 2, eval_every: int | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None, tokenizer=None,
                  seed: int = 0, overwrite: bool = False, progress: bool = True, log=print):
    """Distil the patch of a pruned model against its dense teacher; returns ``(model, DistillResult)``.

    ``student``: a checkpoint directory written by ``save_pruned`` (loaded with ``load_pruned``) or a
    pruned model in memory. ``teacher``: a finished ``TeacherCache`` or its directory, or the dense
    model's directory; then its top-``topk`` cache is built in ``cache_dir`` (default
    ``<out_dir>.teacher-cache``, a folder beside ``out_dir``) from ``input_ids`` (``[N, T]`` or a list of ``[1, T]``; the last
    ``val_samples`` are the validation set), resuming a partial one. The teacher is loaded, cached and
    freed before the student is loaded, so the two are never in memory together; for that reason a
    student passed as a model needs a teacher cache, not a teacher model.

    ``device``/``dtype`` apply to the models loaded here (default: CUDA when available, fp32 on the CPU
    and bf16 on a GPU). With ``out_dir`` the distilled model is saved there with ``save_pruned`` (plus
    ``tokenizer`` if given) and the run is described in ``distill.json``, all in one atomic write.
    ``out_dir`` is checked before anything is loaded: it must be new or empty (``overwrite=True``
    replaces a non-empty one), writable, and never the student's, the teacher's or the cache's folder.
    """
    device = resolve_device(device, "distill_patch: device")
    load_dtype = dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if train not in TRAIN_MODES:
        raise ValueError(f"distill_patch: unknown train={train!r}; accepted: {', '.join(TRAIN_MODES)}")
    if not isinstance(student, nn.Module):
        student_dir = Path(student)
        if not student_dir.is_dir():
            raise FileNotFoundError(f"distill_patch: student {student_dir} is not a directory; pass a pruned checkpoint "
                                    "written by save_pruned (linearpatch prune) or a pruned model")
    if out_dir is not None:
        out_dir = check_out_dir(out_dir, overwrite, student=None if isinstance(student, nn.Module) else student_dir,
                                 teacher=teacher.directory if isinstance(teacher, TeacherCache) else teacher,
                                 cache_dir=cache_dir)

    if isinstance(teacher, TeacherCache):
        cache = teacher
    elif isinstance(teacher, (str, os.PathLike)):
        teacher_path = Path(teacher)
        if not teacher_path.is_dir():
            raise FileNotFoundError(f"distill_patch: teacher {teacher_path} is not a directory; pass the dense model's "
                                    "directory or a teacher cache directory")
        if is_teacher_cache_dir(teacher_path):
            cache = TeacherCache(teacher_path)
        else:
            if isinstance(student, nn.Module):
                raise ValueError("distill_patch: the student is already in memory, so the teacher model cannot be loaded "
                                 "next to it; build the teacher cache first (build_teacher_cache) and pass it, or pass "
                                 "the student as a checkpoint directory")
            if input_ids is None:
                raise ValueError("distill_patch: building the teacher cache needs input_ids (the token windows to "
                                 "distil on, [N, T]); none were given")
            if not (teacher_path / "config.json").is_file():
                raise FileNotFoundError(f"distill_patch: {teacher_path} holds neither a model (config.json) nor a "
                                        f"teacher cache ({MANIFEST_FILE})")
            if cache_dir is None:
                if out_dir is None:
                    raise ValueError("distill_patch: give cache_dir or out_dir (the cache goes beside it, to "
                                     "<out_dir>.teacher-cache)")
                cache_dir = default_cache_dir(out_dir)
            from transformers import AutoModelForCausalLM

            log(f"loading the teacher from {teacher_path}")
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=load_dtype).to(device).eval()
            cache = build_teacher_cache(teacher_model, input_ids, cache_dir, topk=topk, chunk_size=chunk_size,
                                        batch_size=teacher_batch_size, progress=progress, log=log)
            del teacher_model
            _free_memory()
    else:
        raise TypeError(f"distill_patch: teacher must be a TeacherCache or a directory, got {type(teacher).__name__}")

    if isinstance(student, nn.Module):
        model = student
    else:
        log(f"loading the pruned student from {student_dir}")
        model = load_pruned(student_dir, device=device, dtype=load_dtype)
    result = train_patch(model, cache, train=train, lr=lr, epochs=epochs, batch_size=batch_size, val_samples=val_samples,
                         patience=patience, eval_every=eval_every, seed=seed, progress=progress, log=log)
    if out_dir is not None:
        record = {"result": result.to_dict(), "teacher": cache.model, "teacher_cache": str(cache.directory),
                  "topk": cache.topk, "seqlen": cache.seqlen, "cache_samples": cache.num_samples}
        before = (model.config.linearpatch.get("provenance") or {}).get("calibration")
        distilled = (f"distilled ({train}) on the dense model's top-{cache.topk} next-token log-probs of "
                     f"{cache.num_samples} windows of {cache.seqlen} tokens")
        save_pruned(model, out_dir, tokenizer=tokenizer, overwrite=overwrite,
                    extra_files={RESULT_FILE: json.dumps(record, indent=1) + "\n"},
                    calibration=f"{before}; then {distilled}" if before else distilled)
        log(f"saved the distilled model to {out_dir}")
    return model, result


def default_cache_dir(out_dir: str | os.PathLike) -> Path:
    """Where ``distill_patch`` keeps the teacher cache by default: ``<out_dir>.teacher-cache`` beside
    ``out_dir`` (not inside it, so the checkpoint folder is written in one atomic rename and a rerun
    with the same ``out_dir`` resumes the cache)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.teacher-cache"


def check_out_dir(out_dir, overwrite: bool = False, *, student=None, teacher=None, cache_dir=None, texts=(),
                  overwrite_option: str = "overwrite=True") -> Path:
    """``out_dir`` checked before any work: new or empty (or ``overwrite``), writable, and never the
    student's, the teacher's or the teacher cache's folder, inside one of them or containing one (see
    ``check_new_directory``); nor does it contain a text file the windows are cut from. The teacher
    cache is written too (when the teacher is a model): ``cache_dir`` must not be, contain or lie
    inside the student's or the teacher's folder either."""
    def given(label, path):
        return (label, path) if isinstance(path, (str, os.PathLike)) else (label, None)

    models = [given("student checkpoint", student), given("teacher", teacher)]
    if isinstance(cache_dir, (str, os.PathLike)) and not (isinstance(teacher, (str, os.PathLike))
                                                           and Path(teacher).resolve() == Path(cache_dir).resolve()):
        check_not_an_input(cache_dir, "distill: teacher cache", models)
    inputs = models + [given("teacher cache", cache_dir)] + [given("text file", t) for t in texts]
    return check_new_directory(out_dir, overwrite, what="distill: output folder", inputs=inputs,
                               overwrite_option=overwrite_option)

"""Perplexity, and zero-shot accuracy through lm-evaluation-harness (the optional ``eval`` extra).

Perplexity over windows ``w_1 .. w_B`` of ``T`` tokens each (every window predicts its tokens
2..T from the ones before; no context crosses a window boundary):

    ppl = exp( sum_b sum_{t=2..T} -log p(w_b[t] | w_b[<t]) / (B * (T - 1)) )

with the log-softmax taken in fp32 whatever the model's dtype.

Retained performance, as in the LinearPatch paper: the mean over tasks of
``pruned_metric / dense_metric``, where the metric is ``acc_norm`` for ARC-Easy, ARC-Challenge,
HellaSwag and PIQA and ``acc`` for every other task.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

LM_EVAL_PIP_COMMAND = 'pip install "linearpatch-kernels[eval]"   (or: pip install lm_eval==0.4.13)'

# Tasks whose paper metric is length-normalized accuracy; every other task uses plain accuracy.
ACC_NORM_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa")


class LmEvalUnavailable(RuntimeError):
    """lm-evaluation-harness is not installed (the message gives the pip command)."""


class TaskDataUnavailable(RuntimeError):
    """An lm-eval task's dataset is neither local nor in the datasets cache, and nothing is downloaded."""


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


@torch.no_grad()
def window_nll(model: nn.Module, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one ``[1, T]`` window and its token count ``T - 1``."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"a perplexity window must have shape [batch, seqlen] with seqlen >= 2, "
                         f"got {tuple(input_ids.shape)}")
    ids = input_ids.to(_input_device(model))
    logits = model(input_ids=ids, use_cache=False).logits
    targets = ids[:, 1:]
    predicted = logits[:, :-1].float()
    nll = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


@torch.no_grad()
def perplexity(model: nn.Module, windows, *, progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of ``model`` on ``windows`` (a list of ``[1, T]`` LongTensors, see the module docstring)."""
    windows = list(windows)
    if not windows:
        raise ValueError("perplexity: no windows; pass a list of [1, seqlen] LongTensors of input_ids")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for ids in tqdm(windows, desc=desc, disable=not progress, leave=False):
            nll, count = window_nll(model, ids)
            total_nll += nll
            total_tokens += count
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


# --- lm-evaluation-harness bridge -------------------------------------------------------------


def paper_metric(task: str) -> str:
    """The metric the paper reports for ``task``: acc_norm for ARC-e/c, HellaSwag, PIQA, else acc."""
    return "acc_norm" if task in ACC_NORM_TASKS else "acc"


def require_lm_eval():
    """Import ``lm_eval``, or raise ``LmEvalUnavailable`` with the pip command."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise LmEvalUnavailable(
            f"--tasks needs lm-evaluation-harness, which is not installed ({e}); install it with:\n"
            f"    {LM_EVAL_PIP_COMMAND}"
        ) from None
    import lm_eval

    return lm_eval


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """An lm-eval TaskManager that knows ``tasks``, reused within the process.

    Indexing lm-eval's thousands of built-in task files takes seconds; when every task asked
    for is one of the local ones in ``include_path``, the built-in index is not built at all.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def _known_tasks(tasks, include_path: str | os.PathLike | None):
    """``(tasks as a list, TaskManager)`` after checking the names and the include path."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("run_lm_eval: no tasks given; pass lm-eval task names such as arc_easy, hellaswag")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"lm-eval include path {include_path} is not a directory of task YAML files")
    task_manager = _task_manager(str(include_path) if include_path else None, tuple(tasks))
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; examples of known tasks: arc_easy, "
                         "arc_challenge, hellaswag, piqa, winogrande, boolq (or pass --include-path with "
                         "your own task YAML files)")
    return tasks, task_manager


def _data_unavailable(tasks, error) -> TaskDataUnavailable:
    return TaskDataUnavailable(
        f"lm-eval could not load the data of {', '.join(tasks)} ({error}). Nothing is downloaded here: put the "
        "datasets in the Hugging Face datasets cache first (HF_DATASETS_CACHE), or describe a local task in a "
        "YAML file and pass its folder with --include-path")


def check_task_data(tasks, *, include_path: str | os.PathLike | None = None) -> list[str]:
    """Check that every task is known and its data loads locally, before any model is scored.

    Builds each task as lm-eval will (reading its dataset from the local cache or the task's own
    files); raises ``TaskDataUnavailable`` naming every task whose data is missing, ``ValueError``
    for unknown task names. Returns the task list.
    """
    require_lm_eval()
    tasks, task_manager = _known_tasks(tasks, include_path)
    if hasattr(task_manager, "load"):
        load = task_manager.load
    else:  # lm-eval before TaskManager.load
        from lm_eval.tasks import get_task_dict

        def load(names):
            return get_task_dict(names, task_manager)
    missing = {}
    for task in tasks:
        try:
            load([task])
        except (ConnectionError, FileNotFoundError) as e:
            missing[task] = e
    if missing:
        raise _data_unavailable(list(missing), "; ".join(f"{t}: {e}" for t, e in missing.items()))
    return tasks


def run_lm_eval(model: nn.Module, tokenizer, tasks, *, include_path: str | os.PathLike | None = None,
                num_fewshot: int = 0, batch_size: int = 1, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Zero-shot (by default) accuracy of an in-memory model on lm-eval ``tasks``.

    Returns ``{task: {"acc": ..., "acc_norm": ...}}`` (a metric the task does not report is absent).
    ``include_path`` is a folder of extra task YAML files (local tasks); ``limit`` caps the number
    of examples per task. The model is evaluated as it is: a pruned model with or without its
    patch enabled, on its own device and dtype.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    tasks, task_manager = _known_tasks(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager, log_samples=False, bootstrap_iters=0)
    except ConnectionError as e:
        # The Hub is unreachable (or offline mode is on) and the task's dataset is not cached.
        raise _data_unavailable(tasks, e) from None
    finally:
        model.train(was_training)
    results = {}
    for task in tasks:
        metrics = out["results"].get(task, {})
        results[task] = {name: float(metrics[f"{name},none"]) for name in ("acc", "acc_norm")
                         if f"{name},none" in metrics}
        if not results[task]:
            raise ValueError(f"lm-eval task {task!r} reported neither acc nor acc_norm (got {sorted(metrics)}); "
                             "retained performance needs multiple-choice tasks")
    return results


def retained_performance(pruned: dict[str, dict[str, float]],
                         dense: dict[str, dict[str, float]]) -> tuple[float, dict[str, float]]:
    """``(mean ratio, {task: pruned/dense})`` over the tasks of ``pruned``, with the paper's metric per task."""
    ratios = {}
    for task, metrics in pruned.items():
        metric = paper_metric(task)
        if task not in dense:
            raise ValueError(f"retained_performance: task {task!r} has no dense result")
        if metric not in metrics or metric not in dense[task]:
            raise ValueError(f"retained_performance: task {task!r} lacks {metric} (the paper's metric for it)")
        if dense[task][metric] == 0:
            raise ValueError(f"retained_performance: the dense model scores 0 {metric} on {task!r}; no ratio")
        ratios[task] = metrics[metric] / dense[task][metric]
    if not ratios:
        raise ValueError("retained_performance: no tasks")
    return sum(ratios.values()) / len(ratios), ratios

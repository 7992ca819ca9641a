"""Any lm-evaluation-harness task beside the built-in SuperGLUE scorer.

A task name the built-in scorer does not know (MMLU, HellaSwag, ARC, GSM8K, a task of
your own in an `--include-path` folder) goes to lm-evaluation-harness's Python API
(`lm_eval.simple_evaluate`) with the model lomotune loaded, wrapped in the harness's
HFLM: its precision, its device and an applied adapter are the ones `lomotune eval`
chose. The harness's numbers come back as `TaskResult`s, so the table and the
`--output` JSON have one shape whoever scored. `pip install 'lomotune[harness]'`.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lomotune.evaluate.metrics import Scores
from lomotune.evaluate.run import TaskResult
from lomotune.evaluate.task import EvalDataError

PIP = "pip install 'lomotune[harness]'"


def harness_version() -> str | None:
    """lm-eval's version, or None where it is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    return importlib.metadata.version("lm_eval")


@functools.cache
def task_manager(include_path: Path | None = None):
    """The harness's index of tasks (it reads every task YAML: seconds to tens of
    seconds), built once per folder: checking the names and scoring share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)


def check_task_names(
    names: list[str], builtin: list[str], include_path: Path | None = None
) -> list[str]:
    """One problem per name neither the built-in scorer nor the harness knows, with the
    nearest names of both; [] when all are known. Where lm-eval is missing, the problem
    names the pip command."""
    if not names:
        return []
    if harness_version() is None:
        return [
            f"unknown task {', '.join(names)}: not a built-in SuperGLUE task "
            f"({', '.join(builtin)}); for lm-evaluation-harness tasks, {PIP}"
        ]
    known = task_manager(include_path).all_tasks
    problems = []
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, [*builtin, *known], n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        problems.append(
            f"unknown task {name}: neither a built-in SuperGLUE task nor an "
            f"lm-evaluation-harness {harness_version()} task{hint}"
        )
    return problems


def evaluate_harness(
    model: torch.nn.Module,
    tokenizer,
    names: list[str],
    *,
    batch_size: int,
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: Path | None = None,
) -> list[TaskResult]:
    """Score `names` with the harness on `model` as it is (precision, device, adapter)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # The harness warns that a passed-in model ignores its loading options: lomotune
    # loaded it on purpose. Its INFO lines would bury the table.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    started = time.perf_counter()
    training = model.training  # HFLM switches the model to eval mode: a run continues after
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager(include_path),
            log_samples=False,
        )
    except OSError as e:  # the task's data: not on the hub, no network, a missing file
        raise EvalDataError(
            f"lm-evaluation-harness could not read the data of {', '.join(names)}: "
            f"{str(e).splitlines()[0][:300]}. Without a network, a task's dataset must be in "
            "the datasets cache already, or a local file (dataset_path: json in an "
            "--include-path task)"
        ) from None
    finally:
        model.train(training)
    seconds = time.perf_counter() - started
    version = harness_version()
    return [
        TaskResult(
            task=task,
            source=f"lm-eval {version}",
            n=_count(out, task),
            scores=_scores(numbers),
            seconds=seconds / len(out["results"]),
        )
        for task, numbers in out["results"].items()
    ]


def _scores(numbers: dict[str, Any]) -> Scores:
    """The harness's {"acc,none": v, "acc_stderr,none": s, "alias": ...} -> Scores with
    metric names as the built-in scorer writes them (the filter kept where not "none")."""
    metrics, stderr = {}, {}
    for key, value in numbers.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        name = metric if filt == "none" else f"{metric},{filt}"
        metrics[name] = float(value)
        err = numbers.get(f"{metric}_stderr,{filt}")
        stderr[name] = float(err) if isinstance(err, (int, float)) else None
    return Scores(metrics=metrics, stderr=stderr)


def _count(out: dict[str, Any], task: str) -> int:
    samples = out.get("n-samples", {}).get(task)
    if samples is None:  # a group: the sum of its tasks'
        return sum(
            s["effective"]
            for t, s in out.get("n-samples", {}).items()
            if t in out.get("group_subtasks", {}).get(task, [])
        )
    return samples["effective"]

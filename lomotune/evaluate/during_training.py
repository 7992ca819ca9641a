"""`training.eval_tasks`: SuperGLUE tasks scored on their val split at every eval of a
training run, with the same prompts and scoring as `lomotune eval`; any other task by
lm-evaluation-harness, as `lomotune eval` hands it over."""

from __future__ import annotations

from pathlib import Path

import torch

from lomotune.evaluate.harness import evaluate_harness
from lomotune.evaluate.reading import read_split
from lomotune.evaluate.run import evaluate_task
from lomotune.evaluate.superglue import TASKS


def task_metrics(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    superglue_dir: str | None,
    *,
    batch_size: int,
    limit: int | None,
    include_path: str | None = None,
) -> dict[str, float]:
    """{"rte_acc": 0.61, ...}: every metric of every task, prefixed with its name."""
    metrics = {}
    others = [name for name in tasks if name not in TASKS]
    for name in [name for name in tasks if name in TASKS]:
        task = TASKS[name]
        docs, source = read_split(task, "val", Path(superglue_dir) if superglue_dir else None)
        docs = docs[:limit] if limit else docs
        result = evaluate_task(model, tokenizer, task, docs, source=source, batch_size=batch_size)
        metrics.update({f"{name}_{k}": v for k, v in result.scores.metrics.items()})
    if others:
        folder = Path(include_path).expanduser() if include_path else None
        for result in evaluate_harness(
            model, tokenizer, others, batch_size=batch_size, limit=limit, include_path=folder
        ):
            metrics.update({f"{result.task}_{k}": v for k, v in result.scores.metrics.items()})
    return metrics

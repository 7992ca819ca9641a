"""Evaluate a model on SuperGLUE tasks: read, pose, score, measure.

`evaluate_task` reads top to bottom: docs -> (few-shot) contexts and continuations ->
token pairs -> log-likelihoods -> the task's metrics.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lomotune.evaluate.metrics import Scores
from lomotune.evaluate.scoring import encode_pair, loglikelihoods
from lomotune.evaluate.task import Task

FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class TaskResult:
    task: str
    source: str  # the file, folder or hub split the docs came from
    n: int  # docs scored
    scores: Scores
    seconds: float


def fewshot_prefixes(
    task: Task, docs: list[dict], pool: list[dict], k: int, *, same_split: bool
) -> list[str]:
    """k solved examples before each doc, drawn as the harness draws them: one
    random.Random(1234) for the whole task, `sample(pool, k)` per doc in order (k + 1
    with the doc itself removed when the pool is the split being evaluated)."""
    if k == 0:
        return [""] * len(docs)
    rng = random.Random(FEWSHOT_SEED)
    prefixes = []
    for doc in docs:
        if same_split:
            shots = [s for s in rng.sample(pool, k + 1) if s != doc][:k]
        else:
            shots = rng.sample(pool, k)
        prefixes.append(
            "".join(
                task.context(s)
                + task.target_delimiter
                + task.choices(s)[task.gold(s)]
                + FEWSHOT_DELIMITER
                for s in shots
            )
        )
    return prefixes


def pairs_of(task: Task, docs: list[dict], prefixes: list[str]) -> list[tuple[str, str]]:
    """(context, continuation) for every choice of every doc, doc by doc."""
    return [
        (prefix + task.context(doc), task.target_delimiter + choice)
        for doc, prefix in zip(docs, prefixes, strict=True)
        for choice in task.choices(doc)
    ]


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    docs: list[dict],
    *,
    source: str,
    batch_size: int,
    prefixes: list[str] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> TaskResult:
    started = time.perf_counter()
    text_pairs = pairs_of(task, docs, prefixes or [""] * len(docs))
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    token_pairs = [encode_pair(tokenizer, c, t, max_length) for c, t in text_pairs]
    flat = loglikelihoods(
        model,
        token_pairs,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        on_progress=on_progress,
    )
    per_doc, at = [], 0
    for doc in docs:
        n = len(task.choices(doc))
        per_doc.append(flat[at : at + n])
        at += n
    scores = task.scores(docs, per_doc)
    return TaskResult(task.name, source, len(docs), scores, time.perf_counter() - started)


def count_pairs(task: Task, docs: list[dict]) -> int:
    return sum(len(task.choices(doc)) for doc in docs)


def results_json(results: list[TaskResult], config: dict) -> dict:
    """The harness's shape ({"results": {task: {metric: value}}}) plus stderr, sizes,
    timings and every doc's prediction."""
    return {
        "results": {r.task: dict(r.scores.metrics) for r in results},
        "stderr": {r.task: dict(r.scores.stderr) for r in results},
        "n": {r.task: r.n for r in results},
        "sources": {r.task: r.source for r in results},
        "seconds": {r.task: round(r.seconds, 3) for r in results},
        "config": config,
        "predictions": {r.task: r.scores.predictions for r in results},
    }

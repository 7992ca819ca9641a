"""SuperGLUE metrics: accuracy (raw and length-normalised), CB macro-F1, MultiRC F1a and
EM, ReCoRD max-over-gold token F1 and exact match.

Each is written from its definition: the harness's formulas (lm-evaluation-harness
0.4.13 `api/metrics.py`, `super_glue/cb/aggregate.py`, SQuAD normalisation from
`transformers.data.metrics.squad_metrics`) and the SuperGLUE paper's (Wang et al. 2019,
Table 1: MultiRC F1a over all answer options, EM per question).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scores:
    """A task's metrics over its docs: value and standard error (None where the metric
    is not a mean over examples) per metric, and one prediction record per doc."""

    metrics: dict[str, float]
    stderr: dict[str, float | None]
    predictions: list[dict] = field(default_factory=list)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample (n-1) standard deviation, as the
    harness reports it."""
    n = len(values)
    if n < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def normalized_argmax(loglikelihoods: Sequence[float], choices: Sequence[str]) -> int:
    """The harness's acc_norm choice: log-likelihood divided by the choice's length in
    characters."""
    return argmax([ll / len(c) for ll, c in zip(loglikelihoods, choices, strict=True)])


def binary_f1(predicted: Sequence[bool], actual: Sequence[bool]) -> float:
    """F1 of the positive class; 0 when there is no positive at all (sklearn's
    zero_division default)."""
    tp = sum(p and a for p, a in zip(predicted, actual, strict=True))
    fp = sum(p and not a for p, a in zip(predicted, actual, strict=True))
    fn = sum(a and not p for p, a in zip(predicted, actual, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(predictions: Sequence[int], golds: Sequence[int], n_classes: int) -> float:
    """Unweighted mean over classes of each class's one-vs-rest F1 (CB's F1)."""
    return mean(
        [
            binary_f1([p == c for p in predictions], [g == c for g in golds])
            for c in range(n_classes)
        ]
    )


def multirc_scores(
    question_ids: Sequence[str], predictions: Sequence[int], labels: Sequence[int]
) -> tuple[float, float]:
    """(F1a, EM) of MultiRC: F1 of "this answer is correct" over all answer options, and
    the fraction of questions whose every answer option is classified right."""
    f1a = binary_f1([p == 1 for p in predictions], [y == 1 for y in labels])
    right: dict[str, bool] = {}
    for q, p, y in zip(question_ids, predictions, labels, strict=True):
        right[q] = right.get(q, True) and p == y
    return f1a, mean([float(v) for v in right.values()])


def squad_normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD script)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)
    return " ".join(text.split())


def squad_exact(gold: str, prediction: str) -> float:
    return float(squad_normalize(gold) == squad_normalize(prediction))


def squad_f1(gold: str, prediction: str) -> float:
    gold_tokens = squad_normalize(gold).split()
    pred_tokens = squad_normalize(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_golds(metric, prediction: str, golds: Sequence[str]) -> float:
    """ReCoRD scores a prediction against its best-matching gold answer."""
    return max(metric(gold, prediction) for gold in golds)


def choice_scores(
    loglikelihoods: list[list[float]],
    choices: list[list[str]],
    golds: list[int],
    doc_ids: list,
) -> Scores:
    """acc and acc_norm of a multiple-choice task, their standard errors, and one
    prediction record per doc."""
    acc, acc_norm, predictions = [], [], []
    for lls, chs, gold, doc_id in zip(loglikelihoods, choices, golds, doc_ids, strict=True):
        pred, pred_norm = argmax(lls), normalized_argmax(lls, chs)
        acc.append(float(pred == gold))
        acc_norm.append(float(pred_norm == gold))
        predictions.append({"idx": doc_id, "prediction": pred, "gold": gold, "loglikelihoods": lls})
    metrics = {"acc": mean(acc), "acc_norm": mean(acc_norm)}
    stderr = {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}
    return Scores(metrics, stderr, predictions)

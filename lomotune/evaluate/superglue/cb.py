"""CommitmentBank: does the premise commit its author to the hypothesis (three classes)."""

from __future__ import annotations

from lomotune.evaluate.metrics import Scores, choice_scores, macro_f1
from lomotune.evaluate.task import Task, premise_hypothesis

LABELS = ["entailment", "contradiction", "neutral"]  # the hub's class ids, in order


def from_official(record: dict) -> list[dict]:
    return [from_hub(record)]  # the same flat fields; the label is a string there


def from_hub(record: dict) -> dict:
    return premise_hypothesis(record, LABELS)


def context(doc: dict) -> str:
    return f"{doc['premise']}\nQuestion: {doc['hypothesis']}. True, False, or Neither?\nAnswer:"


def choices(doc: dict) -> list[str]:
    return ["True", "False", "Neither"]


def gold(doc: dict) -> int:
    return doc["label"]


def score(docs: list[dict], lls: list[list[float]]) -> Scores:
    scores = choice_scores(
        lls, [choices(d) for d in docs], [gold(d) for d in docs], [d["idx"] for d in docs]
    )
    predicted = [p["prediction"] for p in scores.predictions]
    scores.metrics["f1"] = macro_f1(predicted, [gold(d) for d in docs], len(LABELS))
    scores.stderr["f1"] = None  # not a mean over examples (the harness bootstraps it)
    return scores


TASK = Task("cb", "CB", "cb", from_official, from_hub, context, choices, gold, score)

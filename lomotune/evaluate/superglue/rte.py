"""RTE: does the premise entail the hypothesis (the RTE challenges, as in SuperGLUE)."""

from __future__ import annotations

from lomotune.evaluate.task import Task, premise_hypothesis

LABELS = ["entailment", "not_entailment"]  # the hub's class ids, in order


def from_official(record: dict) -> list[dict]:
    return [from_hub(record)]  # the same flat fields; the label is a string there


def from_hub(record: dict) -> dict:
    return premise_hypothesis(record, LABELS)


def context(doc: dict) -> str:
    return f"{doc['premise']}\nQuestion: {doc['hypothesis']} True or False?\nAnswer:"


def choices(doc: dict) -> list[str]:
    return ["True", "False"]


def gold(doc: dict) -> int:
    return doc["label"]


# The harness names it sglue_rte (its `rte` is GLUE's); lomotune takes `rte`.
TASK = Task("rte", "RTE", "rte", from_official, from_hub, context, choices, gold)

"""BoolQ: a yes/no question about a passage (Clark et al. 2019)."""

from __future__ import annotations

from lomotune.evaluate.task import Task, label_index, require


def from_official(record: dict) -> list[dict]:
    return [from_hub(record)]  # the same flat fields; the label is a boolean there


def from_hub(record: dict) -> dict:
    return {
        "question": require(record, "question", str),
        "passage": require(record, "passage", str),
        "idx": require(record, "idx", int),
        "label": label_index(record),
    }


def context(doc: dict) -> str:
    return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"


def choices(doc: dict) -> list[str]:
    return ["no", "yes"]


def gold(doc: dict) -> int:
    return doc["label"]


TASK = Task("boolq", "BoolQ", "boolq", from_official, from_hub, context, choices, gold)

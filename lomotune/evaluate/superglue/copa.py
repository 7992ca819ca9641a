"""COPA: which of two alternatives is the cause (or effect) of the premise."""

from __future__ import annotations

from lomotune.evaluate.task import MalformedRecord, Task, label_index, require

CONNECTORS = {"cause": "because", "effect": "therefore"}


def from_official(record: dict) -> list[dict]:
    return [from_hub(record)]  # the same fields in both layouts


def from_hub(record: dict) -> dict:
    question = require(record, "question", str)
    if question not in CONNECTORS:
        raise MalformedRecord(f"question {question!r} should be 'cause' or 'effect'")
    return {
        "premise": require(record, "premise", str),
        "choice1": require(record, "choice1", str),
        "choice2": require(record, "choice2", str),
        "question": question,
        "idx": require(record, "idx", int),
        "label": label_index(record),
    }


def context(doc: dict) -> str:
    # The premise's final period gives way to the connector: "The man fell because".
    return doc["premise"].strip()[:-1] + f" {CONNECTORS[doc['question']]}"


def _lower_first(sentence: str) -> str:
    return sentence[0].lower() + sentence[1:]


def choices(doc: dict) -> list[str]:
    # The harness's choices carry a leading space of their own on top of the target
    # delimiter: the continuation starts with two spaces. Kept, to score what it scores.
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


def gold(doc: dict) -> int:
    return doc["label"]


TASK = Task("copa", "COPA", "copa", from_official, from_hub, context, choices, gold)

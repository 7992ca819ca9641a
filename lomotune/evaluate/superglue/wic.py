"""WiC: is a word used in the same sense in two sentences."""

from __future__ import annotations

from lomotune.evaluate.task import Task, label_index, require


def from_official(record: dict) -> list[dict]:
    return [from_hub(record)]  # the same flat fields; the label is a boolean there


def from_hub(record: dict) -> dict:
    return {
        "word": require(record, "word", str),
        "sentence1": require(record, "sentence1", str),
        "sentence2": require(record, "sentence2", str),
        # character offsets of the word in each sentence
        "start1": require(record, "start1", int),
        "start2": require(record, "start2", int),
        "end1": require(record, "end1", int),
        "end2": require(record, "end2", int),
        "idx": require(record, "idx", int),
        "label": label_index(record),
    }


def context(doc: dict) -> str:
    word = doc["sentence1"][doc["start1"] : doc["end1"]]
    return (
        f"Sentence 1: {doc['sentence1']}\nSentence 2: {doc['sentence2']}\n"
        f"Question: Is the word '{word}' used in the same way in the two sentences above?\n"
        "Answer:"
    )


def choices(doc: dict) -> list[str]:
    return ["no", "yes"]


def gold(doc: dict) -> int:
    return doc["label"]


TASK = Task("wic", "WiC", "wic", from_official, from_hub, context, choices, gold)

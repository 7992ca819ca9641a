"""WSC (Winograd schema): does the marked pronoun refer to the marked noun phrase.

The harness reads the hub's `wsc.fixed`, which differs from the official release in the
capitalisation of 8 of the 104 validation texts; read from official files, those 8
prompts differ from the harness's by that capitalisation.
"""

from __future__ import annotations

import re

from lomotune.evaluate.task import Task, label_index, require


def from_official(record: dict) -> list[dict]:
    # The official layout nests the spans under "target"; the hub's are flat.
    target = require(record, "target", dict)
    return [from_hub({**record, **target})]


def from_hub(record: dict) -> dict:
    return {
        "text": require(record, "text", str),
        "span1_index": require(record, "span1_index", int),  # a word index
        "span2_index": require(record, "span2_index", int),
        "span1_text": require(record, "span1_text", str),
        "span2_text": require(record, "span2_text", str),
        "idx": require(record, "idx", int),
        "label": label_index(record),
    }


def detokenize(text: str) -> str:
    """Undo the dataset's spaces before punctuation (the harness's general_detokenize)."""
    text = text.replace(" n't", "n't").replace(" )", ")").replace("( ", "(")
    text = text.replace('" ', '"').replace(' "', '"')
    return re.sub(r" (['.,])", r"\1", text)


def context(doc: dict) -> str:
    # The pronoun is found by its word index and marked with asterisks.
    before = " ".join(doc["text"].split()[: doc["span2_index"]])
    after = doc["text"][len(before) + len(doc["span2_text"]) + 1 :]
    passage = detokenize(before + f" *{doc['span2_text']}*" + after)
    return (
        f"Passage: {passage}\n"
        f'Question: In the passage above, does the pronoun "*{doc["span2_text"]}*" refer to '
        f'"*{doc["span1_text"]}*"?\n'
        "Answer:"
    )


def choices(doc: dict) -> list[str]:
    return ["no", "yes"]


def gold(doc: dict) -> int:
    return doc["label"]


TASK = Task("wsc", "WSC", "wsc.fixed", from_official, from_hub, context, choices, gold)

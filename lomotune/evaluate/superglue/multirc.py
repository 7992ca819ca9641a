"""MultiRC: is a candidate answer to a question about a paragraph correct.

Scored with the official metrics, labels the right way round. lm-evaluation-harness
0.4.13 lists the choices as [".. yes", ".. no"] and takes the label (1 = correct answer)
as the index of the right choice, so it counts "no" as right for correct answers: its
MultiRC acc is one minus the real one. Here the "yes" choice (index 0) is right when the
label is 1.
"""

from __future__ import annotations

from lomotune.evaluate.metrics import Scores, argmax, mean, mean_stderr, multirc_scores
from lomotune.evaluate.task import Task, label_index, require


def from_official(record: dict) -> list[dict]:
    # One official line is a paragraph with its questions, each with its answers.
    paragraph_idx = require(record, "idx", int)
    passage = require(record, "passage", dict)
    text = require(passage, "text", str)
    docs = []
    for question in require(passage, "questions", list):
        for answer in require(question, "answers", list):
            docs.append(
                {
                    "paragraph": text,
                    "question": require(question, "question", str),
                    "answer": require(answer, "text", str),
                    "idx": {
                        "paragraph": paragraph_idx,
                        "question": require(question, "idx", int),
                        "answer": require(answer, "idx", int),
                    },
                    "label": label_index(answer),
                }
            )
    return docs


def from_hub(record: dict) -> dict:
    idx = require(record, "idx", dict)
    return {
        "paragraph": require(record, "paragraph", str),
        "question": require(record, "question", str),
        "answer": require(record, "answer", str),
        "idx": {key: require(idx, key, int) for key in ("paragraph", "question", "answer")},
        "label": label_index(record),
    }


def context(doc: dict) -> str:
    return f"{doc['paragraph']}\nQuestion: {doc['question']}\nAnswer:"


def choices(doc: dict) -> list[str]:
    return [
        f"{doc['answer']}\nIs the answer correct? yes",
        f"{doc['answer']}\nIs the answer correct? no",
    ]


def gold(doc: dict) -> int:
    return 0 if doc["label"] == 1 else 1  # "yes" for a correct answer


def score(docs: list[dict], lls: list[list[float]]) -> Scores:
    predicted_correct = [int(argmax(ll) == 0) for ll in lls]
    labels = [d["label"] for d in docs]
    question_ids = [f"{d['idx']['paragraph']}-{d['idx']['question']}" for d in docs]
    f1a, em = multirc_scores(question_ids, predicted_correct, labels)
    acc = [float(p == y) for p, y in zip(predicted_correct, labels, strict=True)]
    predictions = [
        {"idx": d["idx"], "prediction": p, "gold": d["label"], "loglikelihoods": ll}
        for d, p, ll in zip(docs, predicted_correct, lls, strict=True)
    ]
    return Scores(
        {"acc": mean(acc), "f1a": f1a, "em": em},
        {"acc": mean_stderr(acc), "f1a": None, "em": None},
        predictions,
    )


TASK = Task("multirc", "MultiRC", "multirc", from_official, from_hub, context, choices, gold, score)

"""ReCoRD: which entity of a news passage fills the @placeholder of a cloze query.

Scored as the harness does: the most likely entity is the prediction, token F1 and
exact match against the best-matching gold answer, averaged over queries.
"""

from __future__ import annotations

from lomotune.evaluate.metrics import (
    Scores,
    argmax,
    max_over_golds,
    mean,
    mean_stderr,
    squad_exact,
    squad_f1,
)
from lomotune.evaluate.task import MalformedRecord, Task, require


def from_official(record: dict) -> list[dict]:
    # One official line is a passage (entities as character spans, end inclusive) with
    # its queries ("qas"), each with its answers.
    passage_idx = require(record, "idx", int)
    passage = require(record, "passage", dict)
    text = require(passage, "text", str)
    entities = [
        text[require(span, "start", int) : require(span, "end", int) + 1]
        for span in require(passage, "entities", list)
    ]
    return [
        _doc(
            text,
            require(qa, "query", str),
            entities,
            [require(answer, "text", str) for answer in require(qa, "answers", list)],
            {"passage": passage_idx, "query": require(qa, "idx", int)},
        )
        for qa in require(record, "qas", list)
    ]


def from_hub(record: dict) -> dict:
    idx = require(record, "idx", dict)
    return _doc(
        require(record, "passage", str),
        require(record, "query", str),
        require(record, "entities", list),
        require(record, "answers", list),
        {key: require(idx, key, int) for key in ("passage", "query")},
    )


def _doc(passage: str, query: str, entities: list, answers: list, idx: dict) -> dict:
    # The harness sorts and de-duplicates both lists (its process_docs); so do we.
    if not answers:
        raise MalformedRecord("no answers (a test split has none: evaluate on val or train)")
    entities, answers = sorted(set(entities)), sorted(set(answers))
    if answers[0] not in entities:
        raise MalformedRecord(f"answer {answers[0]!r} is not one of the passage's entities")
    return {
        "passage": passage,
        "query": query,
        "entities": entities,
        "answers": answers,
        "idx": idx,
    }


def context(doc: dict) -> str:
    article, *highlights = doc["passage"].strip().split("\n@highlight\n")
    return article + "\n\n" + "".join(f"  - {highlight}.\n" for highlight in highlights)


def choices(doc: dict) -> list[str]:
    return [f"  - {doc['query']}".replace("@placeholder", entity) for entity in doc["entities"]]


def gold(doc: dict) -> int:
    return doc["entities"].index(doc["answers"][0])


def score(docs: list[dict], lls: list[list[float]]) -> Scores:
    f1, em, predictions = [], [], []
    for doc, ll in zip(docs, lls, strict=True):
        entity = doc["entities"][argmax(ll)]
        f1.append(max_over_golds(squad_f1, entity, doc["answers"]))
        em.append(max_over_golds(squad_exact, entity, doc["answers"]))
        predictions.append(
            {"idx": doc["idx"], "prediction": entity, "gold": doc["answers"], "loglikelihoods": ll}
        )
    return Scores(
        {"f1": mean(f1), "em": mean(em)},
        {"f1": mean_stderr(f1), "em": mean_stderr(em)},
        predictions,
    )


TASK = Task("record", "ReCoRD", "record", from_official, from_hub, context, choices, gold, score)

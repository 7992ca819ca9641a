"""What a SuperGLUE task is to the evaluator, and the errors its data can raise.

A task's examples ("docs") are plain dicts in the flat field layout of the hub dataset
`aps/super_glue` (the layout lm-evaluation-harness templates read): the official JSONL
layout is converted into it when read, so that one template serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lomotune.errors import LomotuneError
from lomotune.evaluate.metrics import Scores, choice_scores


class EvalDataError(LomotuneError):
    """Data that cannot be evaluated (a missing folder, a malformed line, an unknown
    task); the message names the file and line and says how to fix it."""


class MalformedRecord(ValueError):
    """One record that does not have the fields or values its task needs; the reader
    adds the file and line."""


@dataclass(frozen=True)
class Task:
    """One SuperGLUE task as lm-evaluation-harness 0.4.13 poses it (`doc_to_text`,
    `doc_to_choice`, `doc_to_target`, target delimiter " ") plus its two readers."""

    name: str  # the harness's task name, lower case (its RTE is `sglue_rte`)
    official_folder: str  # BoolQ, CB, ...: the official release's folder name
    hub_config: str  # the config of `aps/super_glue` the harness reads
    from_official: Callable[[dict], list[dict]]  # one official line -> its docs
    from_hub: Callable[[dict], dict]  # one hub row -> its doc (validated)
    context: Callable[[dict], str]  # doc_to_text
    choices: Callable[[dict], list[str]]  # doc_to_choice (without the delimiter)
    gold: Callable[[dict], int]  # index of the right choice
    # docs, their choices' log-likelihoods -> metrics; None: acc and acc_norm
    score: Callable[[list[dict], list[list[float]]], Scores] | None = None
    target_delimiter: str = " "

    def scores(self, docs: list[dict], loglikelihoods: list[list[float]]) -> Scores:
        if self.score is not None:
            return self.score(docs, loglikelihoods)
        return choice_scores(
            loglikelihoods,
            [self.choices(d) for d in docs],
            [self.gold(d) for d in docs],
            [d["idx"] for d in docs],
        )


def require(record: dict, key: str, kind: type | tuple[type, ...]):
    """record[key], checked to be of `kind`; MalformedRecord naming the field if not."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise MalformedRecord(f"missing field {key!r}")
    value = record[key]
    # bool is an int in Python: a boolean where a number is wanted is malformed.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise MalformedRecord(
            f"field {key!r} should be {_kind_name(kind)}, got {type(value).__name__} {value!r}"
        )
    return value


def label_index(record: dict, names: list[str] | None = None) -> int:
    """The official `label` (a string of `names`, a boolean, or an int) or the hub's
    class id, as the hub's class id. A test split's missing label is an error."""
    if "label" not in record:
        raise MalformedRecord(
            "missing field 'label' (a test split has no labels: evaluate on val or train)"
        )
    value = record["label"]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and names is not None:
        if value not in names:
            raise MalformedRecord(f"label {value!r} is not one of {names}")
        return names.index(value)
    n_classes = len(names) if names is not None else 2
    if isinstance(value, int) and 0 <= value < n_classes:
        return value
    if value == -1:
        raise MalformedRecord("label is -1 (a test split has no labels: evaluate on val or train)")
    raise MalformedRecord(f"label {value!r} is not a class of this task ({names or [0, 1]})")


def premise_hypothesis(record: dict, labels: list[str]) -> dict:
    """The doc of an entailment task (CB, RTE): the same flat fields in both layouts,
    the label a string of `labels` in the official one, its index in the hub's."""
    return {
        "premise": require(record, "premise", str),
        "hypothesis": require(record, "hypothesis", str),
        "idx": require(record, "idx", int),
        "label": label_index(record, labels),
    }


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))

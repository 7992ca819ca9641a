"""Generated datasets, `data.source: builtin:NAME`: no file, no download, and a task whose
answers can be checked exactly, so a run shows whether the model learnt.

Every generator is a pure function of (number of examples, seed) and returns rows with the
fields `prompt` and `completion`; prompts are unique, so the held-out split never repeats
a training question. The completion starts with a space: it follows "Answer:" and is
tokenized on its own, as a model's generated answer would be.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable

from lomotune.data.errors import DataError

Row = dict[str, str]


def dates(n: int, seed: int) -> list[Row]:
    """YYYY-MM-DD -> DD/MM/YYYY. The quickstart's task: SmolLM2-135M-Instruct gets 0/40
    before training and about 30/40 after 30 fused-SGD steps at lr 3e-3 (DESIGN.md)."""
    first = datetime.date(1900, 1, 1).toordinal()
    last = datetime.date(2099, 12, 31).toordinal()
    # Sampling ordinals (not year, month, day separately) gives valid days only, leap
    # years included, and every date the same chance.
    days = _unique(n, seed, lambda rng: rng.randint(first, last), last - first + 1, "dates")
    rows = []
    for ordinal in days:
        d = datetime.date.fromordinal(ordinal)
        rows.append(
            {
                "prompt": f"Rewrite the date {d:%Y-%m-%d} in the form DD/MM/YYYY.\nAnswer:",
                "completion": f" {d.day:02d}/{d.month:02d}/{d.year:04d}",
            }
        )
    return rows


def arithmetic(n: int, seed: int) -> list[Row]:
    """Sums and differences of two numbers below 100; differences are never negative."""

    def draw(rng: random.Random) -> tuple[int, str, int]:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            return a, "+", b
        return max(a, b), "-", min(a, b)

    # 100*100 sums + 5050 ordered differences.
    questions = _unique(n, seed, draw, 100 * 100 + 5050, "arithmetic")
    rows = []
    for a, op, b in questions:
        value = a + b if op == "+" else a - b
        rows.append({"prompt": f"What is {a} {op} {b}?\nAnswer:", "completion": f" {value}"})
    return rows


GENERATORS: dict[str, Callable[[int, int], list[Row]]] = {
    "dates": dates,
    "arithmetic": arithmetic,
}


def generate(name: str, n: int, seed: int) -> list[Row]:
    if name not in GENERATORS:
        known = ", ".join(f"builtin:{k}" for k in GENERATORS)
        raise DataError(
            f"data.source: there is no built-in dataset {name!r}. Built-in datasets: {known}; "
            "or give a file (.jsonl, .json, .csv, .parquet) or hub:org/name"
        )
    return GENERATORS[name](n, seed)


def _unique(n: int, seed: int, draw: Callable, possible: int, name: str) -> list:
    if n > possible // 2:
        # Past half of the space, rejection sampling slows down and the task becomes a
        # lookup table; no recipe needs that many.
        raise DataError(
            f"data.num_examples: builtin:{name} has only {possible} distinct examples; "
            f"ask for at most {possible // 2} (got {n})"
        )
    rng = random.Random(seed)
    seen: set = set()
    out = []
    while len(out) < n:
        item = draw(rng)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out

"""`data.source: superglue:<task>`: a SuperGLUE split as prompt-completion rows to train
on, posed exactly as `lomotune eval` poses it (lm-evaluation-harness 0.4.13 prompts): the
prompt is the task's context, the completion the target delimiter and the right choice,
so the loss falls on the answer only.

The files come from `data.superglue_dir` (official or hub layout, as `--data-dir`), or
the hub dataset `aps/super_glue` when it is not set. The train split is capped at
`data.num_examples` by a seed-0 sample, as the LOMO repository samples its 1000.
"""

from __future__ import annotations

import random
from pathlib import Path

from lomotune.data.errors import DataError
from lomotune.data.sources import RawRows, Row
from lomotune.evaluate.reading import read_split
from lomotune.evaluate.superglue import TASKS
from lomotune.evaluate.task import EvalDataError

PREFIX = "superglue:"
SAMPLE_SEED = 0


def read_superglue(
    source: str, split: str, superglue_dir: str | None, *, max_examples: int | None
) -> RawRows:
    """Rows {"prompt", "completion"} of `split` (val, train) of the task `source` names."""
    name = source.removeprefix(PREFIX)
    if name not in TASKS:
        raise DataError(
            f"data.source: {source}: no SuperGLUE task {name!r}; choose one of "
            + ", ".join(f"superglue:{t}" for t in TASKS)
        )
    task = TASKS[name]
    try:
        docs, origin = read_split(task, split, Path(superglue_dir) if superglue_dir else None)
    except EvalDataError as e:
        raise DataError(f"data.source: {source}: {e} (data.superglue_dir, data.split)") from None
    if max_examples is not None and len(docs) > max_examples:
        keep = random.Random(SAMPLE_SEED).sample(range(len(docs)), max_examples)
        docs = [docs[i] for i in keep]
    rows = [
        Row(
            i + 1,
            {
                "prompt": task.context(doc),
                "completion": task.target_delimiter + task.choices(doc)[task.gold(doc)],
            },
        )
        for i, doc in enumerate(docs)
    ]
    return RawRows(origin, "example", rows)

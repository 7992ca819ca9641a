"""The eight SuperGLUE tasks, as lm-evaluation-harness 0.4.13 poses them (tag
`super-glue-lm-eval-v1`), one module each."""

from __future__ import annotations

from lomotune.evaluate.superglue import boolq, cb, copa, multirc, record, rte, wic, wsc
from lomotune.evaluate.task import EvalDataError, Task

TASKS: dict[str, Task] = {
    m.TASK.name: m.TASK for m in (boolq, cb, copa, multirc, record, rte, wic, wsc)
}
ALL = "superglue"  # --tasks superglue: all eight


def select_tasks(names: str) -> list[Task]:
    """'boolq,cb' or 'superglue' -> the tasks, in the order given."""
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    if wanted == [ALL]:
        return list(TASKS.values())
    unknown = [n for n in wanted if n not in TASKS]
    if unknown or not wanted:
        raise EvalDataError(
            f"unknown task {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(TASKS)}, or {ALL} for all eight"
        )
    return [TASKS[n] for n in wanted]

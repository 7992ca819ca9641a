"""What `lomotune eval` shows while it scores and when it is done: a progress bar with
an ETA on a terminal, plain lines otherwise; a table of the results."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lomotune.evaluate.run import TaskResult


class ScoringProgress:
    """Counts scored (context, choice) pairs of one task at a time. A rich bar with
    ETA when stderr is a terminal; else a line per task and about every 10% of it."""

    def __init__(self, live: bool | None = None) -> None:
        self.console = Console(stderr=True)
        self.live = sys.stderr.isatty() if live is None else live
        self._bar: Progress | None = None

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def start(self, task: str, total: int) -> None:
        self.task, self.total, self.done, self.next_line = task, total, 0, 0.1
        self.started = time.perf_counter()
        if self.live:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._id = self._bar.add_task(f"{task:8s}", total=total)
        else:
            print(f"eval {task}: scoring {total} choices", file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._id, completed=self.done)
        elif self.done >= self.next_line * self.total and self.done < self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            print(
                f"eval {self.task}: {self.done}/{self.total} choices, {elapsed:.0f}s, "
                f"eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            self.next_line = (self.done / self.total // 0.1 + 1) * 0.1

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elapsed = time.perf_counter() - self.started
        print(f"eval {self.task}: done in {elapsed:.1f}s", file=sys.stderr, flush=True)


def results_table(results: list[TaskResult]) -> Table:
    table = Table("task", "metric", "value", "n", "stderr", "source")
    for r in results:
        for metric, value in r.scores.metrics.items():
            stderr = r.scores.stderr.get(metric)
            table.add_row(
                r.task,
                metric,
                f"{value:.4f}",
                str(r.n),
                "-" if stderr is None else f"{stderr:.4f}",
                r.source,
            )
    return table

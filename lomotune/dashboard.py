"""What a training run shows and records: a live terminal view and a metrics log.

`Dashboard` draws a rich Live view (progress, current numbers, a loss sparkline,
warnings) when stdout is a terminal, and one plain line per logged step otherwise (CI
logs, `| tee`, files). Built with `enabled=False` (every rank but 0) it does nothing.

`MetricsLog` appends one JSON object per line to `metrics.jsonl`; `read_metrics` reads it
back, tolerating a last line cut short by a crash; `truncate_metrics` rewinds it to a
checkpoint's step on resume.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from lomotune.errors import EXIT_FAILED, LomotuneError
from lomotune.monitor import format_bytes

METRICS_FILE = "metrics.jsonl"
SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 60
MAX_WARNINGS = 5
LOSS_EMA_BETA = 0.9


# ---------------------------------------------------------------------------------------
# Formatting (shared by the plain lines, the live table and the summary)


def format_duration(seconds: float) -> str:
    """151 -> '2m31s', 3725 -> '1h02m05s', 4.2 -> '4.2s'."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def _format_value(key: str, value: Any) -> str:
    """Format one metric by what its name says it is."""
    if value is None:
        return "-"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, dict):  # a breakdown (memory parts): each value as its key says
        return ", ".join(f"{k} {_format_value(key, v)}" for k, v in value.items())
    if not isinstance(value, (int, float)):
        return str(value)
    if key.startswith("mem") or "memory" in key or key.endswith("_bytes"):
        return format_bytes(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key == "lr" or key.endswith("_lr"):
        return f"{value:.1e}"
    if "tokens_per_s" in key or key in ("tgs",):
        return f"{value:,.0f}"
    if key.endswith("time") or key.endswith("_s") or key.endswith("seconds"):
        return format_duration(value) if value >= 60 else f"{value:.2f} s"
    if key == "loss_scale":
        return f"{value:g}"
    if "loss" in key:
        return f"{value:.4f}"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


_LABELS = {
    "loss": "loss",
    "loss_smooth": "loss (smoothed)",
    "lr": "lr",
    "tokens_per_s": "tokens/s",
    "step_time": "step time",
    "grad_norm": "grad norm",
    "skipped_steps": "skipped steps",
    "loss_scale": "loss scale",
    "eval_loss": "eval loss",
    "final_loss": "final loss",
    "final_loss_smoothed": "final loss (smoothed)",
    "last_step_loss": "last step's loss",
    "accuracy_before": "exact match before",
    "accuracy_after": "exact match after",
    "mean_tokens_per_s": "mean tokens/s",
    "peak_memory": "peak memory",
    "mem_peak": "peak memory",
    "mem_current": "memory",
    "mem_kind": "memory kind",
    "peak_memory_predicted": "peak memory predicted (tensors)",
    "peak_memory_predicted_parts": "predicted, by part",
    "peak_memory_predicted_at": "predicted peak at",
    "peak_memory_above_start": "peak memory above start",
    "wall_time": "wall time",
    "mfu": "MFU",
}


def _label(key: str) -> str:
    return _LABELS.get(key, key.replace("_", " "))


def sparkline(values: Iterable[float], width: int = SPARK_POINTS) -> str:
    """The last `width` finite values as block characters, scaled min..max."""
    points = [v for v in values if math.isfinite(v)][-width:] if width > 0 else []
    if not points:
        return ""
    lo, hi = min(points), max(points)
    if hi == lo:
        return SPARK_CHARS[len(SPARK_CHARS) // 2] * len(points)
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[round((v - lo) / (hi - lo) * top)] for v in points)


class _Sparkline:
    """A loss curve that fits whatever width the terminal gives it."""

    def __init__(self, values: deque[float]):
        self.values = values

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        finite = [v for v in self.values if math.isfinite(v)]
        if not finite:
            yield Text("loss: (no steps yet)", style="dim")
            return
        label = f"loss {min(finite):.3f}..{max(finite):.3f} "
        room = options.max_width - len(label)
        if room < 8:  # too narrow for a label: the curve alone
            label, room = "", options.max_width
        line = Text(label, style="dim")
        line.append(sparkline(finite, min(room, SPARK_POINTS)), style="cyan")
        yield line


class _Numbers:
    """`label  value` rows. On a narrow terminal the labels are cut first, the numbers
    last (a rich Table would shrink both)."""

    def __init__(self, rows: list[tuple[str, str]]):
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        value_width = max(len(value) for _, value in self.rows)
        label_width = max(len(label) for label, _ in self.rows)
        label_width = max(0, min(label_width, options.max_width - value_width - 3))
        for label, value in self.rows:
            if len(label) > label_width:
                label = label[: max(0, label_width - 1)] + "…" if label_width else ""
            line = Text(" ")
            line.append(label.ljust(label_width), style="dim")
            line.append("  " + value.rjust(value_width))
            line.no_wrap, line.overflow = True, "ellipsis"
            yield line


# ---------------------------------------------------------------------------------------
# Dashboard


class Dashboard:
    """Training progress for people. Use as a context manager around the loop.

    live=None picks the Live view only when the console is a (non-dumb) terminal.
    enabled=False turns every method into a no-op (for ranks other than 0).
    """

    def __init__(
        self,
        total_steps: int,
        title: str,
        live: bool | None = None,
        enabled: bool = True,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
        log_every: int = 1,
    ):
        self.total_steps = total_steps
        self.log_every = log_every  # a step line is shown every log_every steps and the last
        self.title = title
        self.enabled = enabled
        self.console = console if console is not None else Console()
        if live is None:
            live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.live = bool(live) and enabled
        self.refresh_per_second = refresh_per_second

        self.step = 0
        self.metrics: dict[str, Any] = {}
        self.eval_metrics: dict[str, Any] = {}
        self.eval_step: int | None = None
        self.losses: deque[float] = deque(maxlen=SPARK_POINTS)
        self.warnings: deque[str] = deque(maxlen=MAX_WARNINGS)
        self._loss_ema = 0.0
        self._loss_count = 0
        # (wall time, step) of recent updates: the ETA comes from measured wall time,
        # evaluation and checkpoint pauses included.
        self._recent: deque[tuple[float, int]] = deque(maxlen=20)

        self._live: Live | None = None
        self._progress: Progress | None = None
        self._task = None

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Dashboard:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=None),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                auto_refresh=False,
                expand=True,
            )
            self._task = self._progress.add_task("steps", total=self.total_steps)
            # redirect_stdout/err: stray prints (a library's progress lines) go above the
            # live view instead of breaking it.
            self._live = Live(
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                get_renderable=self._render,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # -- updates ----------------------------------------------------------------------

    def update_step(self, step: int, metrics: dict[str, Any], *, show: bool = True) -> None:
        """Record a step (every step: the smoothed loss must not depend on how often
        lines are shown); print or refresh only when `show`."""
        if not self.enabled:
            return
        self.step = step
        self.metrics = dict(metrics)
        loss = metrics.get("loss")
        if loss is not None:
            loss = float(loss)
            self.losses.append(loss)
            if math.isfinite(loss):
                self._loss_ema = LOSS_EMA_BETA * self._loss_ema + (1 - LOSS_EMA_BETA) * loss
                self._loss_count += 1
        self._recent.append((time.monotonic(), step))
        if not show:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step)
        if self._live is None:
            self.console.print(
                self.format_step_line(), markup=False, highlight=False, soft_wrap=True
            )

    def update_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.eval_step = step
        self.eval_metrics = dict(metrics)
        if self._live is None:
            parts = [f"eval step {step}/{self.total_steps}"]
            parts += [f"{_label(k)} {_format_value(k, v)}" for k, v in metrics.items()]
            self.console.print(" | ".join(parts), markup=False, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        if not self.enabled:
            return
        if self._live is None:
            self.console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            self.warnings.append(message)

    def note(self, message: str) -> None:
        """An info line; with the live view on, it is printed above it (and stays)."""
        if not self.enabled:
            return
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.live:
            table = Table(title=f"{self.title}: summary", show_header=False, expand=False)
            table.add_column("what", style="bold")
            table.add_column("value", justify="right")
            for key, value in summary.items():
                table.add_row(_label(key), _format_value(key, value))
            self.console.print(table)
        else:
            self.console.print("summary:", highlight=False)
            for key, value in summary.items():
                self.console.print(
                    f"  {_label(key)}: {_format_value(key, value)}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )

    # -- the MetricLogger interface (lomotune.loggers) -----------------------------------

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # the title and the notes say what runs; the recipe is recipe.yaml

    def log_dict(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if kind == "eval":
            self.update_eval(step, metrics)
            return
        show = step % self.log_every == 0 or step == self.total_steps
        self.update_step(step, metrics, show=show)

    def log_summary(self, step: int | None, summary: dict[str, Any]) -> None:
        self.summary(summary_shown(summary))

    def close(self) -> None:
        self.__exit__(None, None, None)

    # -- derived numbers ----------------------------------------------------------------

    @property
    def smoothed_loss(self) -> float | None:
        """EMA of the loss, bias-corrected for its zero start (as nanoGPT/nanochat do)."""
        if self._loss_count == 0:
            return None
        return self._loss_ema / (1 - LOSS_EMA_BETA**self._loss_count)

    def eta_seconds(self) -> float | None:
        """Remaining steps times the measured wall time per step (recent updates), or
        the reported step time while only one update has been seen."""
        remaining = self.total_steps - self.step
        if remaining <= 0:
            return 0.0
        if len(self._recent) >= 2:
            (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
            if s1 > s0 and t1 > t0:
                return remaining * (t1 - t0) / (s1 - s0)
        step_time = self.metrics.get("step_time")
        return None if step_time is None else remaining * float(step_time)

    def format_step_line(self) -> str:
        """`step 12/200 | loss 1.2345 | lr 3.0e-04 | 1,234 tok/s | mem ... | eta 2m31s`;
        fields that were not reported are left out, never made up."""
        m = self.metrics
        parts = [f"step {self.step}/{self.total_steps}"]
        if m.get("loss") is not None:
            parts.append(f"loss {_format_value('loss', float(m['loss']))}")
        if m.get("lr") is not None:
            parts.append(f"lr {float(m['lr']):.1e}")
        if m.get("tokens_per_s") is not None:
            tokens = f"{float(m['tokens_per_s']):,.0f} tok/s"
            if m.get("tokens_per_s_per_process") is not None:  # several processes
                tokens += f" ({float(m['tokens_per_s_per_process']):,.0f} per process)"
            parts.append(tokens)
        if m.get("mem_current") is not None:
            mem = f"mem {format_bytes(m['mem_current'])}"
            extra = []
            if m.get("mem_peak_spread") is not None:  # several processes
                extra.append(
                    f"peak {format_bytes(m['mem_peak'])} max over processes, spread "
                    f"{format_bytes(m['mem_peak_spread'])}"
                )
            elif m.get("mem_peak") is not None:
                extra.append(f"peak {format_bytes(m['mem_peak'])}")
            if m.get("mem_kind"):
                extra.append(str(m["mem_kind"]))
            parts.append(mem + (f" ({', '.join(extra)})" if extra else ""))
        if m.get("step_time") is not None:
            parts.append(f"{float(m['step_time']):.2f} s/step")
        if m.get("mfu") is not None:
            parts.append(f"MFU {_format_value('mfu', float(m['mfu']))}")
        if m.get("grad_norm") is not None:
            parts.append(f"grad norm {float(m['grad_norm']):.3g}")
        if m.get("loss_scale") is not None:
            parts.append(f"loss scale {float(m['loss_scale']):g}")
        if m.get("skipped_steps"):
            parts.append(f"skipped {int(m['skipped_steps'])}")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    # -- live rendering -------------------------------------------------------------------

    def _numbers_table(self) -> _Numbers:
        m = self.metrics
        rows: list[tuple[str, str]] = [
            ("loss", _format_value("loss", m.get("loss"))),
            ("loss (smoothed)", _format_value("loss", self.smoothed_loss)),
            ("lr", _format_value("lr", m.get("lr"))),
            ("tokens/s", _format_value("tokens_per_s", m.get("tokens_per_s"))),
            ("step time", _format_value("step_time", m.get("step_time"))),
        ]
        if m.get("tokens_per_s_per_process") is not None:
            rows.append(
                (
                    "tokens/s per process",
                    _format_value("tokens_per_s", m["tokens_per_s_per_process"]),
                )
            )
        kind = f" ({m['mem_kind']})" if m.get("mem_kind") else ""
        rows.append(("memory" + kind, _format_value("mem_current", m.get("mem_current"))))
        if m.get("mem_peak_spread") is not None:
            rows.append(
                ("peak memory, max over processes" + kind, _format_value("mem_peak", m["mem_peak"]))
            )
            rows.append(
                (
                    "peak memory spread over processes",
                    _format_value("mem_peak", m["mem_peak_spread"]),
                )
            )
        else:
            rows.append(("peak memory" + kind, _format_value("mem_peak", m.get("mem_peak"))))
        for key in ("mfu", "grad_norm", "loss_scale", "skipped_steps"):
            if m.get(key) is not None:
                rows.append((_label(key), _format_value(key, m[key])))
        if self.eval_step is not None:
            for key, value in self.eval_metrics.items():
                rows.append((f"{_label(key)} @ {self.eval_step}", _format_value(key, value)))
        else:
            rows.append(("eval loss", "-"))

        return _Numbers(rows)

    def _render(self) -> Group:
        parts: list[Any] = [Text(self.title, style="bold", overflow="ellipsis", no_wrap=True)]
        if self._progress is not None:
            parts.append(self._progress)
        parts.append(self._numbers_table())
        parts.append(_Sparkline(self.losses))
        if self.warnings:
            body = Text("\n".join(self.warnings), style="yellow")
            parts.append(Panel(body, title="warnings", border_style="yellow"))
        return Group(*parts)


# ---------------------------------------------------------------------------------------
# Metrics log


class MetricsError(LomotuneError):
    """A metrics file that cannot be read; the message names the file and the line."""

    exit_code = EXIT_FAILED  # `plot` reports it as a PlotError (2); a resume stops with 1


def _json_default(value: Any) -> Any:
    # Tensors and numpy scalars: .item() gives the Python number.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the metrics log: {value!r}")


class MetricsLog:
    """Appends records to a JSON-lines file (`path`, conventionally run_dir/metrics.jsonl).

    Each record has `kind` ("train", "eval" or "summary"), `step` and `time` (Unix
    seconds), then the metrics. Every write is flushed, so a crash loses at most the line
    being written. Opening an existing file appends (resume); a partial last line left by
    a crash is cut off first so that the next record starts on its own line.
    Non-finite losses are written as NaN/Infinity (Python's json reads them back).
    With enabled=False (ranks other than 0) nothing is opened or written.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if not enabled:  # ranks other than 0 write nothing
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        # held open for the run (closed by close() / __exit__), flushed every write
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, kind: str, step: int | None, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()

    def train(self, step: int, metrics: dict[str, Any]) -> None:
        self.write("train", step, metrics)

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        self.write("eval", step, metrics)

    def summary(self, step: int | None, summary: dict[str, Any]) -> None:
        self.write("summary", step, summary)

    # the MetricLogger interface (lomotune.loggers)
    def log_config(self, config: dict[str, Any]) -> None:
        pass  # the resolved recipe is recipe.yaml, beside this file

    def log_dict(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        self.write(kind, step, metrics)

    def log_summary(self, step: int | None, summary: dict[str, Any]) -> None:
        self.summary(step, summary)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file. A last line that does not parse (a crash mid-write)
    is skipped; a bad line anywhere else is an error."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # cut short by a crash while it was being written
            raise MetricsError(f"{path}, line {number}: not a JSON object ({e})") from e
        if not isinstance(record, dict):
            raise MetricsError(f"{path}, line {number}: expected a JSON object, got {line!r}")
        records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Rewrite `path` atomically (temp file + os.replace) keeping the records with
    step <= `step` and those with no step, but no summary. Returns the number kept."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = [
        r
        for r in read_metrics(path)
        if r.get("kind") != "summary" and (r.get("step") is None or r["step"] <= step)
    ]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(kept)


def summary_shown(summary: dict[str, Any]) -> dict[str, Any]:
    """The few lines printed at the end of a run, each under 80 columns; summary.json
    holds every number (the estimate's parts, the peak per process, ...)."""
    s = summary
    shown: dict[str, Any] = {"method": s["method"], "steps": s["steps"]}
    if s.get("final_loss") is not None:
        shown["final_loss_smoothed"] = s["final_loss"]
    shown["last_step_loss"] = s.get("last_loss")
    for key in ("eval_loss", "accuracy_before", "accuracy_after"):
        if s.get(key) is not None:
            shown[key] = s[key]
    tokens = f"{s['tokens_per_s'] or 0:,.0f}"
    if s["world_size"] > 1:
        tokens += f" ({s['tokens_per_s_per_process']:,.0f} a process, {s['world_size']} processes)"
    shown["tokens_per_s"] = tokens
    peak = f"{format_bytes(s['peak_memory'])} ({s['memory_kind']})"
    predicted = s.get("peak_memory_predicted")
    if s["memory_kind"].startswith("cuda") and predicted is not None:
        peak += f", predicted {format_bytes(predicted)}"
    shown["peak_memory"] = peak
    if s["world_size"] > 1:  # the peak above is the largest of any process
        shown["peak_memory_spread"] = f"{format_bytes(s['peak_memory_spread'])} over the processes"
    if s.get("step_memory") is not None:  # a CPU run: RSS's rise within a step
        shown["step_memory"] = (
            f"{format_bytes(s['step_memory'])}, predicted {format_bytes(s['step_memory_predicted'])}"
        )
    if s.get("skipped_steps"):
        shown["skipped_steps"] = s["skipped_steps"]
    shown["wall_time"] = s["wall_time"]
    shown["model_dir"] = s["model_dir"]
    return shown

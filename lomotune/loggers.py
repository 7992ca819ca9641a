"""Where a run's numbers go: one interface, one class per backend.

A run logs each thing once per site (step metrics, eval results, the summary, the
resolved recipe as config) to a `Loggers`, which hands it to every backend asked for
in `training.loggers`:

    jsonl        metrics.jsonl in the run folder (always on; `MetricsLog`)
    tensorboard  event files under run_folder/tensorboard (`lomotune[tensorboard]`)
    wandb        Weights & Biases; offline (run_folder/wandb) unless logged in or
                 WANDB_MODE says otherwise (`lomotune[wandb]`)

The dashboard is one more backend. Only rank 0 logs: every other rank gets no backend.
As torchtune's MetricLoggerInterface and litgpt's choose_logger: a new backend is one
class here and its entry in `LOGGERS` (the recipe accepts the names found there).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TENSORBOARD_DIR = "tensorboard"


class MetricLogger(Protocol):
    """What a run logs to. `kind` is "train" (a step) or "eval" (held-out numbers)."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_dict(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None: ...

    def log_summary(self, step: int | None, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def logger_problems(names: list[str]) -> list[str]:
    """One recipe problem per unknown logger name, and per logger whose package is not
    installed (naming the pip command)."""
    problems = []
    for name in names:
        backend = LOGGERS.get(name)
        if backend is None:
            close = difflib.get_close_matches(name, list(LOGGERS), n=1)
            hint = f"did you mean {close[0]}?" if close else f"choose from {', '.join(LOGGERS)}"
            problems.append(f"training.loggers: unknown logger {name!r}; {hint}")
        elif backend.module is not None and importlib.util.find_spec(backend.module) is None:
            problems.append(
                f"training.loggers: {name} needs the {backend.module} package; {backend.pip}"
            )
    return problems


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite-or-not real numbers of a record (None, strings and lists are left out:
    TensorBoard scalars and W&B charts take numbers)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    """Scalars as `train/<key>`, `eval/<key>`, `summary/<key>`; the recipe as text."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events written after the checkpoint's step (by the interrupted run)
        # are purged, so that TensorBoard shows one curve, as metrics.jsonl does.
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log_config(self, config: dict[str, Any]) -> None:
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("recipe", f"```\n{text}\n```", 0)

    def log_dict(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def log_summary(self, step: int | None, summary: dict[str, Any]) -> None:
        for key, value in _numbers(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step or 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; else online only where W&B credentials exist (no prompt,
    no network: an offline run folder can be uploaded later with `wandb sync`)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class WandbLogger:
    """A W&B run in the run folder (run_folder/wandb), named after the run folder."""

    def __init__(self, output_dir: Path, project: str = "lomotune"):
        import wandb

        self.mode = wandb_mode()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", project),
            name=output_dir.name,
            dir=str(output_dir),
            mode=self.mode,
            # the dashboard owns the terminal: no console capture, no banner lines
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_dict(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        numbers = {f"{kind}/{k}": v for k, v in _numbers(metrics).items() if math.isfinite(v)}
        self.run.log(numbers, step=step)

    def log_summary(self, step: int | None, summary: dict[str, Any]) -> None:
        self.run.summary.update(_numbers(summary))

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Every backend of a run behind the one interface; a context manager that enters
    the ones that are context managers (the dashboard's live view) and closes all."""

    def __init__(self, backends: list[MetricLogger]):
        self.backends = backends
        self._stack = contextlib.ExitStack()

    def log_config(self, config: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log_config(config)

    def log_dict(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        for backend in self.backends:
            backend.log_dict(step, metrics, kind)

    def log_summary(self, step: int | None, summary: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log_summary(step, summary)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Loggers:
        for backend in self.backends:
            if hasattr(backend, "__enter__"):
                self._stack.enter_context(backend)
            else:
                self._stack.callback(backend.close)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_loggers(
    names: list[str],
    output_dir: Path,
    *,
    always: list[MetricLogger],
    enabled: bool,
    resume_step: int | None = None,
) -> Loggers:
    """The backends of `training.loggers` after `always` (the dashboard and the JSONL
    log). enabled=False (ranks other than 0): no backend at all."""
    if not enabled:
        return Loggers([])
    backends = list(always)
    for name in dict.fromkeys(names):
        opener = LOGGERS[name].open
        if opener is not None:
            backends.append(opener(output_dir, resume_step))
    return Loggers(backends)


@dataclass(frozen=True)
class Backend:
    module: str | None  # the package it imports; None: nothing beyond lomotune's own
    pip: str | None  # the command that installs that package
    # (run folder, step resumed from or None) -> the backend; None: among `always`
    open: Callable[[Path, int | None], MetricLogger] | None


# name in `training.loggers` -> its backend
LOGGERS: dict[str, Backend] = {
    "jsonl": Backend(None, None, None),  # always on: metrics.jsonl (MetricsLog)
    "tensorboard": Backend(
        "tensorboard",
        "pip install 'lomotune[tensorboard]'",
        lambda out, step: TensorBoardLogger(out / TENSORBOARD_DIR, step),
    ),
    "wandb": Backend("wandb", "pip install 'lomotune[wandb]'", lambda out, _: WandbLogger(out)),
}

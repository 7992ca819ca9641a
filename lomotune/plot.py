"""Plot a run's metrics.jsonl as one PNG: loss, tokens/s and memory over steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lomotune.dashboard import LOSS_EMA_BETA, METRICS_FILE, MetricsError, read_metrics
from lomotune.errors import LomotuneError

PLOT_FILE = "training.png"
GIB = 1024**3


class PlotError(LomotuneError):
    """A run that cannot be plotted; the message says why and what to do."""


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if r.get("step") is not None and isinstance(value, (int, float)):
            steps.append(int(r["step"]))
            values.append(float(value))
    return steps, values


def _smooth(values: list[float], beta: float = LOSS_EMA_BETA) -> list[float]:
    """Bias-corrected EMA, the same as the dashboard's smoothed loss."""
    out, ema, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            ema = beta * ema + (1 - beta) * v
            n += 1
        out.append(ema / (1 - beta**n) if n else math.nan)
    return out


def plot_run(run_dir: Path) -> Path:
    """Draw run_dir/metrics.jsonl into run_dir/training.png and return its path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    try:
        records = read_metrics(metrics_path)
    except MetricsError as e:
        raise PlotError(f"cannot plot {run_dir}: {e}") from e
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise PlotError(f"{metrics_path} has no training steps to plot")

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from e

    # A bare Figure with the Agg canvas: no pyplot, no global backend switch, no display.
    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_tps, ax_mem = fig.subplots(3, 1, sharex=True)

    steps, losses = _series(train, "loss")
    if steps:
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss")
        ax_loss.plot(steps, _smooth(losses), color="tab:blue", lw=2, label="loss (smoothed)")
    eval_steps, eval_losses = _series(evals, "eval_loss")
    if eval_steps:
        ax_loss.plot(eval_steps, eval_losses, "o", color="tab:red", label="eval loss")
    ax_loss.set_ylabel("loss")
    _finish(ax_loss, has_data=bool(steps or eval_steps))

    steps, tps = _series(train, "tokens_per_s")
    if steps:
        ax_tps.plot(steps, tps, color="tab:green", lw=1)
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_ylim(bottom=0)  # from zero: a wobble should look like one
    _finish(ax_tps, has_data=bool(steps), legend=False)

    kinds = {r["mem_kind"] for r in train if r.get("mem_kind")}
    kind = ", ".join(sorted(kinds)) if kinds else "kind not recorded"
    steps, current = _series(train, "mem_current")
    if steps:
        ax_mem.plot(steps, [v / GIB for v in current], color="tab:purple", label="current")
    steps_p, peak = _series(train, "mem_peak")
    if steps_p:
        ax_mem.plot(steps_p, [v / GIB for v in peak], "--", color="tab:orange", label="peak")
    ax_mem.set_ylabel(f"memory, GiB\n({kind})")
    ax_mem.set_ylim(bottom=0)
    _finish(ax_mem, has_data=bool(steps or steps_p))
    ax_mem.set_xlabel("step")

    fig.suptitle(run_dir.name)
    out = run_dir / PLOT_FILE
    fig.savefig(out, dpi=110)
    return out


def _finish(ax, has_data: bool, legend: bool = True) -> None:
    if not has_data:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)

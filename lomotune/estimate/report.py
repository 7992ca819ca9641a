"""Estimates for people (a rich table, which GPUs it fits) and for scripts (JSON, PNG)."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from lomotune.estimate.analytic import Estimate, GiB

GPU_SIZES_GIB = (16, 24, 40, 48, 80, 141)
PART_LABELS = {
    "weights": "weights",
    "lora_adapters": "LoRA adapters (fp32)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "optimizer_step_temporary": "optimizer step temporaries",
    "activations_kept": "activations kept for backward",
    "layer_transient": "one layer's recompute + backward",
    "logits_loss": "logits / loss buffers",
    "cuda_overhead": "CUDA context + allocator (apart)",
}


# Row labels of the table: short enough that seven methods fit 80 columns.
SHORT_LABELS = {
    "weights": "weights",
    "lora_adapters": "LoRA (fp32)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "optimizer_step_temporary": "step temporaries",
    "activations_kept": "activations kept",
    "layer_transient": "layer recompute+bw",
    "logits_loss": "logits / loss",
    "cuda_overhead": "CUDA ctx (apart)",
}


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def smallest_gpu(total_bytes: int) -> str:
    ok = [g for g in GPU_SIZES_GIB if total_bytes <= g * GiB]
    return f"{ok[0]}" if ok else "none"


# Methods side by side in one table: with the short labels, this many fit 80 columns.
METHODS_PER_TABLE = 6


def table(estimates: list[Estimate], title: str) -> Group:
    """One column per method: parts, tensor total, total with overhead, the smallest
    common GPU it fits. Method names break at their hyphen and the labels are short;
    more than METHODS_PER_TABLE methods continue in a second table below, so that the
    whole fits an 80-column terminal; `peak_lines` says where each peaks."""
    step = METHODS_PER_TABLE
    parts = [estimates[i : i + step] for i in range(0, len(estimates), step)]
    tables = [_one_table(p, title if i == 0 else "") for i, p in enumerate(parts)]
    sizes = "/".join(str(g) for g in GPU_SIZES_GIB)
    fits = f"smallest GPU it fits, of {sizes} GiB: " + ", ".join(
        f"{e.method} {smallest_gpu(e.total_bytes)}" for e in estimates
    )
    return Group(*tables, Text(fits))


def _one_table(estimates: list[Estimate], title: str) -> Table:
    out = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        min_width=min(len(title), 80),  # a one-method table does not wrap its title
    )
    out.add_column("GiB per GPU")
    for e in estimates:
        out.add_column(e.method.replace("-", "-\n"), justify="right")
    for key, label in SHORT_LABELS.items():
        if key == "cuda_overhead" or not any(e.parts.get(key) for e in estimates):
            continue
        out.add_row(label, *[gib(e.parts.get(key, 0)) for e in estimates])
    out.add_row("tensors at peak", *[gib(e.tensor_bytes) for e in estimates], style="bold")
    out.add_row(SHORT_LABELS["cuda_overhead"], *[gib(e.parts["cuda_overhead"]) for e in estimates])
    out.add_row("total", *[gib(e.total_bytes) for e in estimates], style="bold")
    return out


def peak_lines(estimates: list[Estimate]) -> list[str]:
    """Where each method peaks, methods that peak at the same moment on one line."""
    by_phase: dict[str, list[str]] = {}
    for e in estimates:
        by_phase.setdefault(e.phase, []).append(e.method)
    return [f"peak at {phase}: {', '.join(methods)}" for phase, methods in by_phase.items()]


def as_json(estimates: list[Estimate], notes: list[str]) -> dict:
    """Per method: totals, parts (GiB), the peak's phase, the GPU sizes it fits, and the
    notes (what the estimate took for what the recipe left open)."""
    return {
        e.method: {
            "notes": notes,
            "total_gib": round(e.total_bytes / GiB, 4),
            "tensors_gib": round(e.tensor_bytes / GiB, 4),
            "phase": e.phase,
            "parts": {k: round(v / GiB, 4) for k, v in e.parts.items()},
            "fits_gib": [g for g in GPU_SIZES_GIB if e.total_bytes <= g * GiB],
        }
        for e in estimates
    }


def plot(estimates: list[Estimate], path: Path, title: str) -> Path:
    """A stacked bar per method, one segment per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(estimates) + 3, 4.5))
    bottoms = [0.0] * len(estimates)
    names = [e.method for e in estimates]
    for key, label in PART_LABELS.items():
        values = [e.parts.get(key, 0) / GiB for e in estimates]
        if not any(values):
            continue
        ax.bar(names, values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for g in GPU_SIZES_GIB:
        if g < max(bottoms) * 1.3:
            ax.axhline(g, color="grey", lw=0.6, ls="--")
            ax.text(len(names) - 0.5, g, f"{g} GiB", va="bottom", ha="right", fontsize=7)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

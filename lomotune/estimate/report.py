"""Estimates for people (a rich table, which GPUs it fits) and for scripts (JSON, PNG)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

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


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def fits(total_bytes: int) -> str:
    ok = [g for g in GPU_SIZES_GIB if total_bytes <= g * GiB]
    return ", ".join(f"{g}" for g in ok) + " GiB" if ok else "none (over 141 GiB)"


def table(estimates: list[Estimate], title: str) -> Table:
    """One column per method: parts, tensor total, total with overhead, which GPUs."""
    out = Table(title=title, title_justify="left")
    out.add_column("GiB per GPU")
    for e in estimates:
        out.add_column(e.method, justify="right")
    for key, label in PART_LABELS.items():
        if key == "cuda_overhead" or not any(e.parts.get(key) for e in estimates):
            continue
        out.add_row(label, *[gib(e.parts.get(key, 0)) for e in estimates])
    out.add_row("tensors at the peak", *[gib(e.tensor_bytes) for e in estimates], style="bold")
    out.add_row(PART_LABELS["cuda_overhead"], *[gib(e.parts["cuda_overhead"]) for e in estimates])
    out.add_row("total", *[gib(e.total_bytes) for e in estimates], style="bold")
    out.add_row("peak is at", *[e.phase for e in estimates])
    out.add_row("fits", *[fits(e.total_bytes) for e in estimates])
    return out


def as_json(estimates: list[Estimate]) -> dict:
    return {
        e.method: {
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

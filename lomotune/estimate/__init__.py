"""Peak GPU memory of a training step before anything runs: formulas (`analytic`), one
real step under fake tensors (`simulate`), the table of known shapes (`shapes`) and the
report (`report`). `lomotune estimate` drives them."""

from __future__ import annotations

from dataclasses import replace

from lomotune.estimate.analytic import METHODS, Estimate, EstimateError, Setup, Shape, estimate
from lomotune.estimate.for_run import largest_fitting
from lomotune.estimate.shapes import resolve_config, shape_of
from lomotune.estimate.simulate import SIMULATED_METHODS, SimulationError, simulate_step


def simulated_estimate(config, setup: Setup) -> Estimate:
    """An Estimate whose tensor parts come from `simulate_step` (MemTracker's categories)."""
    from lomotune.estimate.analytic import CUDA_OVERHEAD

    if setup.batch_size < 1 or setup.seq_len < 2:
        raise EstimateError(
            f"batch {setup.batch_size} x {setup.seq_len}: needs at least 1 sequence of 2 tokens"
        )
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and setup.seq_len > context:
        raise EstimateError(
            f"sequence length {setup.seq_len} is longer than the model's context ({context})"
        )
    try:
        sim = simulate_step(
            config,
            setup.method,
            batch_size=setup.batch_size,
            seq_len=setup.seq_len,
            precision=setup.precision,
            checkpointing=setup.checkpointing,
            loss_chunk_tokens=setup.loss_chunk_tokens,
            attention=setup.attention,
        )
    except SimulationError as e:
        raise EstimateError(str(e)) from None
    p = sim.parts
    parts = {
        "weights": p.get("Parameter", 0) + p.get("Buffer", 0),
        "gradients": p.get("Gradient", 0),
        "optimizer_state": p.get("Optstate", 0),
        "activations_kept": p.get("Activation", 0) + p.get("Other", 0),
        "layer_transient": p.get("Temp", 0),
    }
    parts = {k: v for k, v in parts.items() if v}
    parts["cuda_overhead"] = CUDA_OVERHEAD
    return Estimate(method=setup.method, phase="simulated (MemTracker)", parts=parts)


def max_batch(config, setup: Setup, gpu_gib: float, limit: int = 4096) -> int:
    """The largest batch whose analytic total fits `gpu_gib` (0 when not even 1 fits)."""
    from lomotune.estimate.analytic import GiB

    shape = shape_of(config)
    budget = gpu_gib * GiB

    def fits(b: int) -> bool:
        return estimate(shape, replace(setup, batch_size=b)).total_bytes <= budget

    return largest_fitting(fits, limit)


__all__ = [
    "METHODS",
    "SIMULATED_METHODS",
    "Estimate",
    "EstimateError",
    "Setup",
    "Shape",
    "estimate",
    "max_batch",
    "resolve_config",
    "shape_of",
    "simulated_estimate",
]


def setup_from_recipe(recipe, *, method: str | None = None) -> tuple[str, Setup, list[str]]:
    """(model name, Setup, notes) for a recipe; notes say what the recipe left open and
    what the estimate took for it."""
    notes = []
    precision = recipe.model.precision
    if precision not in ("bf16", "fp16", "fp32"):
        notes.append(f"model.precision {precision}: estimated for bf16 (what GPUs do natively)")
        precision = "bf16"
    gpus = recipe.hardware.gpus
    if gpus == "auto" or gpus == 0:
        notes.append(f"hardware.gpus {gpus}: estimated for one GPU")
        gpus = 1
    batch = recipe.training.batch_size
    if batch == "auto":
        notes.append(
            "training.batch_size auto: a run picks the largest that fits its device; "
            "estimated here for batch 1 (--max-batch gives the largest for --gpu-mem)"
        )
        batch = 1
    lora = recipe.optimizer.lora
    setup = Setup(
        method=method or recipe.optimizer.name,
        batch_size=batch,
        seq_len=recipe.data.max_length,
        precision=precision,
        checkpointing=recipe.model.activation_checkpointing,
        gpus=int(gpus),
        loss_chunk_tokens=recipe.model.loss_chunk_tokens,
        lora_rank=lora.r if lora else 64,
    )
    return recipe.model.name, setup, notes

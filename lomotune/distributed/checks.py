"""Why a recipe cannot run on N processes (`refusal`): checked by `lomotune train`
before it launches them, and again in each process (torchrun launches unchecked)."""

from __future__ import annotations

import torch

from lomotune.distributed.sharding import shards
from lomotune.recipe import HardwareConfig, Recipe


def missing_gpus(hw: HardwareConfig) -> str | None:
    """Why the GPUs the recipe asks for are not all here (None when they are)."""
    available = torch.cuda.device_count()
    if isinstance(hw.gpus, int) and hw.gpus > available:
        return f"hardware.gpus: {hw.gpus} asked for, {available} present. Set hardware.gpus: {available} (0 = CPU) or auto"
    return None


# The oldest torch lomotune runs on, as pyproject.toml requires it (a test compares them).
TORCH_FLOOR = "2.12"


def torch_lacks_sum_reduction() -> str | None:
    """Why this torch cannot sum a sharded method's gradients over ranks (None when it
    can): FSDP2 averages them unless told otherwise, and the loss is already divided by
    the global token count, so every step would be N times too small on N processes."""
    from torch.distributed.fsdp import FSDPModule

    for name in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms"):
        if not hasattr(FSDPModule, name):
            return (
                f"torch {torch.__version__} has no FSDPModule.{name}, which sharded methods "
                "need to sum gradients over processes (FSDP2 would average them: N-times "
                f"smaller steps on N processes). Install torch>={TORCH_FLOOR}, as lomotune "
                "requires"
            )
    return None


def refusal(recipe: Recipe, world_size: int) -> str | None:
    """Why this recipe cannot run on `world_size` processes (None when it can)."""
    if world_size <= 1:
        return None
    if missing_gpus(recipe.hardware):
        return missing_gpus(recipe.hardware)
    if shards(recipe) and torch_lacks_sum_reduction():
        return torch_lacks_sum_reduction()
    if recipe.training.batch_size != "auto" and recipe.training.batch_size < world_size:
        return (
            f"training.batch_size: {recipe.training.batch_size} rows cannot be split over "
            f"{world_size} processes; set it to at least {world_size}"
        )
    return None

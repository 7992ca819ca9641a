"""Advice on settings that run, but perhaps not as the user hopes: a method's lr and
precision, the fused kernels a GPU lacks, a CPU run's thread count. Shown as notes and
warnings at the start of a run (and by --dry-run).
"""

from __future__ import annotations

import torch

from lomotune import methods
from lomotune.optim import kernels
from lomotune.recipe import Recipe


def threads_note(recipe: Recipe) -> str:
    """A CPU run's speed follows its torch thread count: say what it is and who chose it."""
    who = (
        "hardware.threads"
        if recipe.hardware.threads
        else "torch's default; hardware.threads sets it"
    )
    return f"torch threads: {torch.get_num_threads()} ({who})"


def method_warnings(recipe: Recipe, device: torch.device) -> list[str]:
    """Settings that run, but probably not as the user hopes."""
    opt = recipe.optimizer
    defaults = methods.method(opt.name)
    low, high = defaults.usual_lr
    out = []
    if not low <= opt.lr <= high:
        out.append(
            f"optimizer.lr {opt.lr:g} is outside the usual range for {opt.name} "
            f"({low:g} to {high:g}; default {defaults.lr:g}, {defaults.lr_source})"
        )
    if (
        defaults.plain_sgd_step
        and recipe.model.precision == "bf16"
        and not (opt.stochastic_rounding and defaults.fused)
        and opt.lr < 1e-4
    ):
        out.append(
            f"optimizer.lr {opt.lr:g} on bf16 weights without stochastic rounding: most "
            "updates are smaller than bf16's spacing and are lost. Use "
            "optimizer.stochastic_rounding: true (lomo), a larger lr, or model.precision: fp32"
        )
    if defaults.fused and device.type != "cpu":
        why = kernels.why_not_compiled(device)  # FusedEngine.prepare_kernels's answer
        if why:
            out.append(
                "the fused update runs as separate eager ops on this GPU (several passes "
                f"over memory where one compiled kernel makes one): {why}"
            )
    return out


def mezo_precision_warning(recipe: Recipe) -> str | None:
    """mezo's in-place perturbations drift weights below fp32 (the adapters of a LoRA
    run are exempt)."""
    zeroth_order = methods.method(recipe.optimizer.name).engine == "zeroth-order"
    if zeroth_order and recipe.model.precision != "fp32" and recipe.optimizer.lora is None:
        return (
            f"mezo perturbs the weights in place: in {recipe.model.precision} each step's +eps*z, -2eps*z, "
            "+eps*z drifts them by about one unit in the last place, more than a typical update. "
            "Use model.precision: fp32 for mezo"
        )
    return None

"""The methods. One file per update rule; `build_engine` picks the engine for a recipe,
by the kind its entry in methods.py declares:

- fused (lomo, adalomo, qlora-sgd): `FusedEngine` + the method's update rule;
- zeroth-order (mezo): `MezoEngine`, forward passes only;
- optimizer (the baselines): `OptimizerEngine` around a torch optimizer; a method with
  fp32 master weights (adamw) computes its loss under autocast below fp32.

Every engine has the same surface: `step(batches, lr) -> StepResult`, `state_dict()`,
`load_state_dict()`, `close()`.
"""

from __future__ import annotations

import torch

from lomotune import methods
from lomotune.optim.engine import DynamicLossScale, Engine, FusedEngine, LossFn
from lomotune.recipe import Recipe


def build_engine(recipe: Recipe, model: torch.nn.Module, loss_fn: LossFn) -> Engine:
    opt = recipe.optimizer
    seed = recipe.training.seed
    method = methods.method(opt.name)
    precision = recipe.model.precision
    if method.fp32_master_weights and precision != "fp32":
        from lomotune.precision import under_autocast

        device_type = next(model.parameters()).device.type
        loss_fn = under_autocast(loss_fn, precision, device_type)
    if method.fused:
        if opt.name == "adalomo":
            from lomotune.distributed.rows import is_sharded, sum_over_ranks
            from lomotune.optim.adalomo import AdaLomoRule

            rule = AdaLomoRule(
                weight_decay=opt.weight_decay,
                eps=opt.adalomo_eps,
                clip_threshold=opt.clip_threshold,
                decay_rate=opt.decay_rate,
                # Sharded (FSDP2): statistics over a matrix's rows need every rank's rows.
                sum_over_shards=sum_over_ranks if is_sharded(model) else None,
            )
        else:
            from lomotune.optim.lomo import LomoRule

            rule = LomoRule(weight_decay=opt.weight_decay)
        scale = None
        if recipe.model.precision == "fp16":
            scale = DynamicLossScale(opt.loss_scale, opt.loss_scale_window)
        return FusedEngine(
            model,
            rule,
            loss_fn,
            clip=opt.clip,
            stochastic_rounding=opt.stochastic_rounding,
            loss_scale=scale,
            seed=seed,
        )
    if method.engine == "zeroth-order":
        from lomotune.optim.mezo import MezoEngine

        return MezoEngine(
            model,
            loss_fn,
            eps=opt.zo_eps,
            directions=opt.zo_directions,
            weight_decay=opt.weight_decay,
            seed=seed,
        )
    from lomotune.optim.baseline import OptimizerEngine, build_optimizer

    return OptimizerEngine(model, build_optimizer(model, opt), loss_fn, clip=opt.clip)

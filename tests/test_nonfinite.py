"""A non-finite gradient under a finite loss never reaches a weight, in every clipping
mode, for the fused rules and the baselines; the step is reported with the tensor's
name; what a fused step can and cannot undo is exactly what the docs say."""

import pytest
import torch

from lomotune.loss import causal_lm_loss
from lomotune.optim.adalomo import AdaLomoRule
from lomotune.optim.baseline import OptimizerEngine
from lomotune.optim.engine import DynamicLossScale, FusedEngine
from lomotune.optim.lomo import LomoRule
from lomotune.recipe import ClipConfig
from lomotune.testing import random_batches, tiny_llama

BAD = "model.layers.0.mlp.up_proj.weight"
EARLY = "model.layers.1.mlp.down_proj.weight"  # its hook fires before BAD's
LATE = "model.embed_tokens.weight"  # the tied embedding: its hook fires last


def poison(model, name=BAD, value=float("nan")):
    """Make one parameter's gradient non-finite (a tensor hook runs before accumulation)."""
    param = dict(model.named_parameters())[name]
    return param.register_hook(lambda g: torch.full_like(g, value))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def all_finite(model):
    return all(bool(p.isfinite().all()) for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", ["lomo", "adalomo"])
@pytest.mark.parametrize("mode", ["none", "per-tensor", "previous", "exact"])
def test_a_nan_gradient_never_reaches_a_weight(mode, rule, dtype):
    model = tiny_llama(dtype=dtype)
    update = LomoRule() if rule == "lomo" else AdaLomoRule()
    engine = FusedEngine(
        model, update, lambda b: causal_lm_loss(model, b, 7),
        clip=ClipConfig(mode=mode, max_norm=10.0), seed=3,
    )  # fmt: skip
    first, second, third = random_batches(3)
    assert engine.step([first], 0.05).skipped is None  # `previous` now has a norm
    before = snapshot(model)
    index = engine.names.index(BAD)
    state_before = {k: v.clone() for k, v in engine.states[index].items()}
    handle = poison(model)
    r = engine.step([second], 0.05)
    handle.remove()
    assert r.skipped == "non-finite gradient" and BAD in r.detail
    assert all_finite(model)
    moved = changed(model, before)
    assert BAD not in moved and LATE not in moved  # the bad one and all after it
    if mode == "exact":
        assert not moved and "nothing applied" in r.detail  # the norm pass saw it first
    else:
        assert EARLY in moved and "kept their update" in r.detail  # cannot be undone
    for key, value in engine.states[index].items():
        assert torch.equal(value, state_before[key]), key  # optimizer state untouched too
    if mode == "previous":
        assert engine.previous_norm is None  # the next step measures its own norm
    assert engine.step([third], 0.05).skipped is None  # and training goes on
    assert all_finite(model) and LATE in changed(model, before)


def test_an_inf_gradient_in_fp16_is_an_overflow_that_applies_nothing():
    model = tiny_llama(dtype=torch.float16)
    engine = FusedEngine(
        model, LomoRule(), lambda b: causal_lm_loss(model, b, 7), clip=ClipConfig(),
        loss_scale=DynamicLossScale(1024.0, window=2),
    )  # fmt: skip
    before = snapshot(model)
    poison(model, value=float("inf"))
    r = engine.step(random_batches(1), 0.05)
    assert r.skipped == "fp16 overflow" and BAD in r.detail
    assert not changed(model, before) and engine.loss_scale.scale == 512.0


@pytest.mark.parametrize("clip", ["none", "exact"])
def test_a_baseline_applies_nothing_from_a_nan_gradient(clip):
    model = tiny_llama()
    engine = OptimizerEngine(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        lambda b: causal_lm_loss(model, b, 7), clip=ClipConfig(mode=clip),
    )  # fmt: skip
    before = snapshot(model)
    handle = poison(model)
    r = engine.step(random_batches(1), 1e-2)
    handle.remove()
    assert r.skipped == "non-finite gradient" and BAD in r.detail
    assert not changed(model, before)
    assert engine.step(random_batches(1), 1e-2).skipped is None and all_finite(model)


@pytest.mark.parametrize("seed", [0, 2**31, 180_000_001, 2**63 + 5, 2**64 - 1])
def test_any_seed_a_user_can_type_works_in_bf16(seed):
    model = tiny_llama(dtype=torch.bfloat16)
    engine = FusedEngine(
        model, LomoRule(), lambda b: causal_lm_loss(model, b, 7), clip=ClipConfig(), seed=seed
    )
    before = snapshot(model)
    assert engine.step(random_batches(1), 1e-3).skipped is None
    assert changed(model, before)


def test_same_seed_same_stochastic_rounding_other_seed_other():
    def run(seed):
        model = tiny_llama(dtype=torch.bfloat16)
        engine = FusedEngine(
            model, LomoRule(), lambda b: causal_lm_loss(model, b, 7), clip=ClipConfig(), seed=seed
        )
        engine.step(random_batches(1), 1e-3)
        return snapshot(model)

    a, b, c = run(2**64 - 1), run(2**64 - 1), run(7)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)

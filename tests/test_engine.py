"""The fused-update engine with the LOMO rule against torch.optim.SGD, step for step."""

import copy
import math

import pytest
import torch

from lomotune.loss import causal_lm_loss
from lomotune.optim.engine import DynamicLossScale, FusedEngine
from lomotune.optim.lomo import LomoRule
from lomotune.optim.rounding import stochastic_round_to_bf16
from lomotune.optim.slices import SlicedUpdate
from lomotune.recipe import ClipConfig
from lomotune.testing import random_batches, tiny_llama

make_batches = random_batches


def mean_loss(model, batch):
    total, n = causal_lm_loss(model, batch, chunk_tokens=7)
    return total / n


def run_fused(model, batches, lr, clip=None, weight_decay=0.0, **kw):
    clip = clip or ClipConfig()
    engine = FusedEngine(
        model, LomoRule(weight_decay), lambda b: causal_lm_loss(model, b, 7), clip=clip, **kw
    )
    results = [engine.step([b], lr) for b in batches]
    engine.close()
    return results


def params_close(a, b, tol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=tol, rtol=0), f"{name}: max diff {(p - q).abs().max()}"


def test_chunked_loss_equals_transformers_loss():
    model = tiny_llama()
    batch = make_batches(1)[0]
    ours, n = causal_lm_loss(model, batch, chunk_tokens=5)
    ref = model(**batch).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(ours / n, ref, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lomo_equals_sgd(weight_decay):
    model = tiny_llama(tie=True)
    ref = copy.deepcopy(model)
    batches = make_batches(4)
    run_fused(model, batches, lr=0.5, weight_decay=weight_decay)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, weight_decay=weight_decay)
    for b in batches:
        opt.zero_grad()
        mean_loss(ref, b).backward()
        opt.step()
    params_close(model, ref)
    # and training did something
    assert not torch.allclose(model.lm_head.weight, tiny_llama(tie=True).lm_head.weight)


def test_no_grad_left_and_one_hook_call_per_parameter():
    model = tiny_llama(tie=True)
    calls = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
    run_fused(model, make_batches(1), lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    assert set(calls) == {n for n, _ in model.named_parameters()}
    assert all(c == 1 for c in calls.values())  # tied embedding: once, after both uses


def test_tied_embedding_gets_sum_of_both_uses():
    model = tiny_llama(tie=True)
    ref = copy.deepcopy(model)
    b = make_batches(1)[0]
    mean_loss(ref, b).backward()
    expected = ref.model.embed_tokens.weight - 0.3 * ref.model.embed_tokens.weight.grad
    run_fused(model, [b], lr=0.3)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert torch.allclose(model.model.embed_tokens.weight, expected, atol=1e-7)


def test_exact_clipping_equals_clip_grad_norm():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    batches = make_batches(3)
    results = run_fused(model, batches, lr=0.5, clip=ClipConfig(mode="exact", max_norm=0.05))
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for b, r in zip(batches, results, strict=True):
        opt.zero_grad()
        mean_loss(ref, b).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert r.grad_norm == pytest.approx(float(norm), rel=1e-5)
        assert float(norm) > 0.05  # the clip was active
        opt.step()
    params_close(model, ref)


def test_per_tensor_clipping():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    batches = make_batches(2)
    run_fused(model, batches, lr=0.5, clip=ClipConfig(mode="per-tensor", max_norm=0.01))
    clipped = 0
    for b in batches:
        ref.zero_grad()
        mean_loss(ref, b).backward()
        with torch.no_grad():
            for p in ref.parameters():
                norm = p.grad.norm()
                if norm > 0.01:
                    clipped += 1
                    p.grad.mul_(0.01 / (norm + 1e-6))
                p.sub_(0.5 * p.grad)
    assert clipped > 5
    params_close(model, ref)


def test_previous_step_norm_clipping():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    batches = make_batches(4)
    results = run_fused(model, batches, lr=0.5, clip=ClipConfig(mode="previous", max_norm=0.05))
    previous = None
    for b, r in zip(batches, results, strict=True):
        ref.zero_grad()
        mean_loss(ref, b).backward()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
        # The first step has no previous norm: it clips exactly (two passes).
        use = norm if previous is None else previous
        coef = min(1.0, 0.05 / (use + 1e-6))
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(0.5 * coef * p.grad)
        assert r.grad_norm == pytest.approx(norm, rel=1e-5)
        previous = norm
    params_close(model, ref)


def test_non_finite_loss_skips_before_anything_is_applied():
    model = tiny_llama()
    before = copy.deepcopy(model)
    engine = FusedEngine(
        model,
        LomoRule(),
        lambda b: (torch.tensor(float("nan"), requires_grad=True), 5),
        clip=ClipConfig(),
    )
    r = engine.step(make_batches(1), lr=1.0)
    assert r.skipped == "non-finite loss"
    params_close(model, before, tol=0)


def test_fp16_overflow_applies_nothing_and_scale_backs_off_then_grows():
    model = tiny_llama(dtype=torch.float16)
    before = copy.deepcopy(model)
    scaler = DynamicLossScale(scale=2.0**40, window=2)  # 2^40 overflows fp16 gradients
    engine = FusedEngine(
        model,
        LomoRule(),
        lambda b: causal_lm_loss(model, b, 7),
        clip=ClipConfig(),
        loss_scale=scaler,
    )
    b = make_batches(1)[0]
    r = engine.step([b], lr=0.1)
    assert r.skipped == "fp16 overflow"
    assert scaler.scale == 2.0**39
    params_close(model, before, tol=0)
    scaler.scale = 1024.0
    r1, r2 = engine.step([b], lr=0.1), engine.step([b], lr=0.1)
    assert r1.skipped is None and r2.skipped is None
    assert scaler.scale == 2048.0  # grew back after a window of 2 clean steps
    assert not torch.equal(model.lm_head.weight, before.lm_head.weight)


def test_fp16_update_matches_fp32_sgd_on_unscaled_gradient():
    model = tiny_llama(dtype=torch.float16)
    ref = tiny_llama(dtype=torch.float16).float()
    b = make_batches(1)[0]
    engine = FusedEngine(
        model,
        LomoRule(),
        lambda x: causal_lm_loss(model, x, 7),
        clip=ClipConfig(),
        loss_scale=DynamicLossScale(256.0, 10),
    )
    r = engine.step([b], lr=0.5)
    mean_loss(ref, b).backward()
    assert r.grad_norm == pytest.approx(
        float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])), rel=2e-2
    )
    with torch.no_grad():
        expected = ref.lm_head.weight - 0.5 * ref.lm_head.weight.grad
    assert (model.lm_head.weight.float() - expected).abs().max() < 2e-3


def test_bf16_small_update_lost_without_stochastic_rounding_kept_with_it():
    """At lr 1e-5 round-to-nearest drops the update; stochastic rounding keeps it in
    expectation: averaged over seeds, the applied update equals the fp32 one."""
    b = make_batches(1)
    start = tiny_llama(dtype=torch.bfloat16)
    ref = copy.deepcopy(start).float()
    mean_loss(ref, b[0]).backward()
    exact = {n: -1e-5 * p.grad for n, p in ref.named_parameters()}  # the fp32 update

    def fraction_applied(models):
        # Least-squares coefficient of the applied update on the exact one: 1 = all of it.
        num = den = 0.0
        for n, q in start.named_parameters():
            applied = sum(dict(m.named_parameters())[n].float() - q.float() for m in models) / len(
                models
            )
            num += float((applied * exact[n]).sum())
            den += float((exact[n] * exact[n]).sum())
        return num / den

    plain = copy.deepcopy(start)
    run_fused(plain, b, lr=1e-5, stochastic_rounding=False)
    assert abs(fraction_applied([plain])) < 0.05  # round-to-nearest loses nearly all of it

    runs = []
    for seed in range(40):
        m = copy.deepcopy(start)
        run_fused(m, b, lr=1e-5, stochastic_rounding=True, seed=seed)
        runs.append(m)
    assert fraction_applied(runs) == pytest.approx(1.0, abs=0.2)
    # Same seed, same result: runs repeat exactly.
    again = copy.deepcopy(start)
    run_fused(again, b, lr=1e-5, stochastic_rounding=True, seed=0)
    params_close(runs[0], again, tol=0)


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * 0.05
    x = x.to(torch.bfloat16).float() + 1e-5  # well below bf16's spacing at these values
    draws = torch.stack([stochastic_round_to_bf16(x, key).float() for key in range(4000)])
    spacing = (x.abs().log2().floor() - 7).exp2()
    err = (draws.mean(0) - x).abs() / spacing
    assert float(err.max()) < 0.05  # mean lands on x; round-to-nearest would be 1e-5 off
    nearest = x.to(torch.bfloat16).float()
    assert float(((nearest - x).abs() / spacing).mean()) > 0.02
    assert set(draws[:, 0].unique().tolist()) <= {
        nearest[0].item(),
        float(
            torch.nextafter(
                nearest[0].to(torch.bfloat16), torch.tensor(math.inf, dtype=torch.bfloat16)
            ).float()
        ),
        float(
            torch.nextafter(
                nearest[0].to(torch.bfloat16), torch.tensor(-math.inf, dtype=torch.bfloat16)
            ).float()
        ),
    }


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lomo_equals_the_reference_lomo_optim(weight_decay):
    """lomo_optim.Lomo 0.1.1 (the paper's package): same weights after 3 steps. Untied
    embeddings: its hook fires per use of a tied weight and would apply the decay twice."""
    from lomo_optim import Lomo

    model = tiny_llama(tie=False)
    ref = copy.deepcopy(model)
    batches = make_batches(3)
    run_fused(model, batches, lr=0.5, weight_decay=weight_decay)
    lomo = Lomo(ref, lr=0.5, weight_decay=weight_decay)
    for b in batches:
        lomo.fused_backward(mean_loss(ref, b), lr=0.5)
    params_close(model, ref)


@pytest.mark.parametrize("rule_name", ["lomo", "adalomo"])
def test_fp16_with_exact_clipping_matches_fp32_on_the_unscaled_clipped_gradient(rule_name):
    """fp16 weights, loss scale 256, exact clipping at a norm the gradient exceeds: the
    update equals the fp32 rule applied to the unscaled gradient clipped with
    clip_grad_norm_ (to fp16 rounding of the weights)."""
    from lomotune.optim.adalomo import AdaLomoRule

    def make_rule():
        return LomoRule() if rule_name == "lomo" else AdaLomoRule()

    model = tiny_llama(dtype=torch.float16)
    ref = tiny_llama(dtype=torch.float16).float()
    b = make_batches(1)[0]
    clip = ClipConfig(mode="exact", max_norm=0.1)
    engine = FusedEngine(
        model, make_rule(), lambda x: causal_lm_loss(model, x, 7), clip=clip,
        loss_scale=DynamicLossScale(256.0, 10),
    )  # fmt: skip
    lr = 0.5 if rule_name == "lomo" else 0.05
    r = engine.step([b], lr=lr)
    assert r.skipped is None
    mean_loss(ref, b).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.1))
    assert norm > 0.1 and r.grad_norm == pytest.approx(norm, rel=2e-2)
    rule = make_rule()
    ok = torch.tensor(True)
    with torch.no_grad():
        for p in ref.parameters():
            update = SlicedUpdate(p, p.grad.clone(), 1.0)  # fp32: one whole-tensor update
            rule.apply(update, rule.init_state(p), lr, 1, ok)
    start = tiny_llama(dtype=torch.float16).float()
    for (name, p), q, s in zip(
        model.named_parameters(), ref.parameters(), start.parameters(), strict=True
    ):
        step = (q - s).abs().max()
        assert (p.float() - q).abs().max() <= 0.05 * step + 2e-3, name


def test_update_seconds_times_the_updates_only_when_asked():
    from lomotune.optim.baseline import OptimizerEngine
    from lomotune.optim.mezo import MezoEngine

    model = tiny_llama()
    batch = make_batches(1)[0]

    def loss(b):
        return causal_lm_loss(model, b, 7)

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for build in (
        lambda: FusedEngine(model, LomoRule(0.0), loss, clip=ClipConfig()),
        lambda: MezoEngine(model, loss),
        lambda: OptimizerEngine(model, sgd, loss, clip=ClipConfig()),
    ):
        engine = build()
        assert engine.update_seconds is None
        engine.step([batch], 1e-3)
        assert engine.update_seconds is None  # nothing timed unless asked
        engine.update_seconds = 0.0
        engine.step([batch], 1e-3)
        assert engine.update_seconds > 0
        engine.close()

"""Updating in row slices: bitwise the same weights, optimizer state and rounding stream
as one whole-tensor slice, and temporaries bounded by the budget whatever the tensor."""

import pytest
import torch

from lomotune.loss import causal_lm_loss
from lomotune.optim.adalomo import AdaLomoRule
from lomotune.optim.engine import FusedEngine
from lomotune.optim.lomo import LomoRule
from lomotune.optim.slices import SlicedUpdate
from lomotune.recipe import ClipConfig
from lomotune.testing import random_batches, tiny_llama

WHOLE = 1 << 40  # every tensor in one slice


def train(rule_name, dtype, slice_bytes, clip="none", steps=3):
    torch.manual_seed(0)
    model = tiny_llama(dtype=dtype)
    rule = LomoRule(weight_decay=0.1) if rule_name == "lomo" else AdaLomoRule(weight_decay=0.1)
    engine = FusedEngine(
        model, rule, lambda b: causal_lm_loss(model, b, 7),
        clip=ClipConfig(mode=clip, max_norm=0.5), seed=11, slice_bytes=slice_bytes,
    )  # fmt: skip
    for batch in random_batches(steps):
        assert engine.step([batch], 1e-2).skipped is None
    return model, engine


@pytest.mark.parametrize("clip", ["none", "per-tensor", "previous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", ["lomo", "adalomo"])
def test_sliced_update_is_bitwise_the_whole_tensor_update(rule, dtype, clip):
    # 1 byte: one row a slice (one element for vectors), the most slices there can be.
    sliced, sliced_engine = train(rule, dtype, slice_bytes=1, clip=clip)
    whole, whole_engine = train(rule, dtype, slice_bytes=WHOLE, clip=clip)
    for (name, p), q in zip(sliced.named_parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q), name
    for a, b in zip(sliced_engine.states, whole_engine.states, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(sliced.parameters(), tiny_llama(dtype=dtype).parameters(), strict=True)
    )


def extra_peak_bytes(update_fn, *existing: torch.Tensor) -> int:
    """Peak bytes of tensors created while `update_fn` runs (real CPU tensors, counted
    by PyTorch's MemTracker), beyond the `existing` ones."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*existing)
    with tracker:
        update_fn()
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return int(snapshot["Total"]) - sum(t.untyped_storage().nbytes() for t in existing)


@pytest.mark.parametrize(
    "rule", [LomoRule(weight_decay=0.1), AdaLomoRule()], ids=["lomo", "adalomo"]
)
def test_temporaries_stay_within_the_budget_whatever_the_tensor(rule):
    rows, cols, budget = 4096, 256, 256 << 10  # a 1M-element bf16 "embedding", 256 KiB
    param = torch.randn(rows, cols).bfloat16()
    grad = torch.randn(rows, cols).bfloat16()
    ok = torch.tensor(True)

    def run(slice_bytes):
        state = rule.init_state(param)
        update = SlicedUpdate(param, grad, 1.0, budget=slice_bytes, round_key=3)
        apply = lambda: rule.apply(update, state, 1e-3, 1, ok)  # noqa: E731
        return extra_peak_bytes(apply, param, grad, ok, *state.values())

    whole = run(WHOLE)
    sliced = run(budget)
    assert whole > 12 * param.numel()  # fp32 gradient and weights, noise, masks
    # Within the budget, plus O(rows + cols) statistics (AdaLomo: fp32 and fp64 vectors).
    assert sliced <= budget + 40 * (rows + cols), (sliced, whole)

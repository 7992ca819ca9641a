"""AdaLomo in the fused engine against a plain re-writing of the reference's update loop
(lomo_optim.AdaLomo 0.1.1, `fuse_update`), and against the reference itself with its
hard-coded `.cuda()` patched out (it fails on a CPU-only torch otherwise)."""

import copy
import math
import threading

import lomo_optim
import pytest
import torch

from lomotune.loss import causal_lm_loss
from lomotune.optim.adalomo import AdaLomoRule
from lomotune.optim.engine import FusedEngine
from lomotune.optim.slices import SlicedUpdate
from lomotune.recipe import ClipConfig
from lomotune.testing import random_batches, tiny_llama

LR = 0.05


make_batches = random_batches


def mean_loss(model, batch):
    total, n = causal_lm_loss(model, batch, chunk_tokens=7)
    return total / n


def make_engine(model, weight_decay=0.0):
    rule = AdaLomoRule(weight_decay=weight_decay)
    return FusedEngine(model, rule, lambda b: causal_lm_loss(model, b, 7), clip=ClipConfig())


def max_diff(a, b) -> float:
    with torch.no_grad():
        return max(
            float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )


class ReferenceAdaLomo:
    """The reference's update, written out plainly: ordinary backward, then every
    parameter in turn. Same formulas and order as lomo_optim.AdaLomo.fuse_update."""

    def __init__(
        self, model, weight_decay=0.0, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8
    ):
        self.model, self.weight_decay = model, weight_decay
        self.eps, self.clip_threshold, self.decay_rate = eps, clip_threshold, decay_rate
        self.step_num = 0
        self.state = {}

    def step(self, batch, lr):
        self.step_num += 1  # the reference counts in fused_backward, before backward
        mean_loss(self.model, batch).backward()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                g = p.grad.float()
                p.grad = None
                beta2t = 1.0 - math.pow(self.step_num, self.decay_rate)
                sq = g**2 + self.eps[0]
                if p.dim() > 1:
                    row, col = self.state.setdefault(
                        name, (torch.zeros(p.shape[0]), torch.zeros(p.shape[1]))
                    )
                    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
                    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    c_factor = col.unsqueeze(-2).rsqrt()
                    update = r_factor * c_factor * g
                else:
                    (v,) = self.state.setdefault(name, (torch.zeros(p.shape),))
                    v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
                    update = v.rsqrt() * g
                rms = update.norm(2) / math.sqrt(update.numel())
                update = update / (rms / self.clip_threshold).clamp(min=1.0)
                p_rms = p.norm(2) / math.sqrt(p.numel())
                scaled_lr = lr * max(self.eps[1], float(p_rms))
                if self.weight_decay:
                    p.mul_(1.0 - scaled_lr * self.weight_decay)  # decoupled, before the update
                p.add_(update, alpha=-scaled_lr)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adalomo_equals_reference_loop(weight_decay):
    model = tiny_llama(tie=True)
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    batches = make_batches(4)
    engine = make_engine(model, weight_decay)
    for b in batches:
        engine.step([b], LR)
    engine.close()
    reference = ReferenceAdaLomo(ref, weight_decay)
    for b in batches:
        reference.step(b, LR)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert max_diff(model, ref) < 1e-6
    # Training moved every parameter, by far more than the tolerance.
    with torch.no_grad():
        moved = [
            float((p - q).abs().max())
            for p, q in zip(model.parameters(), start.parameters(), strict=True)
        ]
    assert min(moved) > 1e-4


def test_adalomo_equals_lomo_optim_with_cuda_patched_out(monkeypatch):
    # lomo_optim.AdaLomo puts its state on .cuda(): on CPU-only torch it raises
    # "Torch not compiled with CUDA enabled". With .cuda() a no-op it runs on CPU.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    model = tiny_llama(tie=True)
    ref = copy.deepcopy(model)
    batches = make_batches(4)
    engine = make_engine(model, weight_decay=0.1)
    for b in batches:
        engine.step([b], LR)
    engine.close()
    # Its fixed loss scale (2**10) divides back out exactly in fp32.
    opt = lomo_optim.AdaLomo(ref, lr=LR, weight_decay=0.1)
    for b in batches:
        opt.fused_backward(mean_loss(ref, b), LR)
    assert max_diff(model, ref) < 1e-6


def test_state_dict_round_trip_is_exact():
    batches = make_batches(4)
    straight = tiny_llama()
    engine = make_engine(straight, weight_decay=0.1)
    for b in batches:
        engine.step([b], LR)

    first = tiny_llama()
    engine = make_engine(first, weight_decay=0.1)
    for b in batches[:2]:
        engine.step([b], LR)
    tensors, meta = engine.state_dict()
    tensors = {k: t.clone() for k, t in tensors.items()}
    weights = copy.deepcopy(first.state_dict())
    engine.close()
    assert meta["step_count"] == 2
    assert {k.rsplit("/", 1)[1] for k in tensors} == {
        "exp_avg_sq_row",
        "exp_avg_sq_col",
        "exp_avg_sq",
    }

    resumed = tiny_llama(seed=123)  # different weights, replaced by the saved ones
    resumed.load_state_dict(weights)
    engine = make_engine(resumed, weight_decay=0.1)
    engine.load_state_dict(tensors, meta)
    for b in batches[2:]:
        engine.step([b], LR)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_frozen_parameters_get_no_state_and_do_not_change():
    model = tiny_llama(tie=True)
    frozen = {
        n
        for n, _ in model.named_parameters()
        if ".layers.0." in n or n.endswith("embed_tokens.weight")
    }
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = copy.deepcopy(model)
    engine = make_engine(model, weight_decay=0.1)
    for b in make_batches(2):
        engine.step([b], LR)
    tensors, _ = engine.state_dict()
    state_owners = {k.rsplit("/", 1)[0] for k in tensors}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert state_owners == trainable and not state_owners & frozen
    for (n, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        if n in frozen:
            assert torch.equal(p, q), n
        else:
            assert not torch.equal(p, q), n
    # State is fp32 and sized O(rows + cols) for matrices.
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    assert tensors[f"{q_proj}/exp_avg_sq_row"].shape == (32,)
    assert tensors[f"{q_proj}/exp_avg_sq_col"].dtype == torch.float32


def test_a_stack_of_expert_matrices_is_factored_per_matrix():
    """(experts, out, in): each expert's update equals the 2-D rule applied to it alone
    (own row/column statistics, own update RMS clip, own parameter RMS)."""
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 5, 4, generator=g)
    stack[1] *= 100.0  # experts of very different scales: one RMS for all would be wrong
    grads = [torch.randn(3, 5, 4, generator=g) for _ in range(3)]
    rule = AdaLomoRule(weight_decay=0.1)
    state = rule.init_state(stack)
    assert state["exp_avg_sq_row"].shape == (3, 5) and state["exp_avg_sq_col"].shape == (3, 4)
    singles = [stack[e].clone() for e in range(3)]
    single_states = [rule.init_state(s) for s in singles]
    ok = torch.tensor(True)
    for step, grad in enumerate(grads, start=1):
        rule.apply(SlicedUpdate(stack, grad.clone(), 1.0), state, 0.01, step, ok)
        for e in range(3):
            update = SlicedUpdate(singles[e], grad[e].clone(), 1.0)
            rule.apply(update, single_states[e], 0.01, step, ok)
    for e in range(3):
        assert torch.allclose(stack[e], singles[e], rtol=1e-6, atol=0), e
    assert not torch.allclose(stack, torch.stack([s for s in singles]) * 0)  # it moved


class ThreadedSum:
    """An all-reduce among threads, one a rank: each rank's `sum_over_shards`."""

    def __init__(self, ranks: int):
        self.barrier = threading.Barrier(ranks)
        self.parts: dict[int, torch.Tensor] = {}

    def of_rank(self, rank: int):
        def sum_over_shards(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[r] for r in sorted(self.parts))
            self.barrier.wait()  # every rank has read before the next sum overwrites
            return total

        return sum_over_shards


def run_ranks(ranks: int, work) -> None:
    errors = []

    def guarded(rank):
        try:
            work(rank)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)
            raise

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("shape", [(5, 4), (1, 4), (5,)])
def test_rows_sharded_over_ranks_update_as_the_whole_tensor(shape):
    """Cut by rows as FSDP2 cuts (torch.chunk: (5, 4) -> 3 + 2 rows, (1, 4) -> 1 + 0),
    each rank's rule sees its rows only, one row per slice, and sums its statistics over the ranks: three
    steps (weight decay, clipping of U) end where the whole tensor's rule ends, weights,
    row factors and column factors alike."""
    torch.manual_seed(0)
    param = torch.randn(shape)
    grads = [torch.randn(shape) * s for s in (1.0, 30.0, 0.01)]  # 30: RMS(U) clips
    kwargs = {"weight_decay": 0.1, "clip_threshold": 1.0}
    whole_rule = AdaLomoRule(**kwargs)
    whole, whole_state = param.clone(), whole_rule.init_state(param)
    for step, g in enumerate(grads, start=1):
        update = SlicedUpdate(whole, g.clone(), 1.0)
        whole_rule.apply(update, whole_state, 0.05, step, torch.tensor(True))

    ranks = 2
    params = list(param.clone().chunk(ranks)) + [param[:0].clone()] * (
        ranks - len(param.chunk(ranks))
    )
    states = [None] * ranks
    sums = ThreadedSum(ranks)

    def work(rank):
        rule = AdaLomoRule(**kwargs, sum_over_shards=sums.of_rank(rank))
        states[rank] = rule.init_state(params[rank])
        for step, g in enumerate(grads, start=1):
            rows = list(g.chunk(ranks)) + [g[:0]] * (ranks - len(g.chunk(ranks)))
            # one row per slice: sliced and sharded at once
            update = SlicedUpdate(params[rank], rows[rank].clone(), 1.0, budget=1)
            rule.apply(update, states[rank], 0.05, step, torch.tensor(True))

    run_ranks(ranks, work)
    torch.testing.assert_close(torch.cat(params), whole, rtol=0, atol=1e-6)
    assert not torch.equal(whole, param)
    if len(shape) == 2:
        row = torch.cat([st["exp_avg_sq_row"] for st in states])
        torch.testing.assert_close(row, whole_state["exp_avg_sq_row"], rtol=1e-6, atol=0)
        for st in states:  # whole on every rank
            torch.testing.assert_close(
                st["exp_avg_sq_col"], whole_state["exp_avg_sq_col"], rtol=1e-6, atol=0
            )
    else:
        v = torch.cat([st["exp_avg_sq"] for st in states])
        torch.testing.assert_close(v, whole_state["exp_avg_sq"], rtol=1e-6, atol=0)


def test_a_bad_gradient_on_one_rank_changes_nothing_on_any():
    """The flag is summed with the statistics: a rank whose rows are all finite still
    leaves its weights and state alone when another rank's are not."""
    param = torch.randn(4, 3)
    params = [t.clone() for t in param.chunk(2)]
    sums = ThreadedSum(2)
    states = [None, None]

    def work(rank):
        rule = AdaLomoRule(sum_over_shards=sums.of_rank(rank))
        states[rank] = rule.init_state(params[rank])
        grad = torch.ones(2, 3)
        if rank == 1:
            grad[0, 0] = float("nan")
        update = SlicedUpdate(params[rank], grad, 1.0)
        rule.apply(update, states[rank], 0.05, 1, grad.sum().isfinite())

    run_ranks(2, work)
    assert torch.equal(torch.cat(params), param)
    assert all(not t.any() for st in states for t in st.values())

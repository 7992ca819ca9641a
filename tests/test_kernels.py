"""The fused updates compiled into one kernel (what a GPU runs), here compiled by inductor
on the CPU: the same weights as the eager sliced path, step for step (LOMO whole,
AdaLomo's second pass)."""

import copy
import re
import shutil

import pytest
import torch

from lomotune.loss import causal_lm_loss
from lomotune.optim import kernels
from lomotune.optim.adalomo import AdaLomoRule
from lomotune.optim.engine import FusedEngine
from lomotune.optim.lomo import LomoRule, lomo_update_elementwise_
from lomotune.recipe import ClipConfig
from lomotune.testing import random_batches, tiny_llama

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler"
)


def train(
    model, compiled: bool, monkeypatch, *, rule=LomoRule, weight_decay=0.0, clip=None, rounding=True
):
    monkeypatch.setattr(kernels, "available", lambda device: compiled)
    engine = FusedEngine(
        model,
        rule(weight_decay=weight_decay),
        lambda b: causal_lm_loss(model, b, 7),
        clip=clip or ClipConfig(),
        stochastic_rounding=rounding,
        seed=3,
    )
    losses = [engine.step([b], 0.05).loss for b in random_batches(3)]
    engine.close()
    return losses


@pytest.mark.parametrize(
    "rule, dtype, weight_decay, clip, rounding",
    [
        (LomoRule, torch.float32, 0.0, None, True),
        (LomoRule, torch.float32, 0.1, ClipConfig(mode="per-tensor", max_norm=0.01), True),
        (LomoRule, torch.bfloat16, 0.1, None, True),
        (LomoRule, torch.bfloat16, 0.0, ClipConfig(mode="previous", max_norm=0.5), False),
        (AdaLomoRule, torch.float32, 0.0, None, True),
        (AdaLomoRule, torch.float32, 0.1, ClipConfig(mode="per-tensor", max_norm=0.01), True),
        (AdaLomoRule, torch.bfloat16, 0.1, None, True),
    ],
)
def test_the_compiled_update_gives_the_eager_weights(
    rule, dtype, weight_decay, clip, rounding, monkeypatch
):
    eager = tiny_llama(tie=True).to(dtype)
    one_kernel = copy.deepcopy(eager)
    settings = dict(rule=rule, weight_decay=weight_decay, clip=clip, rounding=rounding)
    eager_losses = train(eager, False, monkeypatch, **settings)
    compiled_losses = train(one_kernel, True, monkeypatch, **settings)
    assert compiled_losses == eager_losses
    for (name, p), q in zip(eager.named_parameters(), one_kernel.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max diff {(p.float() - q.float()).abs().max()}"
    start = tiny_llama(tie=True).to(dtype)  # the run moved the weights at all
    moved = [
        not torch.equal(p, q) for p, q in zip(eager.parameters(), start.parameters(), strict=True)
    ]
    assert sum(moved) > len(moved) // 2


def test_a_gated_update_changes_nothing_even_with_nan(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    param = torch.randn(300, dtype=torch.bfloat16)
    before = param.clone()
    grad = torch.full((300,), float("nan"), dtype=torch.bfloat16)
    compiled = kernels.compiled(lomo_update_elementwise_)
    lr = torch.tensor(0.1)
    _, code = run_and_get_code(compiled, param, grad, 1.0, lr, 0.0, torch.tensor(False), 12345, 0)
    assert torch.equal(param, before)
    # one loop: read weight and gradient, write the weight
    assert len(set(re.findall(r"cpp_fused\w+", "\n".join(code)))) == 1


def test_the_probe_passes_right_kernels_and_names_a_broken_one(monkeypatch):
    checks = {"rounding": kernels.rounding_check}
    assert kernels.probe(torch.device("cpu"), checks) is None  # inductor's C++: right bits

    def fails_to_build(fn):
        def run(*args):
            raise RuntimeError("no backend for this device\nmore lines")

        return run

    monkeypatch.setattr(kernels, "compiled", fails_to_build)
    why = kernels.probe(torch.device("cpu"), checks)
    assert "could not build the rounding" in why
    assert "RuntimeError: no backend for this device)" in why
    monkeypatch.setattr(kernels, "compiled", lambda fn: lambda out, *a: out.zero_())
    assert "other bits" in kernels.probe(torch.device("cpu"), checks)


def _engine(model, rule, clip=None, rounding=True):
    return FusedEngine(
        model, rule, lambda b: causal_lm_loss(model, b, 7), clip=clip or ClipConfig(),
        stochastic_rounding=rounding, seed=3,
    )  # fmt: skip


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "rule, clip",
    [
        (LomoRule(weight_decay=0.1), ClipConfig(mode="per-tensor", max_norm=0.01)),
        (AdaLomoRule(weight_decay=0.1), ClipConfig()),
    ],
)
def test_every_kernel_of_a_run_is_built_before_training_and_none_in_backward(
    rule, clip, monkeypatch
):
    """The engine's checks build each kernel as its hooks call it (the run's rule, dtype,
    weight decay, clipping and rounding): the steps that follow compile nothing, whatever
    their learning rate (LOMO's was compiled as a constant: a new kernel per lr)."""
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "_compiled", {})
    model = tiny_llama(tie=True).to(torch.bfloat16)
    engine = _engine(model, rule, clip)
    assert kernels.probe(torch.device("cpu"), engine._kernel_checks()) is None
    built = _graphs()
    assert built >= 2  # the rounding kernel and the rule's
    monkeypatch.setattr(kernels, "available", lambda device: True)
    for lr, batch in zip((0.05, 0.03), random_batches(2), strict=True):  # a schedule's lrs
        assert engine.step([batch], lr).skipped is None
    assert _graphs() == built, "a kernel was compiled inside backward"


def test_a_kernel_that_fails_in_a_hook_falls_back_to_the_eager_ops_with_one_warning(
    monkeypatch,
):
    eager = tiny_llama(tie=True).to(torch.bfloat16)
    fallback = copy.deepcopy(eager)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    eager_engine = _engine(eager, LomoRule())
    eager_losses = [eager_engine.step([b], 0.05).loss for b in random_batches(2)]

    def fails(fn):
        def run(*args):
            raise RuntimeError("ptxas fatal: out of registers")

        return run

    # the CPU as a prepared GPU whose kernels then fail
    monkeypatch.setattr(kernels, "_why_not", {"cpu": None})
    monkeypatch.setattr(kernels, "available", lambda d: kernels._why_not["cpu"] is None)
    monkeypatch.setattr(kernels, "compiled", fails)
    engine = _engine(fallback, LomoRule())
    with pytest.warns(RuntimeWarning) as caught:
        losses = [engine.step([b], 0.05).loss for b in random_batches(2)]
    assert len(caught) == 1
    assert "lomo_update_elementwise_ failed (RuntimeError: ptxas fatal" in str(caught[0].message)
    assert losses == eager_losses
    for p, q in zip(eager.parameters(), fallback.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_gpu_is_prepared_once_under_one_key_and_an_unprepared_one_runs_eager(monkeypatch):
    probed = []
    monkeypatch.setattr(kernels, "_why_not", {})
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kernels, "probe", lambda d, checks: probed.append(str(d)) or None)
    # `lomotune train` prepares "cuda"; the hooks ask with the parameters' "cuda:0"
    assert kernels.prepare(torch.device("cuda"), {}) is None
    assert kernels.available(torch.device("cuda:0"))
    assert kernels.prepare(torch.device("cuda:0"), {}) is None
    assert probed == ["cuda"]
    assert "not built before training" in kernels.why_not_compiled(torch.device("cuda:1"))
    assert not kernels.available(torch.device("cuda:1"))
    assert kernels.why_not_compiled(torch.device("cpu")) is not None
    monkeypatch.setattr(kernels, "probe", lambda d, checks: "it broke")
    assert kernels.prepare(torch.device("cuda:1"), {}) == "it broke"
    assert not kernels.available(torch.device("cuda:1"))

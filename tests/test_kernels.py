"""The fused updates compiled into one kernel (what a GPU runs), here compiled by inductor
on the CPU: the same weights as the eager sliced path, step for step (LOMO whole,
AdaLomo's second pass)."""

import copy
import re
import shutil

import pytest
import torch

from lomotune.models import causal_lm_loss
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
    _, code = run_and_get_code(compiled, param, grad, 1.0, 0.1, 0.0, torch.tensor(False), 12345, 0)
    assert torch.equal(param, before)
    # one loop: read weight and gradient, write the weight
    assert len(set(re.findall(r"cpp_fused\w+", "\n".join(code)))) == 1


def test_the_probe_passes_a_right_kernel_and_names_a_broken_one(monkeypatch):
    assert kernels.probe(torch.device("cpu")) is None  # inductor's C++ build: right bits

    def fails_to_build(fn):
        def run(*args):
            raise RuntimeError("no backend for this device\nmore lines")

        return run

    monkeypatch.setattr(kernels, "compiled", fails_to_build)
    why = kernels.probe(torch.device("cpu"))
    assert "could not build" in why and "RuntimeError: no backend for this device" in why
    monkeypatch.setattr(kernels, "compiled", lambda fn: lambda out, *a: out.zero_())
    assert "other bits" in kernels.probe(torch.device("cpu"))


def test_each_gpu_is_probed_once_and_a_failed_probe_means_eager(monkeypatch):
    probed = []
    monkeypatch.setattr(kernels, "_why_not", {})
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(kernels, "probe", lambda d: probed.append(str(d)) or "it broke")
    gpu = torch.device("cuda:0")
    assert kernels.why_not_compiled(gpu) == "it broke" and not kernels.available(gpu)
    assert kernels.why_not_compiled(gpu) == "it broke"
    assert probed == ["cuda:0"]
    assert kernels.why_not_compiled(torch.device("cpu")) is not None

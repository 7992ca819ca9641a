"""lr_at against values worked out by hand."""

import math

import pytest

from lomotune.optim.schedule import lr_at
from lomotune.recipe import OptimizerConfig


def cfg(**kw):
    return OptimizerConfig(name="lomo", lr=1.0, **kw)


def test_warmup_is_linear_from_one_step_in():
    c = cfg(warmup_steps=4, schedule="constant")
    assert [lr_at(s, 10, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_reaches_the_floor():
    c = cfg(warmup_steps=2, schedule="linear", min_lr_ratio=0.1)
    # after warmup, 8 decay steps: factor 1 - k/8, then lr = 0.1 + 0.9 * factor
    assert lr_at(2, 10, c) == pytest.approx(1.0)
    assert lr_at(6, 10, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10, 10, c) == pytest.approx(0.1)


def test_cosine_decay():
    c = cfg(schedule="cosine")
    assert lr_at(0, 4, c) == pytest.approx(1.0)
    assert lr_at(1, 4, c) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(2, 4, c) == pytest.approx(0.5)
    assert lr_at(4, 4, c) == pytest.approx(0.0, abs=1e-12)

"""The estimate beside a run (tiny model, CPU): predicted next to measured in the summary,
`training.batch_size: auto`, the batch an out-of-memory stop suggests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lomotune.train
from lomotune.cli import app
from lomotune.estimate import Setup, estimate, shape_of
from lomotune.estimate.for_run import Budget
from lomotune.monitor import format_bytes
from lomotune.testing import tiny_llama

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()


def train(out: Path, *overrides: str):
    return runner.invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", "hardware.threads=1", *overrides, "--plain"],
    )


def tiny_estimate(method: str, batch: int):
    # tiny.yaml: fp32, checkpointing on, sequences of up to 48 tokens, CPU (foreach AdamW)
    setup = Setup(method, batch, 48, precision="fp32", device="cpu")
    return estimate(shape_of(tiny_llama().config), setup)


def fixed_budget(monkeypatch, n_bytes: int) -> None:
    budget = Budget(n_bytes, f"a test budget of {n_bytes} bytes")
    monkeypatch.setattr(lomotune.estimate.for_run, "device_budget", lambda *a, **k: budget)


def test_summary_holds_predicted_next_to_measured(tmp_path):
    out = tmp_path / "run"
    result = train(out, "training.max_steps=2", "optimizer.name=adamw", "optimizer.lr=1e-3")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    expected = tiny_estimate("adamw", 8)
    assert summary["peak_memory_predicted"] == expected.tensor_bytes
    assert summary["peak_memory_predicted_parts"]["optimizer_state"] == 2 * 4 * 21_952
    weights = expected.parts["weights"]
    assert weights == 4 * 21_952  # the tiny model's 21,952 fp32 parameters
    persistent = weights + 2 * 4 * 21_952  # and AdamW's two moments
    assert summary["step_memory_predicted"] == expected.tensor_bytes - persistent
    assert 0 <= summary["step_memory"] <= summary["peak_memory"]
    assert summary["memory_kind"] == "process RSS"
    # printed side by side, on one line
    step, predicted = (format_bytes(summary[k]) for k in ("step_memory", "step_memory_predicted"))
    assert f"  step memory: {step}, predicted {predicted}\n" in result.output


def test_batch_size_auto_takes_the_largest_the_estimate_fits(tmp_path, monkeypatch):
    # A budget between the estimates of batch 20 and 21: auto must choose 20.
    at_20, at_21 = (tiny_estimate("lomo", b).tensor_bytes for b in (20, 21))
    assert at_20 < at_21
    fixed_budget(monkeypatch, (at_20 + at_21) // 2)
    out = tmp_path / "run"
    # 2000 examples: 1800 training rows, where 1/16 (112) is above what memory allows
    result = train(
        out, "training.max_steps=1", "training.batch_size=auto", "data.num_examples=2000"
    )
    assert result.exit_code == 0, result.output
    assert "training.batch_size auto: 20 (lomo, sequences of up to 48 tokens" in result.output
    assert "21 would need" in result.output
    assert "batch_size: 20" in (out / "recipe.yaml").read_text()  # the resolved recipe


def test_batch_size_auto_keeps_a_run_of_updates_and_refuses_when_nothing_fits(
    tmp_path, monkeypatch
):
    # Memory for everything: the batch stops where an epoch is still 16 updates, not at
    # the whole data set (180 rows: one update an epoch).
    fixed_budget(monkeypatch, 2**40)
    result = train(tmp_path / "a", "training.max_steps=1", "training.batch_size=auto")
    assert result.exit_code == 0, result.output
    message = " ".join(result.output.split())
    assert "training.batch_size auto: 11 (lomo" in message  # 200 examples, 10% held out
    assert "at most 11 so that an epoch of the 180 training rows is 16 updates" in message
    assert "batch_size: 11" in (tmp_path / "a" / "recipe.yaml").read_text()
    fixed_budget(monkeypatch, 1000)  # not even the weights
    result = train(tmp_path / "b", "training.max_steps=1", "training.batch_size=auto")
    assert result.exit_code == 2, result.output
    assert "not even 1 sequence of 48 tokens fits" in result.output
    assert "set training.batch_size to a number" in result.output.lower()


@pytest.mark.parametrize("batch_fits", [True, False])
def test_out_of_memory_quotes_the_estimate_and_the_batch_that_fits(
    tmp_path, monkeypatch, batch_fits
):
    real_build = lomotune.train.build_engine

    def build(recipe, model, loss_fn):
        engine = real_build(recipe, model, loss_fn)
        calls = itertools.count(1)
        real_step = engine.step

        def step(batches, lr):
            if next(calls) == 2:
                raise MemoryError("Tried to allocate 2.00 GiB")
            return real_step(batches, lr)

        engine.step = step
        return engine

    monkeypatch.setattr(lomotune.train, "build_engine", build)
    at_5, at_6 = (tiny_estimate("lomo", b).tensor_bytes for b in (5, 6))
    fixed_budget(monkeypatch, 2**40 if batch_fits else (at_5 + at_6) // 2)
    result = train(tmp_path / "run", "training.batch_size=12", "training.max_steps=3")
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "The memory estimate for batch 12 x 48:" in text
    if batch_fits:  # the estimate thought 12 fits: it says so, and halving is the advice
        assert "what ran out is memory the estimate does not count" in text
        assert "training.batch_size: 6 (now 12)" in text
    else:
        assert "batch 5 is predicted to need" in text
        assert "training.batch_size: 5 (now 12)" in text


def test_batch_size_auto_on_resume_takes_the_checkpoints(tmp_path, monkeypatch):
    at_5, at_6 = (tiny_estimate("lomo", b).tensor_bytes for b in (5, 6))
    fixed_budget(monkeypatch, (at_5 + at_6) // 2)
    out = tmp_path / "run"
    first = train(out, "training.max_steps=1", "training.batch_size=auto")
    assert first.exit_code == 0, first.output
    fixed_budget(monkeypatch, 2**40)  # more memory now: a fresh choice would differ
    again = runner.invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", "hardware.threads=1", "training.max_steps=2",
         "training.batch_size=auto", "--plain", "--resume"],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "training.batch_size auto: 5, the batch of the checkpoint resumed" in again.output

"""Exact resume: a run that crashes and is resumed ends bitwise where an uninterrupted run
ends, for every kind of engine and in fp32 and bf16; a resume under another recipe is
refused unless forced.

The crash is real to the loop: an exception thrown from inside it after step 5 (the
weights of steps 4 and 5 are in memory only, step 4's metrics and an eval are on disk),
so the resume must go back to the step-3 checkpoint and cut the metrics log there."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lomotune.train
from lomotune.checkpoint import list_checkpoints
from lomotune.cli import app
from lomotune.dashboard import read_metrics

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()

# 54 train examples in batches of 8: 7 batches an epoch (the last of 6), so 8 steps cross
# an epoch (adamw and mezo, two micro-batches a step, within step 4: just after the
# checkpoint of step 3).
COMMON = [
    "hardware.threads=1",  # deterministic, and fast on a shared CPU (see one_thread)
    "data.num_examples=60",
    "training.max_steps=8",
    "training.save_every=3",
    "training.keep_checkpoints=5",
    "training.eval_every=4",
    "optimizer.schedule=cosine",
    "optimizer.warmup_steps=2",
]
CASES = {
    "lomo-fp32": ["optimizer.name=lomo", "optimizer.lr=0.05", "model.precision=fp32"],
    # bf16 weights: stochastic rounding draws noise from (seed, step, parameter).
    "lomo-bf16": ["optimizer.name=lomo", "optimizer.lr=0.05", "model.precision=bf16"],
    "adalomo-fp32": ["optimizer.name=adalomo", "optimizer.lr=0.01", "model.precision=fp32"],
    "adalomo-bf16": ["optimizer.name=adalomo", "optimizer.lr=0.01", "model.precision=bf16"],
    "mezo-fp32": ["optimizer.name=mezo", "optimizer.lr=1e-3", "optimizer.zo_directions=2",
                  "optimizer.gradient_accumulation=2", "model.precision=fp32"],
    "mezo-bf16": ["optimizer.name=mezo", "optimizer.lr=1e-3", "optimizer.zo_directions=2",
                  "optimizer.gradient_accumulation=2", "model.precision=bf16"],
    "adamw-fp32": ["optimizer.name=adamw", "optimizer.lr=3e-3",
                   "optimizer.gradient_accumulation=2", "model.precision=fp32"],
    "adamw-bf16": ["optimizer.name=adamw", "optimizer.lr=3e-3",
                   "optimizer.gradient_accumulation=2", "model.precision=bf16"],
}  # fmt: skip


class SimulatedCrash(Exception):
    pass


def train(out: Path, *overrides: str, flags=()):
    return runner.invoke(
        app, ["train", TINY, f"training.output_dir={out}", *overrides, "--plain", *flags]
    )


def crash_after_step(monkeypatch, step: int) -> None:
    """The run dies once `step` is done, before it is logged or saved."""
    real = lomotune.train.log_step

    def log_step(run, *args):
        if run.state.step == step:
            raise SimulatedCrash(f"killed after step {step}")
        return real(run, *args)

    monkeypatch.setattr(lomotune.train, "log_step", log_step)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def tensors_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor of a safetensors file as raw bytes: equal means bitwise equal."""
    return {
        k: v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in load_file(path).items()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_crash_and_resume_is_bitwise_an_uninterrupted_run(tmp_path, monkeypatch, case):
    settings = [*COMMON, *CASES[case]]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert train(straight, *settings).exit_code == 0

    with monkeypatch.context() as m:
        crash_after_step(m, 5)
        died = train(crashed, *settings)
    assert isinstance(died.exception, SimulatedCrash)
    assert [c.name for c in list_checkpoints(crashed)] == ["step-000003"]
    assert [r["step"] for r in records(crashed, "train")] == [1, 2, 3, 4]  # 4: after the save
    assert [r["step"] for r in records(crashed, "eval")] == [4]

    resumed = train(crashed, *settings, flags=["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {crashed / 'checkpoints' / 'step-000003'} (step 3)" in resumed.output

    # The final weights, and the optimizer state of the last checkpoint, bit for bit.
    final = tensors_bytes(straight / "model" / "model.safetensors")
    assert tensors_bytes(crashed / "model" / "model.safetensors") == final
    start = tensors_bytes(straight / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    assert start != final  # the steps after the checkpoint did change the weights
    last = Path("checkpoints") / "step-000008"
    assert tensors_bytes(crashed / last / "optimizer.safetensors") == tensors_bytes(
        straight / last / "optimizer.safetensors"
    )
    a = json.loads((straight / last / "state.json").read_text())
    b = json.loads((crashed / last / "state.json").read_text())
    for key in ("step", "epoch", "index", "tokens_seen", "skipped_steps", "engine"):
        assert a[key] == b[key], key

    # The log: one record per step, and the same lr, loss, data epoch per step as straight.
    want, got = records(straight, "train"), records(crashed, "train")
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("lr", "loss", "epoch", "tokens"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    assert len({r["lr"] for r in want}) >= 6  # warmup + cosine: the lr moves every step
    assert want[-1]["epoch"] >= 1  # the data position crossed an epoch
    assert [(r["step"], r["eval_loss"]) for r in records(crashed, "eval")] == [
        (r["step"], r["eval_loss"]) for r in records(straight, "eval")
    ]
    assert [
        r["step"] for r in read_metrics(crashed / "metrics.jsonl") if r["kind"] == "summary"
    ] == [8]


def test_resume_under_a_changed_recipe_is_refused_unless_forced(tmp_path):
    out = tmp_path / "run"
    assert (
        train(out, "training.max_steps=4", "training.save_every=2", "hardware.threads=1").exit_code
        == 0
    )
    before = tensors_bytes(out / "model" / "model.safetensors")

    changed = train(
        out, "training.max_steps=8", "optimizer.name=adamw", "training.seed=7", flags=["--resume"]
    )
    assert changed.exit_code == 2
    assert "was made with a different recipe" in changed.output
    assert "optimizer.name: checkpoint has 'lomo', recipe has 'adamw'" in changed.output
    assert "training.seed: checkpoint has 42, recipe has 7" in changed.output
    assert "--force" in changed.output and "Traceback" not in changed.output
    assert tensors_bytes(out / "model" / "model.safetensors") == before  # nothing touched
    assert [c.name for c in list_checkpoints(out)] == ["step-000002", "step-000004"]

    other_data = ["data.source=builtin:dates", "data.num_examples=30", "data.max_length=96"]
    assert train(out, "training.max_steps=8", *other_data, flags=["--resume"]).exit_code == 2

    # --force: another method starts with fresh optimizer state (a lomo checkpoint has
    # none that adamw could read); other data starts its next epoch when the saved
    # position (batch 6) is past its end (27 examples: 4 batches an epoch).
    forced = train(
        out, "training.max_steps=6", "optimizer.name=adamw", flags=["--resume", "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert "optimizer state (lomo) was not loaded: adamw starts with fresh state" in forced.output
    forced = train(out, "training.max_steps=8", *other_data, flags=["--resume", "--force"])
    assert forced.exit_code == 0, forced.output
    train_steps = [r["step"] for r in records(out, "train")]
    assert train_steps == list(range(1, 9))
    assert [r["epoch"] for r in records(out, "train")][-2:] == [1, 1]  # batches 0, 1 of epoch 1


def test_resume_with_fewer_gpus_than_at_save_restores_those_that_exist(tmp_path, monkeypatch):
    """12 GPUs' RNG states saved, 3 visible now: GPU i gets the state saved as cuda/i (by
    number: cuda/10 is not GPU 2's), no IndexError for the 9 that are gone. torch.cuda is
    faked as torch's own is on 3 GPUs: an index past them raises IndexError."""
    from safetensors.torch import save_file

    from lomotune.checkpoint import _rng_of_this_process, restore_rng

    saved = _rng_of_this_process()
    states = {"torch": saved["torch"]["torch"]}
    states |= {f"cuda/{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(12)}
    save_file(states, tmp_path / "rng.safetensors")
    payload = {"python_rng": saved["python"], "numpy_rng": saved["numpy"]}
    restored = {}

    def set_rng_state(state, device=0):
        if int(device) >= 3:
            raise IndexError("list index out of range")  # torch.cuda.default_generators[i]
        restored[int(device)] = int(state[0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # set_rng_state_all's
    monkeypatch.setattr(torch.cuda.random, "device_count", lambda: 3)
    restore_rng(tmp_path, payload)
    assert restored == {0: 0, 1: 1, 2: 2}

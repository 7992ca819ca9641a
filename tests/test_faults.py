"""Faults: signals, kills, non-finite losses, out of memory, a full disk. Each leaves a
complete checkpoint to resume from and a message that says what happened and what to do.

The signal tests run `python -m lomotune.cli train` as a child process and act on its
output lines as they appear ("step N/...", "checkpoint saved: ..."): no test hooks in
the code under test."""

import errno
import hashlib
import itertools
import json
import math
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from typer.testing import CliRunner

import lomotune.checkpoint
import lomotune.train
from lomotune.checkpoint import latest_checkpoint, list_checkpoints, read_training_state
from lomotune.cli import app
from lomotune.dashboard import MetricsLog, read_metrics

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()
# One thread: a run in a child process and one in this process compute bitwise alike,
# and a CPU shared with other jobs does not stall two threads that wait for each other.
THREADS = "hardware.threads=1"


def train(out: Path, *overrides: str, flags=()):
    return runner.invoke(
        app, ["train", TINY, f"training.output_dir={out}", THREADS, *overrides, "--plain", *flags]
    )


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_complete(checkpoint: Path) -> None:
    """A checkpoint that a resume can use: state, optimizer state and weights all read."""
    state, _ = read_training_state(checkpoint)
    assert state.step == int(checkpoint.name.split("-")[1])
    load_file(checkpoint / "optimizer.safetensors")
    assert load_file(checkpoint / "rng.safetensors")["torch"].numel() > 0
    assert weights(checkpoint / "model")["model.embed_tokens.weight"].shape[0] > 0


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob(".partial-*"))


# ---------------------------------------------------------------------------------------
# Signals and kills, on a child process


class Child:
    """`lomotune train` in a child process; its output lines as they come."""

    def __init__(self, *args: str, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lomotune.cli", "train", *args, "--plain"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """Block until an output line matches `pattern` (a regex, matched at the start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(
                    f"no line {pattern!r} in {timeout} s:\n{self.output}"
                ) from None
            if line is None:
                raise AssertionError(f"ended before a line {pattern!r}:\n{self.output}")
            self.lines.append(line)
            found = re.match(pattern, line)
            if found:
                return found

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def long_run(out: Path, *overrides: str) -> list[str]:
    # 2000 steps: far more than a test waits for, so only a signal ends it.
    return [TINY, f"training.output_dir={out}", THREADS, "training.max_steps=2000",
            "training.eval_every=0", *overrides]  # fmt: skip


def test_sigint_saves_says_how_to_resume_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    child = Child(*long_run(out, "training.save_every=0"), cwd=tmp_path)
    child.wait_for(r"step 3/2000 ")
    child.send(signal.SIGINT)
    assert child.finish() == 130, child.output
    stopped = re.search(r"stopped by SIGINT after step (\d+); checkpoint (\S+)\.", child.output)
    assert stopped, child.output
    step = int(stopped.group(1))
    assert step >= 3
    checkpoint = out / "checkpoints" / f"step-{step:06d}"
    assert stopped.group(2) == str(checkpoint) and latest_checkpoint(out) == checkpoint
    assert_complete(checkpoint)
    assert [r["step"] for r in train_records(out)] == list(range(1, step + 1))
    assert "Traceback" not in child.output
    # The command it prints is the one to run (the run's own resolved recipe).
    command = f"Continue with: lomotune train {out / 'recipe.yaml'} --resume"
    assert command in child.output

    resumed = runner.invoke(
        app,
        [
            "train",
            str(out / "recipe.yaml"),
            "--resume",
            f"training.max_steps={step + 3}",
            "--plain",
        ],
    )
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {checkpoint} (step {step})" in resumed.output
    assert [r["step"] for r in train_records(out)] == list(range(1, step + 4))
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 3


def test_sigterm_saves_and_exits_143(tmp_path):
    out = tmp_path / "run"
    child = Child(*long_run(out), cwd=tmp_path)
    child.wait_for(r"step 2/2000 ")
    child.send(signal.SIGTERM)
    assert child.finish() == 143, child.output
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", child.output).group(1))
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{step:06d}"
    assert_complete(latest_checkpoint(out))
    assert "Traceback" not in child.output


def test_second_sigint_during_the_save_aborts_and_keeps_the_last_checkpoint(tmp_path):
    # The first SIGINT after step 7: the save it asks for (step 7 or 8; the periodic
    # ones are at 5 and 10) starts after it. The second comes once that save has written
    # its weights into checkpoints/.partial-step-*/.
    out = tmp_path / "run"
    child = Child(*long_run(out, "training.save_every=5"), cwd=tmp_path)
    child.wait_for(r"step 7/2000 ")
    child.send(signal.SIGINT)
    child.wait_for(r"SIGINT: finishing this step")
    wait_until(lambda: any(out.glob("checkpoints/.partial-step-*/model/model.safetensors")), child)
    child.send(signal.SIGINT)
    assert child.finish() == 130, child.output
    assert "interrupted before a step could finish" in child.output
    assert "the last complete checkpoint, if any, is intact" in child.output
    assert "Traceback" not in child.output
    assert list_checkpoints(out) == [out / "checkpoints" / "step-000005"]
    assert_complete(out / "checkpoints" / "step-000005")
    assert partials(out) == []  # the half-written checkpoint was removed on the way out
    resumed = train(out, "training.max_steps=9", flags=["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {out / 'checkpoints' / 'step-000005'} (step 5)" in resumed.output


def wait_until(condition, child: Child, timeout: float = 30) -> None:
    """Poll without sleeping: a whole save of the tiny model takes a few milliseconds."""
    deadline = time.monotonic() + timeout
    while not condition() and child.proc.poll() is None and time.monotonic() < deadline:
        pass


# The files of a checkpoint in the order a save writes them: a kill when one of them
# appears in the .partial-* folder lands at that point of the save.
SAVE_STAGES = ["model/config.json", "model/model.safetensors", "model/tokenizer.json",
               "optimizer.safetensors", "rng.safetensors", "state.json"]  # fmt: skip


def test_killed_at_random_points_always_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL four times, in a step or at a point of a save chosen at random (seeded);
    each resume starts from the newest complete checkpoint, and the end is bitwise the
    run that was never killed."""
    settings = ["training.max_steps=24", "training.save_every=1", "training.eval_every=0",
                "optimizer.schedule=cosine", "model.precision=fp32"]  # fmt: skip
    reference = tmp_path / "reference"
    assert train(reference, *settings).exit_code == 0

    out = tmp_path / "killed"
    rng = random.Random(20240611)
    done, kills_in_saves, latest = 0, 0, None  # steps with a checkpoint; kills mid-save
    for where in ["save", "step", "save", "save"]:
        child = Child(
            TINY, f"training.output_dir={out}", THREADS, *settings, "--resume", cwd=tmp_path
        )
        if latest is not None:
            child.wait_for(rf"resumed from {re.escape(str(latest))} \(step {done}\)")
        target = done + rng.randint(2, 4)
        if where == "save":  # it starts right after the step's line
            child.wait_for(rf"step {target}/24 ")
            stage = out / "checkpoints" / f".partial-step-{target:06d}" / rng.choice(SAVE_STAGES)
            wait_until(stage.exists, child)
        else:  # in the next step, a moment after the save
            child.wait_for(rf"checkpoint saved: .*step-{target:06d}")
            time.sleep(rng.uniform(0.0, 0.005))
        child.proc.kill()
        child.finish()
        kills_in_saves += bool(partials(out))
        latest = latest_checkpoint(out)
        assert_complete(latest)
        announced = re.findall(r"checkpoint saved: .*step-(\d+)", child.output)
        done = int(latest.name.split("-")[1])
        assert done >= int(announced[-1]) if announced else done > 0  # nothing saved was lost
    assert done < 24
    assert kills_in_saves >= 2  # of the 3 aimed at saves: they did land in the middle

    last = Child(TINY, f"training.output_dir={out}", THREADS, *settings, "--resume", cwd=tmp_path)
    assert last.finish() == 0, last.output
    assert f"resumed from {latest} (step {done})" in last.output
    assert_bitwise_equal(weights(out / "model"), weights(reference / "model"))
    assert [r["step"] for r in train_records(out)] == list(range(1, 25))
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(reference)]
    assert partials(out) == []  # what killed saves left behind was cleared


# ---------------------------------------------------------------------------------------
# Non-finite losses


def poison_steps(monkeypatch, bad: set[int]) -> None:
    """The engine's loss is NaN on the given steps (1-based)."""
    real_build = lomotune.train.build_engine

    def build(recipe, model, loss_fn):
        engine = real_build(recipe, model, loss_fn)
        real_step, calls = engine.step, itertools.count(1)

        def nan_loss(batch):
            loss_sum, n = loss_fn(batch)
            return loss_sum * float("nan"), n

        def step(batches, lr):
            engine.loss_fn = nan_loss if next(calls) in bad else loss_fn
            return real_step(batches, lr)

        engine.step = step
        return engine

    monkeypatch.setattr(lomotune.train, "build_engine", build)


NAN_METHODS = {
    "lomo": ["optimizer.lr=0.05"],
    "adalomo": ["optimizer.lr=0.01"],
    "mezo": ["optimizer.lr=1e-3"],
    "adamw": ["optimizer.lr=3e-3", "optimizer.gradient_accumulation=2"],
}


@pytest.mark.parametrize("method", list(NAN_METHODS))
def test_non_finite_steps_are_skipped_counted_and_change_nothing(tmp_path, monkeypatch, method):
    poison_steps(monkeypatch, {2, 4})
    out = tmp_path / method
    result = train(
        out, f"optimizer.name={method}", *NAN_METHODS[method], "training.max_steps=6",
        "training.save_every=1", "training.keep_checkpoints=10", "training.eval_every=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "step 2: non-finite loss; nothing applied" in result.output
    assert re.search(r"^step 4/6 \| loss nan \|.* \| skipped 2 \|", result.output, re.M)
    records = train_records(out)
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 2, 2]
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 2
    step = {c.name: weights(c / "model") for c in list_checkpoints(out)}
    for before, skipped, after in (("1", "2", "3"), ("3", "4", "5")):
        a, b = step[f"step-00000{before}"], step[f"step-00000{skipped}"]
        if method == "mezo":
            # MeZO perturbs in place (theta + eps z - eps z): back to within rounding.
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
        else:
            assert_bitwise_equal(a, b)
        c = step[f"step-00000{after}"]
        assert any(not torch.equal(b[k], c[k]) for k in b)  # the next good step applies


def test_diverging_run_stops_with_exit_4_and_a_checkpoint(tmp_path):
    # lr 1e6: step 1 is finite and applied, the weights blow up, then every loss is NaN.
    out = tmp_path / "run"
    result = train(
        out, "optimizer.lr=1e6", "training.max_steps=40", "training.save_every=1",
        "training.keep_checkpoints=3", "training.eval_every=0",
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    skipped = [r["skipped_steps"] for r in train_records(out)]
    first_bad = skipped.index(1) + 1
    stop = first_bad + 4  # training.max_bad_steps: 5 in a row
    assert skipped == [0] * (first_bad - 1) + [1, 2, 3, 4, 5] and first_bad >= 2
    assert f"5 steps in a row had non-finite loss; stopped at step {stop}" in result.output
    assert "Lower optimizer.lr" in result.output and "Traceback" not in result.output
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{stop:06d}"
    assert_complete(latest_checkpoint(out))
    # The stop's save prunes nothing (keep_checkpoints is 3): what was saved before stays.
    assert [c.name for c in list_checkpoints(out)] == [
        f"step-{s:06d}" for s in range(stop - 3, stop + 1)
    ]
    # Skipped steps applied nothing: the weights stay those of the last finite step.
    final = weights(latest_checkpoint(out) / "model")
    for checkpoint in list_checkpoints(out)[:-1]:
        assert int(checkpoint.name.split("-")[1]) >= first_bad - 1
        assert_bitwise_equal(weights(checkpoint / "model"), final)


# ---------------------------------------------------------------------------------------
# Out of memory


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_exits_3_naming_the_batch_size_and_the_fixes(tmp_path, monkeypatch, error):
    real_build = lomotune.train.build_engine

    def build(recipe, model, loss_fn):
        engine = real_build(recipe, model, loss_fn)
        real_step, calls = engine.step, itertools.count(1)

        def step(batches, lr):
            if next(calls) == 3:
                raise error("Tried to allocate 2.00 GiB")
            return real_step(batches, lr)

        engine.step = step
        return engine

    monkeypatch.setattr(lomotune.train, "build_engine", build)
    out = tmp_path / "run"
    result = train(
        out, "optimizer.name=adamw", "optimizer.lr=3e-3", "model.activation_checkpointing=false",
        "training.save_every=2", "training.batch_size=6",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "out of host memory at step 3" in result.output
    assert "Tried to allocate 2.00 GiB" in result.output
    assert "training.batch_size: 3 (now 6)" in result.output
    assert "model.activation_checkpointing: true" in result.output
    assert "optimizer.name: lomo or adalomo" in result.output
    assert "Traceback" not in result.output
    assert [c.name for c in list_checkpoints(out)] == ["step-000002"]  # the last good one


# ---------------------------------------------------------------------------------------
# A full disk


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def no_space(kind: str, filename) -> Exception:
    """What a full disk raises: the OSError, or safetensors' SafetensorError wrapping it
    (its message as safetensors 0.x writes it on a 64 KiB tmpfs), which is no OSError."""
    if kind == "safetensors":
        return SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )
    return OSError(errno.ENOSPC, "No space left on device", str(filename))


@pytest.mark.parametrize("kind", ["os", "safetensors"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    settings = ["training.max_steps=6", "training.save_every=2", "training.eval_every=0"]
    real_save_file, saves, digest = lomotune.checkpoint.save_file, [], {}

    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).name == "optimizer.safetensors":
            saves.append(filename)
            if len(saves) == 2:  # the second checkpoint: half a file, then no space
                digest["before"] = folder_digest(out / "checkpoints" / "step-000002")
                Path(filename).write_bytes(b"\0" * 100)
                raise no_space(kind, filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(lomotune.checkpoint, "save_file", save_file)
        result = train(out, *settings)
    assert result.exit_code == 5, result.output  # EXIT_WRITE_FAILED
    previous = out / "checkpoints" / "step-000002"
    assert (
        f"could not write checkpoint {out / 'checkpoints' / 'step-000004'}: No space left on "
        f"device; the previous checkpoint {previous} is intact" in result.output
    )
    assert "Free disk space" in result.output and "Traceback" not in result.output
    assert list_checkpoints(out) == [previous] and partials(out) == []
    assert folder_digest(previous) == digest["before"]

    # It is intact indeed: resuming from it ends where a run that never failed ends.
    resumed = train(out, *settings, flags=["--resume"])
    assert resumed.exit_code == 0, resumed.output
    reference = tmp_path / "reference"
    assert train(reference, *settings).exit_code == 0
    assert_bitwise_equal(weights(out / "model"), weights(reference / "model"))


@pytest.mark.parametrize("kind", ["os", "safetensors"])
def test_disk_full_while_writing_the_final_model(tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    real_save_model = lomotune.train.save_model

    def save_model(run, folder, weights=None):
        if folder.name == ".partial-model":
            (folder / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"\0" * 100)
            raise no_space(kind, folder / "model.safetensors")
        return real_save_model(run, folder, weights)

    with monkeypatch.context() as m:
        m.setattr(lomotune.train, "save_model", save_model)
        result = train(out, "training.max_steps=3", "training.eval_every=0")
    assert result.exit_code == 5, result.output
    assert f"could not write the final model to {out / 'model'}: No space left on device" in (
        result.output
    )
    assert "Traceback" not in result.output
    assert not (out / "model").exists() and not (out / ".partial-model").exists()
    assert_complete(out / "checkpoints" / "step-000003")
    again = train(out, "training.max_steps=3", "training.eval_every=0", flags=["--resume"])
    assert again.exit_code == 0, again.output
    assert_bitwise_equal(
        weights(out / "model"), weights(out / "checkpoints" / "step-000003" / "model")
    )


def test_disk_full_while_logging_metrics(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write, writes = MetricsLog.write, itertools.count(1)

    def write(self, kind, step, metrics):
        if kind == "train" and next(writes) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, kind, step, metrics)

    with monkeypatch.context() as m:
        m.setattr(MetricsLog, "write", write)
        result = train(out, "training.max_steps=6", "training.save_every=2")
    assert result.exit_code == 5, result.output
    assert f"No space left on device: {out / 'metrics.jsonl'}" in result.output
    assert "continue with --resume" in result.output and "Traceback" not in result.output
    assert latest_checkpoint(out) == out / "checkpoints" / "step-000004"
    resumed = train(out, "training.max_steps=6", "training.save_every=2", flags=["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in train_records(out)] == list(range(1, 7))


# ---------------------------------------------------------------------------------------
# Non-finite weights and recipe values


@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", ".nan"])
def test_non_finite_float_keys_are_refused(tmp_path, value):
    result = train(tmp_path / "run", f"optimizer.lr={value}")
    assert result.exit_code == 2, result.output
    assert "optimizer.lr: input should be a finite number" in result.output
    assert not (tmp_path / "run").exists()


def test_a_final_model_with_a_non_finite_weight_is_never_written(tmp_path, monkeypatch):
    """The last step's update overflows one weight: its loss was finite, the next step
    never comes, and the weights must not become the final model."""
    real_build = lomotune.train.build_engine

    def build(recipe, model, loss_fn):
        engine = real_build(recipe, model, loss_fn)
        real_step, calls = engine.step, itertools.count(1)

        def step(batches, lr):
            result = real_step(batches, lr)
            if next(calls) == 3:
                with torch.no_grad():
                    model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
            return result

        engine.step = step
        return engine

    monkeypatch.setattr(lomotune.train, "build_engine", build)
    out = tmp_path / "run"
    result = train(out, "training.max_steps=3", "training.save_every=2", "training.eval_every=0")
    assert result.exit_code == 4, result.output
    assert (
        "after step 3 the weights are not finite (model.layers.1.mlp.up_proj.weight); "
        "the final model was not written" in result.output
    )
    assert "Traceback" not in result.output
    assert not (out / "model").exists() and not (out / ".partial-model").exists()
    assert [c.name for c in list_checkpoints(out)] == ["step-000002"]
    assert all(
        torch.isfinite(w).all() for w in weights(out / "checkpoints/step-000002/model").values()
    )


# ---------------------------------------------------------------------------------------
# The output folder: --overwrite, a second run, a folder inside another run


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    """`training.output_dir=. --overwrite` from the user's own folder removes nothing."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "my.yaml").write_text(Path(TINY).read_text())
    (work / "notes.txt").write_text("mine")
    result = runner.invoke(
        app, ["train", str(work / "my.yaml"), f"training.output_dir={work}", THREADS, "--plain",
              "--overwrite"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"--overwrite: {work} is not a lomotune run's folder (it holds my.yaml, notes.txt)" in (
        message
    )
    assert "nothing was removed" in message and "Traceback" not in message
    assert sorted(p.name for p in work.iterdir()) == ["my.yaml", "notes.txt"]
    # Without --overwrite it is refused as well, and not called "an earlier run".
    plain = runner.invoke(app, ["train", str(work / "my.yaml"), f"training.output_dir={work}"])
    assert plain.exit_code == 2 and "not a lomotune run's folder" in plain.output


def test_overwrite_removes_only_what_the_run_wrote(tmp_path):
    out = tmp_path / "run"
    assert train(out, "training.max_steps=2", "training.save_every=1").exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = weights(out / "model")
    again = train(out, "training.max_steps=1", "optimizer.lr=0.5", flags=["--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "notes.txt").read_text() == "mine"
    assert [c.name for c in list_checkpoints(out)] == ["step-000001"]  # step 2's is gone
    assert [r["step"] for r in train_records(out)] == [1]
    assert any(not torch.equal(before[k], w) for k, w in weights(out / "model").items())
    assert not (out / ".lomotune.lock").exists()  # released with the run


@pytest.mark.parametrize("what", ["recipe", "data", "model"])
def test_overwrite_refuses_a_run_folder_holding_what_the_run_reads(tmp_path, what):
    out = tmp_path / "run"
    assert train(out, "training.max_steps=1").exit_code == 0
    recipe, overrides = TINY, []
    if what == "recipe":
        recipe = str(out / "my.yaml")
        (out / "my.yaml").write_text(Path(TINY).read_text())
    elif what == "data":
        rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)]
        (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        overrides = [f"data.source={out / 'rows.jsonl'}"]
    else:  # training on from the run's own final model
        overrides = [f"model.name={out / 'model'}"]
    before = sorted(p.name for p in out.iterdir())
    result = runner.invoke(
        app, ["train", recipe, f"training.output_dir={out}", THREADS, *overrides, "--plain",
              "--overwrite"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"--overwrite: {out} holds the {what} " in message
    assert "which this run reads; nothing was removed" in message
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_process(tmp_path):
    out = tmp_path / "run"
    first = Child(*long_run(out, "training.save_every=2"), cwd=tmp_path)
    first.wait_for(r"checkpoint saved: .*step-000002")
    for flags in (["--resume"], ["--overwrite"], []):
        second = train(out, "training.max_steps=3", flags=flags)
        assert second.exit_code == 2, second.output
        message = " ".join(second.output.split())
        assert f"{out} is in use by another lomotune run: process {first.proc.pid} on " in message
        assert "Traceback" not in message
    assert latest_checkpoint(out) is not None and first.proc.poll() is None  # untouched
    first.proc.kill()  # SIGKILL: no chance to remove its lock file
    first.finish()
    assert (out / ".lomotune.lock").exists()  # stale: its process is gone
    latest = latest_checkpoint(out)
    step = int(latest.name.split("-")[1])
    resumed = train(out, f"training.max_steps={step + 1}", flags=["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {latest} (step {step})" in resumed.output


def test_an_output_folder_inside_another_runs_checkpoints_is_refused(tmp_path):
    a = tmp_path / "a"
    assert train(a, "training.max_steps=2", "training.save_every=1").exit_code == 0
    for inner in (a / "checkpoints" / "mine", a / "checkpoints", a / "model" / "sub"):
        result = train(inner, "training.max_steps=1")
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert f"training.output_dir: {inner} lies inside " in message
        assert "belongs to another run" in message
    assert not (a / "checkpoints" / "mine").exists() and not (a / "model" / "sub").exists()


# ---------------------------------------------------------------------------------------
# Resume: the data, the recipe


def test_a_resume_onto_changed_data_is_refused_unless_forced(tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"{i} + 2 =", "completion": f" {i + 2}"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    settings = [f"data.source={data}", "training.save_every=2", "training.eval_every=0"]
    assert train(out, *settings, "training.max_steps=2").exit_code == 0
    rows[7]["completion"] = " 10"  # one answer edited under the run: same size, same rows
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = {p: (out / p).read_bytes() for p in ("recipe.yaml", "metrics.jsonl")}

    refused = train(out, *settings, "training.max_steps=4", flags=["--resume"])
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.output.split())
    checkpoint = out / "checkpoints" / "step-000002"
    assert f"the training data ({data}" in message
    assert f"is not the data the checkpoint {checkpoint} was trained on" in message
    assert "pass --force to continue on this data" in message and "Traceback" not in message
    assert {p: (out / p).read_bytes() for p in written} == written  # nothing rewritten

    forced = train(out, *settings, "training.max_steps=4", flags=["--resume", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "continuing on it (--force)" in forced.output
    # The next checkpoint records the new data: resuming from it needs no --force.
    again = train(out, *settings, "training.max_steps=5", flags=["--resume"])
    assert again.exit_code == 0, again.output


# ---------------------------------------------------------------------------------------
# Damaged inputs: one line naming the file, exit 2


def test_a_damaged_weights_file_is_named_by_train_and_eval(tmp_path):
    run = tmp_path / "run"
    assert train(run, "training.max_steps=1", "training.eval_every=0").exit_code == 0
    weights_file = run / "model" / "model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])  # a copy cut short
    fixtures = Path(__file__).parent / "fixtures" / "superglue" / "hub"
    results = [
        train(tmp_path / "next", f"model.name={run / 'model'}"),
        runner.invoke(app, ["eval", "--model", str(run / "model"), "--tasks", "rte",
                            "--data-dir", str(fixtures), "--precision", "fp32"]),
    ]  # fmt: skip
    for result in results:
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert f"{weights_file} is not a readable safetensors file" in message
        assert "Traceback" not in message and "SafetensorError" not in message
    assert not (tmp_path / "next").exists()


def test_a_recipe_of_random_bytes_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(bytes(random.Random(7).randrange(256) for _ in range(2000)))
    result = runner.invoke(app, ["train", str(recipe), "--plain"])
    assert result.exit_code == 2, result.output
    assert "not a YAML recipe: byte" in result.output and "is not UTF-8 text" in result.output
    assert "Traceback" not in result.output


def test_a_max_length_beyond_the_models_context_is_refused_at_start(tmp_path):
    # tiny-llama: max_position_embeddings 512 (lomotune.testing.tiny_llama_config)
    result = train(tmp_path / "run", "data.max_length=600")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (
        "data.max_length: 600 is beyond the context of model 'tiny-llama' (512 positions, its "
        "max_position_embeddings). Set data.max_length: 512 or less" in message
    )
    assert not (tmp_path / "run").exists() and "Traceback" not in message
    assert train(tmp_path / "ok", "data.max_length=512", "training.max_steps=1").exit_code == 0


@pytest.mark.parametrize("size", ["-5", "0", "inf"])
def test_estimate_refuses_a_gpu_size_that_is_not_one(size):
    result = runner.invoke(
        app, ["estimate", "--model", "tiny-llama", "--max-batch", "--gpu-mem", size]
    )
    assert result.exit_code == 2, result.output
    assert f"--gpu-mem: {float(size):g} is not a size" in result.output
    assert "largest batch" not in result.output


def cosine_lr(step: int, total: int, lr: float) -> float:
    """The lr of 0-based `step` under cosine decay to 0 without warmup, written out here."""
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def test_a_resume_that_changes_lr_or_max_steps_says_what_changes_from_which_step(tmp_path):
    out = tmp_path / "run"
    settings = ["optimizer.schedule=cosine", "training.save_every=3", "training.eval_every=0"]
    assert train(out, *settings, "training.max_steps=6").exit_code == 0
    resumed = train(out, *settings, "training.max_steps=10", "optimizer.lr=0.5", flags=["--resume"])
    assert resumed.exit_code == 0, resumed.output
    was, now = cosine_lr(6, 6, 0.05), cosine_lr(6, 10, 0.5)  # 0 (the end), then 0.173
    notes = [
        "optimizer.lr: 0.05 -> 0.5 from step 7 (steps 1-6 ran with 0.05)",
        "training.max_steps: 6 -> 10 from step 7 (steps 1-6 ran with 6)",
        f"the lr of step 7 is {now:.3g} ({was:.3g} under the checkpoint's recipe): cosine "
        "schedule over 10 steps, was 6",
    ]
    for note in notes:
        assert note in resumed.output
    # The folder keeps both values: recipe.yaml the new ones, headed by the old.
    recipe = (out / "recipe.yaml").read_text()
    for note in notes:
        assert f"# resumed at step 6: {note}\n" in recipe
    assert "lr: 0.5\n" in recipe and "max_steps: 10\n" in recipe
    lrs = [r["lr"] for r in train_records(out)]
    assert lrs[:6] == pytest.approx([cosine_lr(s, 6, 0.05) for s in range(6)], rel=1e-12)
    assert lrs[6:] == pytest.approx([cosine_lr(s, 10, 0.5) for s in range(6, 10)], rel=1e-12)

    # Resumed again without a change: no new note, the history stays.
    again = train(out, *settings, "training.max_steps=10", "optimizer.lr=0.5", flags=["--resume"])
    assert again.exit_code == 0, again.output
    assert "from step" not in again.output
    assert (out / "recipe.yaml").read_text().count("# resumed at step 6:") == 3


def test_a_refused_resume_names_only_the_keys_that_differ(tmp_path):
    out = tmp_path / "run"
    assert train(out, "training.max_steps=2", "training.eval_every=0").exit_code == 0
    refused = train(out, "training.max_steps=4", "data.max_length=64", flags=["--resume"])
    assert refused.exit_code == 2, refused.output
    lines = [line.strip() for line in refused.output.splitlines() if line.strip().startswith("- ")]
    assert lines == ["- data.max_length: checkpoint has 48, recipe has 64"]
    assert "'source'" not in refused.output  # not the whole data section

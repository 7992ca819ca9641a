"""Several processes on CPU (gloo, 2 processes, the tiny model), started the ways a user
starts them: `lomotune train` with hardware.processes: 2 (torch's elastic launcher),
and `torchrun -m lomotune train`.

Two processes with the global batch split between them must end where one process with
the whole batch ends (1e-5, fp32); their checkpoints resume on 1 and on 2 processes; a
rank that is killed ends the run within seconds, with a message."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lomotune.cli import app

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()
COMMON = [
    "hardware.gpus=0",
    "hardware.threads=1",
    "data.num_examples=40",
    "training.eval_every=2",
    "training.save_every=2",
    "training.keep_checkpoints=5",
    "model.precision=fp32",
]
METHODS = {
    # lomo under FSDP2 with the global norm clipped: the norm is summed over ranks.
    "lomo": ["optimizer.name=lomo", "optimizer.lr=0.05", "optimizer.clip.mode=exact",
             "optimizer.clip.max_norm=0.5"],
    # adamw under FSDP2: its moments are sharded, and gathered whole in checkpoints.
    "adamw": ["optimizer.name=adamw", "optimizer.lr=1e-3", "optimizer.clip.mode=exact",
              "optimizer.clip.max_norm=0.5"],
    # mezo: data parallel, only the losses are summed.
    "mezo": ["optimizer.name=mezo", "optimizer.lr=1e-3", "optimizer.zo_directions=2"],
}  # fmt: skip


def cli(*args: str, timeout: float = 240, launcher=(sys.executable, "-m", "lomotune")):
    """The command in a fresh process, as a user types it (the launcher needs real
    processes: CliRunner cannot start them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def in_process(out: Path, method: str, steps: int, *flags: str):
    result = runner.invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", f"training.max_steps={steps}",
         *COMMON, *METHODS[method], "--plain", *flags],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_and_their_checkpoints_resume_on_one_or_two(tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    in_process(one, method, 4)
    launched = cli(
        "train", TINY, f"training.output_dir={two}", "training.max_steps=4", "hardware.processes=2",
        *COMMON, *METHODS[method], "--plain",
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert_close(weights(two / "model"), weights(one / "model"))
    # The global loss, not a rank's share, is what every step reports.
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").open()) if r["kind"] == "train"]
              for d in (one, two)]  # fmt: skip
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["peak_memory_spread"] >= 0
    assert "# world_size: 2" in (two / "recipe.yaml").read_text()
    assert launched.stdout.count("summary:") == 1  # rank 0 alone prints

    # The 2-process checkpoint continues on 1 process and ends where one process ends.
    in_process(one, method, 6, "--resume")
    in_process(two, method, 6, "--resume")
    assert_close(weights(two / "model"), weights(one / "model"))
    optimizer = [
        load_file(d / "checkpoints" / "step-000006" / "optimizer.safetensors") for d in (one, two)
    ]
    assert_close(*optimizer)
    if method == "lomo":  # and on 2 processes, from a checkpoint written by 1 (torchrun)
        resumed = cli(
            "--nproc-per-node", "2", "-m", "lomotune", "train", TINY, f"training.output_dir={one}",
            "training.max_steps=8", *COMMON, *METHODS[method], "--plain", "--resume",
            launcher=(str(Path(sys.executable).parent / "torchrun"),),
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resumed from" in resumed.stdout and resumed.stdout.count("summary:") == 1
        in_process(two, method, 8, "--resume")
        assert_close(weights(one / "model"), weights(two / "model"))


def test_a_killed_process_ends_the_run_within_seconds(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lomotune", "train", TINY, f"training.output_dir={out}",
         "training.max_steps=100000", "hardware.processes=2", *COMMON, "--plain"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (
            not (out / "metrics.jsonl").exists()
            or "train" not in (out / "metrics.jsonl").read_text()
        ):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)
        workers = children(launcher.pid)
        assert len(workers) == 2
        killed_at = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, stdout + stderr
    assert took < 15, took
    assert "process 1 was stopped by SIGKILL; the other processes were stopped" in stderr
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(found)


def test_a_method_that_does_not_shard_yet_is_refused_before_launching(tmp_path):
    result = runner.invoke(
        app,
        ["train", TINY, f"training.output_dir={tmp_path / 'run'}", "hardware.gpus=0",
         "hardware.processes=2", "optimizer.name=adam-mini", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "optimizer.name: adam-mini does not run on several processes yet (these do: lomo" in (
        result.output
    )
    assert not (tmp_path / "run").exists()

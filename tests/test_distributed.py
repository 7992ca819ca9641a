"""Several processes on CPU (gloo, 2 processes, the tiny model), started the ways a user
starts them: `lomotune train` with hardware.processes: 2 (torch's elastic launcher),
and torchrun.

For every method, two processes with the global batch split between them must end where
one process with the whole batch ends (1e-5, fp32), and checkpoints written by 2
processes continue on 1 and those written by 1 continue on 2, again to the same weights
and optimizer state; a sharded checkpoint (torch.distributed.checkpoint, each rank its
part) continues on 2 processes to the bits of an uninterrupted 2-process run; a rank that
is killed ends the run within seconds, with a message.

Starting two processes costs more than the tiny trainings themselves (each imports
torch and transformers), so one torchrun start runs every method's 2-process commands
(`several_trainings.py`), and the tests below read what they left."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.distributed import checks, group
from lomotune.recipe import load_recipe

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "lomotune" / "recipes" / "tiny.yaml")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
runner = CliRunner()
COMMON = [
    "hardware.gpus=0",
    "hardware.threads=1",
    "data.num_examples=24",
    "training.eval_every=2",
    "training.save_every=2",
    "training.keep_checkpoints=5",
    "model.precision=fp32",
    "--plain",
]
METHODS = {
    # lomo under FSDP2 with the global norm clipped: the norm is summed over ranks.
    # Generation eval of 1 prompt: rank 1 decodes it, rank 0 nothing (forward passes
    # that differ between ranks: no collective may be left inside generate).
    "lomo": ["optimizer.name=lomo", "optimizer.lr=0.05", "optimizer.clip.mode=exact",
             "optimizer.clip.max_norm=0.5", "training.generate_eval_examples=1"],
    # adalomo under FSDP2: row statistics of a shard local, column statistics, mean(R),
    # both RMS summed over ranks; its factors written sharded by rows in checkpoints.
    "adalomo": ["optimizer.name=adalomo", "optimizer.lr=1e-2", "optimizer.weight_decay=0.01"],
    # adamw under FSDP2: its moments are sharded, and so written in checkpoints.
    "adamw": ["optimizer.name=adamw", "optimizer.lr=1e-3", "optimizer.clip.mode=exact",
              "optimizer.clip.max_norm=0.5"],
    # mezo: data parallel, only the losses are summed.
    "mezo": ["optimizer.name=mezo", "optimizer.lr=1e-3", "optimizer.zo_directions=2"],
    # adam-mini: data parallel, gradients summed before its step (norm blocks included).
    "adam-mini": ["optimizer.name=adam-mini", "optimizer.lr=1e-3"],
    # qlora-sgd: data parallel over the adapters, summed in the fused hook; no dropout,
    # whose masks would differ between one process's rows and two processes' halves.
    "qlora-sgd": ["optimizer.name=qlora-sgd", "optimizer.lr=0.05", "optimizer.lora.r=4",
                  "optimizer.lora.dropout=0", "optimizer.clip.mode=exact"],
}  # fmt: skip
STEPS, RESUMED_STEPS = 2, 3  # the first run ends with a checkpoint at STEPS
SHARDED = ("lomo", "adalomo", "adamw")  # FSDP2 on 2 processes: sharded checkpoints


def train_args(out: Path, method: str, steps: int, *flags: str) -> list[str]:
    return ["train", TINY, f"training.output_dir={out}", f"training.max_steps={steps}",
            *COMMON, *METHODS[method], *flags]  # fmt: skip


def in_process(out: Path, method: str, steps: int, *flags: str):
    with pytest.MonkeyPatch.context() as patch:  # no PNG: a second of matplotlib a run
        patch.setattr("lomotune.train.plot_quietly", lambda run: None)
        result = runner.invoke(app, train_args(out, method, steps, *flags))
    assert result.exit_code == 0, result.output
    return result


def cli(*args: str, timeout: float = 240, launcher=(sys.executable, "-m", "lomotune")):
    """The command in a fresh process, as a user types it (the launcher needs real
    processes: CliRunner cannot start them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def free_port() -> int:
    """A port no one listens on: runs of other test sessions on this machine use 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method: 1 process to step STEPS (in this process); then, in one torchrun
    start of 2 processes, the same from scratch, and the 1-process checkpoint continued
    to RESUMED_STEPS; for the sharded methods also a copy of the 2-process run continued
    on 2 processes, and a 2-process run straight to RESUMED_STEPS. Returns (the folder,
    torchrun's result, what each 1-process run printed)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:  # a data cache of its own, as conftest's
        patch.setenv("LOMOTUNE_CACHE", str(root / "cache"))
        printed = {}
        for method in METHODS:
            printed[method] = in_process(root / "one" / method, method, STEPS).output
            shutil.copytree(root / "one" / method, root / "one-then-two" / method)
        commands = [train_args(root / "two" / m, m, STEPS) for m in METHODS] + [
            train_args(root / "one-then-two" / m, m, RESUMED_STEPS, "--resume") for m in METHODS
        ]
        for m in SHARDED:
            commands += [
                ["copy", str(root / "two" / m), str(root / "two-then-two" / m)],
                train_args(root / "two-then-two" / m, m, RESUMED_STEPS, "--resume"),
                train_args(root / "two-straight" / m, m, RESUMED_STEPS),
            ]
        (root / "commands.json").write_text(json.dumps(commands))
        launched = cli(
            "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "several_trainings.py"),
            str(root / "commands.json"), launcher=(TORCHRUN,),
        )  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr
    return root, launched, printed


def weights(folder: Path) -> dict[str, torch.Tensor]:
    names = ["model.safetensors", "adapter_model.safetensors"]  # whole model, or adapters
    return load_file(next(folder / n for n in names if (folder / n).exists()))


def optimizer_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The engine's state tensors of a checkpoint, whole, from either format (a sharded
    one read by DCP's own converter)."""
    folder = run / "checkpoints" / f"step-{step:06d}"
    if (folder / "shards").is_dir():
        return whole_shards(folder).get("optimizer", {})  # none: lomo has no state tensors
    return load_file(folder / "optimizer.safetensors")


def whole_shards(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    converted = checkpoint.parent.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "shards", converted)
    return torch.load(converted)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def train_losses(run: Path) -> list[float]:
    rows = map(json.loads, (run / "metrics.jsonl").open())
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_and_checkpoints_continue_on_one_or_two(runs, method):
    root, _, _ = runs
    one, two, one_then_two = (root / d / method for d in ("one", "two", "one-then-two"))
    assert_close(weights(two / "model"), weights(one / "model"))
    # The global loss, not a rank's share, is what every step reports.
    assert train_losses(two) == pytest.approx(train_losses(one), abs=1e-5)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["peak_memory_spread"] >= 0
    assert "# world_size: 2" in (two / "recipe.yaml").read_text()
    steps = [r for r in map(json.loads, (two / "metrics.jsonl").open()) if r["kind"] == "train"]
    for r in steps:  # per step: the whole run's tokens/s, per process, and the peaks' spread
        assert r["tokens_per_s_per_process"] == pytest.approx(r["tokens_per_s"] / 2)
        assert 0 <= r["mem_peak_spread"] < r["mem_peak"]

    # A 2-process checkpoint continues on 1 process, a 1-process one on 2 (torchrun
    # above): both end where 1 process ends, weights and optimizer state.
    in_process(one, method, RESUMED_STEPS, "--resume")
    in_process(two, method, RESUMED_STEPS, "--resume")
    for other in (two, one_then_two):
        assert_close(weights(other / "model"), weights(one / "model"))
        assert_close(optimizer_state(other, RESUMED_STEPS), optimizer_state(one, RESUMED_STEPS))
    assert train_losses(one_then_two) == pytest.approx(train_losses(one), abs=1e-5)


@pytest.mark.parametrize("method", SHARDED)
def test_a_sharded_checkpoint_continues_on_two_processes_to_the_same_bits(runs, method):
    root, _, _ = runs
    checkpoint = root / "two-straight" / method / "checkpoints" / f"step-{STEPS:06d}"
    # Each rank wrote its part; no rank gathered the model for it.
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # fmt: skip
    assert (
        not (checkpoint / "model").exists() and not (checkpoint / "optimizer.safetensors").exists()
    )
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2 and len(state["rng_of_ranks"]) == 2
    assert {"shards/.metadata", "shards/__1_0.distcp", "rng.safetensors"} <= set(state["files"])
    # What the shards hold, read by DCP's own converter: the model of that step, as the
    # 1-process run wrote it (to the reduction order).
    shards = whole_shards(checkpoint)
    one = load_file(
        root / "one" / method / "checkpoints" / f"step-{STEPS:06d}" / "model" / "model.safetensors"
    )
    assert_close({k: shards["model"][k] for k in one}, one)

    resumed, straight = root / "two-then-two" / method, root / "two-straight" / method
    assert_bitwise_equal(weights(resumed / "model"), weights(straight / "model"))
    assert_bitwise_equal(
        optimizer_state(resumed, RESUMED_STEPS), optimizer_state(straight, RESUMED_STEPS)
    )
    assert train_losses(resumed) == train_losses(straight)


def test_generation_eval_on_two_processes_equals_one(runs):
    root, launched, printed = runs

    def accuracy_records(run: Path) -> list[dict]:
        rows = map(json.loads, (run / "metrics.jsonl").open())
        return [{k: v for k, v in r.items() if k != "time"} for r in rows if "total" in r]

    one, two = (accuracy_records(root / d / "lomo") for d in ("one", "two"))
    # before and after training (and after the resumed step, when that test ran first)
    assert len(one) >= 2 and all(r["total"] == 1 for r in one)
    assert two == one
    samples = [line for line in printed["lomo"].splitlines() if "(expected" in line]
    assert len(samples) == 2 and all(line in launched.stdout for line in samples)


def test_rank_0_alone_prints_and_each_resume_says_so(runs):
    _, launched, _ = runs
    assert launched.stdout.count("summary:") == 2 * len(METHODS) + 2 * len(SHARDED)
    assert launched.stdout.count("resumed from") == len(METHODS) + len(SHARDED)
    assert launched.stdout.count("per process) | mem ") >= len(METHODS)  # the step lines
    assert "max over processes, spread" in launched.stdout


def wait_for_a_training_step(launcher, out: Path) -> None:
    """Until the launched run has logged a training step (at most 2 minutes)."""
    deadline = time.monotonic() + 120
    while (
        not (out / "metrics.jsonl").exists() or '"train"' not in (out / "metrics.jsonl").read_text()
    ):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)


def test_a_killed_process_ends_the_run_within_seconds(tmp_path):
    out = tmp_path / "run"
    launcher = launched_run(out, "training.max_steps=100000")
    try:
        wait_for_a_training_step(launcher, out)
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
    # Rank 0's failed collective is no news: the launcher's line is all there is.
    assert "Traceback" not in stdout + stderr and "Connection reset" not in stderr
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_kill_9_of_the_launcher_ends_its_workers(tmp_path):
    """The workers die with their launcher: none goes on writing checkpoints and metrics
    that a later --resume would meet as a second writer."""
    out = tmp_path / "run"
    launcher = launched_run(out, "training.max_steps=100000", "training.save_every=1")
    try:
        wait_for_a_training_step(launcher, out)
        workers = children(launcher.pid)
        assert len(workers) == 2
        launcher.kill()  # SIGKILL: no handler runs, nothing is passed on
        launcher.wait(timeout=30)  # (its pipes stay open while a worker lives)
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.stdout.close()
        launcher.stderr.close()
    assert not any(alive(pid) for pid in workers)
    lines = (out / "metrics.jsonl").read_text()
    time.sleep(1.0)
    assert (out / "metrics.jsonl").read_text() == lines  # nobody writes any more


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(found)


def test_a_master_port_in_use_is_named_with_the_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            app,
            ["train", TINY, f"training.output_dir={tmp_path / 'run'}", "hardware.gpus=0",
             "hardware.processes=2", "hardware.master_addr=127.0.0.1", f"--master-port={port}",
             "--plain"],
        )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"hardware.master_port: {port} on 127.0.0.1 is in use" in result.output
    assert "Pass --master-port with a free port" in result.output


def test_an_empty_model_has_the_structure_and_no_weights():
    """What ranks other than 0 of a sharded run build: every parameter on the meta device
    (no memory), shaped and tied as the real model, with its tokenizer."""
    from lomotune.models import load_model
    from lomotune.recipe import ModelConfig

    cfg = ModelConfig(name="tiny-llama", precision="fp32")
    real = load_model(cfg, torch.device("cpu")).model
    empty = load_model(cfg, torch.device("cpu"), empty=True)
    assert all(p.is_meta for p in empty.model.parameters())
    assert {n: p.shape for n, p in empty.model.named_parameters()} == {
        n: p.shape for n, p in real.named_parameters()
    }
    assert empty.model.lm_head.weight is empty.model.get_input_embeddings().weight
    assert empty.tokenizer.pad_token_id is not None


def test_every_method_has_a_way_to_run_on_several_processes_and_is_tested_here():
    from typing import get_args

    from lomotune import methods
    from lomotune.recipe import MethodName

    assert {m.processes for m in methods.REGISTRY.values()} <= {"sharded", "replicated"}
    assert sorted(methods.NAMES) == sorted(get_args(MethodName))
    # sgd and adamw-pure step through the same engine and FSDP2 path as adamw; lora-adamw
    # through the data-parallel OptimizerEngine path of adam-mini, on mezo's adapters
    assert set(get_args(MethodName)) - set(METHODS) == {"sgd", "adamw-pure", "lora-adamw"}


def launched_run(out: Path, *flags: str) -> subprocess.Popen:
    """`lomotune train` of 2 processes (the elastic launcher) in a session of its own, as
    a terminal runs it: a signal to its process group is Ctrl-C."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lomotune", "train", TINY, f"training.output_dir={out}",
         "hardware.processes=2", *COMMON, f"hardware.master_port={free_port()}", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip


def test_ctrl_c_on_two_processes_saves_and_exits_as_one_process_does(tmp_path):
    from lomotune.checkpoint import latest_checkpoint, verify_checkpoint

    out = tmp_path / "run"
    launcher = launched_run(out, "training.max_steps=100000", "training.save_every=0")
    try:
        wait_for_a_training_step(launcher, out)
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        stdout, stderr = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, stdout + stderr
    # One message, the one a single process prints, and no launcher noise.
    stopped = re.fullmatch(
        r"error: stopped by SIGINT after step (\d+); checkpoint (\S+)\.\n"
        r"Continue with: lomotune train (\S+) --resume\n",
        stderr,
    )
    assert stopped, stderr
    assert stdout.count("SIGINT: finishing this step, then saving a checkpoint") == 1
    checkpoint = out / "checkpoints" / f"step-{int(stopped.group(1)):06d}"
    assert stopped.group(2) == str(checkpoint) and latest_checkpoint(out) == checkpoint
    assert stopped.group(3) == str(out / "recipe.yaml")
    assert (checkpoint / "shards" / "__1_0.distcp").exists() and verify_checkpoint(checkpoint) == []


def test_bad_input_found_in_the_processes_is_one_message_and_exit_2(tmp_path):
    # Found by rank 0 after the launch (the folder is decided there), not by the CLI.
    (tmp_path / "taken").write_text("a file")
    launcher = launched_run(tmp_path / "taken", "training.max_steps=2")
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 2, stdout + stderr
    assert stderr == (
        f"error: training.output_dir: {tmp_path / 'taken'} is a file, not a folder. Set "
        "training.output_dir to a folder (it is created if missing)\n"
    )


def test_torchrun_m_lomotune_runs_under_it_and_is_not_launched_again(tmp_path):
    out = tmp_path / "run"
    result = cli(
        "--standalone", "--nproc-per-node", "2", "-m", "lomotune", "train", TINY,
        f"training.output_dir={out}", "training.max_steps=2", "hardware.processes=2", *COMMON,
        launcher=(TORCHRUN,),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # Launched again, each of the 2 would have started 2 more: 4 ranks, or a port clash.
    assert result.stdout.count("summary:") == 1
    assert (out / "checkpoints" / "step-000002" / "shards" / "__1_0.distcp").exists()


def test_bad_input_under_torchrun_is_printed_once(tmp_path):
    """Every process meets the same missing file: one line, not one per process."""
    missing = tmp_path / "missing.jsonl"
    result = cli(
        "--standalone", "--nproc-per-node", "2", "-m", "lomotune", "train", TINY,
        f"training.output_dir={tmp_path / 'run'}", f"data.source={missing}",
        "hardware.processes=2", *COMMON, launcher=(TORCHRUN,),
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count(f"error: data.source: no such file: {missing}") == 1, result.stderr


def test_a_sharded_load_fills_the_shards_from_rank_0_and_no_device_holds_the_whole_model(
    tmp_path,
):
    """Two processes (gloo) set up a bf16 lomo run: the model reaches `distribute` on the
    meta device on every rank, rank 0's included (0 bytes on the device; rank 0 read the
    weights into CPU memory), and after it each rank's shard of every weight is its rows of
    the model's own weights, bit for bit; gradients are reduce-scattered in fp32."""
    from lomotune.testing import tiny_llama

    launched = cli(
        "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "sharded_load.py"),
        str(tmp_path), launcher=(TORCHRUN,),
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr
    reference = tiny_llama(dtype=torch.bfloat16).state_dict()  # the weights tiny-llama loads
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["bytes_on_device"] == 0, rank
        assert seen["param_dtypes"] == ["torch.bfloat16"]
        assert seen["reduce_dtypes"] == ["torch.float32"]
        shards = load_file(tmp_path / f"rank{rank}.safetensors")
        assert shards.keys() <= reference.keys() and len(shards) > 5
        for name, shard in shards.items():
            rows = -(-reference[name].shape[0] // 2)  # FSDP2: dim 0 in equal chunks
            expected = reference[name][rank * rows : (rank + 1) * rows]
            assert torch.equal(shard, expected), (rank, name)


def test_a_torch_without_fsdp2_sum_reduction_is_refused_with_the_floor(tmp_path, monkeypatch):
    """A torch whose FSDP2 cannot be told to sum (before 2.8) would average the gradients
    of an already globally normalized loss: refused before any process starts, exit 2,
    naming the torch lomotune requires; the data-parallel methods are not concerned."""
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "set_gradient_divide_factor")
    args = ["train", TINY, f"training.output_dir={tmp_path / 'out'}", "hardware.gpus=0",
            "hardware.processes=2", "optimizer.name=lomo", "--plain"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "has no FSDPModule.set_gradient_divide_factor" in result.output
    assert f"Install torch>={checks.TORCH_FLOOR}" in result.output
    recipe = load_recipe(TINY, ["hardware.gpus=0", "optimizer.name=mezo"])
    assert checks.refusal(recipe, 2) is None


def test_the_torch_floor_in_the_code_is_the_one_pyproject_requires():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={checks.TORCH_FLOOR}",' in pyproject


def _slow_rank_0(rank: int, port: int, out: str) -> None:
    """One of 2 processes whose group times out after 5 s: rank 0 works 12 s alone inside
    share_from_main (a large checkpoint written and hashed), then every rank meets again."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=5),
    )  # fmt: skip
    world = group.World(rank=rank, local_rank=rank, size=2)
    try:
        got = group.share_from_main(world, lambda: time.sleep(12) or "written")
        got += f" {group.gather_floats(world, float(rank))}"  # the run's group again
    except Exception as e:
        got = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}").write_text(got)
    dist.destroy_process_group()


def test_rank_0_working_alone_longer_than_the_collective_timeout_is_waited_for(tmp_path):
    """The run's collectives time out (10 minutes; 5 s here) to catch a hang, but rank 0
    alone writing or hashing a large checkpoint may take longer while the others wait for
    its answer: they wait in share_from_main's own group (RANK_0_ALONE_TIMEOUT)."""
    import torch.multiprocessing as mp

    mp.spawn(_slow_rank_0, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "written [0.0, 1.0]"
    assert group.RANK_0_ALONE_TIMEOUT.total_seconds() >= 3600

"""training.loggers: every backend gets the run's numbers, read back with each backend's
own reader (TensorBoard's EventAccumulator; W&B's offline run file, record by record)."""

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.dashboard import read_metrics
from lomotune.loggers import open_loggers

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()


def train(out: Path, *overrides: str):
    args = ["train", TINY, f"training.output_dir={out}", "training.max_steps=4"]
    args += ["training.eval_every=2", "training.save_every=0", *overrides, "--plain"]
    return runner.invoke(app, args)


def jsonl_numbers(out: Path, kind: str, key: str) -> dict[int, float]:
    records = read_metrics(out / "metrics.jsonl")
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of a W&B run file: a 7-byte header (":W&B", magic, version), then
    LevelDB log records (crc32, length, type) in 32 KiB blocks, each a protobuf Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("wandb") is None,
    reason="needs lomotune[tensorboard,wandb]",
)
def test_a_run_writes_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    # No W&B credentials anywhere: the run must go offline by itself, without a prompt.
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    out = tmp_path / "run"
    result = train(out, "training.loggers=[jsonl,tensorboard,wandb]")
    assert result.exit_code == 0, result.output
    losses = jsonl_numbers(out, "train", "loss")
    eval_losses = jsonl_numbers(out, "eval", "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4] and sorted(eval_losses) == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb == pytest.approx(losses, rel=1e-6)  # stored as float32
    tb_eval = {e.step: e.value for e in events.Scalars("eval/eval_loss")}
    assert tb_eval == pytest.approx(eval_losses, rel=1e-6)
    (text,) = events.Tensors("recipe/text_summary")  # the resolved recipe, as text
    assert '"name": "tiny-llama"' in text.tensor_proto.string_val[0].decode()

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    rows = wandb_history(run_file)
    wb = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert wb == pytest.approx(losses, rel=1e-12)  # W&B keeps the double
    wb_eval = {row["_step"]: row["eval/eval_loss"] for row in rows if "eval/eval_loss" in row}
    assert wb_eval == pytest.approx(eval_losses, rel=1e-12)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_logger_whose_package_is_missing_is_a_recipe_error_with_the_pip_command(
    tmp_path, monkeypatch, name
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == name else real(m, *a)
    )
    out = tmp_path / "run"
    result = train(out, f"training.loggers=[jsonl,{name}]")
    assert result.exit_code == 2, result.output
    assert f"pip install 'lomotune[{name}]'" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_an_unknown_logger_is_a_recipe_error_with_a_did_you_mean(tmp_path):
    out = tmp_path / "run"
    result = train(out, "training.loggers=[jsonl,tensorbord]")
    assert result.exit_code == 2, result.output
    assert "unknown logger 'tensorbord'; did you mean tensorboard?" in result.output


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_on_two_processes_rank_0_alone_writes_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with socket.socket() as s:  # a free port: other test sessions here use 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lomotune", "train", TINY, f"training.output_dir={out}",
         "training.max_steps=3", "training.eval_every=0", "training.save_every=0",
         "hardware.gpus=0", "hardware.processes=2", "hardware.threads=1",
         f"hardware.master_port={port}", "data.num_examples=24", "model.precision=fp32",
         "training.loggers=[jsonl,tensorboard]", "--plain"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (events_file,) = (out / "tensorboard").iterdir()  # one writer: rank 0's
    events = EventAccumulator(str(events_file))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb == pytest.approx(jsonl_numbers(out, "train", "loss"), rel=1e-6)
    assert sorted(tb) == [1, 2, 3]


def test_ranks_other_than_0_log_nowhere(tmp_path):
    loggers = open_loggers(
        ["jsonl", "tensorboard", "wandb"], tmp_path, always=[object()], enabled=False
    )
    assert loggers.backends == []
    assert list(tmp_path.iterdir()) == []

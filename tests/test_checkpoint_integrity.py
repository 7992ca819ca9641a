"""Checkpoints you can trust: every file a checkpoint wrote is checked against the size
and sha256 recorded with it before a resume. A damaged newest checkpoint is named and the
previous intact one used; with none intact the run stops with exit 2 and the list."""

import hashlib
import json
from pathlib import Path

from typer.testing import CliRunner

from lomotune.checkpoint import list_checkpoints, verify_checkpoint
from lomotune.cli import app

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()
COMMON = ["hardware.threads=1", "data.num_examples=40", "training.eval_every=0", "--plain"]


def train(out: Path, steps: int, *flags: str):
    return runner.invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", f"training.max_steps={steps}",
         "training.save_every=2", "training.keep_checkpoints=5", *COMMON, *flags],
    )  # fmt: skip


def test_a_truncated_newest_checkpoint_gives_way_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    assert train(out, 4).exit_code == 0
    step2, step4 = list_checkpoints(out)
    # What state.json records is what is on disk, computed independently here.
    files = json.loads((step4 / "state.json").read_text())["files"]
    weights = step4 / "model" / "model.safetensors"
    assert files["model/model.safetensors"] == {
        "size": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert {"optimizer.safetensors", "rng.safetensors", "model/config.json"} <= set(files)
    assert verify_checkpoint(step4) == []

    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # a copy cut short
        f.truncate(size // 2)
    assert verify_checkpoint(step4) == [
        f"model/model.safetensors has {size // 2} bytes, {size} were written"
    ]
    result = train(out, 6, "--resume")
    assert result.exit_code == 0, result.output
    assert f"damaged checkpoint skipped: {step4}: model/model.safetensors has" in result.output
    assert f"resumed from {step2} (step 2)" in result.output


def test_same_size_corruption_is_caught_by_the_hash(tmp_path):
    out = tmp_path / "run"
    assert train(out, 2).exit_code == 0
    (step2,) = list_checkpoints(out)
    rng_file = step2 / "rng.safetensors"
    data = bytearray(rng_file.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte, same size
    rng_file.write_bytes(bytes(data))
    (step2 / "model" / "config.json").unlink()
    result = train(out, 4, "--resume")
    assert result.exit_code == 2, result.output
    assert f"no intact checkpoint to resume from in {out}; found:" in result.output
    assert "config.json is missing" in result.output
    assert "rng.safetensors does not match the sha256 recorded" in result.output
    assert "Traceback" not in result.output


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    result = train(path, 2, "--resume")
    assert result.exit_code == 2, result.output
    assert f"training.output_dir: {path} is a file, not a folder" in result.output
    assert "intact" not in result.output
    assert path.read_text() == "not a folder"


def test_shard_files_another_machine_wrote_elsewhere_are_named(tmp_path):
    """Several machines whose output_dir is not shared: rank 0 sees .metadata but not
    every .distcp file it names, and must say so rather than hash an incomplete set."""
    import torch
    import torch.distributed.checkpoint as dcp

    from lomotune.checkpoint import shard_files_not_here

    shards = tmp_path / "shards"
    dcp.save({"w": torch.arange(6.0)}, storage_writer=dcp.FileSystemWriter(shards))
    written = sorted(p.name for p in shards.glob("*.distcp"))
    assert written and shard_files_not_here(shards) == []
    (shards / written[0]).unlink()  # what another machine's disk would hold
    assert shard_files_not_here(shards) == [written[0]]


def test_one_flipped_bit_in_state_json_is_caught(tmp_path):
    """state.json is covered like every other file: a bit flipped in its data position
    still parses, and would resume at the wrong place (other final weights)."""
    out = tmp_path / "run"
    assert train(out, 4).exit_code == 0
    step2, step4 = list_checkpoints(out)
    state = step4 / "state.json"
    text = state.read_bytes()
    at = text.index(b'"index": ') + len(b'"index": ')
    flipped = text[:at] + bytes([text[at] ^ 0x01]) + text[at + 1 :]  # a digit, another digit
    state.write_bytes(flipped)
    assert json.loads(flipped)["index"] != json.loads(text)["index"]  # still valid JSON
    assert verify_checkpoint(step4) == [
        "state.json does not match the sha256 recorded when it was written"
    ]
    result = train(out, 6, "--resume")
    assert result.exit_code == 0, result.output
    assert f"damaged checkpoint skipped: {step4}: state.json does not match" in result.output
    assert f"resumed from {step2} (step 2)" in result.output

"""scripts/bench_memory.py, bench_speed.py and bench_gpu_memory.py on the tiny model, and
their rows: the methods of the registry and the variants its fields admit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lomotune import methods

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import bench_speed  # noqa: E402

TINY = ["--model", "tiny-llama", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "1"]


def bench(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_every_method_is_a_row_and_every_row_names_its_method():
    rows = bench_common.ROWS
    assert set(methods.NAMES) <= set(rows) and rows[0] == bench_common.FORWARD_ONLY
    for row in rows[1:]:
        entry, suffix = bench_common.method_of(row)
        assert row == entry.name + suffix
        assert bench_common.describe(row)
    assert {"lomo-ref", "adalomo-ref", "lomo-nosr", "adamw-amp"} <= set(rows)
    assert "sgd-nosr" not in rows and "mezo-ref" not in rows
    with pytest.raises(ValueError, match="no bench row"):
        bench_common.method_of("sgd-amp")


def test_interleaved_rows_share_one_plain_model_at_one_precision():
    at_bf16, at_fp32 = bench_speed.interleaved("bf16"), bench_speed.interleaved("fp32")
    assert "adamw" not in at_bf16 and "adamw" in at_fp32  # fp32 master weights
    assert "adamw-pure" in at_bf16 and "lomo-nosr" in at_bf16
    for rows in (at_bf16, at_fp32):
        assert not {"no_grad", "lomo-ref", "qlora-sgd", "lora-adamw"} & set(rows)


def test_bench_memory_runs_each_method_as_training_does(tmp_path):
    out = tmp_path / "bench.json"
    done = bench("bench_memory.py", *TINY, "--methods", "lomo,adamw", "--json", str(out))
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["lomo", "adamw"]
    for r in rows.values():
        assert "error" not in r and r["tokens_per_s"] > 0 and r["median_update_s"] > 0
    # bf16 weights for lomo; adamw keeps fp32 master weights, as `lomotune train` does
    params = rows["lomo"]["params"]
    assert rows["lomo"]["tensors"]["Parameter"] == 2 * params
    assert rows["adamw"]["tensors"]["Parameter"] == 4 * params
    assert f"- lomo: {methods.method('lomo').summary}" in done.stdout
    assert "### bf16" in done.stdout and "| lomo / adamw tokens_per_s |" in done.stdout


def test_bench_speed_alternates_the_methods(tmp_path):
    out = tmp_path / "speed.json"
    args = [*TINY, "--precision", "fp32", "--methods", "lomo,mezo,adamw", "--json", str(out)]
    done = bench("bench_speed.py", *args)
    rows = {r["method"]: r for r in json.loads(out.read_text())["interleaved"]}
    assert list(rows) == ["lomo", "mezo", "adamw"]
    assert rows["lomo"]["median_update_s"] > 0 and rows["mezo"]["median_update_s"] is None
    assert "tokens/s vs adamw" in done.stdout
    refused = bench("bench_speed.py", *TINY, "--methods", "lomo,adamw", check=False)
    assert refused.returncode == 2 and "not ['adamw']" in refused.stderr


def test_bench_gpu_memory_counts_a_step(tmp_path):
    out = tmp_path / "fake.json"
    args = ["--fake-like", "tiny-llama", "--batch", "1", "--seq", "16", "--json", str(out)]
    done = bench("bench_gpu_memory.py", *args, "--methods", "no_grad,lomo")
    rows = json.loads(out.read_text())["fake_1b"]
    assert [r["method"] for r in rows] == ["no_grad", "lomo"]
    assert all(r["peak"] > 0 for r in rows)
    assert "Counted under FakeTensorMode + MemTracker: the shape of tiny-llama" in done.stdout

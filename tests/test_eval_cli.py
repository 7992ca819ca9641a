"""`lomotune eval` end to end on the tiny model and the fixtures; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from lomotune.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["eval", "--model", "tiny-llama", *args])


def test_eval_writes_results_and_predictions(tmp_path):
    out = tmp_path / "results.json"
    data = str(FIXTURES / "hub")
    done = run("--tasks", "superglue", "--data-dir", data, "--precision", "fp32",
               "--batch-size", "3", "--output", str(out))  # fmt: skip
    assert done.exit_code == 0, done.output
    written = json.loads(out.read_text())
    assert set(written["results"]) == {
        "boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"
    }  # fmt: skip
    assert set(written["results"]["cb"]) == {"acc", "acc_norm", "f1"}
    assert set(written["results"]["multirc"]) == {"acc", "f1a", "em"}
    assert set(written["results"]["record"]) == {"f1", "em"}
    assert written["n"]["multirc"] == 5
    assert len(written["predictions"]["rte"]) == 2
    assert written["config"]["resolved_precision"] == "fp32"
    assert "multirc" in done.output and "f1a" in done.output
    # An existing output is not replaced without --overwrite.
    again = run("--tasks", "rte", "--data-dir", data, "--output", str(out))
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_limit_and_fewshot(tmp_path):
    out = tmp_path / "r.json"
    # few-shot examples come from train: evaluate train itself (the doc is left out).
    folder = tmp_path / "data" / "CB"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text((FIXTURES / "official" / "CB" / "val.jsonl").read_text())
    done = run("--tasks", "cb", "--data-dir", str(tmp_path / "data"), "--split", "train",
               "--limit", "2", "--num-fewshot", "1", "--output", str(out))  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads(out.read_text())["n"]["cb"] == 2


def test_bad_input_exits_2(tmp_path):
    # (glue itself is an lm-evaluation-harness task now)
    unknown = run("--tasks", "rte,gleu", "--data-dir", str(FIXTURES / "official"))
    assert unknown.exit_code == 2 and "unknown task gleu" in unknown.output
    missing = run("--tasks", "rte", "--data-dir", str(tmp_path))
    assert missing.exit_code == 2 and "no folder for rte" in missing.output
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "val.jsonl").write_text('{"premise": "p", "idx": 0}\n')
    malformed = run("--tasks", "rte", "--data-dir", str(tmp_path))
    assert malformed.exit_code == 2
    assert "val.jsonl line 1: missing field 'hypothesis'" in " ".join(malformed.output.split())
    bad_batch = run("--tasks", "rte", "--data-dir", str(tmp_path), "--batch-size", "0")
    assert bad_batch.exit_code == 2 and "--batch-size 0" in bad_batch.output


def test_a_harness_task_without_lm_eval_names_the_pip_command(monkeypatch):
    from lomotune.evaluate import harness

    monkeypatch.setattr(harness, "harness_version", lambda: None)  # as if not installed
    done = run("--tasks", "rte,hellaswag", "--data-dir", str(FIXTURES / "official"))
    assert done.exit_code == 2, done.output
    text = " ".join(done.output.split())
    assert "unknown task hellaswag" in text and "pip install 'lomotune[harness]'" in text

"""`data.source: superglue:<task>`: the eval prompt with the right answer as completion;
each shipped SuperGLUE recipe runs (tiny model, fixture files) and its output evaluates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.data import DataError
from lomotune.data.sources import read_source
from lomotune.data.superglue import read_superglue

FIXTURES = Path(__file__).parent / "fixtures" / "superglue" / "official"
RECIPES = Path(__file__).parents[1] / "lomotune" / "recipes"
SCRIPTS = Path(__file__).parents[1] / "scripts"
runner = CliRunner()


def test_rows_are_the_eval_prompt_and_the_right_answer():
    raw = read_source("superglue:rte", "val", num_examples=10, seed=0, superglue_dir=str(FIXTURES))
    assert [r.data for r in raw.rows] == [
        {
            "prompt": "The cat sat on the mat all day.\nQuestion: A cat sat on a mat. "
            "True or False?\nAnswer:",
            "completion": " True",
        },
        {
            "prompt": "No rain fell in May.\nQuestion: It rained in May. True or False?\nAnswer:",
            "completion": " False",
        },
    ]
    multirc = read_superglue("superglue:multirc", "val", str(FIXTURES), max_examples=None)
    assert [r.data["completion"] for r in multirc.rows][:2] == [
        " Two\nIs the answer correct? yes",
        " One\nIs the answer correct? no",
    ]


def test_train_split_is_capped_by_a_fixed_sample():
    capped = read_superglue("superglue:multirc", "val", str(FIXTURES), max_examples=3)
    again = read_superglue("superglue:multirc", "val", str(FIXTURES), max_examples=3)
    assert len(capped.rows) == 3 and capped.rows == again.rows


def test_unknown_task_and_missing_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no SuperGLUE task 'glue'"):
        read_superglue("superglue:glue", "train", str(FIXTURES), max_examples=None)
    with pytest.raises(DataError, match="no folder for rte"):
        read_superglue("superglue:rte", "train", str(tmp_path), max_examples=None)


SHIPPED = sorted(p.name for p in RECIPES.glob("superglue-*.yaml"))


def test_the_shipped_superglue_recipes_are_what_their_tables_write():
    # scripts/superglue_recipes.py holds each task's and method's settings once
    check = subprocess.run(
        [sys.executable, str(SCRIPTS / "superglue_recipes.py"), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    assert len(SHIPPED) == 31  # 5 tasks x 6 methods, and BoolQ's LOMO recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_superglue_recipe_trains_a_step_as_shipped(tmp_path, name):
    # As shipped (precision, method, lr, schedule, LoRA), but the tiny model, one step, and
    # the fixtures' val files as the train split (the fixtures have no train files), and
    # room for the tiny tokenizer's longer token sequences.
    trained = runner.invoke(
        app,
        ["train", str(RECIPES / name), "model.name=tiny-llama", f"data.superglue_dir={FIXTURES}",
         "data.split=val", "data.max_length=256", "training.epochs=null", "training.max_steps=1",
         f"training.output_dir={tmp_path / 'run'}",
         "--plain"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "step 1/1" in trained.output


def test_the_table_script_trains_scores_and_resumes_per_cell(tmp_path):
    # A SuperGLUE folder with train files (the fixtures' val files as train): the
    # held-out mode splits them, trains on the rest, scores the held-out part.
    data = tmp_path / "superglue"
    for task in ("CB", "COPA"):
        (data / task).mkdir(parents=True)
        rows = (FIXTURES / task / "val.jsonl").read_text()
        (data / task / "train.jsonl").write_text(rows * 5)
    out = tmp_path / "table"
    cmd = [sys.executable, str(SCRIPTS / "superglue_table.py"), "--superglue-dir", str(data),
           "--holdout", "--tasks", "cb,copa", "--methods", "zero-shot,lomo",
           "--model", "tiny-llama", "--set", "training.epochs=0.2", "--out", str(out)]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    cells = sorted(p.name for p in (out / "holdout" / "cells").iterdir())
    assert cells == ["cb-lomo.json", "cb-zero-shot.json", "copa-lomo.json", "copa-zero-shot.json"]
    cb = json.loads((out / "holdout" / "cells" / "cb-lomo.json").read_text())
    held = (out / "holdout" / "holdout" / "CB" / "val.jsonl").read_text().splitlines()
    train = (out / "holdout" / "holdout" / "CB" / "train.jsonl").read_text().splitlines()
    rows = (data / "CB" / "train.jsonl").read_text().splitlines()
    assert len(held) == len(rows) // 5 and len(held) + len(train) == len(rows)
    assert 0.0 <= cb["metrics"]["acc"] <= 1.0 and cb["overrides"] == ["training.epochs=0.2"]
    assert "| lomo |" in first.stdout and "| zero-shot |" in first.stdout
    again = subprocess.run([*cmd, "--write", str(tmp_path / "B.md")], capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 0 and "..." not in again.stdout  # every cell was kept
    table = (tmp_path / "B.md").read_text()
    assert table.startswith("\n<!-- superglue-table:begin -->") or "superglue-table:begin" in table


@pytest.mark.parametrize("task", ["cb"])  # every recipe trains above; one also scores
def test_shipped_superglue_recipe_trains_tiny_and_evaluates(tmp_path, task):
    out = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train",
            str(RECIPES / f"superglue-{task}-lomo.yaml"),
            "model.name=tiny-llama",
            "model.precision=fp32",
            f"data.superglue_dir={FIXTURES}",
            "data.split=val",  # the fixtures have val files only
            "training.epochs=null",  # the recipes train by epochs
            "training.max_steps=2",
            "training.eval_every=2",
            "training.save_every=2",
            f"training.output_dir={out}",
            "--plain",
        ],
    )
    assert trained.exit_code == 0, trained.output
    scored = runner.invoke(
        app,
        ["eval", "--model", str(out), "--tasks", task, "--data-dir", str(FIXTURES),
         "--precision", "fp32", "--output", str(tmp_path / "r.json")],
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    assert "acc" in json.loads((tmp_path / "r.json").read_text())["results"][task]


def test_eval_tasks_are_scored_at_each_eval(tmp_path):
    from lomotune.dashboard import read_metrics

    out = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train",
            str(RECIPES / "superglue-rte-lomo.yaml"),
            "model.name=tiny-llama",
            "model.precision=fp32",
            f"data.superglue_dir={FIXTURES}",
            "data.split=val",
            "training.epochs=null",  # the recipes train by epochs
            "training.max_steps=2",
            "training.eval_every=1",
            "training.eval_tasks=[rte, cb]",
            f"training.output_dir={out}",
            "--plain",
        ],
    )
    assert trained.exit_code == 0, trained.output
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) >= 2
    for record in evals:
        assert 0.0 <= record["rte_acc"] <= 1.0 and "cb_f1" in record
    assert "rte acc" in trained.output or "rte_acc" in trained.output


def test_unknown_eval_task_is_a_recipe_error(tmp_path):
    bad = runner.invoke(
        app, ["train", str(RECIPES / "superglue-rte-lomo.yaml"), "training.eval_tasks=[gleu]"]
    )  # (glue itself is an lm-evaluation-harness task now)
    assert bad.exit_code == 2 and "unknown task gleu" in bad.output

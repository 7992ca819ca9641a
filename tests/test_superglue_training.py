"""`data.source: superglue:<task>`: the eval prompt with the right answer as completion;
each shipped SuperGLUE recipe runs (tiny model, fixture files) and its output evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.data import DataError
from lomotune.data.sources import read_source
from lomotune.data.superglue import read_superglue

FIXTURES = Path(__file__).parent / "fixtures" / "superglue" / "official"
RECIPES = Path(__file__).parents[1] / "lomotune" / "recipes"
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


@pytest.mark.parametrize("task", ["rte", "cb", "boolq", "copa"])
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

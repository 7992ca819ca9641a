"""`lomotune eval` hands the tasks its own scorer does not know to lm-evaluation-harness:
a task of our own (a local JSONL file, given by --include-path) scored through lomotune
gives exactly the numbers of a direct lm_eval run on the same model. Offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.dashboard import read_metrics
from lomotune.evaluate.harness import task_manager  # lm_eval's TaskManager, built once
from lomotune.testing import tiny_llama, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="needs lomotune[harness] (lm-eval)")
runner = CliRunner()
SUPERGLUE = Path(__file__).parent / "fixtures" / "superglue" / "official"
TASK = "lomotune_tiny_sums"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a 3-choice task of 40 sums, written here."""
    root = tmp_path_factory.mktemp("harness")
    model_dir = root / "model"
    tiny_llama(seed=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    lines = []
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        choices = [str(a + b), str(a + b + rng.randint(1, 9)), str(abs(a - b))]
        order = rng.sample(range(3), 3)
        doc = {"question": f"{a} + {b} = ?", "choices": [choices[i] for i in order]}
        doc["label"] = order.index(0)
        lines.append(json.dumps(doc))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=tasks / "docs.jsonl"))
    gone = TASK_YAML.format(task="lomotune_tiny_gone", data=tasks / "gone.jsonl")
    (tasks / "lomotune_tiny_gone.yaml").write_text(gone)  # its data is not there
    return model_dir, tasks


def test_a_harness_task_gives_the_numbers_of_a_direct_lm_eval_run(setup, tmp_path):
    model_dir, tasks = setup
    out = tmp_path / "results.json"
    done = runner.invoke(
        app,
        ["eval", "--model", str(model_dir), "--tasks", f"cb,{TASK}", "--include-path",
         str(tasks), "--precision", "fp32", "--batch-size", "4", "--limit", "30",
         "--data-dir", str(SUPERGLUE), "--output", str(out)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    ours = json.loads(out.read_text())

    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
        tasks=[TASK],
        batch_size=4,
        limit=30,
        task_manager=task_manager(tasks),
        log_samples=False,
    )["results"][TASK]
    assert ours["results"][TASK] == {"acc": direct["acc,none"], "acc_norm": direct["acc_norm,none"]}
    assert ours["stderr"][TASK] == {
        "acc": direct["acc_stderr,none"],
        "acc_norm": direct["acc_norm_stderr,none"],
    }
    assert ours["n"][TASK] == 30
    assert 0 < ours["results"][TASK]["acc"] < 1  # a real fraction of 30, not a constant
    assert ours["config"]["harness_version"] == lm_eval.__version__
    assert set(ours["results"]) == {"cb", TASK}  # the built-in scorer kept SuperGLUE's cb
    assert ours["sources"]["cb"].endswith("val.jsonl")
    assert TASK in done.output and "lm-eval" in done.output  # the same table


def test_a_task_neither_knows_is_an_error_with_near_matches(setup):
    model_dir, tasks = setup
    done = runner.invoke(
        app,
        ["eval", "--model", str(model_dir), "--tasks", "rte,hellaswg,lomotune_tiny_sum",
         "--include-path", str(tasks)],
    )  # fmt: skip
    assert done.exit_code == 2, done.output
    text = " ".join(done.output.split())
    assert "unknown task hellaswg" in text and "hellaswag" in text
    assert "unknown task lomotune_tiny_sum" in text and TASK in text
    assert "Traceback" not in done.output


def test_training_eval_tasks_may_name_a_harness_task(setup, tmp_path):
    _, tasks = setup
    out = tmp_path / "run"
    recipe = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
    trained = runner.invoke(
        app,
        ["train", recipe, f"training.output_dir={out}", "training.max_steps=2",
         "training.eval_every=2", "training.save_every=0", f"training.eval_tasks=[{TASK}]",
         f"training.eval_tasks_include_path={tasks}", "--plain"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    (last,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert last["step"] == 2
    # The trained model, saved, scored by a direct lm_eval run: the same numbers.
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(out / "model"), "dtype": "float32", "device": "cpu"},
        tasks=[TASK],
        batch_size=8,
        task_manager=task_manager(tasks),
        log_samples=False,
    )["results"][TASK]
    assert last[f"{TASK}_acc"] == direct["acc,none"]
    assert last[f"{TASK}_acc_norm"] == direct["acc_norm,none"]


def test_a_harness_task_whose_data_cannot_be_read_is_an_error_for_people(setup):
    model_dir, tasks = setup
    done = runner.invoke(
        app,
        ["eval", "--model", str(model_dir), "--tasks", "lomotune_tiny_gone",
         "--include-path", str(tasks)],
    )  # fmt: skip
    assert done.exit_code == 2, done.output
    text = " ".join(done.output.split())
    assert "could not read the data of lomotune_tiny_gone" in text and "Traceback" not in text


def test_an_adapter_folder_is_scored_with_its_adapter_applied(setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, tasks = setup
    # random (not zero) LoRA weights, so that the adapter changes the scores
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    out = tmp_path / "results.json"
    done = runner.invoke(
        app,
        ["eval", "--model", str(adapter), "--tasks", TASK, "--include-path", str(tasks),
         "--precision", "fp32", "--batch-size", "4", "--output", str(out)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    ours = json.loads(out.read_text())["results"][TASK]

    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "peft": str(adapter), "dtype": "float32",
                    "device": "cpu"},
        tasks=[TASK],
        batch_size=4,
        task_manager=task_manager(tasks),
        log_samples=False,
    )["results"][TASK]  # fmt: skip
    # (seen here: the base model alone scores acc 0.175, with the adapter 0.075: equal
    # numbers mean the adapter was applied)
    assert ours == {"acc": direct["acc,none"], "acc_norm": direct["acc_norm,none"]}


def test_harness_tasks_during_training_are_refused_on_several_processes(setup, tmp_path):
    from lomotune.recipe import RecipeError, load_recipe

    _, tasks = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"training: {{max_steps: 2, eval_tasks: [rte, {TASK}], "
        f"eval_tasks_include_path: {tasks}}}\nhardware: {{gpus: 0, processes: 2}}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    (problem,) = e.value.problems
    assert problem.startswith(f"training.eval_tasks: harness tasks ({TASK}) are scored in one")

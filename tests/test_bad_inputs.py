"""Every bad input gets one clear message, exit code 2, no traceback, and nothing written.

Each row of the table: a name, the recipe (None = the tiny recipe) and overrides, and
fragments that the message must contain. Files the rows need are written by `files`."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.recipe import ModelConfig
from lomotune.testing import tiny_llama, tiny_tokenizer

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """hardware.threads=1 sets torch's thread count for the process: restore it after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    (d / "malformed.yaml").write_text("model:\n  name: tiny-llama\n precision: fp32\n")
    (d / "list.yaml").write_text("- model\n- data\n")
    (d / "empty.jsonl").write_text("")
    good = {"prompt": "1+1=", "completion": "2"}
    rows = [good if i % 3 else {"prompt": "no answer"} for i in range(40)]  # 14 bad rows
    (d / "bad_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = {"prompt": "p" * 100, "completion": "c" * 10}
    (d / "long.jsonl").write_text(json.dumps(long) + "\n" * 1 + json.dumps(long) + "\n")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (d / "chat.jsonl").write_text((json.dumps(chat) + "\n") * 20)
    (d / "broken.json").write_text('[{"prompt": "a", "completion": "b"},\n{"prompt": }]')
    (d / "no-config").mkdir()
    # A model folder whose tokenizer has no chat template.
    tiny_llama().save_pretrained(d / "no-chat-template")
    tiny_tokenizer(chat_template=False).save_pretrained(d / "no-chat-template")
    return d


# name: (recipe file or None for tiny.yaml, overrides, fragments of the message)
CASES = {
    "malformed YAML": ("malformed.yaml", [], ["malformed.yaml has 1 problem", "not valid YAML at line 3, column 2"]),
    "YAML not a mapping": ("list.yaml", [], ["the top level must be a mapping of sections", "not a list"]),
    "no recipe file": ("missing.yaml", [], ["no such file", "lomotune recipes"]),
    "override without =": (None, ["optimizer.lr"], ["override 'optimizer.lr': write it as key.path=value"]),
    "wrong type": (None, ["training.batch_size=eight"], ["training.batch_size: should be a whole number of at least 1, or auto", "(got 'eight')"]),
    "wrong type of a section": (None, ["optimizer=fast"], ["optimizer: input should be a valid dictionary"]),
    "unknown key": (None, ["optimizer.weight_decy=0.1"], ["optimizer.weight_decy: unknown key; did you mean optimizer.weight_decay?"]),
    "unknown section": (None, ["trainer.steps=3"], ["trainer: unknown key"]),
    "not an allowed value": (None, ["data.format=csv"], ["data.format: 'csv' is not allowed", "'prompt-completion'"]),
    "out of range": (None, ["optimizer.lr=-1"], ["optimizer.lr: input should be greater than 0 (got -1)"]),
    "out of range, fraction": (None, ["data.eval_fraction=1.5"], ["data.eval_fraction: input should be less than 1 (got 1.5)"]),
    "all problems at once": (None, ["optimizer.lr=0", "training.batch_size=0", "model.precision=fp8"],
                             ["has 3 problem(s)", "optimizer.lr:", "training.batch_size:", "model.precision:"]),
    "neither steps nor epochs": (None, ["training.max_steps=null"], ["set training.max_steps or training.epochs"]),
    "accumulation with lomo": (None, ["optimizer.gradient_accumulation=4"],
                               ["optimizer.gradient_accumulation: lomo applies each update inside backward",
                                "raise training.batch_size instead"]),
    "missing model path": (None, ["model.name=./no/such/model"], ["model './no/such/model' is neither a built-in alias", "Check model.name"]),
    "model folder without config": (None, ["model.name={d}/no-config"], ["has no config.json"]),
    "unknown model alias": (None, ["model.name=smollm9"], ["model 'smollm9' is neither a built-in alias (smollm2-135m, tiny-llama)"]),
    "missing data path": (None, ["data.source={d}/nope.jsonl"], ["data.source: no such file:", "nope.jsonl"]),
    "data file with no rows": (None, ["data.source={d}/empty.jsonl"], ["empty.jsonl has no rows"]),
    "data file not valid JSON": (None, ["data.source={d}/broken.json"], ["broken.json is not valid JSON", "at line 2"]),
    "rows missing fields": (None, ["data.source={d}/bad_rows.jsonl"],
                            ["14 of 40 rows cannot be used with data.format: prompt-completion",
                             "line 1: no field 'completion'; line 4: no field 'completion'",
                             "(first 5 shown)", "data.on_bad_rows: skip"]),
    "every example too long": (None, ["data.source={d}/long.jsonl", "data.max_length=16"],
                               ["every training example was cut before its answer at max_length 16",
                                "Raise data.max_length to 111"]),
    "chat without a chat template": (None, ["data.source={d}/chat.jsonl", "data.format=chat", "model.name={d}/no-chat-template"],
                                     ["data.format: chat needs the tokenizer's chat template", "prompt-completion"]),
    "unknown built-in dataset": (None, ["data.source=builtin:nope"], ["no built-in dataset 'nope'", "builtin:dates, builtin:arithmetic"]),
    "more GPUs than present": (None, ["hardware.gpus=1"], ["hardware.gpus: 1 asked for, 0 present", "hardware.gpus: 0"]),
    "several processes, a batch that cannot be split": (None, ["hardware.gpus=0", "hardware.processes=2", "training.batch_size=1"], ["training.batch_size: 1 rows cannot be split over 2 processes", "set it to at least 2"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_message_and_exit_2(tmp_path, files, name):
    recipe, overrides, fragments = CASES[name]
    if name == "more GPUs than present" and torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    path = str(files / recipe) if recipe else TINY
    overrides = [o.format(d=files) for o in overrides]
    result = runner.invoke(
        app,
        ["train", path, *overrides, f"training.output_dir={out}", "hardware.threads=1", "--plain"],
    )
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # handled: not an exception escaping
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())  # whatever the terminal wrapped
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message
    assert not out.exists()  # a bad input writes nothing


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path, files):
    result = runner.invoke(
        app,
        ["train", TINY, f"data.source={files / 'bad_rows.jsonl'}", "data.on_bad_rows=skip",
         "training.batch_size=4", "training.max_steps=2", "hardware.threads=1",
         f"training.output_dir={tmp_path / 'out'}", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: 14 bad rows skipped (data.on_bad_rows: skip)" in result.output
    assert "23 train / 3 eval examples" in result.output  # the 26 good rows, split 9:1


def test_yaml_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    result = runner.invoke(app, ["train", str(recipe), "--plain"])
    assert result.exit_code == 2, result.output
    assert "not valid YAML at line 1" in result.output
    assert "could not determine a constructor" in " ".join(result.output.split())
    assert not marker.exists()
    # Overrides are parsed as YAML too, just as safely: the tag stays a plain string.
    result = runner.invoke(
        app, ["train", TINY, f"model.name=!!python/object/apply:os.system ['touch {marker}']"]
    )
    assert result.exit_code == 2 and not marker.exists()


def test_trust_remote_code_is_off_unless_asked(tmp_path, files, monkeypatch):
    assert ModelConfig().trust_remote_code is False
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained)
    )
    model = files / "no-chat-template"
    base = ["train", TINY, f"model.name={model}", "training.max_steps=1", "hardware.threads=1"]
    result = runner.invoke(app, [*base, f"training.output_dir={tmp_path / 'a'}", "--plain"])
    assert result.exit_code == 0, result.output
    assert seen == [False] and "trust_remote_code is on" not in result.output
    result = runner.invoke(
        app,
        [*base, "model.trust_remote_code=true", f"training.output_dir={tmp_path / 'b'}", "--plain"],
    )
    assert result.exit_code == 0, result.output
    assert seen == [False, True]
    assert "warning: model.trust_remote_code is on: code from the model folder runs" in (
        result.output
    )


def test_an_output_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    result = runner.invoke(
        app, ["train", TINY, f"training.output_dir={out}", "hardware.threads=1", "--plain"]
    )
    assert result.exit_code == 2, result.output
    assert f"training.output_dir: cannot create {out}: Not a directory" in result.output
    assert "Traceback" not in result.output

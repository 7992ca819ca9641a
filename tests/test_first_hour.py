"""What a new user meets in their first hour (issue 23): older checkpoints that load, an
auto batch that keeps a run a run, export of any run folder, a short true summary,
suggestions that help, and the commands any CLI has."""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.testing import tiny_llama_config

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
SUPERGLUE = Path(__file__).parent / "fixtures" / "superglue" / "official"
runner = CliRunner()

TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings "
    "and many more words follow here so that the trainer sees a few hundred of them"
)


@pytest.fixture(autouse=True)
def restore_threads():
    """hardware.threads sets torch's thread count for the process: restore it after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A LLaMA-1/2-style folder: a tiny Llama and a sentencepiece `tokenizer.model` trained
    here on a few hundred words, no tokenizer.json (as the LOMO paper's models ship)."""
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-sentencepiece")
    words = TEXT.split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(60)]
    lines += ["1+1=2", "2+3=5", "7+8=15", "9+9=18", "0123456789 + ="]  # builtin:arithmetic
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=96,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=96)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------
# 1. Checkpoints whose tokenizer is only a sentencepiece tokenizer.model


def test_a_sentencepiece_tokenizer_model_loads_as_sentencepiece_reads_it(sentencepiece_model):
    import sentencepiece as spm

    from lomotune.models import load_model
    from lomotune.recipe import ModelConfig

    cfg = ModelConfig(name=str(sentencepiece_model), precision="fp32")
    loaded = load_model(cfg, torch.device("cpu"))
    reference = spm.SentencePieceProcessor(model_file=str(sentencepiece_model / "tokenizer.model"))
    text = "the lazy fox jumps over seven kings"
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    assert ids == reference.encode(text)
    assert loaded.tokenizer.decode(ids) == reference.decode(ids) == text
    assert loaded.tokenizer.eos_token_id == reference.eos_id() == 2


def test_a_sentencepiece_model_trains_and_evaluates(tmp_path, sentencepiece_model):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", TINY, f"model.name={sentencepiece_model}", "training.max_steps=2",
         "training.eval_every=0", "training.save_every=0", "hardware.threads=1",
         f"training.output_dir={out}", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "model" / "tokenizer.model").exists() or (
        out / "model" / "tokenizer.json"
    ).exists()
    result = runner.invoke(
        app,
        ["eval", "--model", str(out), "--tasks", "cb", "--data-dir", str(SUPERGLUE),
         "--limit", "4", "--precision", "fp32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cb" in result.output.lower()


def test_an_unreadable_tokenizer_model_is_one_line_exit_2(tmp_path, sentencepiece_model):
    broken = tmp_path / "broken"
    shutil.copytree(sentencepiece_model, broken)
    (broken / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
    for args in (
        ["train", TINY, f"model.name={broken}", f"training.output_dir={tmp_path / 'run'}",
         "hardware.threads=1", "--plain"],
        ["eval", "--model", str(broken), "--tasks", "cb", "--data-dir", str(SUPERGLUE)],
    ):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert isinstance(result.exception, SystemExit)
        message = " ".join(result.output.split())
        assert message.startswith("error: could not load the tokenizer of model")
        assert f"{broken / 'tokenizer.model'} is not a sentencepiece model" in message
        assert "tiktoken" not in message and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# 2. training.batch_size: auto keeps a run a run (the CPU case: test_estimate_run.py)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize(("rows", "processes", "accumulation", "expected"), [
    (900, 1, 1, 56),  # 900 // 16
    (900, 2, 1, 56),  # a multiple of the processes
    (900, 4, 1, 56),
    (900, 1, 4, 14),  # four micro-batches an update: 900 // 64
    (10, 2, 1, 2),  # fewer rows than 16 updates: one row a process
])  # fmt: skip
def test_batch_size_auto_keeps_16_updates_an_epoch(
    device_type, rows, processes, accumulation, expected
):
    from lomotune.estimate.for_run import Budget, choose_batch_size
    from lomotune.recipe import load_recipe
    from lomotune.testing import tiny_llama

    method = "adamw" if accumulation > 1 else "lomo"
    recipe = load_recipe(
        Path(TINY),
        [f"optimizer.name={method}", f"optimizer.gradient_accumulation={accumulation}"],
    )
    huge = Budget(2**50, "a test budget of 1 PiB")
    batch, why = choose_batch_size(recipe, tiny_llama().config, device_type, processes, huge, rows)
    assert batch == expected
    updates = rows // (expected * accumulation)
    assert f"so that an epoch of the {rows} training rows is {updates} updates" in why


# ---------------------------------------------------------------------------------------
# 3. lomotune export on a run folder, its model/, or a run that has nothing to merge


def train(out: Path, *overrides: str):
    return runner.invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", "hardware.threads=1", "training.eval_every=0",
         "training.save_every=0", *overrides, "--plain"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A qlora-sgd run on a saved base (named in its recipe) and a lomo run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lomotune.testing import tiny_tokenizer

    d = tmp_path_factory.mktemp("runs")
    config = LlamaConfig(
        vocab_size=105, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d / "base")
    tiny_tokenizer().save_pretrained(d / "base")
    threads = torch.get_num_threads()
    result = train(
        d / "qlora", f"model.name={d / 'base'}", "model.precision=bf16", "optimizer.name=qlora-sgd",
        "optimizer.lr=0.05", "optimizer.lora.r=4", "training.max_steps=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = train(d / "lomo", "training.max_steps=1")
    assert result.exit_code == 0, result.output
    torch.set_num_threads(threads)
    return d


def exported_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_export_of_a_qlora_run_folder_reads_the_base_from_its_recipe(tmp_path, runs):
    # The explicit form, as before: the adapter folder and --base.
    reference = tmp_path / "reference"
    result = runner.invoke(
        app,
        ["export", str(runs / "qlora" / "model"), str(reference), "--base", str(runs / "base"),
         "--precision", "fp32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = exported_weights(reference)
    # The run folder itself, no --base: the base the run's recipe.yaml names.
    result = runner.invoke(app, ["export", str(runs / "qlora"), str(tmp_path / "a"), "--precision", "fp32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = exported_weights(tmp_path / "a")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # An adapter whose config lost the base's name (moved, or an alias): the recipe names it.
    adapter = tmp_path / "run" / "model"
    shutil.copytree(runs / "qlora" / "model", adapter)
    shutil.copy(runs / "qlora" / "recipe.yaml", tmp_path / "run" / "recipe.yaml")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["export", str(adapter), str(tmp_path / "b"), "--precision", "fp32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = exported_weights(tmp_path / "b")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # Neither names it: the message names --base.
    (adapter / "lomotune_recipe.yaml").unlink()
    (tmp_path / "run" / "recipe.yaml").unlink()
    result = runner.invoke(app, ["export", str(adapter), str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "names no base model" in message and "with --base" in message
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("where", ["lomo", "lomo/model"])
def test_export_of_a_full_model_run_says_so(tmp_path, runs, where):
    result = runner.invoke(app, ["export", str(runs / where), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    message = " ".join(result.output.split())
    assert message.startswith(f"error: {runs / 'lomo' / 'model'} is already a full model")
    assert "a lomo run trained every weight: nothing to merge" in message
    assert "save_adapter" not in message and "base" not in message.replace(str(runs), "")
    assert not (tmp_path / "out").exists()


def test_export_of_a_folder_that_is_no_run_names_what_it_takes(tmp_path):
    (tmp_path / "notes").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "notes"), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "it is not a LoRA adapter" in message
    assert "a qlora-sgd run's folder, its model/ folder, or a PEFT adapter folder" in message
    assert "save_adapter" not in message


# ---------------------------------------------------------------------------------------
# 5. Suggestions that do not mislead; no third-party noise the user cannot act on


@pytest.mark.parametrize(("typed", "meant"), [
    ("optimizer.learning_rate", "optimizer.lr"),  # difflib said decay_rate
    ("optimizer.max_grad_norm", "optimizer.clip.max_norm"),
    ("optimizer.gradient_accumulation_steps", "optimizer.gradient_accumulation"),
    ("training.num_train_epochs", "training.epochs"),
    ("training.per_device_train_batch_size", "training.batch_size"),
    ("data.max_seq_length", "data.max_length"),
    ("model.model_name_or_path", "model.name"),
    ("optimizer.weight_decy", "optimizer.weight_decay"),  # a typo: the closest spelling
])  # fmt: skip
def test_unknown_keys_suggest_what_was_meant(typed, meant):
    from lomotune.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe(Path(TINY), [f"{typed}=1"])
    assert caught.value.problems == [f"{typed}: unknown key; did you mean {meant}?"]


def lomotune(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process: what a user's terminal shows, warnings and
    library logging included (pytest's own capture would hide them)."""
    return subprocess.run(
        [sys.executable, "-m", "lomotune", *args], capture_output=True, text=True, timeout=300
    )


def test_no_third_party_noise_on_eval_and_export(tmp_path, runs):
    result = lomotune(
        "eval", "--model", "tiny-llama", "--tasks", "cb", "--data-dir", str(SUPERGLUE),
        "--limit", "4", "--precision", "fp32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stderr and "past_key_values" not in result.stderr
    # A lomo run's export imports peft and with it bitsandbytes: one line, and only ours.
    result = lomotune("export", str(runs / "lomo"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "kernels-community" not in result.stderr


def test_silencing_is_by_message_not_by_library():
    import logging
    import warnings

    from lomotune.quiet import silence_third_party_noise

    shown = [
        ("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning),
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning),
        ("`something_else` is deprecated and will be removed", FutureWarning),
        ("`past_key_values` is deprecated and will be removed", UserWarning),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # what a fresh process shows
        silence_third_party_noise()
        for message, category in shown:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in seen] == [m for m, _ in shown[2:]]
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    keep = Keep()
    logger.addHandler(keep)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        logger.warning("Something else bitsandbytes says")
    finally:
        logger.removeHandler(keep)
    assert records == ["Something else bitsandbytes says"]


# ---------------------------------------------------------------------------------------
# 6. What any CLI has


def test_version():
    from lomotune import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"lomotune {__version__} (python ")


# ---------------------------------------------------------------------------------------
# 4. The end-of-run summary: short and true


def test_summary_is_short_true_and_fits_80_columns(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}  # fmt: skip
    (tmp_path / "chat.jsonl").write_text((json.dumps(chat) + "\n") * 40)
    out = tmp_path / "run"
    result = train(
        out, f"data.source={tmp_path / 'chat.jsonl'}", "data.format=chat",
        "training.generate_eval_examples=4", "training.max_steps=3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = result.output[result.output.index("summary:") :].splitlines()[1:]
    printed = [line for line in printed if line.startswith("  ")]
    labels = [line.split(":")[0].strip() for line in printed]
    assert labels == [
        "method", "steps", "final loss (smoothed)", "last step's loss", "eval loss", "tokens/s",
        "peak memory", "step memory", "wall time", "model dir",
    ]  # fmt: skip
    assert all(len(line) <= 80 for line in printed if "model dir" not in line)
    assert not re.search(r"\bnan\b", result.output) and "accuracy after" not in result.output
    assert result.output.count("has no answers to match") == 1  # said once, as a warning
    # The numbers are the run's: the last step's loss as metrics.jsonl logged it.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] == losses[-1] and "accuracy_after" not in summary
    assert f"  last step's loss: {losses[-1]:.4f}" in printed
    assert f"  final loss (smoothed): {summary['final_loss']:.4f}" in printed


def test_dry_run_reports_and_writes_nothing(tmp_path):
    import yaml

    from lomotune.estimate import Setup, estimate, shape_of
    from lomotune.monitor import format_bytes
    from lomotune.testing import tiny_llama

    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", TINY, f"training.output_dir={out}", "hardware.threads=1", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert not out.exists()  # nothing written, nothing trained
    recipe_text, report = result.output.split("\n\n", 1)
    resolved = yaml.safe_load(recipe_text)
    assert resolved["training"]["batch_size"] == 8 and resolved["model"]["precision"] == "fp32"
    assert resolved["training"]["output_dir"] == str(out)
    # tiny.yaml: 200 arithmetic examples, 10% held out; 20 steps of batch 8
    assert "data: 180 train / 20 eval examples from builtin:arithmetic" in report
    assert "steps: 20 of batch 8" in report
    assert "torch threads: 1 (hardware.threads)" in report
    expected = estimate(
        shape_of(tiny_llama().config), Setup("lomo", 8, 48, precision="fp32", device="cpu")
    )
    assert f"memory estimate: {format_bytes(expected.tensor_bytes)}" in report
    assert "step 1/" not in result.output
    # A folder that holds something: said, and left as it was.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["train", TINY, f"training.output_dir={out}", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"{out} already holds files: a run needs --resume, --overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_training_run_shows_its_thread_count(tmp_path):
    result = train(tmp_path / "run", "training.max_steps=1", "hardware.threads=1")
    assert result.exit_code == 0, result.output
    assert "torch threads: 1 (hardware.threads)" in result.output


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A model folder whose tokenizer has no chat template (as a base model's)."""
    from lomotune.testing import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("base-model")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer(chat_template=False).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("given", ["string", "file"])
def test_chat_template_gives_a_base_model_one(tmp_path, base_model, given):
    import jinja2
    import yaml
    from transformers import AutoTokenizer

    from lomotune.data import prepare_data
    from lomotune.data.chat_template import apply_chat_template
    from lomotune.recipe import load_recipe

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (tmp_path / "chat.jsonl").write_text((json.dumps({"messages": messages}) + "\n") * 30)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    recipe = yaml.safe_load(Path(TINY).read_text())
    recipe["model"]["name"] = str(base_model)
    recipe["data"] = {"source": "chat.jsonl", "format": "chat", "max_length": 48}
    # a file beside the recipe, named relative to it (as data.source is)
    recipe["data"]["chat_template"] = CHATML if given == "string" else "chatml.jinja"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # The rows are rendered with the template: the first row, as Jinja itself renders it.
    parsed = load_recipe(path, [])
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    apply_chat_template(tokenizer, parsed.data)
    data = prepare_data(parsed.data, tokenizer, seed=0)
    rendered = jinja2.Template(CHATML).render(messages=messages, add_generation_prompt=False)
    assert tokenizer.decode(data.train[0].input_ids) == rendered  # every row is this one
    # A run trains with it, and the trained model keeps it.
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", str(path), f"training.output_dir={out}", "training.max_steps=2",
         "training.eval_every=0", "hardware.threads=1", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == CHATML


@pytest.mark.parametrize(("value", "fragment"), [
    ("chatml", "data.chat_template: 'chatml' is neither a file nor a Jinja template"),
    ("{% for m in messages %}{{ m }}", "data.chat_template: not a valid Jinja template (line 1:"),
])  # fmt: skip
def test_a_bad_chat_template_is_one_line_exit_2(tmp_path, base_model, value, fragment):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}  # fmt: skip
    (tmp_path / "chat.jsonl").write_text((json.dumps(chat) + "\n") * 20)
    result = runner.invoke(
        app,
        ["train", TINY, f"model.name={base_model}", f"data.source={tmp_path / 'chat.jsonl'}",
         "data.format=chat", f"data.chat_template={value}", f"training.output_dir={tmp_path / 'o'}",
         "hardware.threads=1", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["recipes", "models"])
def test_lists_print_whole_names_when_piped_at_80_columns(command):
    from lomotune.builtin_models import BUILTIN_MODELS, TINY_ALIAS
    from lomotune.cli import SHIPPED_RECIPES

    result = runner.invoke(app, [command], env={"COLUMNS": "80"})  # not a terminal: a pipe
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    names = [p.stem for p in SHIPPED_RECIPES.glob("*.yaml")]
    names = names if command == "recipes" else [*BUILTIN_MODELS, TINY_ALIAS]
    cells = {cell.strip() for line in result.output.splitlines() for cell in line.split("│")}
    assert set(names) <= cells
    assert all(len(line) <= 80 for line in result.output.splitlines() if "│" in line)


def test_readme_commands_work_from_any_folder(tmp_path, monkeypatch):
    from lomotune.cli import find_recipe

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    named = re.findall(r"^\s+lomotune (?:train|estimate) ([^-\s]\S*)", readme, re.MULTILINE)
    shipped = [n for n in named if n != "my.yaml"]  # my.yaml: the user's own recipe
    assert "quickstart" in shipped or "recipes/quickstart.yaml" in shipped
    monkeypatch.chdir(tmp_path)  # not the repository
    for name in shipped:
        assert find_recipe(name).is_file(), name

"""What a new user meets in their first hour (issue 23): older checkpoints that load, an
auto batch that keeps a run a run, export of any run folder, a short true summary,
suggestions that help, and the commands any CLI has."""

import io
import json
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
    import shutil

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

"""The whole path through the CLI on the tiny model: recipe -> model -> data -> engine ->
loop -> outputs, for every method."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.dashboard import read_metrics
from lomotune.testing import tiny_tokenizer

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")
runner = CliRunner()


def train(out: Path, *overrides: str, flags=()):
    result = runner.invoke(
        app, ["train", TINY, f"training.output_dir={out}", *overrides, "--plain", *flags]
    )
    return result


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_cli_trains_tiny_model_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = train(out, "training.max_steps=30")
    assert result.exit_code == 0, result.output
    losses = train_losses(out)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learned
    # The final model loads with plain transformers and is the trained one.
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok("12").input_ids
    assert model.config.use_cache is True
    assert (out / "model" / "lomotune_recipe.yaml").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["peak_memory"] > 0 and summary["tokens_per_s"] > 0
    assert (out / "training.png").stat().st_size > 1000
    assert "step 30/30" in result.output and "summary" in result.output


def test_output_folder_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "run"
    assert train(out, "training.max_steps=2").exit_code == 0
    before = (out / "model" / "model.safetensors").read_bytes()
    again = train(out, "training.max_steps=2", "optimizer.lr=0.5")
    assert again.exit_code == 2
    assert "already holds a finished run" in again.output and "--overwrite" in again.output
    assert (out / "model" / "model.safetensors").read_bytes() == before
    replaced = train(out, "training.max_steps=2", "optimizer.lr=0.5", flags=["--overwrite"])
    assert replaced.exit_code == 0
    assert (out / "model" / "model.safetensors").read_bytes() != before


METHOD_SETTINGS = {
    "lomo": ["optimizer.lr=0.05"],
    "adalomo": ["optimizer.lr=0.01"],
    "mezo": ["optimizer.lr=1e-3", "optimizer.gradient_accumulation=2", "optimizer.zo_directions=2"],
    "adamw": ["optimizer.lr=3e-3", "optimizer.gradient_accumulation=2"],
    "sgd": ["optimizer.lr=0.05", "optimizer.clip.mode=exact"],
    "adam-mini": ["optimizer.lr=3e-3"],
}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_every_method_runs_from_a_recipe(tmp_path, method):
    out = tmp_path / method
    result = train(
        out, f"optimizer.name={method}", "training.max_steps=12", *METHOD_SETTINGS[method]
    )
    assert result.exit_code == 0, result.output
    losses = train_losses(out)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    if method != "mezo":  # MeZO needs far more steps to move the loss
        assert sum(losses[-3:]) < sum(losses[:3])


def test_qlora_sgd_trains_adapters_and_saves_peft_folder(tmp_path):
    base = tmp_path / "base"
    config = LlamaConfig(
        vocab_size=105, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    out = tmp_path / "qlora"
    result = train(
        out, f"model.name={base}", "model.precision=bf16", "optimizer.name=qlora-sgd",
        "optimizer.lr=0.05", "optimizer.lora.r=8", "training.max_steps=6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "model" / "adapter_config.json").exists()
    assert (out / "model" / "adapter_model.safetensors").exists()
    # r=8 over 7 linear layers a block, 2 blocks: 8 * (sum of in + out features) * 2
    assert "qlora-sgd: 32,768 of 341,760 parameters trained" in result.output
    merged = tmp_path / "merged"
    exported = runner.invoke(
        app, ["export", str(out / "model"), str(merged), "--base", str(base), "--precision", "fp32"]
    )
    assert exported.exit_code == 0, exported.output
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    again = runner.invoke(app, ["export", str(out / "model"), str(merged), "--base", str(base)])
    assert again.exit_code == 2 and "overwrite" in again.output


def test_mezo_on_lora_adapters_only(tmp_path):
    out = tmp_path / "mezo-lora"
    result = train(
        out,
        "optimizer.name=mezo",
        "optimizer.lr=1e-3",
        "optimizer.lora.r=4",
        "training.max_steps=4",
    )
    assert result.exit_code == 0, result.output
    assert (
        "mezo: 4,096 of 26,048 parameters" in result.output
    )  # r * (in + out of 7 linears) * 2 blocks
    assert (out / "model" / "adapter_model.safetensors").exists()

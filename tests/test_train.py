"""The whole path through the CLI on the tiny model: recipe -> model -> data -> engine ->
loop -> outputs, for every method."""

import importlib.util
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
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    # The summary agrees with the per-step records, recomputed here.
    tokens = sum(r["tokens"] for r in records)
    assert summary["steps"] == 30
    assert summary["tokens_per_s"] == pytest.approx(tokens / sum(r["step_time"] for r in records))
    assert summary["peak_memory"] == max(r["mem_peak"] for r in records)
    assert not any("mfu" in r for r in records)  # no peak FLOP/s known for a CPU: no MFU
    assert summary["final_loss"] == pytest.approx(bias_corrected_ema(losses))
    assert (out / "training.png").stat().st_size > 1000
    assert "step 30/30" in result.output and "summary" in result.output


def test_mfu_is_logged_on_a_device_of_known_peak(tmp_path, monkeypatch):
    peak = 2e9  # FLOP/s of a pretend device
    monkeypatch.setattr("lomotune.train.peak_flops_for", lambda device: peak)
    out = tmp_path / "run"
    result = train(out, "training.max_steps=3")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    n = sum(p.numel() for p in model.parameters())  # every parameter, tied ones once
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 3
    for r in records:
        assert r["mfu"] == pytest.approx(6 * n * r["tokens_per_s"] / peak)
    assert "MFU " in result.output


def bias_corrected_ema(values, beta=0.9):
    ema = 0.0
    for v in values:
        ema = beta * ema + (1 - beta) * v
    return ema / (1 - beta ** len(values))


def test_final_loss_does_not_depend_on_log_every(tmp_path):
    every = train(tmp_path / "every", "training.max_steps=12")
    sparse = train(tmp_path / "sparse", "training.max_steps=12", "training.log_every=5")
    assert every.exit_code == 0 and sparse.exit_code == 0, sparse.output
    a = json.loads((tmp_path / "every" / "summary.json").read_text())["final_loss"]
    b = json.loads((tmp_path / "sparse" / "summary.json").read_text())["final_loss"]
    assert a == b == pytest.approx(bias_corrected_ema(train_losses(tmp_path / "every")))


def test_precision_auto_is_resolved_printed_and_saved(tmp_path, monkeypatch):
    import lomotune.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: (False, "this CPU (AVX2) has none"))
    result = train(tmp_path / "run", "training.max_steps=2", "model.precision=auto")
    assert result.exit_code == 0, result.output
    assert "precision auto -> fp32: this CPU (AVX2) has none" in result.output
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "precision: fp32" in saved and "precision: auto" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert loaded.dtype == torch.float32


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_fix(tmp_path, monkeypatch):
    import lomotune.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: (False, "this CPU (AVX2) has none"))
    result = train(tmp_path / "run", "training.max_steps=1", "model.precision=bf16")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: model.precision is bf16, but this CPU (AVX2) has none" in text
    assert "model.precision: auto (or fp32)" in text


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


def test_a_fused_method_on_a_gpu_without_its_kernel_says_why(monkeypatch):
    import lomotune.advice as advice
    from lomotune.optim import kernels
    from lomotune.recipe import ModelConfig, OptimizerConfig, Recipe, TrainingConfig

    recipe = Recipe(
        model=ModelConfig(precision="bf16"),
        optimizer=OptimizerConfig(name="lomo", lr=1e-2),
        training=TrainingConfig(max_steps=1),
    )
    gpu = torch.device("cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(kernels, "_why_not", {})
    assert "pip install triton" in kernels.prepare(gpu, {})  # FusedEngine.prepare_kernels
    (warning,) = advice.method_warnings(recipe, gpu)
    assert "eager ops" in warning and "pip install triton" in warning
    assert advice.method_warnings(recipe, torch.device("cpu")) == []
    monkeypatch.setattr(kernels, "why_not_compiled", lambda device: None)
    assert advice.method_warnings(recipe, gpu) == []


def test_tiny_model_for_qlora_sgd_moves_to_the_device():
    """The tiny model is never quantized: for qlora-sgd it goes to the device as for any
    other method (the meta device stands in for a GPU)."""
    from lomotune.models import load_model
    from lomotune.recipe import ModelConfig

    cfg = ModelConfig(name="tiny-llama", precision="fp32", activation_checkpointing=False)
    model = load_model(cfg, torch.device("meta"), quantize_4bit=True).model
    assert {p.device.type for p in model.parameters()} == {"meta"}

"""The method registry, and the baselines it adds as users run them: adamw with fp32
master weights under bf16 autocast (the HF Trainer's `bf16=True`), adamw-pure (weights
and state in bf16), lora-adamw (peft LoRA + AdamW over an unquantized base)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
from typer.testing import CliRunner

from lomotune import methods
from lomotune.cli import app
from lomotune.estimate import Setup, estimate, resolve_config, shape_of
from lomotune.loss import causal_lm_loss
from lomotune.optim import build_engine
from lomotune.recipe import MethodName, OptimizerConfig, Recipe, RecipeError, load_recipe
from lomotune.testing import tiny_llama

TINY = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml")


def test_the_registry_is_the_one_list_of_methods():
    assert get_args(MethodName) == methods.NAMES
    fields = OptimizerConfig.model_fields
    for key in methods.METHOD_ONLY_KEYS:  # each such key is a recipe key some method reads
        assert key in fields and methods.readers_of(key)
    assert methods.FUSED == ("lomo", "adalomo", "qlora-sgd")
    for m in methods.REGISTRY.values():
        low, high = m.usual_lr
        assert low <= m.lr <= high, m.name
    with pytest.raises(ValueError, match="known: lomo"):
        methods.method("adam")


def test_a_key_of_another_method_is_refused_naming_its_readers():
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, ["optimizer.name=lomo", "optimizer.betas=[0.9,0.95]"])
    assert "only adamw, adamw-pure, adam-mini, lora-adamw do" in str(e.value)
    with pytest.raises(RecipeError, match="LoRA adapters are for mezo, qlora-sgd, lora-adamw"):
        load_recipe(TINY, ["optimizer.name=adamw", "optimizer.lora.r=4"])


def bf16_recipe(name: str, lr: float) -> Recipe:
    return load_recipe(
        TINY, [f"optimizer.name={name}", f"optimizer.lr={lr}", "model.precision=bf16"]
    )


def one_adamw_step(name: str, dtype: torch.dtype, lr: float) -> tuple[dict, dict, list]:
    torch.manual_seed(0)
    model = tiny_llama(dtype=dtype)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    seen = []  # the dtype each projection computed in
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    engine = build_engine(
        bf16_recipe(name, lr), model, lambda b: causal_lm_loss(model, b, chunk_tokens=16)
    )
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    engine.step([batch], lr)
    after = {n: p.detach().float() for n, p in model.named_parameters()}
    return before, after, seen


def test_adamw_keeps_fp32_master_weights_and_computes_in_bf16():
    # AdamW's first step moves every weight whose gradient is well above eps by lr
    # (m / sqrt(v) = sign(g) after bias correction): independent of the code, by hand.
    lr = 1e-5
    before, after, seen = one_adamw_step("adamw", torch.float32, lr)
    assert seen == [torch.bfloat16]  # the forward ran under bf16 autocast
    moved = torch.cat([(after[n] - before[n]).abs().flatten() for n in before])
    assert (moved > 0.9 * lr).float().mean() > 0.97
    assert moved.max() <= lr * 1.01  # fp32 rounding of w - lr at |w| <= 1: under 1 %


def test_adamw_pure_loses_small_updates_to_bf16_rounding():
    # The same step on bf16 weights: most changes of 1e-5 are below half the spacing of
    # bf16 around the weights (|w| ~ 0.02: spacing 2^-13 = 1.2e-4), so they are lost.
    lr = 1e-5
    before, after, seen = one_adamw_step("adamw-pure", torch.bfloat16, lr)
    assert seen == [torch.bfloat16]
    w = torch.cat([before[n].flatten() for n in before])
    moved = torch.cat([(after[n] - before[n]).abs().flatten() for n in before])
    # By hand: a step of lr is lost where bf16 rounds w + lr and w - lr back to w.
    lost = ((w + lr).bfloat16().float() == w) & ((w - lr).bfloat16().float() == w)
    assert lost.float().mean() > 0.8
    assert ((moved == 0) == lost).float().mean() > 0.98


def test_adamw_in_bf16_trains_fp32_weights_from_a_recipe(tmp_path):
    out = tmp_path / "adamw"
    result = CliRunner().invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", "optimizer.name=adamw",
         "optimizer.lr=3e-3", "model.precision=bf16", "training.max_steps=6", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes == {torch.float32}  # the master weights are what it trained


def test_lora_adamw_trains_only_the_adapters(tmp_path):
    out = tmp_path / "lora"
    result = CliRunner().invoke(
        app,
        ["train", TINY, f"training.output_dir={out}", "optimizer.name=lora-adamw",
         "optimizer.lr=1e-2", "optimizer.lora.r=4", "training.max_steps=8", "--plain"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # r * (in + out of the 7 linears of a block) * 2 blocks, as for mezo's adapters
    assert "lora-adamw: 4,096 of 26,048 parameters trained" in result.output
    assert (out / "model" / "adapter_model.safetensors").exists()


def test_estimate_counts_each_adamw_as_it_runs():
    # LLaMA-7B, bf16, batch 1 x 512: at the optimizer step, by hand
    shape = shape_of(resolve_config("llama-7b"))
    p = shape.params()
    mixed = estimate(shape, Setup("adamw", 1, 512, precision="bf16"))
    pure = estimate(shape, Setup("adamw-pure", 1, 512, precision="bf16"))
    # fp32 weights, fp32 gradients, fp32 m and v: 16 bytes a parameter
    assert mixed.parts["weights"] == 4 * p
    assert mixed.parts["optimizer_state"] == 8 * p
    # bf16 weights and state: 2 + 4 bytes a parameter, gradients 2
    assert pure.parts["weights"] == 2 * p and pure.parts["optimizer_state"] == 4 * p
    # the peak is the optimizer step (fused CUDA AdamW: no temporaries): 16 vs 8 bytes
    assert mixed.phase == pure.phase == "optimizer step"
    assert mixed.tensor_bytes == 16 * p and pure.tensor_bytes == 8 * p
    lora = estimate(shape, Setup("lora-adamw", 1, 512, precision="bf16", lora_rank=8))
    adapters = lora.parts["lora_adapters"]
    # r=8 on q, k, v, o, gate, up, down: 8 x (in + out) x 32 layers, fp32
    assert adapters == 4 * 8 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert lora.parts["optimizer_state"] == 2 * adapters

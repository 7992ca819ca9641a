"""LoRA adapters over a frozen base, for qlora-sgd (QLoRA, arXiv 2305.14314).

The base comes from `models.load_model(..., quantize_4bit=True)`: every linear layer of
the decoder is a bitsandbytes `Linear4bit` holding NF4 weights with double quantization
(the absmax constants quantized again to 8 bits). `add_lora_adapters` wraps it in a
PEFT `PeftModel` whose only trainable parameters are the adapters, so that the fused
engine, which updates every parameter with `requires_grad`, touches nothing else.

Why not peft's `prepare_model_for_kbit_training`: it casts every parameter that is not
4-bit (embeddings, lm_head, norms) to fp32. On SmolLM2-135M the tied embedding alone is
28M of its 135M parameters, so that cast doubles the largest non-quantized tensor: the
opposite of what a 4-bit base is for. Its other jobs are not needed here:
- freezing the base: `get_peft_model` already freezes everything but the adapters
  (checked below, so a change in peft cannot silently train the base);
- fp32 norms: Llama's RMSNorm already computes its variance in fp32;
- input embeddings that require grad, for reentrant checkpointing: `load_model` uses
  non-reentrant checkpointing (`use_reentrant=False`), which passes gradients to the
  adapters inside a checkpointed layer whether or not the layer's input requires grad
  (transformers marks the embedding output as requiring grad anyway; a test runs the
  adapters' backward with checkpointing on).
The adapters themselves are kept in fp32 (peft's `autocast_adapter_dtype`): they are
small, and the fused SGD update then needs no rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lomotune.models import logical_numel
from lomotune.recipe import LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel


def add_lora_adapters(model: torch.nn.Module, cfg: LoraConfig) -> PeftModel:
    """Freeze `model` and wrap it in a PEFT LoRA model; returns the `PeftModel`.

    `cfg.target_modules` is a list of module names or "all-linear" (peft's own keyword:
    every linear layer but the output head, 4-bit `Linear4bit` layers included)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout if cfg.dropout is not None else default_lora_dropout(model),
        target_modules=cfg.target_modules,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. target modules that match nothing
        raise ValueError(f"optimizer.lora.target_modules: {e}") from None
    keep_4bit_layers_trainable(peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if "lora_" not in n]
    if stray or not trainable:
        raise RuntimeError(
            f"LoRA should train only adapter parameters; trainable: {stray or 'none'}"
        )
    return peft_model


def default_lora_dropout(model: torch.nn.Module) -> float:
    """QLoRA's dropout (arXiv 2305.14314, Appendix B): 0.1 up to 13B parameters, 0.05
    for 33B and 65B."""
    total = sum(logical_numel(p) for p in model.parameters())
    return 0.05 if total >= 30e9 else 0.1


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50) repacks a Linear4bit's weight for fast CPU inference the first
    time it runs in eval mode without grad (our eval passes), permanently: afterwards its
    matmul has no backward, and the adapters below it get almost no gradient (measured on
    SmolLM2: 2.7e-4 -> 1.4e-9). Training needs the unpacked layout: turn that path off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------------------------------
# Sizes


def tensor_bytes(t: torch.Tensor, seen: set[int] | None = None) -> int:
    """Bytes held by `t` and, for a 4-bit parameter, by its quantization state: absmax
    (8-bit under double quantization), the NF4 code, and the second level's absmax and
    code. Tensors whose storage is in `seen` are skipped (and new ones added)."""
    seen = set() if seen is None else seen
    parts = [t]
    state = getattr(t, "quant_state", None)
    while state is not None:
        parts += [
            x
            for x in (state.absmax, state.code, getattr(state, "offset", None))
            if torch.is_tensor(x)
        ]
        state = getattr(state, "state2", None)  # double quantization: the absmax's own state
    total = 0
    for x in parts:
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += x.untyped_storage().nbytes()
    return total

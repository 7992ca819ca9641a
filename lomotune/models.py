"""Load a model with its tokenizer in the recipe's precision (`builtin_models` resolves
its name to a folder or hub id; `loss` computes its loss), and count its parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from lomotune.builtin_models import TINY_ALIAS, ModelError, resolve_model
from lomotune.recipe import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # the folder or hub id it came from


def damaged_weights(source: Path | str) -> str | None:
    """'FILE is not a readable safetensors file (why)' for the first weights file of a
    local folder whose header does not read (cut short, overwritten), else None:
    safetensors' own error does not name the file."""
    from safetensors import safe_open

    for path in sorted(Path(str(source)).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]})"
    return None


def load_model(
    cfg: ModelConfig, device: torch.device, *, quantize_4bit: bool = False, empty: bool = False
) -> LoadedModel:
    """Load model and tokenizer in the recipe's precision; activation checkpointing on
    when asked. `quantize_4bit` loads the base in NF4 (qlora-sgd). `empty`: the model's
    structure on the meta device, no weights read (a rank of a sharded run other than 0:
    it receives its shards from rank 0 after `fully_shard`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.precision not in DTYPES:  # "auto" is resolved for the device first
        raise ValueError(
            f"load_model needs a resolved precision, got {cfg.precision!r}: "
            "call precision.resolve_precision first"
        )
    dtype = DTYPES[cfg.precision]
    if cfg.name == TINY_ALIAS:
        from lomotune.testing import tiny_llama, tiny_tokenizer

        with torch.device("meta") if empty else contextlib.nullcontext():
            model = tiny_llama(dtype=dtype)
        tokenizer, source = tiny_tokenizer(), TINY_ALIAS
    else:
        source = resolve_model(cfg.name)
        kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if quantize_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            if device.type == "cuda":
                kwargs["device_map"] = {"": device.index or 0}
        tokenizer = load_tokenizer(cfg.name, source, cfg.trust_remote_code)
        try:
            if empty:
                config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(
                        config, dtype=dtype, trust_remote_code=cfg.trust_remote_code
                    )
            else:
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, SafetensorError) as e:
            damaged = damaged_weights(source)
            if damaged:
                raise ModelError(
                    f"could not load model {cfg.name!r}: {damaged}. Replace the file with a "
                    "complete copy of it"
                ) from None
            raise ModelError(f"could not load model {cfg.name!r} from {source}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # bitsandbytes placed a 4-bit base itself (device_map); the tiny model is never
    # quantized, so it moves like any other.
    placed = quantize_4bit and cfg.name != TINY_ALIAS
    if not (placed or empty):
        model.to(device)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        # Non-reentrant checkpointing: needs no input gradients and allows the second
        # backward of exact clipping (retain_graph).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source))


def load_tokenizer(name: str, source: Path | str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id; one line naming the cause when it cannot
    be read. A folder holding only a sentencepiece `tokenizer.model` (LLaMA-1/2 era) is
    converted by transformers, which needs sentencepiece and protobuf (dependencies)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, RuntimeError, TypeError) as e:
        # transformers reports an unreadable tokenizer.model as "tiktoken is required"
        # (its last guess at the file's format): name the file instead.
        spm = Path(str(source)) / "tokenizer.model"
        if spm.is_file() and not (Path(str(source)) / "tokenizer.json").is_file():
            if not all(_importable(m) for m in ("sentencepiece", "google.protobuf")):
                raise ModelError(
                    f"the tokenizer of model {name!r} is a sentencepiece {spm.name}, which needs "
                    "sentencepiece and protobuf: pip install sentencepiece protobuf"
                ) from None
            raise ModelError(
                f"could not load the tokenizer of model {name!r}: {spm} is not a sentencepiece "
                "model that sentencepiece can read (damaged or another format); replace it with "
                "the model's original tokenizer files"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load the tokenizer of model {name!r} from {source}: {first}. "
            "Check that the folder holds the model's tokenizer files"
        ) from None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or blocked
        return False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical_numel(p)
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for: a packed 4-bit parameter (two weights a
    byte, stored as uint8 of shape (n/2, 1)) counts its original shape."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()

"""What `lomotune eval --model` accepts, loaded through models.load_model.

A lomotune run folder (its final `model/` is used), any Hugging Face model folder, a
hub id, a built-in alias, or a PEFT LoRA adapter folder (a qlora-sgd run's model): the
base named in the adapter's config is loaded and the adapter applied. QLoRA adapters are
applied over the base in the chosen precision, not over a 4-bit copy of it (as
`lomotune export --merge` does), so that eval needs no bitsandbytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lomotune.builtin_models import ModelError
from lomotune.export import adapter_base_model, run_recipe
from lomotune.models import LoadedModel, load_model
from lomotune.recipe import ModelConfig

EVAL_PRECISIONS = ("auto", "fp32", "bf16")  # fp16 needs care a forward pass need not take


def model_folder(name: str) -> str:
    """A run folder -> its final model folder; anything else unchanged."""
    path = Path(name).expanduser()
    if path.is_dir() and not _is_model(path):
        if _is_model(path / "model"):
            return str(path / "model")
        raise ModelError(
            f"{path} holds neither a model (config.json), an adapter (adapter_config.json), "
            "nor a finished run's model/ folder; point --model at one of those"
        )
    return name


def load_for_eval(name: str, precision: str, device: torch.device) -> LoadedModel:
    """Load `name` (see the module docstring) in `precision` (resolved: fp32 or bf16)."""
    name = model_folder(name)
    path = Path(name).expanduser()
    adapter = path.is_dir() and (path / "adapter_config.json").exists()
    # The base: named in the adapter's config, else in its run's recipe (model.name).
    base = (
        (adapter_base_model(path) or run_recipe(path).get("model", {}).get("name"))
        if adapter
        else name
    )
    if base is None:
        raise ModelError(f"{path}/adapter_config.json names no base model to apply it to")
    cfg = ModelConfig(name=base, precision=precision, activation_checkpointing=False)
    loaded = load_model(cfg, device)
    if adapter:
        from peft import PeftModel

        loaded.model = PeftModel.from_pretrained(loaded.model, str(path)).to(device)
        loaded.source = f"{base} + adapter {path}"
    loaded.model.eval()
    return loaded


def _is_model(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()

"""Merge trained LoRA adapters into their base model: one plain transformers folder that
loads and runs with no peft and no bitsandbytes.

The adapters of a qlora-sgd run were trained over a 4-bit base, but they are merged
into the *original* base weights, loaded in bf16/fp32/fp16: merging into the NF4 base
would dequantize it, add the update and quantize it again, which rounds away most of
what the adapters learned (and leaves a 4-bit model besides). The merged model computes
W + (alpha/r) B A with the original W, i.e. what the adapters compute over that base.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lomotune.errors import LomotuneError
from lomotune.models import DTYPES, load_model
from lomotune.recipe import ModelConfig


class ExportError(LomotuneError):
    """An export that cannot be done; the message says what to change."""


class OutputExistsError(ExportError):
    """An output folder that already holds something; the message says how to proceed."""


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty `out_dir` unless `overwrite`; nothing written is lost silently."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} is not empty; choose another folder, or pass overwrite=True "
            "(--overwrite) to replace what is there"
        )
    return out


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """The base model named in a PEFT adapter folder's adapter_config.json, if any."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.exists():
        raise ExportError(
            f"{adapter_dir} has no adapter_config.json: it is not a LoRA adapter. Point "
            "lomotune export at a qlora-sgd run's folder, its model/ folder, or a PEFT adapter folder"
        )
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or None


def adapter_folder(path: str | Path) -> Path:
    """What `lomotune export` is pointed at -> the adapter folder: a run folder (its
    final `model/`) or an adapter folder itself. A run that trained every weight (lomo,
    adalomo, mezo, ...) has nothing to merge: its model/ is already the full model."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path}: no such folder; point lomotune export at a qlora-sgd run")
    if not (path / "adapter_config.json").exists() and (path / "model").is_dir():
        path = path / "model"  # a run folder
    if not (path / "adapter_config.json").exists() and (path / "config.json").exists():
        method = run_recipe(path).get("optimizer", {}).get("name")
        trained = f"a {method} run trained every weight: " if method else ""
        raise ExportError(
            f"{path} is already a full model ({trained}nothing to merge); it loads as it is "
            f"with transformers or `lomotune eval --model {path}`"
        )
    adapter_base_model(path)  # says what is wrong with a folder that is no adapter
    return path


def run_recipe(adapter_dir: Path) -> dict:
    """The resolved recipe of the run that wrote `adapter_dir` (its model/ holds a copy,
    the run folder the original); {} when there is none."""
    import yaml

    for candidate in (adapter_dir / "lomotune_recipe.yaml", adapter_dir.parent / "recipe.yaml"):
        if candidate.is_file():
            try:
                recipe = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            return recipe if isinstance(recipe, dict) else {}
    return {}


def merge_adapter(
    base_model: str | Path | None,
    adapter_dir: str | Path,
    out_dir: str | Path,
    precision: str = "bf16",
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Load the base (`base_model`: a folder, built-in alias or hub id; None = the one
    named in the adapter's config, else in its run's recipe) in `precision`, apply the
    adapters (`adapter_dir`: a qlora-sgd run's folder or an adapter folder), merge them
    into its weights and save model + tokenizer as safetensors in `out_dir`.

    Written to a temporary folder beside `out_dir` and renamed when complete."""
    from peft import PeftModel

    if precision not in DTYPES:
        raise ExportError(
            f"precision {precision!r}: merge into the original weights in one of {', '.join(DTYPES)}; "
            "merging into a 4-bit base would round the adapters' update away"
        )
    adapter_dir = adapter_folder(adapter_dir)
    out = check_output_dir(out_dir, overwrite)
    if out.resolve() in (adapter_dir.resolve(), adapter_dir.parent.resolve()):
        raise OutputExistsError(
            f"{out} is the run's or the adapter's own folder; write the merged model to another folder"
        )
    if base_model is None:
        # The adapter's config names the base's folder or hub id; a run's recipe names
        # the model.name it was trained on (also an alias, or a base the config lost).
        named = adapter_base_model(adapter_dir)
        trained_on = run_recipe(adapter_dir).get("model", {}).get("name")
        base_model = named or trained_on
        if base_model is None:
            raise ExportError(
                f"{adapter_dir}/adapter_config.json names no base model and no run recipe is "
                "beside it; pass the model the adapters were trained on with --base"
            )

    cfg = ModelConfig(
        name=str(base_model),
        precision=precision,
        activation_checkpointing=False,
        trust_remote_code=trust_remote_code,
    )
    loaded = load_model(cfg, torch.device("cpu"), quantize_4bit=False)
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True  # load_model turns the KV cache off for training

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-merge-") as tmp:
        staged = Path(tmp) / "model"
        merged.save_pretrained(
            str(staged)
        )  # safetensors (the default, and the only format in transformers 5)
        loaded.tokenizer.save_pretrained(str(staged))
        if out.exists():
            shutil.rmtree(out)  # empty, or overwrite=True
        os.replace(staged, out)
    return out

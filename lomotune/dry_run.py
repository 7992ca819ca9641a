"""`lomotune train --dry-run`: what a run would do, without training or writing its output
folder: the resolved recipe, the data's counts, the steps and the memory estimate. The
model's config and tokenizer are read, never its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lomotune.builtin_models import TINY_ALIAS, ModelError, resolve_model
from lomotune.data import BatchLoader, prepare_data
from lomotune.data.chat_template import apply_chat_template
from lomotune.estimate import EstimateError
from lomotune.estimate import for_run as estimate_for_run
from lomotune.models import load_tokenizer
from lomotune.monitor import format_bytes
from lomotune.precision import resolve_precision
from lomotune.recipe import ModelConfig, Recipe, recipe_to_yaml


def dry_run(recipe: Recipe, world_size: int = 1) -> str:
    """The report of a dry run (resolves the recipe's `auto` values in place, as a run
    does). Raises what a run's setup raises for bad input (ModelError, DataError, ...)."""
    from lomotune.advice import threads_note
    from lomotune.train import count_total_steps, pick_device  # imports much

    device = pick_device(recipe)
    precision = resolve_precision(recipe.model.precision, device)
    recipe.model.precision = precision.precision
    tokenizer, config = tokenizer_and_config(recipe.model)
    apply_chat_template(tokenizer, recipe.data)
    data = prepare_data(recipe.data, tokenizer, seed=recipe.training.seed)
    t, lines = recipe.training, [precision.reason]
    if device.type == "cpu":
        if recipe.hardware.threads:  # as the run would set it
            torch.set_num_threads(recipe.hardware.threads)
        lines.append(threads_note(recipe))

    def loader(batch: int) -> BatchLoader:
        return BatchLoader(
            data.train,
            batch_size=batch,
            seed=t.seed,
            pad_id=tokenizer.pad_token_id,
            packing=recipe.data.packing,
            max_length=recipe.data.max_length,
        )

    rows = loader(1).batches_per_epoch
    s = data.stats
    counted = f"data: {len(data.train)} train / {len(data.eval)} eval examples from {s.source}"
    if recipe.data.packing:
        counted += f" ({rows} packed rows of {recipe.data.max_length} tokens)"
    lines.append(counted)
    for n, what in [
        (s.dropped, "dropped: their answer lay beyond data.max_length"),
        (s.truncated, f"longer than data.max_length={recipe.data.max_length}, truncated"),
        (s.bad_rows_skipped, "bad rows skipped (data.on_bad_rows: skip)"),
    ]:
        if n:
            lines.append(f"  {n} examples {what}")
    if t.batch_size == "auto":
        budget = estimate_for_run.device_budget(device)
        try:
            batch, why = estimate_for_run.choose_batch_size(
                recipe, config, device.type, world_size, budget, rows
            )
        except EstimateError as e:
            batch, why = 1, f"training.batch_size auto: no choice ({e}); shown for batch 1"
        t.batch_size = batch
        lines.append(why)
    steps = count_total_steps(recipe, loader(t.batch_size))
    epochs = steps * t.batch_size * recipe.optimizer.gradient_accumulation / max(rows, 1)
    lines.append(
        f"steps: {steps} of batch {t.batch_size} (about {epochs:.2g} passes over the data) "
        f"on {device.type}"
    )
    try:
        e = estimate_for_run.predict(recipe, config, device.type, world_size, t.batch_size)
        needed = estimate_for_run.needed_bytes(e, device.type)
        lines.append(f"memory estimate: {format_bytes(needed)} (peak at {e.phase})")
    except EstimateError as err:
        lines.append(f"no memory estimate: {err}")
    out = Path(t.output_dir)
    if out.is_dir() and any(out.iterdir()):  # what `lomotune train` would say at start
        lines.append(
            f"{out} already holds files: a run needs --resume, --overwrite or another "
            "training.output_dir"
        )
    lines.append(f"dry run: nothing trained, nothing written to {out}")
    return recipe_to_yaml(recipe) + "\n" + "\n".join(lines)


def tokenizer_and_config(cfg: ModelConfig) -> tuple[Any, Any]:
    """The model's tokenizer and transformers config: what the data and the estimate
    need, without reading a weight."""
    from transformers import AutoConfig

    if cfg.name == TINY_ALIAS:
        from lomotune.testing import tiny_llama, tiny_tokenizer

        return tiny_tokenizer(), tiny_llama().config  # built in memory: a few KiB
    source = resolve_model(cfg.name)
    tokenizer = load_tokenizer(cfg.name, source, cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"could not read the config of model {cfg.name!r} from {source}: {e}"
        ) from None
    if tokenizer.pad_token_id is None:  # as load_model does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, config

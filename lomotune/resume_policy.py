"""What a resume may change: the recipe keys that must match the checkpoint's (others
need --force), the data that must be the checkpoint's, the changes a resume notes from
the step it continues at, and their history in the run's recipe.yaml.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lomotune.checkpoint import read_training_state
from lomotune.data import BatchLoader, PreparedData
from lomotune.optim.schedule import lr_at
from lomotune.recipe import OptimizerConfig, Recipe

# What must match for a checkpoint to continue under a recipe (the rest may change:
# max_steps, eval_every, save_every, output appearance).
RESUME_MUST_MATCH = (
    "model",
    "data",
    "optimizer.name",
    "optimizer.lora",
    "training.seed",
    "training.batch_size",
)


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """The keys that differ, one line each (the leaves of a section, not the section)."""
    out = []
    for key in RESUME_MUST_MATCH:
        a, b = dig(saved, key), dig(current, key)
        if key == "training.batch_size" and b == "auto":
            continue  # the run takes the checkpoint's batch size
        old, new = flat(a, key), flat(b, key)
        if isinstance(a, dict) != isinstance(b, dict):  # a section on one side only
            old, new = {key: a}, {key: b}
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                out.append(
                    f"{name}: checkpoint has {old.get(name)!r}, recipe has {new.get(name)!r}"
                )
    return out


def data_change(checkpoint: Path, data: PreparedData, data_fingerprint: str) -> str | None:
    """What differs where the training data is not the data the checkpoint was trained on
    (a data file edited under the run: the recipe's data section alone does not show it);
    None where it is the same. Resuming onto other data needs --force."""
    saved = read_training_state(checkpoint)[0].data_fingerprint
    if saved == data_fingerprint:
        return None
    return (
        f"the training data ({data.stats.source}: {len(data.train)} examples now) is not the "
        f"data the checkpoint {checkpoint} was trained on (the tokenized set's sha256 differs)"
    )


# Keys a resume may change, each with a note of what changes from which step: the
# schedule and the update rule's settings. Those of RESUME_MUST_MATCH need --force; the
# rest (eval_every, save_every, log_every, hardware, ...) change nothing that is trained.
RESUME_NOTED = ("optimizer", "training.max_steps", "training.epochs")


def resume_changes(
    saved: dict, recipe: Recipe, step: int, loader: BatchLoader, total_steps: int
) -> list[str]:
    """One line per value that differs from the checkpoint's recipe and changes training
    from step `step` + 1 on, and one for the lr that step gets where the schedule moved."""
    current = recipe.model_dump(mode="json")
    must_match = set(RESUME_MUST_MATCH)
    notes = []
    for key in RESUME_NOTED:
        old, new = flat(dig(saved, key), key), flat(dig(current, key), key)
        for name in sorted(set(old) | set(new)):
            if any(name == m or name.startswith(m + ".") for m in must_match):
                continue  # refused without --force, named by recipe_differences
            if old.get(name) != new.get(name):
                notes.append(
                    f"{name}: {old.get(name)!r} -> {new.get(name)!r} from step {step + 1} "
                    f"(steps 1-{step} ran with {old.get(name)!r})"
                )
    if notes:
        try:
            before = OptimizerConfig.model_validate(saved["optimizer"])
        except ValueError:  # written by a version with other keys: the lines above say it
            return notes
        old_total = saved["training"].get("max_steps") or max(
            1,
            math.ceil(
                saved["training"]["epochs"]
                * loader.batches_per_epoch
                / before.gradient_accumulation
            ),
        )
        was, now = lr_at(step, old_total, before), lr_at(step, total_steps, recipe.optimizer)
        if was != now:
            notes.append(
                f"the lr of step {step + 1} is {now:.3g} ({was:.3g} under the checkpoint's "
                f"recipe): {recipe.optimizer.schedule} schedule over {total_steps} steps, "
                f"was {old_total}"
            )
    return notes


def dig(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = (tree or {}).get(part)
    return tree


def flat(value: Any, prefix: str) -> dict[str, Any]:
    """{"optimizer.clip.mode": "none", ...}: every leaf of a section under its key path."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flat(v, f"{prefix}.{k}"))
    return out


RESUMED_AT = re.compile(r"^# (resumed at step (\d+): .*)$")


def resume_history(output_dir: Path, step: int, changes: list[str]) -> list[str]:
    """The "resumed at step N" lines for the header of the run's recipe.yaml: those it
    holds of steps up to `step` (a resume from an older checkpoint drops the steps after
    it), then one per change of this resume (from resume_changes)."""
    try:
        lines = (output_dir / "recipe.yaml").read_text().splitlines()
    except OSError:
        lines = []
    found = [RESUMED_AT.match(line) for line in lines]
    history = [m.group(1) for m in found if m and int(m.group(2)) <= step]
    return history + [f"resumed at step {step}: {change}" for change in changes]

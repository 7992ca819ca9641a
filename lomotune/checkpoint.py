"""Atomic checkpoints and exact resume.

A checkpoint is a folder you can read with your eyes:

    checkpoints/step-000100/
        model/                  weights (safetensors, Hugging Face layout) + config
        optimizer.safetensors   the engine's state tensors (AdaLomo factors, Adam moments)
        rng.safetensors         torch RNG states
        state.json              step, data position, engine scalars, python/numpy RNG,
                                the resolved recipe, and the size and sha256 of every
                                other file of the checkpoint

It is written to `checkpoints/.partial-step-000100/`, every file fsynced, then renamed:
a crash in the middle of a save leaves a `.partial-*` folder that is ignored (and removed
by the next save), and the previous checkpoint intact. Only folders named `step-*` are
complete.

A disk can still lie, or a copy be cut short: before a resume every file is checked
against the size and sha256 recorded in state.json (`verify_checkpoint`), and a damaged
newest checkpoint gives way to the newest intact one (`newest_intact_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 2  # 2: state.json records every file's size and sha256


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message says what to do."""


@dataclass
class TrainingState:
    """Where the loop is: everything but weights and optimizer tensors."""

    step: int  # optimizer steps completed
    epoch: int  # data position: the next batch is (epoch, index)
    index: int
    tokens_seen: int
    bad_steps_in_a_row: int
    skipped_steps: int
    engine_meta: dict[str, Any]
    recipe: dict[str, Any]


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    output_dir: Path,
    state: TrainingState,
    save_model,  # callable(folder): writes the weights in Hugging Face layout
    engine_tensors: dict[str, torch.Tensor],
    keep: int | None,  # complete checkpoints to keep; None = remove none
) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    final = root / name
    partial = root / f".partial-{name}"
    for stale in root.glob(".partial-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        partial.mkdir()
        save_model(partial / "model")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in engine_tensors.items()},
            partial / "optimizer.safetensors",
        )
        save_file(torch_rng_states(), partial / "rng.safetensors")
        payload = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "epoch": state.epoch,
            "index": state.index,
            "tokens_seen": state.tokens_seen,
            "bad_steps_in_a_row": state.bad_steps_in_a_row,
            "skipped_steps": state.skipped_steps,
            "engine": state.engine_meta,
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            "recipe": state.recipe,
            "files": file_digests(partial),
        }
        (partial / "state.json").write_text(json.dumps(payload, indent=1))
        _fsync_tree(partial)
        if final.exists():  # a checkpoint of this very step, e.g. re-saved after resume
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
    except BaseException as e:  # disk full, or a second Ctrl-C: no half-written folder stays
        shutil.rmtree(partial, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        previous = latest_checkpoint(output_dir)
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"could not write checkpoint {final}: {e.strerror or e}; {kept}. Free disk space or change training.output_dir"
        ) from None
    for old in list_checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> tuple[TrainingState, dict[str, torch.Tensor], dict]:
    """(training state, engine tensors, raw state.json) of a complete checkpoint."""
    try:
        payload = json.loads((folder / "state.json").read_text())
        tensors = load_file(folder / "optimizer.safetensors")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {folder} cannot be read ({e}); remove it to resume from the one before"
        ) from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder} has format {payload.get('format_version')}, this lomotune reads {FORMAT_VERSION}"
        )
    state = TrainingState(
        step=payload["step"],
        epoch=payload["epoch"],
        index=payload["index"],
        tokens_seen=payload["tokens_seen"],
        bad_steps_in_a_row=payload["bad_steps_in_a_row"],
        skipped_steps=payload["skipped_steps"],
        engine_meta=payload["engine"],
        recipe=payload["recipe"],
    )
    return state, tensors, payload


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `folder` but state.json (which
    carries this table; a damaged state.json does not parse)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path != folder / "state.json":
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[path.relative_to(folder).as_posix()] = {
                "size": path.stat().st_size,
                "sha256": digest,
            }
    return out


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with a checkpoint's files (empty when every file is as written)."""
    try:
        payload = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        return [f"state.json cannot be read ({e})"]
    if payload.get("format_version") != FORMAT_VERSION or "files" not in payload:
        return [
            f"format {payload.get('format_version')}, this lomotune reads {FORMAT_VERSION} "
            "(written by another version)"
        ]
    problems = []
    for name, want in payload["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were written")
            continue
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != want["sha256"]:
                problems.append(f"{name} does not match the sha256 recorded when it was written")
    return problems


def newest_intact_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint whose files are all as written, one line per damaged
    newer checkpoint skipped on the way). Older checkpoints are not read."""
    damaged = []
    for folder in reversed(list_checkpoints(output_dir)):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder, damaged
        damaged.append(f"{folder}: " + "; ".join(problems))
    return None, damaged


def restore_rng(folder: Path, payload: dict) -> None:
    states = load_file(folder / "rng.safetensors")
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(states) if k.startswith("cuda/")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = payload["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(payload["numpy_rng"]))  # type: ignore[arg-type]


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load every safetensors file of a Hugging Face folder into `model`, exactly."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weights (*.safetensors) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights are saved once; everything else must be there.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise CheckpointError(
            f"weights in {folder} do not match the model: missing {really_missing[:5]}, unexpected {unexpected[:5]}"
        )


def torch_rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda/{i}"] = s
    return states


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

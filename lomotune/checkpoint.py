"""Atomic checkpoints and exact resume.

A checkpoint is a folder you can read with your eyes:

    checkpoints/step-000100/
        model/                  weights (safetensors, Hugging Face layout) + config
        optimizer.safetensors   the engine's state tensors (AdaLomo factors, Adam moments)
        rng.safetensors         torch RNG states
        state.json              step, data position, engine scalars, python/numpy RNG,
                                the resolved recipe, and the size and sha256 of every
                                other file of the checkpoint; its own content's sha256
                                in "state_sha256"

A run whose model is sharded over several processes (FSDP2: lomo, adalomo, sgd, adamw)
writes a sharded checkpoint instead, with `torch.distributed.checkpoint` (DCP): no rank
gathers the model or the optimizer state, each writes its own part.

    checkpoints/step-000100/
        shards/                 DCP: .metadata and one __<rank>_0.distcp per process:
                                the model's weights and the engine's state tensors
        rng.safetensors         torch RNG state of every process ("rank<r>/torch")
        state.json              as above, with "sharded": true, the world size and the
                                python/numpy RNG of every process

DCP reshards on load: a sharded checkpoint continues on any number of processes (each
reads the rows it holds; one process reads the whole), and a one-process checkpoint on
several. With several machines the output folder must be one shared file system: rank 0
hashes the files every rank wrote. The final model is always one Hugging Face folder.

It is written to `checkpoints/.partial-step-000100/`, every file fsynced, then renamed:
a crash in the middle of a save leaves a `.partial-*` folder that is ignored (and removed
by the next save), and the previous checkpoint intact. Only folders named `step-*` are
complete.

A disk can still lie, or a copy be cut short: before a resume every file is checked
against the size and sha256 recorded in state.json (`verify_checkpoint`), and a damaged
newest checkpoint gives way to the newest intact one (`newest_intact_checkpoint`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lomotune.distributed.group import ALONE, World, gather_objects, share_from_main
from lomotune.distributed.rows import is_sharded
from lomotune.errors import EXIT_FAILED, LomotuneError

# 2: state.json records every file's size and sha256; 3: and the sha256 of its own content
FORMAT_VERSION = 3
SHARDS = "shards"  # the DCP folder of a sharded checkpoint


# The exit code of a run stopped because a file could not be written (a full disk, a
# folder gone or read-only): everything saved before is intact, the message says so.
EXIT_WRITE_FAILED = 5


class CheckpointError(LomotuneError):
    """A checkpoint that cannot be written or read; the message says what to do."""

    exit_code = EXIT_FAILED


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None: the error itself, or the one that
    safetensors wraps into its SafetensorError ("Error while serializing: I/O error: No
    space left on device (os error 28)"), which is no OSError."""
    if isinstance(error, OSError):
        return error
    if type(error).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
    return None


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
    # sha256 of the tokenized training set (data.pipeline.fingerprint): a resume onto
    # other data is refused unless --force
    data_fingerprint: str | None = None


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
    *,
    model: torch.nn.Module,
    engine,  # FusedEngine | MezoEngine | OptimizerEngine: state_dict(gather=...)
    write_model,  # callable(folder): the weights in Hugging Face layout (not sharded)
    keep: int | None,  # complete checkpoints to keep; None = remove none
    world: World = ALONE,
) -> Path:
    """Write the checkpoint of `state.step` atomically and return its folder. With several
    processes every one calls this (a collective); rank 0 writes all but the shards, and a
    failure (CheckpointError) is raised on every rank."""
    sharded = is_sharded(model)
    tensors, state.engine_meta = engine.state_dict(gather=not sharded)
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:06d}"
    partial = root / f".partial-{final.name}"
    share_from_main(world, lambda: _start(output_dir, final, partial))
    if sharded:
        from torch.distributed.checkpoint import FileSystemWriter, save
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        try:  # each rank its own rows; DCP fsyncs each file and writes .metadata last
            save(
                {"model": get_model_state_dict(model), "optimizer": tensors},
                storage_writer=FileSystemWriter(partial / SHARDS),
            )
        except CheckpointException as e:  # raised on every rank when one failed
            cause = _first_os_error(e)
            share_from_main(world, lambda: _abandon(output_dir, final, partial, cause))
        rngs = gather_objects(world, _rng_of_this_process())
        write_files = None
    else:
        rngs = [_rng_of_this_process()]

        def write_files() -> None:
            write_model(partial / "model")
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                partial / "optimizer.safetensors",
            )

    return share_from_main(
        world, lambda: _complete(output_dir, state, final, partial, write_files, rngs, keep)
    )


def _start(output_dir: Path, final: Path, partial: Path) -> None:
    """An empty `.partial-*` folder to write into; those left by a killed save removed."""
    root = partial.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    except OSError as e:
        _abandon(output_dir, final, partial, e)


def _complete(
    output_dir: Path,
    state: TrainingState,
    final: Path,
    partial: Path,
    write_files,  # callable() writing the weights and engine tensors; None: shards written
    rngs: list[dict[str, Any]],  # `_rng_of_this_process` of every rank, in rank order
    keep: int | None,
) -> Path:
    """Rank 0: the small files, the digests of every file, fsync, rename."""
    sharded = write_files is None
    try:
        if write_files is not None:
            write_files()
        if sharded:
            rng_tensors = {
                f"rank{r}/{k}": v for r, rng in enumerate(rngs) for k, v in rng["torch"].items()
            }
        else:
            rng_tensors = rngs[0]["torch"]
        save_file(rng_tensors, partial / "rng.safetensors")
        payload = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "epoch": state.epoch,
            "index": state.index,
            "tokens_seen": state.tokens_seen,
            "bad_steps_in_a_row": state.bad_steps_in_a_row,
            "skipped_steps": state.skipped_steps,
            "engine": state.engine_meta,
            "data_fingerprint": state.data_fingerprint,
        }
        if sharded:
            payload["sharded"] = True
            payload["world_size"] = len(rngs)
            payload["rng_of_ranks"] = [
                {k: v for k, v in rng.items() if k != "torch"} for rng in rngs
            ]
        else:
            payload["python_rng"], payload["numpy_rng"] = rngs[0]["python"], rngs[0]["numpy"]
        if sharded and (missing := shard_files_not_here(partial / SHARDS)):
            # Several machines, each writing into its own disk: what this rank cannot see,
            # it cannot hash, and a resume anywhere would lack it.
            raise OSError(
                errno.ENOENT,
                f"the shard files {', '.join(missing)} written by other processes are not "
                "visible from rank 0: with several machines training.output_dir must be on "
                "a file system all of them share",
            )
        payload["recipe"] = state.recipe
        payload["files"] = file_digests(partial)
        payload["state_sha256"] = state_digest(payload)
        (partial / "state.json").write_text(json.dumps(payload, indent=1))
        _fsync_tree(partial)
        if final.exists():  # a checkpoint of this very step, e.g. re-saved after resume
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(final.parent)
    except BaseException as e:  # disk full, or a second Ctrl-C: no half-written folder stays
        shutil.rmtree(partial, ignore_errors=True)
        cause = os_error_of(e)
        if cause is None:
            raise
        _abandon(output_dir, final, partial, cause)
    for old in list_checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def shard_files_not_here(shards: Path) -> list[str]:
    """The files a DCP checkpoint's .metadata names that do not exist under `shards`."""
    from torch.distributed.checkpoint import FileSystemReader

    named = {
        info.relative_path
        for info in FileSystemReader(shards).read_metadata().storage_data.values()
    }
    return sorted(name for name in named if not (shards / name).is_file())


def _abandon(output_dir: Path, final: Path, partial: Path, error: OSError | Exception) -> None:
    """Remove what a failed save wrote and raise what the user can do about it."""
    shutil.rmtree(partial, ignore_errors=True)
    previous = latest_checkpoint(output_dir)
    kept = (
        f"the previous checkpoint {previous} is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    reason = getattr(error, "strerror", None) or error
    raise CheckpointError(
        f"could not write checkpoint {final}: {reason}; {kept}. Free disk space or change training.output_dir",
        EXIT_WRITE_FAILED,
    ) from None


def _first_os_error(error: Exception) -> Exception:
    """The first OSError among the ranks' failures of a DCP save (else the error itself)."""
    for failure in getattr(error, "failures", {}).values():
        cause = os_error_of(getattr(failure, "exception", failure))
        if cause is not None:
            return cause
    return error


def state_digest(payload: dict) -> str:
    """The sha256 of state.json's content but its own "state_sha256" (canonical JSON: the
    same whatever the indentation or key order). One flipped bit in a number (the data
    position, the step) still parses: this is what catches it."""
    content = {k: v for k, v in payload.items() if k != "state_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_state_json(folder: Path) -> dict:
    """state.json of a checkpoint, checked against its own sha256; ValueError (one line)
    for a file that cannot be read, of another format, or not as written."""
    try:
        payload = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"state.json cannot be read ({e})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise ValueError(
            f"format {version}, this lomotune reads {FORMAT_VERSION} (written by another version)"
        )
    if payload.get("state_sha256") != state_digest(payload):
        raise ValueError("state.json does not match the sha256 recorded when it was written")
    return payload


def read_training_state(folder: Path) -> tuple[TrainingState, dict]:
    """(training state, raw state.json) of a complete checkpoint, without its tensors."""
    try:
        payload = read_state_json(folder)
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint {folder} cannot be used: {e}; remove it to resume from the one before"
        ) from None
    state = TrainingState(
        step=payload["step"],
        epoch=payload["epoch"],
        index=payload["index"],
        tokens_seen=payload["tokens_seen"],
        bad_steps_in_a_row=payload["bad_steps_in_a_row"],
        skipped_steps=payload["skipped_steps"],
        engine_meta=payload["engine"],
        recipe=payload["recipe"],
        data_fingerprint=payload.get("data_fingerprint"),
    )
    return state, payload


def restore_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    engine,  # as built for this run: sharded or not, on this run's processes
    world: World = ALONE,
    engine_state: bool = True,  # False: the checkpoint's optimizer state is not this method's
) -> TrainingState:
    """Load a complete checkpoint into `model` and `engine` (after the model is sharded
    and the engine built) and restore the RNG; returns where the loop was. Every process
    calls it. Either format goes into either kind of run: DCP reshards a sharded
    checkpoint for this run's processes; a one-process checkpoint's whole weights are read
    by rank 0 and sent as shards."""
    state, payload = read_training_state(folder)
    try:
        if payload.get("sharded"):
            tensors = _read_shards(folder / SHARDS, model, engine, engine_state)
        else:
            _read_whole_weights(folder / "model", model, world)
            tensors = load_file(folder / "optimizer.safetensors") if engine_state else {}
        restore_rng(folder, payload, world.rank)
    except (OSError, ValueError, RuntimeError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {folder} cannot be read ({str(e).splitlines()[0][:300]}); remove it to "
            "resume from the one before"
        ) from None
    if engine_state:
        engine.load_state_dict(tensors, state.engine_meta)
    return state


def _read_shards(
    shards: Path, model: torch.nn.Module, engine, engine_state: bool
) -> dict[str, torch.Tensor]:
    """The model's weights from a sharded checkpoint, each process reading the rows it
    holds (all of them when alone), and the engine's state tensors, read the same way
    (returned, for the engine to take)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    reader = FileSystemReader(shards)
    wanted = {"model": get_model_state_dict(model)}
    if engine_state:
        saved = {  # key -> (whole shape, dtype) of the engine's tensors in the checkpoint
            key.removeprefix("optimizer."): (meta.size, meta.properties.dtype)
            for key, meta in reader.read_metadata().state_dict_metadata.items()
            if key.startswith("optimizer.") and isinstance(meta, TensorStorageMetadata)
        }
        wanted["optimizer"] = engine.state_template(saved)
    # Into the tensors of `wanted`, in place. A single process reads without a process
    # group, which is what DCP's warning about a missing group would ask.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load(wanted, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, wanted["model"])
    return wanted.get("optimizer", {})


def _read_whole_weights(folder: Path, model: torch.nn.Module, world: World) -> None:
    """The weights of a Hugging Face folder into `model`: directly when the model is
    whole here; read by rank 0 and sent as shards when it is sharded."""
    if not is_sharded(model):
        restore_weights(model, folder)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = _read_safetensors(folder) if world.is_main else {}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for key, source in tied.items() if isinstance(tied, dict) else []:
        if key not in weights and source in weights:  # saved once: both names, one tensor
            weights[key] = weights[source]
    set_model_state_dict(
        model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )


def restore_weights(model: torch.nn.Module, folder: Path) -> None:
    """A Hugging Face folder's weights into a whole model: every weight, or, for a PEFT
    model, its adapters (the base comes from the recipe)."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        load_weights(model, folder)


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
        payload = read_state_json(folder)
    except ValueError as e:
        return [str(e)]
    if not isinstance(payload.get("files"), dict):
        return ["state.json lists no files"]
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


def restore_rng(folder: Path, payload: dict, rank: int = 0) -> None:
    """This process's RNG states as the checkpoint saved them. A sharded checkpoint holds
    one per process; on more processes than wrote it, rank r takes those of rank r mod
    (processes that wrote it) (no draw then repeats an uninterrupted run's anyway)."""
    states = load_file(folder / "rng.safetensors")
    if payload.get("sharded"):
        source = rank % payload["world_size"]
        prefix = f"rank{source}/"
        states = {k.removeprefix(prefix): v for k, v in states.items() if k.startswith(prefix)}
        python_rng = payload["rng_of_ranks"][source]["python"]
        numpy_rng = payload["rng_of_ranks"][source]["numpy"]
    else:
        python_rng, numpy_rng = payload["python_rng"], payload["numpy_rng"]
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        # Each visible GPU takes the state saved for its index (numbered, not sorted as
        # strings: cuda/10 after cuda/2). A GPU saved but not visible now has no generator
        # to restore; one visible now but not then keeps its seeded state.
        visible = torch.cuda.device_count()
        for key, state in states.items():
            if key.startswith("cuda/") and int(key.removeprefix("cuda/")) < visible:
                torch.cuda.set_rng_state(state, int(key.removeprefix("cuda/")))
    version, internal, gauss = python_rng
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(numpy_rng))  # type: ignore[arg-type]


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weights (*.safetensors) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load every safetensors file of a Hugging Face folder into `model`, exactly."""
    state = _read_safetensors(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights are saved once; everything else must be there.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise CheckpointError(
            f"weights in {folder} do not match the model: missing {really_missing[:5]}, unexpected {unexpected[:5]}"
        )


def _rng_of_this_process() -> dict[str, Any]:
    """{"torch": {name: state tensor}, "python": [...], "numpy": [...]}."""
    return {"torch": torch_rng_states(), "python": _python_rng_state(), "numpy": _numpy_rng_state()}


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

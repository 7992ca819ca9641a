"""The training run, top to bottom: setup -> fit -> save.

    recipe -> output folder checks -> model + tokenizer -> data -> engine -> loop
           -> checkpoints (every save_every steps, on SIGINT/SIGTERM, at the end)
           -> final model (Hugging Face folder) + metrics.jsonl + training.png

`train(recipe)` is the whole thing; the CLI only parses arguments and calls it. What a
resume may change is `resume_policy`'s to say, warnings on settings `advice`'s, and
SIGINT/SIGTERM `signals`'s.
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from lomotune import __version__, methods, run_folder
from lomotune.advice import method_warnings, mezo_precision_warning, threads_note
from lomotune.allocator import return_freed_memory
from lomotune.checkpoint import (
    EXIT_WRITE_FAILED,
    CheckpointError,
    TrainingState,
    list_checkpoints,
    newest_intact_checkpoint,
    os_error_of,
    read_training_state,
    restore_checkpoint,
    save_checkpoint,
)
from lomotune.dashboard import METRICS_FILE, Dashboard, MetricsLog, truncate_metrics
from lomotune.data import BatchLoader, PreparedData, prepare_data
from lomotune.data.chat_template import apply_chat_template
from lomotune.data.pipeline import fingerprint
from lomotune.distributed import checks, group, launch, sharding
from lomotune.distributed.group import World, any_rank, share_from_main
from lomotune.errors import EXIT_BAD_INPUT, EXIT_FAILED, LomotuneError
from lomotune.estimate import Estimate, EstimateError
from lomotune.estimate import for_run as estimate_for_run
from lomotune.evaluate.during_training import task_metrics
from lomotune.evaluate.exact_match import ExactMatch, exact_match
from lomotune.loggers import Loggers, open_loggers
from lomotune.loss import causal_lm_loss, loss_note
from lomotune.models import LoadedModel, count_parameters, load_model
from lomotune.monitor import MemoryMeter, Throughput, format_bytes, mfu, peak_flops_for
from lomotune.optim import build_engine
from lomotune.optim.engine import Engine, FusedEngine
from lomotune.optim.mezo import MezoEngine
from lomotune.optim.schedule import lr_at
from lomotune.precision import resolve_precision
from lomotune.recipe import LoraConfig, Recipe, RecipeError, recipe_to_yaml
from lomotune.resume_policy import data_change, recipe_differences, resume_changes, resume_history
from lomotune.signals import GracefulStop

# Exit codes: what a script calling lomotune can tell apart (1 and 2: lomotune.errors).
EXIT_OUT_OF_MEMORY = 3
EXIT_DIVERGED = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class TrainError(LomotuneError):
    """A run that stops for a reason the user can act on; carries its exit code."""

    exit_code = EXIT_FAILED


@dataclass
class Run:
    recipe: Recipe
    output_dir: Path
    device: torch.device
    loaded: LoadedModel
    data: PreparedData
    loader: BatchLoader
    engine: Engine
    total_steps: int
    state: TrainingState
    dashboard: Dashboard  # also among `log`'s backends; notes and warnings go to it alone
    log: Loggers  # every number of the run: dashboard, metrics.jsonl, training.loggers
    meter: MemoryMeter
    world: World
    throughput: Throughput = field(default_factory=Throughput)
    resumed_from: Path | None = None
    saved: tuple[int, Path] | None = None  # (step, folder) of the newest checkpoint
    notes: list[str] = field(default_factory=list)  # from setup, shown at the start
    warnings: list[str] = field(default_factory=list)  # likewise, shown as warnings
    results: dict[str, Any] = field(default_factory=dict)
    # The memory estimate of this run's step (None where the formulas do not cover the
    # model: estimate_note says why).
    estimate: Estimate | None = None
    estimate_note: str | None = None
    model_config: Any = None  # the transformers config the estimate reads
    # MFU's fixed parts, found once: (all parameters, the device's peak FLOP/s); None off
    # a GPU of known peak, where no MFU is logged.
    mfu_basis: tuple[int, float] | None = None


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    live: bool | None = None,
    recipe_file: Path | None = None,  # the YAML it was read from: --overwrite keeps it
) -> dict[str, Any]:
    """Run a recipe to the end; returns the summary. Raises TrainError/RecipeError.
    Under a launcher (several processes) every process calls this; rank 0 decides about
    the output folder and writes every file."""
    if launch.needs_launch(recipe):
        raise TrainError(
            "hardware: this recipe asks for several processes; start it with `lomotune train` "
            "(which launches them) or under torchrun",
            EXIT_BAD_INPUT,
        )
    world = group.join(recipe)
    # Rank 0 holds the output folder for the run's life: a second run there is refused.
    lock = run_folder.OutputLock(Path(recipe.training.output_dir))
    try:
        return train_in(
            world,
            recipe,
            lock,
            overwrite=overwrite,
            resume=resume,
            force=force,
            live=live,
            recipe_file=recipe_file,
        )
    finally:
        lock.release()
        group.leave(world)


def train_in(
    world: World,
    recipe: Recipe,
    lock: run_folder.OutputLock,
    *,
    overwrite: bool,
    resume: bool,
    force: bool,
    live: bool | None,
    recipe_file: Path | None = None,
) -> dict[str, Any]:
    output_dir = Path(recipe.training.output_dir)
    device = group.device_of(world, recipe) or pick_device(recipe)
    if device.type == "cpu":
        return_freed_memory()  # else the process keeps every freed size's high-water mark
    # `auto` becomes what this hardware computes in natively; the resolved value is what
    # the saved recipe and a resume compare.
    precision = resolve_precision(recipe.model.precision, device)
    recipe.model.precision = precision.precision

    def decide() -> tuple[Path | None, list[str]]:
        refused = checks.refusal(recipe, world.size)
        if refused:
            raise RecipeError([refused])
        take_output_dir(lock)
        return plan_output_dir(
            output_dir,
            recipe,
            overwrite=overwrite,
            resume=resume or recipe.resume == "auto",
            force=force,
            recipe_file=recipe_file,
        )

    checkpoint, damaged = share_from_main(world, decide)  # taken once, by rank 0
    transformers.logging.disable_progress_bar()  # the dashboard is the progress display
    run = setup(recipe, output_dir, checkpoint, device, live=live, world=world, force=force)
    run.warnings += [f"damaged checkpoint skipped: {d}" for d in damaged]
    run.notes.insert(0, precision.reason)
    if precision.warning:
        run.warnings.insert(0, precision.warning)
    started = time.perf_counter()
    with GracefulStop(quiet=not world.is_main) as stop, run.log, run.meter:
        run.log.log_config(recipe.model_dump(mode="json"))
        if run.resumed_from:
            run.dashboard.note(f"resumed from {run.resumed_from} (step {run.state.step})")
        for message in run.notes:
            run.dashboard.note(message)
        for message in run.warnings:
            run.dashboard.warn(message)
        if recipe.model.trust_remote_code:
            run.dashboard.warn(
                "model.trust_remote_code is on: code from the model folder runs in this process"
            )
        try:
            if recipe.training.generate_eval_examples and run.resumed_from is None:
                run.results["accuracy_before"] = generation_accuracy(run, "before training")
            fit(run, stop)
            if recipe.training.generate_eval_examples:
                run.results["accuracy_after"] = generation_accuracy(run, "after training")
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise out_of_memory(run, e) from None
        final_dir = save_final(run)
        summary = summarize(run, time.perf_counter() - started, final_dir)
        run.log.log_summary(run.state.step, summary)
    if world.is_main:
        plot_quietly(run)
    return summary


# ---------------------------------------------------------------------------------------
# Setup


def take_output_dir(lock: run_folder.OutputLock) -> None:
    """The output folder's lock, or exit 2 naming the run that holds it."""
    folder = lock.folder
    if folder.exists() and not folder.is_dir():
        raise TrainError(
            f"training.output_dir: {folder} is a file, not a folder. Set "
            "training.output_dir to a folder (it is created if missing)",
            EXIT_BAD_INPUT,
        )
    inside = run_folder.enclosing_run_part(folder)
    if inside is not None:
        raise TrainError(
            f"training.output_dir: {folder} lies inside {inside}, which belongs to another run "
            "(its checkpoint rotation or --overwrite would delete this run). Set "
            "training.output_dir to a folder outside it",
            EXIT_BAD_INPUT,
        )
    try:
        lock.acquire()
    except run_folder.FolderInUse as e:
        raise TrainError(
            f"training.output_dir: {folder} is in use by another lomotune run: {e}. Wait for "
            "it to end (or stop it), or set training.output_dir to another folder",
            EXIT_BAD_INPUT,
        ) from None
    except OSError as e:
        raise TrainError(
            f"training.output_dir: cannot create {folder}: {e.strerror or e}. Set it to a folder you can write",
            EXIT_BAD_INPUT,
        ) from None


def plan_output_dir(
    output_dir: Path,
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    force: bool,
    recipe_file: Path | None = None,
) -> tuple[Path | None, list[str]]:
    """Decide what to do with the output folder: (the checkpoint to resume from, one line
    per damaged newer checkpoint passed over). Nothing already written is removed unless
    the user said --overwrite."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainError(
            f"training.output_dir: {output_dir} is a file, not a folder. Set "
            "training.output_dir to a folder (it is created if missing)",
            EXIT_BAD_INPUT,
        )
    has_content = bool(run_folder.contents(output_dir))
    if overwrite and has_content:
        overwrite_run(output_dir, recipe, recipe_file)
        return None, []
    checkpoint, damaged = None, []
    if resume and has_content and list_checkpoints(output_dir):
        checkpoint, damaged = newest_intact_checkpoint(output_dir)
        if checkpoint is None:
            lines = "\n".join(f"  - {d}" for d in damaged)
            raise TrainError(
                f"no intact checkpoint to resume from in {output_dir}; found:\n{lines}\n"
                "Restore the files from a copy, or start again with --overwrite",
                EXIT_BAD_INPUT,
            )
    if resume and checkpoint is not None:
        saved = read_training_state(checkpoint)[0].recipe
        differences = recipe_differences(saved, recipe.model_dump(mode="json"))
        if differences and not force:
            lines = "\n".join(f"  - {d}" for d in differences)
            raise TrainError(
                f"the checkpoint {checkpoint} was made with a different recipe:\n{lines}\n"
                "Resume with the original recipe, or pass --force to continue anyway",
                EXIT_BAD_INPUT,
            )
        return checkpoint, damaged
    if has_content and not run_folder.is_run(output_dir):
        listed = ", ".join(p.name for p in run_folder.contents(output_dir)[:5])
        raise TrainError(
            f"training.output_dir: {output_dir} is not empty and not a lomotune run's folder "
            f"(it holds {listed}). Set training.output_dir to a new or empty folder",
            EXIT_BAD_INPUT,
        )
    if has_content:
        final = (output_dir / "model").exists()
        if resume and not final and not list((output_dir / "checkpoints").glob("step-*")):
            return None, []  # nothing was saved yet: start again (the caller says so)
        what = "a finished run" if final else "an earlier run"
        raise TrainError(
            f"{output_dir} already holds {what}. Pass --overwrite to replace it, --resume to continue "
            "it, or set training.output_dir to another folder",
            EXIT_BAD_INPUT,
        )
    return None, []


def overwrite_run(output_dir: Path, recipe: Recipe, recipe_file: Path | None) -> None:
    """--overwrite: remove what an earlier run wrote into `output_dir`, and only that."""
    if not run_folder.is_run(output_dir):
        listed = ", ".join(p.name for p in run_folder.contents(output_dir)[:5])
        raise TrainError(
            f"--overwrite: {output_dir} is not a lomotune run's folder (it holds {listed}); "
            "nothing was removed. --overwrite only replaces an earlier run: set "
            "training.output_dir to a new or empty folder",
            EXIT_BAD_INPUT,
        )
    source = recipe.data.source
    inside = run_folder.inputs_inside(
        output_dir,
        {
            "the recipe": str(recipe_file) if recipe_file else None,
            "the data": source if ":" not in source.split("/")[0] else None,
            "the SuperGLUE folder": recipe.data.superglue_dir,
            "the model": recipe.model.name,
        },
    )
    if inside:
        raise TrainError(
            f"--overwrite: {output_dir} holds {' and '.join(inside)}, which this run reads; "
            "nothing was removed. Set training.output_dir to a folder of its own",
            EXIT_BAD_INPUT,
        )
    run_folder.remove_run_outputs(output_dir)


def pick_device(recipe: Recipe) -> torch.device:
    hw = recipe.hardware
    available = torch.cuda.device_count()
    if hw.gpus == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    if hw.gpus == 0:
        return torch.device("cpu")
    if checks.missing_gpus(hw):
        raise RecipeError([checks.missing_gpus(hw)])
    return torch.device("cuda")


def setup(
    recipe: Recipe,
    output_dir: Path,
    checkpoint: Path | None,
    device: torch.device,
    *,
    live: bool | None = None,
    world: World = group.ALONE,
    force: bool = False,
) -> Run:
    if recipe.hardware.threads:
        torch.set_num_threads(recipe.hardware.threads)
    seed_everything(recipe.training.seed)
    opt = recipe.optimizer
    method = methods.method(opt.name)
    meter = MemoryMeter(device)
    auto_batch = recipe.training.batch_size == "auto"
    budget = estimate_for_run.device_budget(device) if auto_batch else None  # model not loaded
    # A sharded run builds the model on the meta device on every rank; rank 0 alone reads
    # the weights, into CPU memory, and sends each rank its shards (`distribute`): no
    # device ever holds the whole model.
    sharded = world.is_distributed and sharding.shards(recipe)
    model_cfg = recipe.model
    if method.fp32_master_weights and recipe.model.precision != "fp32":
        # The weights are the fp32 master copy; the loss runs under autocast (build_engine).
        model_cfg = recipe.model.model_copy(update={"precision": "fp32"})
    loaded = load_model(model_cfg, device, quantize_4bit=method.quantized_base, empty=sharded)
    weights = (
        load_model(model_cfg, torch.device("cpu")).model if sharded and world.is_main else None
    )
    model_config = loaded.model.config
    context = getattr(model_config, "max_position_embeddings", None)
    if (
        context and recipe.data.max_length > context
    ):  # positions the model has no rotary/embedding for
        raise TrainError(
            f"data.max_length: {recipe.data.max_length} is beyond the context of model "
            f"{recipe.model.name!r} ({context} positions, its max_position_embeddings). Set "
            f"data.max_length: {context} or less",
            EXIT_BAD_INPUT,
        )
    lora = opt.lora if opt.lora is not None or not method.trains_adapters_only else LoraConfig()
    if lora is not None:  # adapter methods always train adapters: QLoRA's defaults if none given
        from lomotune.lora import add_lora_adapters

        loaded.model = add_lora_adapters(loaded.model, lora)
    apply_chat_template(loaded.tokenizer, recipe.data)
    data = prepare_data(recipe.data, loaded.tokenizer, seed=recipe.training.seed)
    notes = [threads_note(recipe)] if device.type == "cpu" else []
    data_fingerprint = fingerprint(data.train)
    if checkpoint is not None:  # before anything in the folder is written
        notes += same_data_or_force(checkpoint, data, data_fingerprint, force)
    if auto_batch:
        batch, why = share_from_main(  # one choice for every process
            world,
            lambda: auto_batch_size(
                recipe,
                model_config,
                device,
                world,
                budget,
                checkpoint,
                data,
                loaded.tokenizer.pad_token_id,
            ),
        )
        recipe.training.batch_size = batch
        notes.append(why)
    loader = BatchLoader(
        data.train,
        batch_size=recipe.training.batch_size,
        seed=recipe.training.seed,
        pad_id=loaded.tokenizer.pad_token_id,
        packing=recipe.data.packing,
        max_length=recipe.data.max_length,
    )
    total_steps = count_total_steps(recipe, loader)
    model = loaded.model
    chunk = recipe.model.loss_chunk_tokens

    def loss_fn(batch):
        return causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()}, chunk)

    if world.is_distributed:
        loss_fn = sharding.distribute(model, loss_fn, recipe, world, device, weights)
        del weights  # rank 0's CPU copy: its tensors were sent
    engine = build_engine(recipe, model, loss_fn)
    if isinstance(engine, FusedEngine):
        engine.prepare_kernels()  # on a GPU: built and checked now, not inside backward
    elif isinstance(engine, MezoEngine):
        why = engine.prepare_kernels()  # z's kernel, on a CPU too
        # The kernel and the eager ops agree to fp32 rounding only: replicas take one path.
        if any_rank(world, why is not None):
            why = why or "another process of the run could not build it"
            engine.why_eager_z = why
            notes.append(
                f"mezo draws z with eager ops, several times slower than one kernel: {why}"
            )
    state = TrainingState(
        step=0,
        epoch=0,
        index=0,
        tokens_seen=0,
        bad_steps_in_a_row=0,
        skipped_steps=0,
        engine_meta={},
        recipe=recipe.model_dump(mode="json"),
        data_fingerprint=data_fingerprint,
    )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)  # every rank: each writes checkpoint parts
    except OSError as e:
        raise TrainError(
            f"training.output_dir: cannot create {output_dir}: {e.strerror or e}. Set it to a folder you can write",
            EXIT_BAD_INPUT,
        ) from None
    notes += [note] if (note := loss_note(model)) else []
    predicted, predicted_note = None, None
    try:
        predicted = estimate_for_run.predict(
            recipe, model_config, device.type, world.size, recipe.training.batch_size
        )
    except EstimateError as e:
        predicted_note = f"no memory estimate: {e}"
    warnings = method_warnings(recipe, device)
    history: list[str] = []  # the values resumes changed, for recipe.yaml's header
    if checkpoint is not None:  # into the model as sharded here, whatever wrote it
        saved_method = read_training_state(checkpoint)[0].recipe.get("optimizer", {}).get("name")
        state = restore_checkpoint(
            checkpoint,
            model=model,
            engine=engine,
            world=world,
            engine_state=saved_method == opt.name,
        )
        if saved_method != opt.name:  # --force with another method: its state means nothing here
            notes.append(
                f"the checkpoint's optimizer state ({saved_method}) was not loaded: {opt.name} starts with fresh state"
            )
        changes = resume_changes(state.recipe, recipe, state.step, loader, total_steps)
        notes += changes
        state.recipe = recipe.model_dump(mode="json")
        state.data_fingerprint = data_fingerprint
        if world.is_main:
            truncate_metrics(output_dir / METRICS_FILE, state.step)
            history = resume_history(output_dir, state.step, changes)
    if world.is_main:
        write_recipe(recipe, output_dir, loaded, world, history)
    title = f"lomotune · {opt.name} · {Path(loaded.source).name} · {recipe.model.precision}"
    if world.is_distributed:
        title += f" · {world.size} processes"
    log_every = recipe.training.log_every
    dashboard = Dashboard(total_steps, title, live=live, enabled=world.is_main, log_every=log_every)
    peak = peak_flops_for(device)
    mfu_basis = (count_parameters(loaded.model)[0], peak) if peak is not None else None
    return Run(
        recipe=recipe,
        output_dir=output_dir,
        device=device,
        loaded=loaded,
        data=data,
        loader=loader,
        engine=engine,
        total_steps=total_steps,
        state=state,
        dashboard=dashboard,
        log=open_loggers(
            recipe.training.loggers,
            output_dir,
            always=[dashboard, MetricsLog(output_dir / METRICS_FILE, enabled=world.is_main)],
            enabled=world.is_main,
            resume_step=state.step if checkpoint is not None else None,
        ),
        meter=meter,
        world=world,
        resumed_from=checkpoint,
        saved=(state.step, checkpoint) if checkpoint is not None else None,
        notes=notes,
        mfu_basis=mfu_basis,
        warnings=warnings,
        estimate=predicted,
        estimate_note=predicted_note,
        model_config=model_config,
    )


def same_data_or_force(
    checkpoint: Path, data: PreparedData, data_fingerprint: str, force: bool
) -> list[str]:
    """Refuse to resume onto training data other than the checkpoint's (resume_policy's
    data_change); with --force, a note. Returns the notes to show."""
    what = data_change(checkpoint, data, data_fingerprint)
    if what is None:
        return []
    if not force:
        raise TrainError(
            f"{what}. Resume with the original data, or pass --force to continue on this data",
            EXIT_BAD_INPUT,
        )
    return [f"{what}; continuing on it (--force) from the checkpoint's data position"]


def auto_batch_size(
    recipe: Recipe,
    config,
    device: torch.device,
    world: World,
    budget: estimate_for_run.Budget | None,
    checkpoint: Path | None,
    data: PreparedData,
    pad_id: int,
) -> tuple[int, str]:
    """`training.batch_size: auto`: the checkpoint's batch on a resume, else the largest
    the memory estimate says fits the device, at most the batch that keeps an epoch of the
    training rows 16 updates long (estimate.for_run.choose_batch_size)."""
    if checkpoint is not None:
        saved = read_training_state(checkpoint)[0].recipe["training"]["batch_size"]
        return saved, f"training.batch_size auto: {saved}, the batch of the checkpoint resumed"
    rows = BatchLoader(  # rows of training data (packed rows when packing)
        data.train,
        batch_size=1,
        seed=recipe.training.seed,
        pad_id=pad_id,
        packing=recipe.data.packing,
        max_length=recipe.data.max_length,
    ).batches_per_epoch
    try:
        return estimate_for_run.choose_batch_size(
            recipe, config, device.type, world.size, budget, rows
        )
    except EstimateError as e:
        raise RecipeError(
            [
                f"training.batch_size: auto needs the memory estimate, which failed: {e}. "
                "Set training.batch_size to a number"
            ]
        ) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_total_steps(recipe: Recipe, loader: BatchLoader) -> int:
    t = recipe.training
    if t.max_steps is not None:
        return t.max_steps
    micro = recipe.optimizer.gradient_accumulation
    return max(1, math.ceil(t.epochs * loader.batches_per_epoch / micro))


def write_recipe(
    recipe: Recipe,
    output_dir: Path,
    loaded: LoadedModel,
    world: World,
    history: list[str] = (),  # "resumed at step N: key: old -> new ...": what ran before
) -> None:
    """The resolved recipe next to the outputs, headed by what produced it and by every
    value a resume changed (the steps before ran with the old one)."""
    header = (
        f"# resolved recipe, written by lomotune {__version__} "
        f"(torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()})\n# model loaded from: {loaded.source}\n"
        f"# world_size: {world.size}\n"
    )
    header += "".join(f"# {line}\n" for line in history)
    (output_dir / "recipe.yaml").write_text(header + recipe_to_yaml(recipe))


# ---------------------------------------------------------------------------------------
# Fit


def fit(run: Run, stop: GracefulStop) -> None:
    recipe, state, t = run.recipe, run.state, run.recipe.training
    micro = recipe.optimizer.gradient_accumulation
    describe_run(run)
    if state.index >= run.loader.batches_per_epoch:  # resumed with --force on other data
        state.epoch, state.index = state.epoch + 1, 0
    batches = run.loader.iterate(start_epoch=state.epoch, start_index=state.index)
    run.loaded.model.train()
    first_step = state.step + 1
    while state.step < run.total_steps:
        lr = lr_at(state.step, run.total_steps, recipe.optimizer)
        step_batches = []
        for _ in range(micro):
            epoch, index, batch = next(batches)
            step_batches.append(batch)
        run.meter.reset_peak()
        at_start = run.meter.current_bytes()
        started = time.perf_counter()
        result = run.engine.step(step_batches, lr)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        seconds = time.perf_counter() - started
        if state.step >= first_step:  # not the first: it pages in weights, creates state
            rise = run.meter.peak_bytes() - at_start
            run.results["step_memory"] = max(run.results.get("step_memory", 0), rise)
        # The next batch position: after the last one used.
        state.epoch, state.index = (epoch, index + 1)
        if state.index >= run.loader.batches_per_epoch:
            state.epoch, state.index = epoch + 1, 0
        state.step += 1
        state.tokens_seen += result.tokens
        run.throughput.record(result.tokens, seconds)
        if result.skipped:
            state.skipped_steps += 1
            state.bad_steps_in_a_row += 1
            detail = result.detail or "nothing applied"
            run.dashboard.warn(f"step {state.step}: {result.skipped}; {detail}")
        else:
            state.bad_steps_in_a_row = 0
        log_step(run, result, lr, seconds)
        if state.bad_steps_in_a_row >= t.max_bad_steps:
            folder = save(run, keep_all=True)  # the checkpoints from before it went bad stay
            raise TrainError(
                f"{state.bad_steps_in_a_row} steps in a row had {result.skipped}; stopped at step {state.step} "
                f"(checkpoint {folder}). Lower optimizer.lr, enable optimizer.clip, or use bf16/fp32",
                EXIT_DIVERGED,
            )
        if t.eval_every and state.step % t.eval_every == 0 and state.step < run.total_steps:
            evaluate_loss(run)
        if t.save_every and state.step % t.save_every == 0 and state.step < run.total_steps:
            save(run)
        if any_rank(run.world, stop.requested):  # every rank stops after the same step
            folder = save(run)
            signum = stop.signal_number or signal.SIGINT  # a rank that saw none follows
            code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT
            raise TrainError(
                f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint {folder}.\n"
                f"Continue with: lomotune train {run.output_dir / 'recipe.yaml'} --resume",
                code,
            )
    if run.data.eval:
        evaluate_loss(run)


def describe_run(run: Run) -> None:
    total, trainable = count_parameters(run.loaded.model)
    s = run.data.stats
    run.dashboard.note(
        f"{run.recipe.optimizer.name}: {trainable:,} of {total:,} parameters trained; "
        f"{len(run.data.train)} train / {len(run.data.eval)} eval examples; "
        f"{run.total_steps} steps on {run.device.type}"
    )
    if warning := mezo_precision_warning(run.recipe):
        run.dashboard.warn(warning)
    if s.dropped:
        run.dashboard.warn(f"{s.dropped} examples dropped: their answer lay beyond data.max_length")
    if s.truncated:
        run.dashboard.warn(
            f"{s.truncated} examples were longer than data.max_length={run.recipe.data.max_length} and were truncated"
        )
    if s.bad_rows_skipped:
        run.dashboard.warn(f"{s.bad_rows_skipped} bad rows skipped (data.on_bad_rows: skip)")


def log_step(run: Run, result, lr: float, seconds: float) -> None:
    step = run.state.step
    metrics = {
        "loss": result.loss,
        "lr": lr,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / seconds if seconds > 0 else None,
        "step_time": seconds,
        "epoch": run.state.epoch,
        "skipped_steps": run.state.skipped_steps,
        **run.meter.as_metrics(),
    }
    # This rank's peak, for the summary (which takes the max and spread over ranks).
    run.results["peak_memory"] = max(run.results.get("peak_memory", 0), metrics["mem_peak"])
    if run.world.is_distributed:  # shown by rank 0: the largest peak of any rank, the spread
        peaks = group.gather_floats(run.world, metrics["mem_peak"])
        metrics["mem_peak"], metrics["mem_peak_spread"] = max(peaks), max(peaks) - min(peaks)
        if metrics["tokens_per_s"] is not None:
            metrics["tokens_per_s_per_process"] = metrics["tokens_per_s"] / run.world.size
    if result.grad_norm is not None:
        metrics["grad_norm"] = result.grad_norm
    if result.loss_scale is not None:
        metrics["loss_scale"] = result.loss_scale
    # On a GPU of known peak: 6 x all parameters (frozen ones too) x tokens/s per device.
    if run.mfu_basis is not None and metrics["tokens_per_s"] is not None:
        per_device = metrics["tokens_per_s"] / run.world.size
        metrics["mfu"] = mfu(per_device, *run.mfu_basis)
    run.log.log_dict(step, metrics)


@torch.no_grad()
def evaluate_loss(run: Run) -> float | None:
    if not run.data.eval:
        return None
    loader = BatchLoader(
        run.data.eval,
        batch_size=run.recipe.training.batch_size,
        seed=0,
        pad_id=run.loaded.tokenizer.pad_token_id,
        packing=False,
        max_length=run.recipe.data.max_length,
        shuffle=False,
    )
    limit = run.recipe.training.eval_batches or loader.batches_per_epoch
    total, n = 0.0, 0
    model = run.loaded.model
    model.eval()
    for index, batch in enumerate(loader):  # one pass, in order
        if index >= limit:
            break
        loss_sum, count = run.engine.loss_fn(batch)  # on the device; summed over ranks
        total += float(loss_sum)
        n += count
    model.train()
    eval_loss = total / max(n, 1)
    run.results["eval_loss"] = eval_loss
    metrics = {"eval_loss": eval_loss}
    if run.recipe.training.eval_tasks:
        metrics.update(
            task_metrics(
                model,
                run.loaded.tokenizer,
                run.recipe.training.eval_tasks,
                run.recipe.data.superglue_dir,
                batch_size=run.recipe.training.batch_size,
                limit=run.recipe.training.eval_tasks_limit,
                include_path=run.recipe.training.eval_tasks_include_path,
            )
        )
        run.results.update(metrics)
    run.log.log_dict(run.state.step, metrics, "eval")
    return eval_loss


SAMPLES_SHOWN = 2  # generated answers shown next to the accuracy


def generation_accuracy(run: Run, when: str) -> float | None:
    """Exact match of generated answers on held-out prompts; None (no accuracy, rather
    than a NaN in the summary) where the data format has no answers to match."""
    pairs = run.data.eval_pairs[: run.recipe.training.generate_eval_examples]
    if not pairs:
        if when.startswith("before") or run.resumed_from is not None:  # said once a run
            run.dashboard.warn(
                "training.generate_eval_examples is set but this data format has no answers "
                "to match: no accuracy is measured"
            )
        return None
    # Several processes: each rank decodes its share of the prompts with the whole model
    # gathered (no collective inside generate), and the counts are summed.
    n, rank, size = len(pairs), run.world.rank, run.world.size
    share = pairs[n * rank // size : n * (rank + 1) // size]
    with sharding.whole_model(run.loaded.model):
        mine = exact_match(
            run.loaded.model,
            run.loaded.tokenizer,
            share,
            max_new_tokens=run.recipe.training.generate_max_new_tokens,
            keep_samples=SAMPLES_SHOWN,
        )
    result = combine_exact_match(group.gather_objects(run.world, mine))
    run.dashboard.note(
        f"held-out exact match {when}: {result.correct}/{result.total} ({result.accuracy:.0%})"
    )
    for prompt, expected, got in result.samples:
        run.dashboard.note(
            f"  {prompt.splitlines()[0][:60]!r} -> {got.strip()[:30]!r} (expected {expected.strip()!r})"
        )
    run.log.log_dict(
        run.state.step,
        {
            f"accuracy_{when.split()[0]}": result.accuracy,
            "correct": result.correct,
            "total": result.total,
        },
        "eval",
    )
    return result.accuracy


def combine_exact_match(parts: list[ExactMatch]) -> ExactMatch:
    """The ranks' results on consecutive shares of the prompts as one result; the samples
    are the first prompts', as one process shows them."""
    correct, total = sum(p.correct for p in parts), sum(p.total for p in parts)
    accuracy = correct / total if total else 0.0
    samples = [s for p in parts for s in p.samples][:SAMPLES_SHOWN]
    return ExactMatch(accuracy=accuracy, correct=correct, total=total, samples=samples)


def out_of_memory(run: Run, error: BaseException) -> TrainError:
    r = run.recipe
    where = "GPU" if run.device.type == "cuda" else "host"
    peak = format_bytes(run.meter.peak_bytes())
    batch, estimate_said = batch_that_fits(run)
    fixes = [f"training.batch_size: {batch} (now {r.training.batch_size})"]
    if not r.model.activation_checkpointing:
        fixes.append("model.activation_checkpointing: true")
    if r.optimizer.name in ("adamw", "adam-mini", "sgd"):
        fixes.append("optimizer.name: lomo or adalomo (no optimizer state, no stored gradients)")
    if r.data.max_length > 256:
        fixes.append(f"data.max_length: {r.data.max_length // 2}")
    return TrainError(
        f"out of {where} memory at step {run.state.step + 1} (peak seen {peak}): {str(error).splitlines()[0][:200]}\n"
        f"{estimate_said}\n"
        "Changes that lower the peak: " + "; ".join(fixes),
        EXIT_OUT_OF_MEMORY,
    )


def batch_that_fits(run: Run) -> tuple[int, str]:
    """(the batch to suggest, what the memory estimate says) after an out-of-memory stop:
    the largest batch the estimate fits in the device, or half the batch where the
    estimate cannot tell or thought this one fitted."""
    batch = run.recipe.training.batch_size
    half = max(1, batch // 2)
    if run.estimate is None:
        return half, f"({run.estimate_note})"
    e, kind = run.estimate, run.device.type
    said = (
        f"The memory estimate for batch {batch} x {run.recipe.data.max_length}: "
        f"{format_bytes(estimate_for_run.needed_bytes(e, kind))} (peak at {e.phase})"
    )
    budget = estimate_for_run.device_budget(run.device, whole_device=True)
    if budget is None:
        return half, said + "; the device's size is unknown here."
    fitting = estimate_for_run.largest_batch(
        run.recipe, run.model_config, kind, run.world.size, budget, limit=batch
    )
    if fitting >= batch:
        return half, (
            f"{said}, within {budget.reason}: what ran out is memory the estimate does not "
            "count (other processes, allocator fragmentation, a longer data.max_length than "
            "the batches had)."
        )
    if fitting == 0:
        return 1, f"{said}; not even batch 1 fits {budget.reason} by the estimate."
    more = estimate_for_run.predict(run.recipe, run.model_config, kind, run.world.size, fitting)
    return fitting, (
        f"{said}, over {budget.reason}; batch {fitting} is predicted to need "
        f"{format_bytes(estimate_for_run.needed_bytes(more, kind))}."
    )


# ---------------------------------------------------------------------------------------
# Save


def save(run: Run, keep_all: bool = False) -> Path:
    """A checkpoint of the current step (atomic; keeps the last K, or all with keep_all).
    A step already saved (an interrupt right after a periodic save) is not written again."""
    if run.saved is not None and run.saved[0] == run.state.step:
        return run.saved[1]
    # Every process: a sharded model is written as shards, each rank its own.
    folder = save_checkpoint(
        run.output_dir,
        run.state,
        model=run.loaded.model,
        engine=run.engine,
        write_model=lambda out: save_model(run, out),
        keep=None if keep_all else run.recipe.training.keep_checkpoints,
        world=run.world,
    )
    run.saved = (run.state.step, folder)
    run.dashboard.note(f"checkpoint saved: {folder}")
    return folder


def save_model(run: Run, out: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The model in Hugging Face layout; `weights`: its whole state gathered from shards."""
    model = run.loaded.model
    model.config.use_cache = True  # for whoever loads it: generation wants the cache
    try:
        # A PEFT model writes its adapter only (PEFT format); others the whole model.
        model.save_pretrained(out, state_dict=weights, safe_serialization=True)
    finally:
        model.config.use_cache = False
    run.loaded.tokenizer.save_pretrained(out)


def save_final(run: Run) -> Path:
    # The README's promise: a NaN never reaches a weight. A skipped step keeps NaN losses
    # out, but an update that overflows a finite weight (an lr far too large) does not
    # show in the loss until the next step: the last step's weights are checked here.
    bad = non_finite_weights(run.loaded.model)
    if any_rank(run.world, bool(bad)):
        named = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainError(
            f"after step {run.state.step} the weights are not finite ({named or 'on another process'}); "
            f"the final model was not written. Lower optimizer.lr (now {run.recipe.optimizer.lr:g}) "
            "or enable optimizer.clip, and start again with --overwrite",
            EXIT_DIVERGED,
        )
    save(run)
    final = run.output_dir / "model"
    weights = sharding.full_state_dict(run.loaded.model)
    # Rank 0 writes it alone (minutes for a large model): the others wait for it in
    # share_from_main, with its long timeout, not in the next collective with the run's.
    share_from_main(run.world, lambda: write_final(run, final, weights))
    return final


def write_final(run: Run, final: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """The final model folder, written to a temporary folder and renamed (rank 0)."""
    tmp = run.output_dir / ".partial-model"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(run, tmp, weights)
        shutil.copy(run.output_dir / "recipe.yaml", tmp / "lomotune_recipe.yaml")
    except Exception as e:  # OSError, or the SafetensorError that wraps one
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_of(e)
        if cause is None:
            raise
        raise CheckpointError(
            f"could not write the final model to {final}: {cause.strerror or cause}; the checkpoint "
            f"{run.saved[1]} is complete. Free disk space, then run again with --resume to write it",
            EXIT_WRITE_FAILED,
        ) from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    run.dashboard.note(f"final model saved: {final}")


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point weights with an inf or nan in this process's part."""
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t  # a shard of FSDP2
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            out.append(name)
    return out


def summarize(run: Run, wall_seconds: float, final_dir: Path) -> dict[str, Any]:
    peaks = group.gather_floats(run.world, run.results.get("peak_memory", run.meter.peak_bytes()))
    summary = {
        "method": run.recipe.optimizer.name,
        "steps": run.state.step,
        "final_loss": None,
        "eval_loss": run.results.get("eval_loss"),
        "world_size": run.world.size,
        "tokens_per_s": run.throughput.overall,  # all processes together
        "tokens_per_s_per_process": (run.throughput.overall or 0) / run.world.size,
        "peak_memory": int(max(peaks)),  # the largest of any process
        **estimate_for_run.comparison(
            run.estimate,
            run.estimate_note,
            run.results.get("step_memory"),
            run.meter.kind,
        ),
        "peak_memory_spread": int(max(peaks) - min(peaks)),
        "process_peak_memory": run.meter.process_peak_bytes(),
        "memory_kind": run.meter.kind,
        "skipped_steps": run.state.skipped_steps,
        "wall_time": wall_seconds,
        "model_dir": str(final_dir),
    }
    for key in ("accuracy_before", "accuracy_after"):
        if run.results.get(key) is not None:
            summary[key] = run.results[key]
    # final_loss is the smoothed loss (an EMA, bias-corrected): one batch's loss is noisy.
    summary["final_loss"] = run.dashboard.smoothed_loss
    summary["last_loss"] = run.dashboard.losses[-1] if run.dashboard.losses else None
    if run.world.is_main:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot_quietly(run: Run) -> None:
    """The PNG of the run; plotting problems never fail a finished run."""
    try:
        from lomotune.plot import plot_run

        path = plot_run(run.output_dir)
        print(f"plot: {path}")
    except Exception as e:  # a missing matplotlib must not lose a finished run
        print(f"plot skipped: {e}")

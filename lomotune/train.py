"""The training run, top to bottom: setup -> fit -> save.

    recipe -> output folder checks -> model + tokenizer -> data -> engine -> loop
           -> checkpoints (every save_every steps, on SIGINT/SIGTERM, at the end)
           -> final model (Hugging Face folder) + metrics.jsonl + training.png

`train(recipe)` is the whole thing; the CLI only parses arguments and calls it.
"""

from __future__ import annotations

import contextlib
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

from lomotune import __version__, distributed
from lomotune.allocator import return_freed_memory
from lomotune.checkpoint import (
    CheckpointError,
    TrainingState,
    list_checkpoints,
    newest_intact_checkpoint,
    read_training_state,
    restore_checkpoint,
    save_checkpoint,
)
from lomotune.dashboard import METRICS_FILE, Dashboard, MetricsLog, truncate_metrics
from lomotune.data import BatchLoader, PreparedData, prepare_data
from lomotune.distributed import World, any_rank, share_from_main
from lomotune.estimate import Estimate, EstimateError
from lomotune.estimate import for_run as estimate_for_run
from lomotune.evaluate.during_training import task_metrics
from lomotune.evaluate.exact_match import ExactMatch, exact_match
from lomotune.loggers import Loggers, open_loggers
from lomotune.models import (
    LoadedModel,
    causal_lm_loss,
    count_parameters,
    load_model,
    loss_note,
)
from lomotune.monitor import MemoryMeter, Throughput, format_bytes
from lomotune.optim import build_engine, kernels
from lomotune.optim.schedule import lr_at
from lomotune.precision import resolve_precision
from lomotune.recipe import (
    FUSED_METHODS,
    METHOD_DEFAULTS,
    LoraConfig,
    Recipe,
    RecipeError,
    recipe_to_yaml,
)

# Exit codes: what a script calling lomotune can tell apart.
EXIT_BAD_INPUT = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_DIVERGED = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

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


class TrainError(Exception):
    """A run that stops for a reason the user can act on; carries its exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Run:
    recipe: Recipe
    output_dir: Path
    device: torch.device
    loaded: LoadedModel
    data: PreparedData
    loader: BatchLoader
    engine: Any  # FusedEngine | MezoEngine | OptimizerEngine: same surface
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


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    live: bool | None = None,
) -> dict[str, Any]:
    """Run a recipe to the end; returns the summary. Raises TrainError/RecipeError.
    Under a launcher (several processes) every process calls this; rank 0 decides about
    the output folder and writes every file."""
    if distributed.needs_launch(recipe):
        raise TrainError(
            "hardware: this recipe asks for several processes; start it with `lomotune train` "
            "(which launches them) or under torchrun",
            EXIT_BAD_INPUT,
        )
    world = distributed.join(recipe)
    try:
        return train_in(world, recipe, overwrite=overwrite, resume=resume, force=force, live=live)
    finally:
        distributed.leave(world)


def train_in(
    world: World, recipe: Recipe, *, overwrite: bool, resume: bool, force: bool, live: bool | None
) -> dict[str, Any]:
    output_dir = Path(recipe.training.output_dir)
    device = distributed.device_of(world, recipe) or pick_device(recipe)
    if device.type == "cpu":
        return_freed_memory()  # else the process keeps every freed size's high-water mark
    # `auto` becomes what this hardware computes in natively; the resolved value is what
    # the saved recipe and a resume compare.
    precision = resolve_precision(recipe.model.precision, device)
    recipe.model.precision = precision.precision

    def decide() -> tuple[Path | None, list[str]]:
        refused = distributed.refusal(recipe, world.size)
        if refused:
            raise RecipeError([refused])
        return plan_output_dir(
            output_dir,
            recipe,
            overwrite=overwrite,
            resume=resume or recipe.resume == "auto",
            force=force,
        )

    checkpoint, damaged = share_from_main(world, decide)  # taken once, by rank 0
    transformers.logging.disable_progress_bar()  # the dashboard is the progress display
    run = setup(recipe, output_dir, checkpoint, device, live=live, world=world)
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


def plan_output_dir(
    output_dir: Path, recipe: Recipe, *, overwrite: bool, resume: bool, force: bool
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
    has_content = output_dir.exists() and any(output_dir.iterdir())
    if overwrite and has_content:
        shutil.rmtree(output_dir)
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


def recipe_differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in RESUME_MUST_MATCH:
        a, b = saved, current
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if key == "training.batch_size" and b == "auto":
            continue  # the run takes the checkpoint's batch size
        if a != b:
            out.append(f"{key}: checkpoint has {a!r}, recipe has {b!r}")
    return out


def pick_device(recipe: Recipe) -> torch.device:
    hw = recipe.hardware
    available = torch.cuda.device_count()
    if hw.gpus == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    if hw.gpus == 0:
        return torch.device("cpu")
    if distributed.missing_gpus(hw):
        raise RecipeError([distributed.missing_gpus(hw)])
    return torch.device("cuda")


def setup(
    recipe: Recipe,
    output_dir: Path,
    checkpoint: Path | None,
    device: torch.device,
    *,
    live: bool | None = None,
    world: World = distributed.ALONE,
) -> Run:
    if recipe.hardware.threads:
        torch.set_num_threads(recipe.hardware.threads)
    seed_everything(recipe.training.seed)
    opt = recipe.optimizer
    meter = MemoryMeter(device)
    auto_batch = recipe.training.batch_size == "auto"
    budget = estimate_for_run.device_budget(device) if auto_batch else None  # model not loaded
    # A sharded run reads the weights on rank 0 only; the other ranks get their shards.
    empty = world.is_distributed and not world.is_main and distributed.shards(recipe)
    loaded = load_model(recipe.model, device, quantize_4bit=opt.name == "qlora-sgd", empty=empty)
    model_config = loaded.model.config
    lora = opt.lora if opt.lora is not None or opt.name != "qlora-sgd" else LoraConfig()
    if lora is not None:  # qlora-sgd always trains adapters: QLoRA's defaults if none given
        from lomotune.lora import add_lora_adapters

        loaded.model = add_lora_adapters(loaded.model, lora)
    data = prepare_data(recipe.data, loaded.tokenizer, seed=recipe.training.seed)
    notes = []
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
        loss_fn = distributed.distribute(model, loss_fn, recipe, world, device)
    engine = build_engine(recipe, model, loss_fn)
    state = TrainingState(
        step=0,
        epoch=0,
        index=0,
        tokens_seen=0,
        bad_steps_in_a_row=0,
        skipped_steps=0,
        engine_meta={},
        recipe=recipe.model_dump(mode="json"),
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
        state.recipe = recipe.model_dump(mode="json")
        if world.is_main:
            truncate_metrics(output_dir / METRICS_FILE, state.step)
    if world.is_main:
        write_recipe(recipe, output_dir, loaded, world)
    title = f"lomotune · {opt.name} · {Path(loaded.source).name} · {recipe.model.precision}"
    if world.is_distributed:
        title += f" · {world.size} processes"
    log_every = recipe.training.log_every
    dashboard = Dashboard(total_steps, title, live=live, enabled=world.is_main, log_every=log_every)
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
        warnings=warnings,
        estimate=predicted,
        estimate_note=predicted_note,
        model_config=model_config,
    )


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
    the memory estimate says fits the device (at most the training rows there are)."""
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


def method_warnings(recipe: Recipe, device: torch.device) -> list[str]:
    """Settings that run, but probably not as the user hopes."""
    opt = recipe.optimizer
    defaults = METHOD_DEFAULTS[opt.name]
    low, high = defaults.usual_lr
    out = []
    if not low <= opt.lr <= high:
        out.append(
            f"optimizer.lr {opt.lr:g} is outside the usual range for {opt.name} "
            f"({low:g} to {high:g}; default {defaults.lr:g}, {defaults.source})"
        )
    fused = opt.name in ("lomo", "sgd", "qlora-sgd")
    if (
        fused
        and recipe.model.precision == "bf16"
        and not (opt.stochastic_rounding and opt.name != "sgd")
        and opt.lr < 1e-4
    ):
        out.append(
            f"optimizer.lr {opt.lr:g} on bf16 weights without stochastic rounding: most "
            "updates are smaller than bf16's spacing and are lost. Use "
            "optimizer.stochastic_rounding: true (lomo), a larger lr, or model.precision: fp32"
        )
    if opt.name in FUSED_METHODS and device.type != "cpu":
        why = kernels.why_not_compiled(device)  # builds the kernel once, before training
        if why:
            out.append(
                "the fused update runs as separate eager ops on this GPU (several passes "
                f"over memory where one compiled kernel makes one): {why}"
            )
    return out


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


def write_recipe(recipe: Recipe, output_dir: Path, loaded: LoadedModel, world: World) -> None:
    """The resolved recipe next to the outputs, headed by what produced it."""
    header = (
        f"# resolved recipe, written by lomotune {__version__} "
        f"(torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()})\n# model loaded from: {loaded.source}\n"
        f"# world_size: {world.size}\n"
    )
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
    r = run.recipe
    if r.optimizer.name == "mezo" and r.model.precision != "fp32" and r.optimizer.lora is None:
        run.dashboard.warn(
            f"mezo perturbs the weights in place: in {r.model.precision} each step's +eps*z, -2eps*z, "
            "+eps*z drifts them by about one unit in the last place, more than a typical update. "
            "Use model.precision: fp32 for mezo"
        )
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
        peaks = distributed.gather_floats(run.world, metrics["mem_peak"])
        metrics["mem_peak"], metrics["mem_peak_spread"] = max(peaks), max(peaks) - min(peaks)
        if metrics["tokens_per_s"] is not None:
            metrics["tokens_per_s_per_process"] = metrics["tokens_per_s"] / run.world.size
    if result.grad_norm is not None:
        metrics["grad_norm"] = result.grad_norm
    if result.loss_scale is not None:
        metrics["loss_scale"] = result.loss_scale
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


def generation_accuracy(run: Run, when: str) -> float:
    pairs = run.data.eval_pairs[: run.recipe.training.generate_eval_examples]
    if not pairs:
        run.dashboard.warn(
            "training.generate_eval_examples is set but this data format has no answers to match"
        )
        return float("nan")
    # Several processes: each rank decodes its share of the prompts with the whole model
    # gathered (no collective inside generate), and the counts are summed.
    n, rank, size = len(pairs), run.world.rank, run.world.size
    share = pairs[n * rank // size : n * (rank + 1) // size]
    with distributed.whole_model(run.loaded.model):
        mine = exact_match(
            run.loaded.model,
            run.loaded.tokenizer,
            share,
            max_new_tokens=run.recipe.training.generate_max_new_tokens,
            keep_samples=SAMPLES_SHOWN,
        )
    result = combine_exact_match(distributed.gather_objects(run.world, mine))
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
    save(run)
    final = run.output_dir / "model"
    weights = distributed.full_state_dict(run.loaded.model)
    if not run.world.is_main:
        return final
    tmp = run.output_dir / ".partial-model"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(run, tmp, weights)
        shutil.copy(run.output_dir / "recipe.yaml", tmp / "lomotune_recipe.yaml")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write the final model to {final}: {e.strerror or e}; the checkpoint "
            f"{run.saved[1]} is complete. Free disk space, then run again with --resume to write it"
        ) from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    run.dashboard.note(f"final model saved: {final}")
    return final


def summarize(run: Run, wall_seconds: float, final_dir: Path) -> dict[str, Any]:
    peaks = distributed.gather_floats(
        run.world, run.results.get("peak_memory", run.meter.peak_bytes())
    )
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
        if key in run.results:
            summary[key] = run.results[key]
    last = run.dashboard.smoothed_loss
    summary["final_loss"] = last
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


# ---------------------------------------------------------------------------------------
# Signals


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, save, exit. Second: abort at once (the
    last complete checkpoint is untouched: saves are atomic)."""

    def __init__(self, quiet: bool = False):  # quiet: ranks other than 0 say nothing
        self.quiet = quiet
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not the main thread (a library caller's worker): leave signals alone.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # second signal: stop now
        self.requested = True
        self.signal_number = signum
        if not self.quiet:
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (again to abort now)",
                flush=True,
            )

#!/usr/bin/env python
"""Memory and speed of every method, side by side, in one run.

    python scripts/bench.py                                   # all methods, bf16, 4 x 512
    python scripts/bench.py --methods lomo,adamw --steps 3 --json /tmp/bench.json
    python scripts/bench.py --fake-1b                         # counted, not measured: see below
    python scripts/bench.py --interleave --methods lomo,sgd,adamw --precision fp32  # speed only

What one method's measurement is (each method in its OWN subprocess, one after another,
never concurrently: process RSS never shrinks, so a comparison inside one process would
charge each method with its predecessors' high-water mark):

1. load the model as a recipe does (`lomotune.models.load_model`, activation
   checkpointing on, non-reentrant); qlora-sgd loads the base in 4-bit NF4 with double
   quantization and adds LoRA adapters (`lomotune.lora.add_lora_adapters`, r=64,
   alpha=16, all linear layers), as `lomotune train` does;
2. build the engine with `lomotune.optim.build_engine` (the same surface as training:
   `engine.step([batch], lr)`), or the reference `lomo_optim.Lomo`
   (`optimizer.fused_backward(loss, lr)`), or nothing for the `no_grad` forward;
3. one batch of `--batch` x `--seq` uniformly random token ids (seeded), labels on all
   tokens, no padding; the loss is `lomotune.loss.causal_lm_loss` (chunked, fp32
   logits per chunk of `model.loss_chunk_tokens`, the recipe default unless --loss-chunk);
4. `--warmup` steps (optimizer state is allocated lazily at the first step), then
   `--steps` measured steps: median step time, tokens/s = tokens / median step time,
   and the peak RSS seen by `MemoryMeter` (a 20 ms sampling thread, so a lower bound).

Reported memory, all process RSS:
- `rss_loaded`: after the model (and adapters, and engine) is built, before any step:
  the weights plus the Python/torch runtime;
- `peak`: MemoryMeter peak during the measured steps; `peak - rss_loaded` is what the
  method needs beyond the weights;
- `ru_maxrss`: the kernel's lifetime peak of the process (includes loading).

Speed on a 2-core CPU drifts 5-10 % between runs minutes apart, more than methods differ:
compare speed with `--interleave` (the methods' steps alternating in one process, so the
drift falls on all alike; memory is not measured there). "update s/step" is the time in
the fused hooks' updates or in optimizer.step: where the methods differ at all.

`--fake-1b`: GPU memory without a GPU. A ~1.1B-parameter Llama shape is built under
`torch._subclasses.fake_tensor.FakeTensorMode` (no storage is allocated) and one training
step of each method is run under `torch.distributed._tools.mem_tracker.MemTracker`,
which counts the bytes of every tensor storage alive at each op and keeps the peak. See
`fake_1b` for what is counted and what is not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = [
    "no_grad",
    "lomo",
    "lomo-ref",
    "lomo-nosr",
    "adalomo",
    "adalomo-ref",
    "mezo",
    "qlora-sgd",
    "sgd",
    "adamw",
    "adamw-amp",
    "adam-mini",
]
DESCRIPTIONS = {
    "no_grad": "forward + loss under torch.no_grad (inference reference)",
    "lomo": "lomotune FusedEngine + LomoRule (post-accumulate-grad hooks)",
    "lomo-ref": "lomo_optim.Lomo 0.1.1 (reference), fused_backward(loss, lr)",
    "lomo-nosr": "lomo with optimizer.stochastic_rounding false (round to nearest)",
    "adalomo": "lomotune FusedEngine + AdaLomoRule",
    "adalomo-ref": "lomo_optim.AdaLomo 0.1.1 (reference), fused_backward(loss, lr)",
    "mezo": "lomotune MezoEngine (2 forwards, 1 direction)",
    "qlora-sgd": "NF4 base + LoRA r=64 all-linear, FusedEngine SGD",
    "sgd": "torch.optim.SGD (foreach), full backward",
    "adamw": "torch.optim.AdamW (foreach), full backward",
    "adamw-amp": "AdamW on fp32 master weights, forward in bf16 autocast (HF Trainer bf16=True)",
    "adam-mini": "adam_mini.Adam_mini 1.1.1, full backward",
}
GiB = 1024**3
TRACKER: list = []  # the MemTracker counting the current step, if any


def library_version() -> str:
    """The commit the library was measured at, '+dirty' when lomotune/ has local changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "lomotune") else "")


MiB = 1024**2


# ---------------------------------------------------------------------------------------
# One method, in its own process


def lomotune_method(method: str) -> str:
    """The lomotune method a bench row varies (lomo-nosr, adamw-amp, lomo-ref: lomo...)."""
    return method.removesuffix("-ref").removesuffix("-nosr").removesuffix("-amp")


def random_batch(args: argparse.Namespace, vocab: int) -> dict:
    """`--batch` x `--seq` uniformly random token ids (seeded), labels on all, no padding."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def bench_recipe(cfg, method: str, args: argparse.Namespace):
    """The recipe whose engine a bench row runs (`build_engine` of lomotune train)."""
    from lomotune.recipe import LoraConfig, OptimizerConfig, Recipe, TrainingConfig

    return Recipe(
        model=cfg,
        optimizer=OptimizerConfig(
            name=lomotune_method(method),
            lr=args.lr,
            lora=LoraConfig() if method == "qlora-sgd" else None,
            stochastic_rounding=not method.endswith("-nosr"),
        ),
        training=TrainingConfig(max_steps=args.warmup + args.steps),
    )


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    from lomotune.allocator import return_freed_memory
    from lomotune.loss import causal_lm_loss
    from lomotune.models import count_parameters, load_model
    from lomotune.monitor import MemoryMeter
    from lomotune.recipe import LoraConfig, ModelConfig

    return_freed_memory()  # as `lomotune train` does on a CPU
    method, precision = args.worker, args.precision
    amp = method == "adamw-amp"  # fp32 weights and optimizer, bf16 compute
    torch.manual_seed(0)
    meter = MemoryMeter("cpu")
    gc.collect()
    rss_start = meter.sample()

    cfg = ModelConfig(
        name=args.model,
        precision="fp32" if amp else precision,
        activation_checkpointing=True,
        loss_chunk_tokens=args.loss_chunk,
    )
    device = torch.device("cpu")
    t0 = time.perf_counter()
    loaded = load_model(cfg, device, quantize_4bit=method == "qlora-sgd")
    model = loaded.model
    if method == "qlora-sgd":
        from lomotune.lora import add_lora_adapters

        model = add_lora_adapters(model, LoraConfig())
    model.train()
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_model = meter.sample()
    total_params, trainable = count_parameters(model)

    chunk = cfg.loss_chunk_tokens
    batch = random_batch(args, model.config.vocab_size)
    tokens = batch["input_ids"].numel()

    def loss_fn(b):
        if TRACKER:  # MemTracker refuses a second forward in one count without this
            TRACKER[0].reset_mod_stats()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return causal_lm_loss(model, b, chunk)

    lr = args.lr
    update_clock = UpdateClock()
    tracked: list = []  # state created before the tensor count that it must include
    if method == "no_grad":

        def step() -> float:
            with torch.no_grad():
                s, n = loss_fn(batch)
            return float(s) / n

    elif method in ("lomo-ref", "adalomo-ref"):
        from lomo_optim import AdaLomo, Lomo

        if method == "adalomo-ref" and not torch.cuda.is_available():
            raise SystemExit("lomo_optim.AdaLomo 0.1.1 creates its state with .cuda(): GPU only")

        opt = (Lomo if method == "lomo-ref" else AdaLomo)(model, lr=lr)
        tracked.append(opt)

        def step() -> float:
            s, n = loss_fn(batch)
            loss = s / n
            value = float(loss.detach())
            opt.fused_backward(loss, lr)
            return value

    else:
        from lomotune.optim import build_engine

        engine = build_engine(bench_recipe(cfg, method, args), model, loss_fn)
        if hasattr(engine, "optimizer"):
            tracked.append(engine.optimizer)
        for st in getattr(engine, "states", []):
            tracked += list(st.values())

        # The time spent in the update itself: the fused hooks, or optimizer.step.
        if hasattr(engine, "optimizer"):
            engine.optimizer.step = update_clock.timed(engine.optimizer.step)
        elif hasattr(engine, "_update"):
            engine._update = update_clock.timed(engine._update)

        def step() -> float:
            return engine.step([batch], lr).loss

    gc.collect()
    rss_loaded = meter.sample()

    meter.start()
    losses, warm_times = [], []
    for _ in range(args.warmup):
        t = time.perf_counter()
        losses.append(step())
        warm_times.append(time.perf_counter() - t)
    gc.collect()
    rss_after_warmup = meter.sample()
    meter.reset_peak()
    times, cpu_times, update_times = [], [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        update_clock.seconds = 0.0
        losses.append(step())
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        update_times.append(update_clock.seconds if update_clock.used else None)
    peak = meter.peak_bytes()
    meter.stop()
    median = statistics.median(times)
    tensors = count_tensor_bytes(step, model, tracked, batch) if args.count_tensors else None
    return {
        "method": method,
        "precision": precision,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": tokens,
        "params": total_params,
        "trainable_params": trainable,
        "load_s": load_s,
        "rss_start": rss_start,
        "rss_model": rss_model,
        "rss_loaded": rss_loaded,
        "rss_after_warmup": rss_after_warmup,
        "peak": peak,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "warmup_s": warm_times,
        "step_s": times,
        "cpu_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "min_step_s": min(times),
        "tensors": tensors,
        "median_step_s": median,
        "median_update_s": statistics.median(update_times) if update_clock.used else None,
        "tokens_per_s": tokens / median,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


# Methods whose steps can alternate on one model in one process: no hooks left behind
# between steps (lomo_optim's cannot be removed), one precision.
INTERLEAVED_METHODS = ["lomo", "lomo-nosr", "adalomo", "mezo", "sgd", "adamw", "adam-mini"]


def speed_interleaved(methods: list[str], precision: str, args: argparse.Namespace) -> list[dict]:
    """Step time of each method in ONE process, on one model, the methods' steps
    alternating (in order in even rounds, reversed in odd ones), so that the machine's
    drift over minutes (step times here move 5-10 % between runs of the same code) falls
    on every method alike. Memory is not measured here (see the per-process rows). A
    fused engine is built for each of its steps and its hooks removed after it; the
    baselines keep their optimizer state. All of them update the same weights."""
    import torch

    from lomotune.allocator import return_freed_memory
    from lomotune.loss import causal_lm_loss
    from lomotune.models import load_model
    from lomotune.optim import build_engine
    from lomotune.recipe import ModelConfig

    return_freed_memory()
    torch.manual_seed(0)
    cfg = ModelConfig(name=args.model, precision=precision, activation_checkpointing=True,
                      loss_chunk_tokens=args.loss_chunk)  # fmt: skip
    model = load_model(cfg, torch.device("cpu")).model
    model.train()
    batch = random_batch(args, model.config.vocab_size)

    def loss_fn(b):
        return causal_lm_loss(model, b, cfg.loss_chunk_tokens)

    kept: dict[str, object] = {}  # engines without hooks live across steps
    clock = UpdateClock()

    def one_step(method: str) -> tuple[float, float]:
        engine = kept.get(method) or build_engine(bench_recipe(cfg, method, args), model, loss_fn)
        if hasattr(engine, "optimizer") or method == "mezo":
            kept[method] = engine
        timed = getattr(engine, "optimizer", engine)
        attr = "step" if hasattr(engine, "optimizer") else "_update"
        original = getattr(timed, attr, None)
        if original is not None:
            setattr(timed, attr, clock.timed(original))
        clock.seconds = 0.0
        t = time.perf_counter()
        try:
            engine.step([batch], args.lr)
        finally:
            if original is not None:
                setattr(timed, attr, original)
            if method not in kept:
                engine.close()
        return time.perf_counter() - t, clock.seconds

    rows = {m: {"method": m, "step_s": [], "update_s": []} for m in methods}
    for round_ in range(args.warmup + args.steps):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            step_s, update_s = one_step(method)
            if round_ >= args.warmup:
                rows[method]["step_s"].append(step_s)
                rows[method]["update_s"].append(update_s)
        print(f"  round {round_ + 1}: " + ", ".join(
            f"{m} {r['step_s'][-1]:.2f} s" for m, r in rows.items() if r["step_s"]
        ), flush=True)  # fmt: skip
    tokens = batch["input_ids"].numel()
    for r in rows.values():
        r["median_step_s"] = statistics.median(r["step_s"])
        r["median_update_s"] = statistics.median(r["update_s"]) if r["method"] != "mezo" else None
        r["tokens_per_s"] = tokens / r["median_step_s"]
        r["precision"] = precision
    return list(rows.values())


def interleaved_table(rows: list[dict]) -> str:
    by = {r["method"]: r for r in rows}
    against = [m for m in ("sgd", "adamw", "lomo") if m in by]
    lines = [
        "\n| method | median step s | update s/step | tokens/s | "
        + " | ".join(f"tokens/s vs {m}" for m in against) + " |",
        "|---|---|---|---|" + "---|" * len(against),
    ]  # fmt: skip
    for r in rows:
        ratios = " | ".join(ratio(r["tokens_per_s"], by[m]["tokens_per_s"]) for m in against)
        lines.append(
            f"| {r['method']} | {r['median_step_s']:.2f} | {update_s(r)} "
            f"| {r['tokens_per_s']:.0f} | {ratios} |"
        )
    return "\n".join(lines)


class UpdateClock:
    """Adds up the wall time of the calls it wraps (a CPU runs them synchronously)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.used = False

    def timed(self, fn):
        def wrapper(*a, **k):
            self.used = True
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t

        return wrapper


def count_tensor_bytes(step, model, tracked: list, batch: dict) -> dict:
    """One more step under MemTracker with real tensors: the peak of the bytes held by
    live tensor storages (what a GPU's allocator would count, less its rounding), free of
    malloc's caching and of the RSS of code and libraries. MemTracker only sees tensors
    created inside it or passed to `track_external`: the model, the batch, and state that
    was created earlier (optimizer state, AdaLomo's factored moments) are passed."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class Tracker(MemTracker):
        # MemTracker puts gradient hooks on every parameter it sees, which raises for a
        # frozen one (the 4-bit base of qlora-sgd), and its post-accumulate hook reads
        # p.grad after the fused engine's hook has already freed it: hook only trainable
        # parameters, and skip a gradient that is gone.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if not install_grad_hooks:
                return out

            def grad_hook(grad):
                if grad is not None:
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                    )
            return out

    try:
        tracker = Tracker()
        tracker.track_external(model, *tracked, *batch.values())
        TRACKER.append(tracker)
        try:
            with tracker:
                step()
        finally:
            TRACKER.clear()
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
        return {str(k.value if hasattr(k, "value") else k): int(v) for k, v in snap.items()}
    except Exception as e:  # the count is extra: report and go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def run_worker(method: str, precision: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--precision",
        precision,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--lr",
        str(args.lr),
        "--loss-chunk",
        str(args.loss_chunk),
        "--worker-out",
        out,
    ]
    if not args.count_tensors:
        cmd.append("--no-count-tensors")
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        return {
            "method": method,
            "precision": precision,
            "error": "\n".join(tail),
            "wall_s": wall,
        }
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["wall_s"] = wall
    return result


def budget_batches(methods: list[str], precision: str, args: argparse.Namespace) -> dict:
    """The largest batch of each method whose estimated GPU peak (`lomotune estimate`'s
    analytic count, CUDA overhead included) fits `--budget-gib`: the batch a GPU of that
    size would run. Variants count as the method they vary (a reference implementation
    as lomotune's; adamw-amp as AdamW on fp32 master weights)."""
    from lomotune.estimate import max_batch
    from lomotune.estimate.analytic import Setup
    from lomotune.estimate.shapes import resolve_config

    config = resolve_config(args.model)
    batches = {}
    for method in methods:
        if method == "no_grad":
            continue  # not a training method: the estimator has no row for it
        base = lomotune_method(method)
        amp = method == "adamw-amp"
        setup = Setup(base, 1, args.seq, precision="fp32" if amp else precision,
                      loss_chunk_tokens=args.loss_chunk, mixed_precision=amp)  # fmt: skip
        batches[method] = max_batch(config, setup, args.budget_gib)
    return batches


# ---------------------------------------------------------------------------------------
# Tables


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def update_s(r: dict) -> str:
    u = r.get("median_update_s")
    return "-" if u is None else f"{u:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def tensor_total(r: dict) -> int | None:
    t = r.get("tensors") or {}
    return t.get("Total")


def tensor_beyond(r: dict) -> int | None:
    t = r.get("tensors") or {}
    if "Total" not in t:
        return None
    return t["Total"] - t.get("Parameter", 0) - t.get("Buffer", 0)


def rss_beyond(r: dict | None) -> int | None:
    return None if r is None else r["peak"] - r["rss_loaded"]


def tables(results: list[dict]) -> str:
    lines = []
    by_precision: dict[str, list[dict]] = {}
    for r in results:
        by_precision.setdefault(r["precision"], []).append(r)
    for precision, rows in by_precision.items():
        ok = [r for r in rows if "error" not in r]
        ref = {r["method"]: r for r in ok}
        lines.append(f"\n### {precision}\n")
        lines.append(
            "| method | RSS loaded | peak RSS in steps | RSS beyond loaded | ru_maxrss "
            "| tensor peak (MemTracker) | tensors beyond weights "
            "| median (min) step s | update s/step | CPU s/step | tokens/s | loss first -> last |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                first = r["error"].strip().splitlines()[-1][:160]
                lines.append(f"| {r['method']} | failed: {first} |" + " |" * 10)
                continue
            total, beyond = tensor_total(r), tensor_beyond(r)
            lines.append(
                f"| {r['method']} (b{r['batch']}) | {gib(r['rss_loaded'])} | {gib(r['peak'])} "
                f"| {gib(rss_beyond(r))} | {gib(r['ru_maxrss'])} "
                f"| {gib(total) if total is not None else '-'} "
                f"| {gib(beyond) if beyond is not None else '-'} "
                f"| {r['median_step_s']:.2f} ({r['min_step_s']:.2f}) | {update_s(r)} "
                f"| {r['median_cpu_s']:.1f} "
                f"| {r['tokens_per_s']:.0f} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |"
            )
        lines.append(
            "\n(memory in GiB; tokens/s = tokens per step / median step time; update s/step: "
            "the time in the fused hooks' updates or in optimizer.step, median)\n"
        )
        lines.append(
            "| method | vs | peak RSS | RSS beyond loaded | tensor peak | tensors beyond weights "
            "| tokens/s | CPU s/step | update s/step |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for base_name in ("adamw", "no_grad", "mezo"):
            base = ref.get(base_name)
            if base is None:
                continue
            for r in ok:
                lines.append(
                    f"| {r['method']} | {base_name} "
                    f"| {ratio(r['peak'], base['peak'])} "
                    f"| {ratio(rss_beyond(r), rss_beyond(base))} "
                    f"| {ratio(tensor_total(r), tensor_total(base))} "
                    f"| {ratio(tensor_beyond(r), tensor_beyond(base))} "
                    f"| {ratio(r['tokens_per_s'], base['tokens_per_s'])} "
                    f"| {ratio(r['median_cpu_s'], base['median_cpu_s'])} "
                    f"| {ratio(r.get('median_update_s'), base.get('median_update_s'))} |"
                )
    return "\n".join(lines)


# The goals, each as (method, against, measure, target): read from one run.
GOALS = [
    ("lomo", "mezo", "peak", "<= 1.30"),
    ("adalomo", "mezo", "peak", "<= 1.30"),
    ("lomo", "lomo-ref", "tokens_per_s", ">= 1.05"),
    ("lomo", "sgd", "tokens_per_s", ">= 1.00"),
    ("lomo", "adamw", "tokens_per_s", ">= 1.05"),
    ("lomo", "adamw-amp", "tokens_per_s", "(for reference)"),
    ("adalomo", "adalomo-ref", "tokens_per_s", ">= 1.00"),
    # with --budget-gib, each at its own largest batch:
    ("lomo", "adamw", "tokens_per_s", ">= 2.00 at one --budget-gib"),
]


def goals_table(results: list[dict], budget: bool) -> str:
    """The ratios the goals name, where both methods of a pair ran without error."""
    lines = ["\n| precision | ratio | measured | goal |", "|---|---|---|---|"]
    for precision in dict.fromkeys(r["precision"] for r in results):
        ok = {r["method"]: r for r in results if r["precision"] == precision and "error" not in r}
        for method, against, measure, goal in GOALS:
            if method in ok and against in ok and (goal.endswith("budget-gib")) == budget:
                value = ratio(ok[method][measure], ok[against][measure])
                lines.append(f"| {precision} | {method} / {against} {measure} | {value} | {goal} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def floor_table(results: list[dict], args: argparse.Namespace) -> str:
    """Each fused method's measured tensor peak next to the parts of its floor, as
    `lomotune.estimate` counts them at the moment of its peak (phase named)."""
    from lomotune.estimate import estimate, shape_of
    from lomotune.estimate.analytic import Setup
    from lomotune.estimate.shapes import resolve_config

    shape = shape_of(resolve_config(args.model))
    lines = ["\n| method | precision | tensor peak measured | floor (estimate) | its parts (MiB) |"]
    lines.append("|---|---|---|---|---|")
    for r in results:
        if r["method"] not in ("lomo", "adalomo", "mezo") or "error" in r:
            continue
        setup = Setup(r["method"], args.batch, args.seq, precision=r["precision"],
                      loss_chunk_tokens=args.loss_chunk, device="cpu")  # fmt: skip
        e = estimate(shape, setup)
        parts = ", ".join(
            f"{k} {v / 2**20:.0f}" for k, v in e.parts.items() if k != "cuda_overhead"
        )
        total = tensor_total(r)
        lines.append(
            f"| {r['method']} | {r['precision']} | {gib(total) if total else '-'} "
            f"| {gib(e.tensor_bytes)} | {e.phase}: {parts} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# GPU memory without a GPU: FakeTensorMode + MemTracker


FAKE_METHODS = ["no_grad", "lomo", "adalomo", "mezo", "sgd", "adamw", "adam-mini"]


def llama_1b_config(layers: int = 16):
    """A ~1.1B Llama shape (TinyLlama's: hidden 2048, 32 heads / 8 kv heads, vocab 32000)
    with `layers` layers (16: 0.97B parameters, 22: TinyLlama's 1.1B)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
    )


def fake_1b(
    methods: list[str], batch: int, seq: int, layers: int, like: str | None, chunk: int
) -> list[dict]:
    """One training step of each method on a ~1.1B Llama, counted, not run.

    `lomotune.estimate.simulate.simulate_step`: lomotune's own engines
    (`FusedEngine.step`, `MezoEngine.step`, `OptimizerEngine.step`) and loss
    (`causal_lm_loss`) run unchanged on a model built under FakeTensorMode, counted by
    MemTracker; see that module for how values that fake tensors lack are answered.
    Byte counts are exact element counts x sizes, without the CUDA allocator's rounding,
    the CUDA context and cuBLAS workspaces (~0.5-1 GiB on a real GPU).
    """
    config = llama_1b_config(layers)
    if like is not None:
        # The shape of a real model (e.g. smollm2-135m, to check the count against
        # MemTracker on real tensors: the `tensor peak` column of the CPU bench), or of
        # one the estimator knows by name (llama-7b).
        from lomotune.estimate.shapes import resolve_config

        config = resolve_config(like)
        config.use_cache = False

    return _fake_runs(methods, batch, seq, config, chunk)


def _fake_runs(methods, batch, seq, config, chunk) -> list[dict]:
    from lomotune.estimate.simulate import simulate_step

    results = []
    for method in methods:
        started = time.perf_counter()
        try:
            sim = simulate_step(
                config, method, batch_size=batch, seq_len=seq, loss_chunk_tokens=chunk
            )
            row = {
                "method": method,
                "params": _param_count(config),
                "peak": sim.peak_bytes,
                "breakdown_at_peak": sim.parts,
            }
        except Exception as e:  # report, go on with the next method
            import traceback

            row = {
                "method": method,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "traceback": traceback.format_exc()[-3000:],
            }
        row["seconds"] = time.perf_counter() - started
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    return results


def _param_count(config) -> int:
    from lomotune.estimate import shape_of

    return shape_of(config).params()


def fake_table(rows: list[dict]) -> str:
    ok = {r["method"]: r for r in rows if "error" not in r}
    weights = None
    if ok:
        any_row = next(iter(ok.values()))
        weights = any_row["params"] * 2
    adamw, no_grad = ok.get("adamw"), ok.get("no_grad")
    lines = [
        "| method | peak (GiB) | beyond bf16 weights (GiB) | peak / no_grad | peak / adamw "
        "| at the peak: weights / grads / optimizer state / activations+temp (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:150]} | | | | |")
            continue
        bd = r["breakdown_at_peak"]
        parts = "{:.2f} / {:.2f} / {:.2f} / {:.2f}".format(
            (bd.get("Parameter", 0) + bd.get("Buffer", 0)) / GiB,
            bd.get("Gradient", 0) / GiB,
            bd.get("Optstate", 0) / GiB,
            (bd.get("Activation", 0) + bd.get("Temp", 0) + bd.get("Other", 0)) / GiB,
        )
        lines.append(
            f"| {r['method']} | {gib(r['peak'])} | {gib(r['peak'] - weights)} "
            f"| {ratio(r['peak'], no_grad and no_grad['peak'])} "
            f"| {ratio(r['peak'], adamw and adamw['peak'])} | {parts} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods",
        help=f"comma list of {METHODS} (default: all); with --fake-1b of {FAKE_METHODS}",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="bf16", help="bf16, fp32, or a comma list")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--loss-chunk",
        type=int,
        help="model.loss_chunk_tokens (default: the recipe's default)",
    )
    p.add_argument("--json", help="write every number measured here")
    p.add_argument(
        "--budget-gib",
        type=float,
        help="run each method at the largest batch its estimated GPU peak fits in this "
        "many GiB (instead of --batch)",
    )
    p.add_argument(
        "--no-count-tensors",
        dest="count_tensors",
        action="store_false",
        help="skip the extra step that counts live tensor bytes with MemTracker",
    )
    p.add_argument("--fake-1b", action="store_true", help="count GPU memory of a ~1.1B Llama step")
    p.add_argument("--fake-layers", type=int, default=16)
    p.add_argument(
        "--fake-like", help="count a real model's shape instead (a model name, e.g. smollm2-135m)"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="speed only: every method's steps alternating in one process (of "
        f"{INTERLEAVED_METHODS}), so that the machine's drift falls on all alike",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loss_chunk is None:
        from lomotune.recipe import ModelConfig

        args.loss_chunk = ModelConfig().loss_chunk_tokens

    if args.worker:
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return

    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    if args.fake_1b:
        unknown = [m for m in methods if m not in FAKE_METHODS]
        if unknown:
            p.error(f"--fake-1b counts {FAKE_METHODS}; not {unknown}")
        methods = methods or FAKE_METHODS
        started = time.perf_counter()
        rows = fake_1b(
            methods, args.batch, args.seq, args.fake_layers, args.fake_like, args.loss_chunk
        )
        print()
        shape = (
            f"the shape of {args.fake_like}"
            if args.fake_like
            else f"Llama hidden 2048, {args.fake_layers} layers, 32 heads / 8 kv heads, "
            "intermediate 5632, vocab 32000, untied"
        )
        print(
            f"Counted under FakeTensorMode + MemTracker: {shape}; bf16; batch {args.batch} x "
            f"{args.seq}; activation checkpointing (non-reentrant); loss chunks of {args.loss_chunk} tokens"
        )
        print(fake_table(rows))
        print(f"\n(total {time.perf_counter() - started:.0f} s)")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"lomotune": library_version(), "fake_1b": rows}, indent=1)
            )
        return

    if args.interleave:
        methods = methods or ["lomo", "sgd", "adamw"]
        unknown = [m for m in methods if m not in INTERLEAVED_METHODS]
        if unknown:
            p.error(f"--interleave runs {INTERLEAVED_METHODS}; not {unknown}")
        started = time.perf_counter()
        print(
            f"bench --interleave: {args.model}, batch {args.batch} x {args.seq}, loss chunk "
            f"{args.loss_chunk}, {args.warmup} warmup + {args.steps} measured rounds of "
            f"{', '.join(methods)}; lomotune {library_version()}",
            flush=True,
        )
        rows = [
            r for precision in args.precision.split(",")
            for r in speed_interleaved(methods, precision, args)
        ]  # fmt: skip
        print(interleaved_table(rows))
        print(
            f"\n(total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f})"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"lomotune": library_version(), "interleaved": rows}, indent=1)
            )
        return

    methods = methods or METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {METHODS}")
    import torch

    header = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "lomotune": library_version(),
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"bench: {args.model}, batch {args.batch} x {args.seq} random tokens, labels on all, "
        f"activation checkpointing on, loss chunk {args.loss_chunk} tokens, {args.warmup} warmup + {args.steps} measured steps, "
        f"each method in its own process; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"lomotune {header['lomotune']}",
        flush=True,
    )
    results = []
    started = time.perf_counter()
    for precision in args.precision.split(","):
        batches = budget_batches(methods, precision, args) if args.budget_gib else {}
        if batches:
            print(f"  largest batch in {args.budget_gib} GiB (estimated): {batches}", flush=True)
        for method in methods:
            if batches.get(method, 1) == 0:
                print(f"  {precision} {method}: batch 1 does not fit {args.budget_gib} GiB")
                continue
            batch = batches.get(method, args.batch)
            r = run_worker(method, precision, argparse.Namespace(**{**vars(args), "batch": batch}))
            results.append(r)
            if "error" in r:
                print(
                    f"  {precision} {method:10s} FAILED ({r['wall_s']:.0f} s):\n{r['error']}",
                    flush=True,
                )
            else:
                print(
                    f"  {precision} {method:10s} loaded {gib(r['rss_loaded'])} GiB, peak {gib(r['peak'])} GiB, "
                    f"median step {r['median_step_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s "
                    f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
    total = time.perf_counter() - started
    header["loadavg_end"] = os.getloadavg()
    print("\n" + "\n".join(f"- {m}: {DESCRIPTIONS[m]}" for m in methods))
    print(tables(results))
    print(floor_table(results, args))
    print(goals_table(results, budget=bool(args.budget_gib)))
    print(
        f"\n(total {total:.0f} s; load average {header['loadavg_start'][0]:.1f} at the start, "
        f"{header['loadavg_end'][0]:.1f} at the end: other processes share these cores)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({**header, "total_s": total, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()

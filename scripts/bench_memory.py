#!/usr/bin/env python
"""Memory and speed of every method, side by side, each method in its own process.

    python scripts/bench_memory.py                            # all methods, bf16, 4 x 512
    python scripts/bench_memory.py --methods lomo,adamw --steps 3 --json /tmp/bench.json

The rows are the methods of lomotune/methods.py and their variants (bench_common.py).
What one row's measurement is (each in its OWN subprocess, one after another, never
concurrently: process RSS never shrinks, so a comparison inside one process would charge
each method with its predecessors' high-water mark):

1. load the model as a recipe does (`lomotune.models.load_model`, activation
   checkpointing on, non-reentrant), in fp32 for a method that keeps fp32 master
   weights; qlora-sgd loads the base in 4-bit NF4 with double quantization, and the
   adapter methods add LoRA adapters (`lomotune.lora.add_lora_adapters`, r=64, alpha=16,
   all linear layers), as `lomotune train` does;
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
compare speed with bench_speed.py (the methods' steps alternating in one process, so the
drift falls on all alike). "update s/step" is the engine's `update_seconds`: the time in
the fused hooks' updates or in optimizer.step, where the methods differ at all.
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

from bench_common import (
    FORWARD_ONLY,
    REFERENCES,
    ROWS,
    add_run_options,
    bench_recipe,
    chosen_rows,
    describe,
    gib,
    library_version,
    method_of,
    parse,
    parser,
    random_batch,
    ratio,
    update_s,
    weights_precision,
)

from lomotune import methods

TRACKER: list = []  # the MemTracker counting the current step, if any

# The methods that keep neither gradients nor optimizer state of the whole model (fused
# or zeroth-order, on full weights): the floor of their peak is what the goals are about.
FLOOR_METHODS = tuple(
    n for n, m in methods.REGISTRY.items() if m.engine != "optimizer" and not m.trains_adapters_only
)


# ---------------------------------------------------------------------------------------
# One method, in its own process


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    from lomotune.allocator import return_freed_memory
    from lomotune.loss import causal_lm_loss
    from lomotune.models import count_parameters, load_model
    from lomotune.monitor import MemoryMeter
    from lomotune.recipe import LoraConfig, ModelConfig

    return_freed_memory()  # as `lomotune train` does on a CPU
    row, precision = args.worker, args.precision
    entry = None if row == FORWARD_ONLY else method_of(row)[0]
    torch.manual_seed(0)
    meter = MemoryMeter("cpu")
    gc.collect()
    rss_start = meter.sample()

    cfg = ModelConfig(
        name=args.model,
        precision=precision,
        activation_checkpointing=True,
        loss_chunk_tokens=args.loss_chunk,
    )
    device = torch.device("cpu")
    t0 = time.perf_counter()
    weights = cfg.model_copy(update={"precision": weights_precision(row, precision)})
    loaded = load_model(weights, device, quantize_4bit=entry is not None and entry.quantized_base)
    model = loaded.model
    if entry is not None and entry.trains_adapters_only:
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
        return causal_lm_loss(model, b, chunk)

    lr = args.lr
    engine = None  # timed: its update_seconds
    tracked: list = []  # state created before the tensor count that it must include
    if row == FORWARD_ONLY:

        def step() -> float:
            with torch.no_grad():
                s, n = loss_fn(batch)
            return float(s) / n

    elif row.endswith("-ref"):
        import lomo_optim

        reference = REFERENCES[entry.name]
        if reference == "AdaLomo" and not torch.cuda.is_available():
            raise SystemExit("lomo_optim.AdaLomo 0.1.1 creates its state with .cuda(): GPU only")

        opt = getattr(lomo_optim, reference)(model, lr=lr)
        tracked.append(opt)

        def step() -> float:
            s, n = loss_fn(batch)
            loss = s / n
            value = float(loss.detach())
            opt.fused_backward(loss, lr)
            return value

    else:
        from lomotune.optim import build_engine

        engine = build_engine(bench_recipe(cfg, row, args), model, loss_fn)
        if hasattr(engine, "optimizer"):
            tracked.append(engine.optimizer)
        for st in getattr(engine, "states", []):
            tracked += list(st.values())

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
        if engine is not None:
            engine.update_seconds = 0.0
        losses.append(step())
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        update_times.append(engine.update_seconds if engine is not None else None)
    peak = meter.peak_bytes()
    meter.stop()
    median = statistics.median(times)
    tensors = count_tensor_bytes(step, model, tracked, batch) if args.count_tensors else None
    return {
        "method": row,
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
        "median_update_s": statistics.median(update_times) if engine is not None else None,
        "tokens_per_s": tokens / median,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


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


def budget_batches(rows: list[str], precision: str, args: argparse.Namespace) -> dict:
    """The largest batch of each row whose estimated GPU peak (`lomotune estimate`'s
    analytic count, CUDA overhead included) fits `--budget-gib`: the batch a GPU of that
    size would run. Variants count as the method they vary (a reference implementation
    as lomotune's; -amp as the method on fp32 master weights)."""
    from lomotune.estimate import max_batch
    from lomotune.estimate.analytic import Setup
    from lomotune.estimate.shapes import resolve_config

    config = resolve_config(args.model)
    batches = {}
    for row in rows:
        if row == FORWARD_ONLY:
            continue  # not a training method: the estimator has no row for it
        entry, suffix = method_of(row)
        amp = suffix == "-amp"
        setup = Setup(entry.name, 1, args.seq, precision="fp32" if amp else precision,
                      loss_chunk_tokens=args.loss_chunk, mixed_precision=amp)  # fmt: skip
        batches[row] = max_batch(config, setup, args.budget_gib)
    return batches


# ---------------------------------------------------------------------------------------
# Tables


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
    """Each fused (or zeroth-order) method's measured tensor peak next to the parts of its
    floor, as `lomotune.estimate` counts them at the moment of its peak (phase named)."""
    from lomotune.estimate import estimate, shape_of
    from lomotune.estimate.analytic import Setup
    from lomotune.estimate.shapes import resolve_config

    shape = shape_of(resolve_config(args.model))
    lines = ["\n| method | precision | tensor peak measured | floor (estimate) | its parts (MiB) |"]
    lines.append("|---|---|---|---|---|")
    for r in results:
        if r["method"] not in FLOOR_METHODS or "error" in r:
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


def main() -> None:
    p = parser(__doc__, f"comma list of {list(ROWS)} (default: all)")
    add_run_options(p)
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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parse(p)

    if args.worker:
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return

    rows = chosen_rows(p, args, ROWS, ROWS, "this benchmark runs")
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
        batches = budget_batches(rows, precision, args) if args.budget_gib else {}
        if batches:
            print(f"  largest batch in {args.budget_gib} GiB (estimated): {batches}", flush=True)
        for method in rows:
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
    print("\n" + "\n".join(f"- {m}: {describe(m)}" for m in rows))
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

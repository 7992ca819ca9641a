#!/usr/bin/env python
"""Speed of several methods, their steps alternating in one process on one model.

    python scripts/bench_speed.py --methods lomo,sgd,adamw --precision fp32

Speed on a 2-core CPU drifts 5-10 % between runs minutes apart, more than methods differ:
here every method's steps alternate (in order in even rounds, reversed in odd ones), so
that the drift falls on all alike. Memory is not measured here (bench_memory.py measures
it, each method in its own process). "update s/step" is the engine's `update_seconds`:
the time in the fused hooks' updates or in optimizer.step, where the methods differ at
all. The batch, the loss and the recipe of each method are bench_memory.py's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_common import (
    FORWARD_ONLY,
    ROWS,
    add_run_options,
    bench_recipe,
    chosen_rows,
    library_version,
    method_of,
    parse,
    parser,
    random_batch,
    ratio,
    update_s,
    weights_precision,
    write_json,
)

DEFAULT = ["lomo", "sgd", "adamw-pure"]


def interleaved(precision: str) -> list[str]:
    """The rows whose steps can alternate on one model: a plain model (no 4-bit base, no
    adapters) with its weights in `precision`, and hooks that are removed between steps
    (lomo_optim's cannot be)."""
    out = []
    for row in ROWS:
        if row == FORWARD_ONLY or row.endswith("-ref"):
            continue
        entry = method_of(row)[0]
        plain = not entry.quantized_base and not entry.trains_adapters_only
        if plain and weights_precision(row, precision) == precision:
            out.append(row)
    return out


def speed_interleaved(methods: list[str], precision: str, args: argparse.Namespace) -> list[dict]:
    """Step time of each method in ONE process, on one model, the methods' steps
    alternating (in order in even rounds, reversed in odd ones), so that the machine's
    drift over minutes (step times here move 5-10 % between runs of the same code) falls
    on every method alike. Memory is not measured here (see the per-process rows). A
    fused engine is built for each of its steps and its hooks removed after it; the
    others keep their state. All of them update the same weights."""
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

    def one_step(method: str) -> tuple[float, float]:
        engine = kept.get(method) or build_engine(bench_recipe(cfg, method, args), model, loss_fn)
        fused = method_of(method)[0].fused
        if not fused:
            kept[method] = engine
        engine.update_seconds = 0.0
        t = time.perf_counter()
        try:
            engine.step([batch], args.lr)
        finally:
            if fused:
                engine.close()
        return time.perf_counter() - t, engine.update_seconds

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
        zeroth_order = method_of(r["method"])[0].engine == "zeroth-order"
        r["median_step_s"] = statistics.median(r["step_s"])
        r["median_update_s"] = None if zeroth_order else statistics.median(r["update_s"])
        r["tokens_per_s"] = tokens / r["median_step_s"]
        r["precision"] = precision
    return list(rows.values())


def interleaved_table(rows: list[dict]) -> str:
    by = {r["method"]: r for r in rows}
    against = [m for m in ("sgd", "adamw", "adamw-pure", "lomo") if m in by]
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


def main() -> None:
    p = parser(
        __doc__,
        f"comma list of {interleaved('fp32')} at fp32 (below it, the methods with fp32 "
        f"master weights need their own model: bench_memory.py) (default: {DEFAULT})",
    )
    add_run_options(p)
    args = parse(p)
    precisions = args.precision.split(",")
    known = [
        row for row in interleaved(precisions[0]) if all(row in interleaved(q) for q in precisions)
    ]
    methods = chosen_rows(p, args, known, DEFAULT, f"at {args.precision} this benchmark runs")
    started = time.perf_counter()
    print(
        f"bench --interleave: {args.model}, batch {args.batch} x {args.seq}, loss chunk "
        f"{args.loss_chunk}, {args.warmup} warmup + {args.steps} measured rounds of "
        f"{', '.join(methods)}; lomotune {library_version()}",
        flush=True,
    )
    rows = [
        r for precision in precisions
        for r in speed_interleaved(methods, precision, args)
    ]  # fmt: skip
    print(interleaved_table(rows))
    print(f"\n(total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f})")
    write_json(args.json, "interleaved", rows)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Loss after K steps on the quickstart task, per method, side by side.

    python scripts/convergence.py                       # every method, 200 steps each
    python scripts/convergence.py --steps 60 --methods lomo,adalomo,adamw
    python scripts/convergence.py --methods adamw@fp32 --lr adamw@fp32=3e-5

Each method is one `lomotune train recipes/quickstart.yaml ...` run (the CLI, in its own
process, one after another), with only these keys overridden:

    optimizer.name, optimizer.lr (per method, below), model.precision (per method),
    training.max_steps=K, training.output_dir=<--out>/<method>, training.save_every=0
    (one checkpoint, at the end), training.eval_every=0 and training.eval_batches=null
    (one eval-loss pass over the whole held-out split, at the end),
    optimizer.lora.r=64 for qlora-sgd (LoRA r=64, alpha=16, all linear layers)

so the data (builtin:dates, 1000 examples, 10% held out), the batch size (8), the
schedule (cosine, 3 warmup steps) and the seed are the quickstart's. A method may be
written `name@precision` to run it in another precision (e.g. `adamw@fp32`).

Default learning rates, from the papers and the quickstart (a method not listed here
runs at its registry default, `lomotune/methods.py`):
- lomo 3e-3: the quickstart's (DESIGN.md: 30/40 after 30 bf16 steps);
- sgd 3e-3: the same update as lomo, applied after the full backward (torch.optim.SGD,
  no stochastic rounding of bf16 weights);
- adalomo 1e-3: AdaLomo's update has RMS <= 1 and is scaled by RMS(theta), so lr is a
  relative step size; the paper and lomo_optim default sit at 5e-4..1e-3;
- mezo 1e-6 in fp32, eps 1e-3: the MeZO paper's full-parameter setting; its runs take
  tens of thousands of steps, so a few hundred do not move the loss much (and bf16
  weights would add a random walk on every perturb/restore: see optim/mezo.py);
- qlora-sgd: its default (only the adapters train, LoRA B starts at zero and alpha/r
  is 0.25, so plain SGD needs a step far larger than full fine-tuning's);
- adamw, adamw-pure, adam-mini 3e-5: usual full fine-tuning values. adamw-pure keeps
  bf16 weights where the precision is bf16, and an Adam step of ~lr per weight is below
  bf16's resolution for most of them: it is the form that loses updates to rounding.

Every method runs in the quickstart's precision, `auto` (bf16 where the machine computes
it natively, fp32 elsewhere; the table shows which), except mezo (fp32).

Output: a table of first/final train loss (mean of the last 10 steps, and the
dashboard's smoothed EMA), eval loss on the held-out split, held-out exact match before
and after (40 examples, greedy), median step time and peak RSS; `--json OUT` keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_common import library_version  # scripts/ is on sys.path when run as a script

from lomotune import methods

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"
METHODS = list(methods.NAMES)
# The quickstart's measured lrs; a method not listed runs at its registry default.
QUICKSTART_LR = {
    "lomo": 3e-3,
    "sgd": 3e-3,
    "adalomo": 1e-3,
    "mezo": 1e-6,
    "adamw": 3e-5,
    "adamw-pure": 3e-5,
    "adam-mini": 3e-5,
}
# Everything else runs in the quickstart's own precision (auto: bf16 where the machine
# computes it natively, fp32 elsewhere), as a user's quickstart does.
DEFAULT_PRECISION = {"mezo": "fp32"}


def parse_map(text: str | None) -> dict[str, str]:
    out = {}
    for item in (text or "").split(","):
        if item.strip():
            key, value = item.split("=", 1)
            out[key.strip()] = value.strip()
    return out


# bitsandbytes 0.50 on a CPU with AVX-512 BF16: the first eval-mode, no-grad forward of a
# Linear4bit (the held-out exact match before training, any eval loss) repacks its weight
# for CPU inference, for good; from then on its matmul (gemv_4bit) has no autograd kernel,
# so no gradient flows back through the frozen base, and the double quantization is
# undone. --bnb-no-repack runs the CLI with bitsandbytes told that the CPU lacks AVX-512
# BF16, which keeps the training path (a workaround here; the fix belongs in lomotune).
NO_REPACK = (
    "import bitsandbytes.nn.modules as m; m.has_avx512bf16 = lambda: False; "
    "from lomotune.cli import main; main()"
)


def lomotune_command(no_repack: bool = False) -> list[str]:
    if no_repack:
        return [sys.executable, "-c", NO_REPACK]
    exe = Path(sys.executable).parent / "lomotune"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from lomotune.cli import main; main()"]


def run_method(spec: str, args: argparse.Namespace, lrs: dict, extra: list[str]) -> dict:
    name, _, precision = spec.partition("@")
    precision = precision or DEFAULT_PRECISION.get(name, "auto")
    lr = float(lrs.get(spec, lrs.get(name, QUICKSTART_LR.get(name, methods.method(name).lr))))
    no_repack = args.bnb_no_repack and methods.method(name).quantized_base
    label = spec + (" (no bnb CPU repack)" if no_repack else "")
    out_dir = Path(args.out) / (spec.replace("@", "-") + ("-norepack" if no_repack else ""))
    overrides = [
        f"optimizer.name={name}",
        f"optimizer.lr={lr:g}",
        f"model.precision={precision}",
        f"training.max_steps={args.steps}",
        f"training.output_dir={out_dir}",
        "training.save_every=0",
        "training.keep_checkpoints=1",
        "training.eval_every=0",
        "training.eval_batches=null",
    ]
    if methods.method(name).trains_adapters_only:
        overrides.append("optimizer.lora.r=64")
    overrides += extra
    cmd = [*lomotune_command(no_repack), "train", str(RECIPE), *overrides, "--plain", "--overwrite"]
    log = out_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - started
    row = {
        "method": label,
        "lr": lr,
        "precision": precision,
        "steps": args.steps,
        "wall_s": wall,
        "command": " ".join(["lomotune", "train", "recipes/quickstart.yaml", *overrides]),
        "log": str(log),
    }
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-8:]
        row["error"] = f"exit {done.returncode}: " + " | ".join(tail)
        return row
    summary = json.loads((out_dir / "summary.json").read_text())
    # the precision `auto` chose on this machine, as the run saved its recipe
    resolved = yaml.safe_load((out_dir / "recipe.yaml").read_text())["model"]["precision"]
    if resolved != precision:
        row["precision"] = f"{precision} ({resolved})"
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    after = next((r for r in records if r["kind"] == "eval" and "accuracy_after" in r), {})
    losses = [r["loss"] for r in train]
    times = [r["step_time"] for r in train]
    row.update(
        first_loss=losses[0],
        last10_loss=statistics.fmean(losses[-10:]),
        ema_loss=summary.get("final_loss"),
        eval_loss=summary.get("eval_loss"),
        accuracy_before=summary.get("accuracy_before"),
        accuracy_after=summary.get("accuracy_after"),
        correct_after=after.get("correct"),
        total=after.get("total"),
        median_step_s=statistics.median(times),
        train_s=sum(times),
        peak_rss=summary.get("peak_memory"),
        skipped_steps=summary.get("skipped_steps"),
    )
    if not args.keep:
        # the final model and checkpoint (up to 3x the weights for adamw): not needed here
        shutil.rmtree(out_dir / "model", ignore_errors=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return row


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| method | precision | lr | steps | train loss first -> last 10 (EMA) | eval loss "
        "| exact match before -> after | median s/step | peak RSS (GiB) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['precision']} | {r['lr']:g} | {r['steps']} "
                f"| failed: {r['error'][:200]} | | | | | |"
            )
            continue
        total = r.get("total") or 0
        before = r["accuracy_before"]
        after = r["accuracy_after"]
        em = (
            f"{round(before * total)}/{total} -> {r['correct_after']}/{total}"
            if total and before is not None and after is not None
            else "-"
        )
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['lr']:g} | {r['steps']} "
            f"| {fmt(r['first_loss'])} -> {fmt(r['last10_loss'])} ({fmt(r['ema_loss'])}) "
            f"| {fmt(r['eval_loss'])} | {em} | {fmt(r['median_step_s'], '.2f')} "
            f"| {fmt(r['peak_rss'] / 1024**3 if r['peak_rss'] else None, '.2f')} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list; name or name@precision"
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", help="per-method lr overrides: lomo=3e-3,adamw@fp32=1e-5")
    p.add_argument("--out", default="/tmp/lomotune-convergence", help="one folder per method")
    p.add_argument("--keep", action="store_true", help="keep each run's final model and checkpoint")
    p.add_argument("--json", help="write the rows here")
    p.add_argument(
        "--bnb-no-repack",
        action="store_true",
        help="qlora-sgd: keep bitsandbytes from repacking 4-bit weights for CPU inference "
        "(which drops their gradient; see NO_REPACK)",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args()
    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    for spec in specs:
        name = spec.partition("@")[0]
        if name not in METHODS:
            p.error(f"unknown method {name!r}; known: {METHODS}")
    lrs = parse_map(args.lr)
    print(
        f"convergence: recipes/quickstart.yaml, {args.steps} steps per method, "
        f"runs under {args.out}; {os.cpu_count()} CPUs; lomotune {library_version()}",
        flush=True,
    )
    rows = []
    started = time.perf_counter()
    for spec in specs:
        row = run_method(spec, args, lrs, args.overrides)
        rows.append(row)
        if "error" in row:
            print(f"  {spec:12s} FAILED ({row['wall_s']:.0f} s): {row['error']}", flush=True)
        else:
            print(
                f"  {spec:12s} loss {row['first_loss']:.3f} -> {row['last10_loss']:.3f}, "
                f"eval {fmt(row['eval_loss'])}, exact match "
                f"{fmt(row['accuracy_before'], '.0%')} -> {fmt(row['accuracy_after'], '.0%')} "
                f"({row['wall_s']:.0f} s)",
                flush=True,
            )
    total = time.perf_counter() - started
    print()
    print(table(rows))
    print(f"\n(total {total:.0f} s)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"lomotune": library_version(), "total_s": total, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()

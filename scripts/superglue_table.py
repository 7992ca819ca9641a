"""The papers' SuperGLUE table in miniature: zero-shot and every method x task, each cell
one shipped recipe trained with `lomotune train` and scored with `lomotune eval` (the
harness protocol), as a user would run them.

    python scripts/superglue_table.py --superglue-dir ../shared/superglue
    python scripts/superglue_table.py --superglue-dir ../shared/superglue --holdout
    python scripts/superglue_table.py ... --tasks cb,copa --methods lomo,adamw \\
        --set optimizer.lr=3e-2 --tag lr3e-2       # a sweep point, its own cells
    python scripts/superglue_table.py ... --write BENCHMARKS.md

`--holdout` (for choosing settings): a part of each train split is held out (a fixed,
seeded sample, as large as the task's val split, a fifth of train or 300 examples, the
smallest), the recipes train on
the rest and are scored on it; the val splits are never read. Without it, the recipes
train on the train split and are scored on val; a task whose folder has no val split is
left out and says so.

Resumable: each cell is a JSON file under --out (cells/<task>-<method>[-tag].json); a cell
already there is not run again, so the table fills over several sittings (delete a cell's
file to run it again). The markdown names the CPU, the date and the commit of each cell.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from superglue_recipes import METHODS, TASKS  # noqa: E402

ZERO_SHOT = "zero-shot"
BEGIN, END = "<!-- superglue-table:begin -->", "<!-- superglue-table:end -->"
HOLDOUT_SEED = 1234


def cpu_model() -> str:
    """lscpu's model name, with whether the CPU computes in bf16 natively."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    bf16 = "avx512_bf16" in fields.get("Flags", "") or "amx_bf16" in fields.get("Flags", "")
    return f"{name} ({'AVX-512 BF16' if bf16 else 'no native bf16'}, {fields.get('CPU(s)', '?').strip()} CPUs)"


def commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "lomotune"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return (run.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def holdout_folder(superglue: Path, out: Path, tasks: list[str]) -> Path:
    """out/holdout/<TASK>/{train,val}.jsonl: the train split less a held-out sample, and
    that sample as 'val'. The official layout only (one JSON object a line)."""
    folder = out / "holdout"
    for name in tasks:
        task = TASKS[name]
        lines = (superglue / task.folder / "train.jsonl").read_text().splitlines()
        lines = [line for line in lines if line.strip()]
        held = min(task.val, len(lines) // 5, 300)  # 300: WiC's scoring stays short
        order = list(range(len(lines)))
        random.Random(HOLDOUT_SEED).shuffle(order)
        keep = set(order[:held])
        target = folder / task.folder
        target.mkdir(parents=True, exist_ok=True)
        (target / "train.jsonl").write_text(
            "".join(lines[i] + "\n" for i in range(len(lines)) if i not in keep)
        )
        (target / "val.jsonl").write_text("".join(lines[i] + "\n" for i in sorted(keep)))
    return folder


def run_cell(
    task: str, method: str, data: Path, out: Path, extra: list[str], tag: str, model: str
) -> dict:
    """Train (unless zero-shot) and score one cell; returns its record."""
    name = f"superglue-{task}-{method}"
    run_dir = out / "runs" / (name + (f"-{tag}" if tag else ""))
    started = time.perf_counter()
    log = out / "logs" / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if method != ZERO_SHOT:
        recipe = ROOT / "lomotune" / "recipes" / f"{name}.yaml"
        cmd = [sys.executable, "-m", "lomotune.cli", "train", str(recipe),
               f"model.name={model}", f"data.superglue_dir={data}",
               f"training.output_dir={run_dir}", *extra,
               "--plain", "--overwrite"]  # fmt: skip
        with log.open("w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"{name}: lomotune train exited {done.returncode}; see {log}")
        model = str(run_dir)
    trained = time.perf_counter() - started
    scores = out / "logs" / f"{run_dir.name}.eval.json"
    cmd = [sys.executable, "-m", "lomotune.cli", "eval", "--model", model, "--tasks", task,
           "--data-dir", str(data), "--output", str(scores), "--overwrite"]  # fmt: skip
    with log.open("a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{name}: lomotune eval exited {done.returncode}; see {log}")
    result = json.loads(scores.read_text())["results"][task]
    return {
        "task": task,
        "method": method,
        "metrics": {k: v for k, v in result.items() if isinstance(v, int | float)},
        "train_s": round(trained, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "overrides": extra,
        "tag": tag,
        "cpu": cpu_model(),
        "date": date.today().isoformat(),
        "commit": commit(),
    }


def markdown(cells: list[dict], title: str, command: str) -> str:
    tasks = [t for t in TASKS if any(c["task"] == t for c in cells)]
    rows = [ZERO_SHOT, *METHODS]
    by = {(c["task"], c["method"]): c for c in cells}
    head = "| method | " + " | ".join(
        "CB acc / F1" if t == "cb" else f"{t.upper()} acc" for t in tasks
    )
    lines = [f"### {title}", "", f"Command: `{command}`", "",
             head + " | average acc |", "|---" * (len(tasks) + 2) + "|"]  # fmt: skip
    for method in rows:
        got = [by.get((t, method)) for t in tasks]
        if not any(got):
            continue
        shown = []
        for t, c in zip(tasks, got, strict=True):
            if c is None:
                shown.append("-")
                continue
            m = c["metrics"]
            text = f"{100 * m['acc']:.1f}"
            if t == "cb" and "f1" in m:
                text += f" / {100 * m['f1']:.1f}"
            shown.append(text)
        accs = [c["metrics"]["acc"] for c in got if c]
        average = f"{100 * sum(accs) / len(accs):.1f}" if len(accs) == len(tasks) else "-"
        lines.append(f"| {method} | " + " | ".join(shown) + f" | {average} |")
    lines += ["", "Wall time per cell (train + eval), with the machine, date and commit:", "",
              "| cell | train s | total s | CPU | date | commit | overrides |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        lines.append(
            f"| {c['task']} {c['method']} | {c['train_s']} | {c['total_s']} | {c['cpu']} | "
            f"{c['date']} | {c['commit']} | {' '.join(c['overrides']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the text between the table's markers in `path` (appended when absent)."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--superglue-dir", type=Path, required=True, help="official layout")
    p.add_argument("--holdout", action="store_true", help="tune: score a held-out part of train")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join([ZERO_SHOT, *METHODS]))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every trained cell (a sweep point)")  # fmt: skip
    p.add_argument("--tag", default="", help="names the cells of a sweep point apart")
    p.add_argument("--model", default="smollm2-135m", help="the base model of every cell")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "superglue-table")
    p.add_argument("--write", type=Path, help="put the table into this markdown file")
    p.add_argument("--only-table", action="store_true", help="run nothing; print the table")
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [t for t in tasks if t not in TASKS] + [
        m for m in names if m != ZERO_SHOT and m not in METHODS
    ]
    if unknown:
        p.error(f"unknown {', '.join(unknown)}; tasks: {', '.join(TASKS)}; methods: "
                f"{ZERO_SHOT}, {', '.join(METHODS)}")  # fmt: skip
    out = args.out / ("holdout" if args.holdout else "val")
    if args.holdout:
        data = holdout_folder(args.superglue_dir, out, tasks)
    else:
        data = args.superglue_dir
        missing = [t for t in tasks if not (data / TASKS[t].folder / "val.jsonl").exists()]
        for t in missing:
            print(f"{t}: no {TASKS[t].folder}/val.jsonl in {data}: left out", file=sys.stderr)
        tasks = [t for t in tasks if t not in missing]
    suffix = f"-{args.tag}" if args.tag else ""
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for method in names:
            cell = cells_dir / f"{task}-{method}{'' if method == ZERO_SHOT else suffix}.json"
            if cell.exists() or args.only_table:
                continue
            print(f"{task} {method}{suffix} ...", flush=True)
            zero = method == ZERO_SHOT
            record = run_cell(task, method, data, out, [] if zero else args.set,
                              "" if zero else args.tag, args.model)  # fmt: skip
            cell.write_text(json.dumps(record, indent=1))
            print(f"  acc {record['metrics'].get('acc', float('nan')):.3f} "
                  f"in {record['total_s']:.0f} s", flush=True)  # fmt: skip
    cells = [json.loads(f.read_text()) for f in sorted(cells_dir.glob("*.json"))]
    cells = [c for c in cells if c["task"] in tasks and c["method"] in names
             and (c["method"] == ZERO_SHOT or c["tag"] == args.tag)]  # fmt: skip
    split = "held-out part of train" if args.holdout else "val split"
    command = "python scripts/superglue_table.py " + " ".join(sys.argv[1:])
    text = markdown(cells, f"SuperGLUE, SmolLM2-135M, scored on the {split}", command)
    if args.write:
        write_section(args.write, text)
        print(f"wrote the table into {args.write}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

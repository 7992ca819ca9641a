#!/usr/bin/env python
"""`lomotune eval` side by side with lm-evaluation-harness 0.4.13: same files, model
folder, batch size, precision and threads; accuracy, per-choice log-likelihoods and time.

    python scripts/eval_vs_harness.py --harness-python /tmp/lmeval-venv/bin/python \\
        --data-dir ../shared/superglue --tasks cb:val,rte:val,copa:train:100 --batch-size 8

The harness runs from its own (throwaway) virtual environment, `--harness-python`
(`pip install torch==2.13.0 lm-eval==0.4.13 transformers accelerate scikit-learn`).
It cannot read local official SuperGLUE files, so lomotune's reader writes each split
in the hub layout to a JSONL file under a temporary folder, and a task YAML there
`include`s the harness's own task file (its prompts, choices and metrics, untouched)
and points `dataset_path: json` at that file. Nothing of the harness is copied.

Each side runs in its own process, one after the other (never concurrently), with
`--threads` torch threads. Reported per task: both accuracies (MultiRC: the harness's
acc is inverted, see README; 1 - its acc is the comparable number), the largest
difference of a choice's log-likelihood, and the wall time of each whole command (start,
model load, reading, scoring) and of the scoring alone (lomotune's per-task seconds,
the harness's `total_evaluation_time_seconds`, which covers all tasks together).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lomotune.builtin_models import resolve_model
from lomotune.evaluate.reading import read_split
from lomotune.evaluate.superglue import TASKS

HARNESS_TASK_NAME = {"rte": "sglue_rte"}  # the harness's names where they differ

HARNESS_RUN = r"""
import json, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import lm_eval
from lm_eval.tasks import TaskManager
started = time.perf_counter()
out = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={args['model']},dtype={args['dtype']}",
    tasks=args["tasks"],
    batch_size=args["batch_size"],
    device="cpu",
    task_manager=TaskManager(include_path=args["include_path"]),
    log_samples=True,
)
wall = time.perf_counter() - started
samples = {
    task: [
        {"doc_id": s["doc_id"], "lls": [float(r[0][0]) for r in s["resps"]]}
        for s in sorted(rows, key=lambda s: s["doc_id"])
    ]
    for task, rows in out["samples"].items()
}
json.dump({"results": out["results"], "samples": samples, "in_python": wall},
          open(args["out"], "w"))
"""


def parse_tasks(spec: str) -> list[tuple[str, str, int | None]]:
    """'cb:val,copa:train:100' -> [(cb, val, None), (copa, train, 100)]."""
    out = []
    for item in spec.split(","):
        name, split, *limit = item.split(":")
        out.append((name, split, int(limit[0]) if limit else None))
    return out


def write_harness_tasks(tasks, data_dir: Path, folder: Path, harness_python: str) -> list[str]:
    """A JSONL file (hub layout, from lomotune's reader) and a task YAML per task."""
    tasks_root = subprocess.run(
        [
            harness_python,
            "-c",
            "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    names = []
    for name, split, limit in tasks:
        docs, _ = read_split(TASKS[name], split, data_dir)
        docs = docs[:limit] if limit else docs
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        local = f"local_{name}"
        included = Path(tasks_root) / "super_glue" / name / "default.yaml"
        (folder / f"{local}.yaml").write_text(
            f"include: {included}\n"
            f"task: {local}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
            "training_split: null\n"
            "validation_split: validation\n"
        )
        names.append(local)
    return names


LOMOTUNE_RUN = r"""
import json, sys, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from pathlib import Path
from lomotune.evaluate.loading import load_for_eval
from lomotune.evaluate.reading import read_split
from lomotune.evaluate.run import evaluate_task
from lomotune.evaluate.superglue import TASKS
import time
started = time.perf_counter()
loaded = load_for_eval(args["model"], args["precision"], torch.device("cpu"))
out = {}
for name, split, limit in args["tasks"]:
    docs, source = read_split(TASKS[name], split, Path(args["data_dir"]))
    docs = docs[:limit] if limit else docs
    r = evaluate_task(loaded.model, loaded.tokenizer, TASKS[name], docs, source=source,
                      batch_size=args["batch_size"])
    out[name] = {"n": r.n, "metrics": r.scores.metrics, "seconds": r.seconds,
                 "lls": [ll for p in r.scores.predictions for ll in p["loglikelihoods"]]}
json.dump({"tasks": out, "in_python": time.perf_counter() - started}, open(args["out"], "w"))
"""


def run_side(python: str, script: str, args: dict, threads: int) -> float:
    """Run one side in its own process; its wall time from start to exit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [python, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"{python} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness-python", required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--tasks", default="cb:val,rte:val")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write everything measured here")
    args = ap.parse_args()

    tasks = parse_tasks(args.tasks)
    model = resolve_model(args.model)  # the same folder for both sides
    with tempfile.TemporaryDirectory(prefix="eval-vs-harness-") as tmp:
        tmp = Path(tmp)
        harness_names = write_harness_tasks(tasks, args.data_dir, tmp, args.harness_python)

        ours_wall = run_side(
            sys.executable,
            LOMOTUNE_RUN,
            {"model": str(model), "precision": args.precision, "tasks": tasks,
             "data_dir": str(args.data_dir), "batch_size": args.batch_size,
             "threads": args.threads, "out": str(tmp / "lomotune.json")},
            args.threads,
        )  # fmt: skip
        ours = json.loads((tmp / "lomotune.json").read_text())
        harness_args = {
            "model": str(model),
            "dtype": {"fp32": "float32", "bf16": "bfloat16"}[args.precision],
            "tasks": harness_names,
            "batch_size": args.batch_size,
            "include_path": str(tmp),
            "threads": args.threads,
            "out": str(tmp / "harness.json"),
        }
        harness_wall = run_side(args.harness_python, HARNESS_RUN, harness_args, args.threads)
        harness = json.loads((tmp / "harness.json").read_text())

    rows = []
    for (name, split, _), local in zip(tasks, harness_names, strict=True):
        mine = ours["tasks"][name]
        h_acc = harness["results"][local]["acc,none"]
        comparable = 1 - h_acc if name == "multirc" else h_acc
        ll_ours = mine["lls"]
        ll_harness = [ll for s in harness["samples"][local] for ll in s["lls"]]
        max_diff = max(abs(a - b) for a, b in zip(ll_ours, ll_harness, strict=True))
        rows.append(
            {
                "task": name,
                "split": split,
                "n": mine["n"],
                "lomotune_acc": mine["metrics"]["acc"],
                "harness_acc": h_acc,
                "harness_acc_comparable": comparable,
                "diff_points": 100 * (mine["metrics"]["acc"] - comparable),
                "max_ll_diff": max_diff,
                "lomotune_scoring_s": mine["seconds"],
                "extra": {k: v for k, v in mine["metrics"].items() if k != "acc"},
            }
        )
    ours_scoring = sum(r["lomotune_scoring_s"] for r in rows)
    summary = {
        "cpu": platform.processor() or platform.machine(),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "threads": args.threads,
        "lomotune_process_s": ours_wall,
        "harness_process_s": harness_wall,
        "lomotune_evaluate_s": ours["in_python"],
        "harness_evaluate_s": harness["in_python"],
        "lomotune_scoring_s": ours_scoring,
        "rows": rows,
    }
    print(
        f"{'task':8} {'split':5} {'n':>5} {'lomotune':>9} {'harness':>9} {'diff pt':>8} {'max|dLL|':>9}"
    )
    for r in rows:
        harness_shown = f"{r['harness_acc_comparable']:.4f}" + (
            "*" if r["task"] == "multirc" else ""
        )
        print(
            f"{r['task']:8} {r['split']:5} {r['n']:5d} {r['lomotune_acc']:9.4f} "
            f"{harness_shown:>9} {r['diff_points']:8.2f} {r['max_ll_diff']:9.2e}"
        )
    print("* MultiRC: 1 - the harness's acc (its labels are inverted)")
    print(
        f"process, start to exit: lomotune {ours_wall:.1f}s, harness {harness_wall:.1f}s "
        f"-> {harness_wall / ours_wall:.2f}x"
    )
    print(
        f"evaluate call (model load + data + scoring): lomotune {ours['in_python']:.1f}s, "
        f"harness simple_evaluate {harness['in_python']:.1f}s "
        f"-> {harness['in_python'] / ours['in_python']:.2f}x (lomotune scoring alone "
        f"{ours_scoring:.1f}s)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

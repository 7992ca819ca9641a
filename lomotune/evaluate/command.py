"""`lomotune eval`: load the model once, then read, score and measure each task.

SuperGLUE tasks are scored by lomotune's own scorer; any other name is handed to
lm-evaluation-harness (`harness.py`) with the same loaded model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lomotune.evaluate import harness, lomo_protocol
from lomotune.evaluate.loading import EVAL_PRECISIONS, load_for_eval
from lomotune.evaluate.reading import read_split
from lomotune.evaluate.report import ScoringProgress
from lomotune.evaluate.run import (
    TaskResult,
    count_pairs,
    evaluate_task,
    fewshot_prefixes,
    results_json,
)
from lomotune.evaluate.superglue import ALL, TASKS, select_tasks
from lomotune.evaluate.task import EvalDataError
from lomotune.precision import resolve_precision

PROTOCOLS = ("harness", "lomo")


@dataclass(frozen=True)
class EvalOptions:
    model: str
    tasks: str
    data_dir: Path | None = None
    split: str = "val"
    limit: int | None = None
    batch_size: int = 8
    precision: str = "auto"
    protocol: str = "harness"
    num_fewshot: int = 0
    output: Path | None = None
    overwrite: bool = False
    include_path: Path | None = None  # a folder of the harness's task YAMLs


def split_task_names(tasks: str) -> tuple[list[str], list[str]]:
    """'rte,hellaswag' -> (["rte"], ["hellaswag"]): the built-in scorer's tasks (and
    `superglue`), then the names left for lm-evaluation-harness."""
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    builtin = [n for n in names if n.lower() in TASKS or n.lower() == ALL]
    return builtin, [n for n in names if n not in builtin]


def check_options(opts: EvalOptions) -> None:
    """Every problem with the options at once, before a model is loaded."""
    problems = []
    if opts.protocol not in PROTOCOLS:
        problems.append(f"--protocol {opts.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if opts.precision not in EVAL_PRECISIONS:
        problems.append(
            f"--precision {opts.precision!r}: choose one of {', '.join(EVAL_PRECISIONS)}"
        )
    if opts.batch_size < 1:
        problems.append(f"--batch-size {opts.batch_size}: give 1 or more")
    if opts.limit is not None and opts.limit < 1:
        problems.append(f"--limit {opts.limit}: give 1 or more, or leave it out for all")
    if opts.num_fewshot < 0:
        problems.append(f"--num-fewshot {opts.num_fewshot}: give 0 or more")
    if opts.num_fewshot and opts.protocol == "lomo":
        problems.append("--num-fewshot: the lomo protocol is zero-shot (as the LOMO paper's)")
    if opts.data_dir is not None and not opts.data_dir.is_dir():
        problems.append(f"--data-dir {opts.data_dir} is not a folder")
    if opts.output is not None and opts.output.exists() and not opts.overwrite:
        problems.append(f"--output {opts.output} exists; choose another file or pass --overwrite")
    if opts.include_path is not None and not opts.include_path.is_dir():
        problems.append(f"--include-path {opts.include_path} is not a folder")
    builtin, others = split_task_names(opts.tasks)
    if not builtin and not others:
        problems.append(f"--tasks: give one or more of {', '.join(TASKS)}, {ALL}, or harness tasks")
    if others and opts.protocol == "lomo":
        problems.append(f"--protocol lomo poses SuperGLUE tasks only, not {', '.join(others)}")
    if others and opts.split != "val":
        problems.append(
            f"--split {opts.split}: harness tasks ({', '.join(others)}) are scored on the split "
            "their task YAML names; leave --split out"
        )
    include = opts.include_path if opts.include_path and opts.include_path.is_dir() else None
    problems += [f"--tasks: {p}" for p in harness.check_task_names(others, list(TASKS), include)]
    if problems:
        raise EvalDataError("; ".join(problems))


def run_eval(opts: EvalOptions, progress: ScoringProgress) -> list[TaskResult]:
    check_options(opts)
    builtin, others = split_task_names(opts.tasks)
    tasks = select_tasks(",".join(builtin)) if builtin else []
    # All data is read (and checked) before the model is loaded: a bad line fails fast.
    splits, pools = {}, {}
    for task in tasks:
        docs, source = read_split(task, opts.split, opts.data_dir)
        if opts.num_fewshot:  # solved examples come from train, as the harness's do
            same = opts.split == "train"
            pools[task.name] = docs if same else read_split(task, "train", opts.data_dir)[0]
        if opts.protocol == "lomo":
            docs = lomo_protocol.sample(docs)
        splits[task.name] = (docs[: opts.limit] if opts.limit else docs, source)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = resolve_precision(opts.precision, device)
    if choice.warning:
        progress.warn(choice.warning.replace("model.precision", "--precision"))
    precision = choice.precision
    loaded = load_for_eval(opts.model, precision, device)

    results = []
    for task in tasks:
        docs, source = splits[task.name]
        if opts.protocol == "lomo":
            prompt = lomo_protocol.PROMPTS[task.name]
            progress.start(task.name, sum(len(prompt.choices(d)) for d in docs))
            result = lomo_protocol.evaluate_lomo(
                loaded.model,
                loaded.tokenizer,
                task,
                docs,
                source_name=source,
                batch_size=opts.batch_size,
                on_progress=progress.advance,
            )
        else:
            prefixes = None
            if opts.num_fewshot:
                prefixes = fewshot_prefixes(
                    task,
                    docs,
                    pools[task.name],
                    opts.num_fewshot,
                    same_split=opts.split == "train",
                )
            progress.start(task.name, count_pairs(task, docs))
            result = evaluate_task(
                loaded.model,
                loaded.tokenizer,
                task,
                docs,
                source=source,
                batch_size=opts.batch_size,
                prefixes=prefixes,
                on_progress=progress.advance,
            )
        progress.finish()
        results.append(result)
    if others:
        results += harness.evaluate_harness(
            loaded.model,
            loaded.tokenizer,
            others,
            batch_size=opts.batch_size,
            limit=opts.limit,
            num_fewshot=opts.num_fewshot,
            include_path=opts.include_path,
        )

    if opts.output is not None:
        config = {
            **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
            "model_source": loaded.source,
            "resolved_precision": precision,
            "device": str(device),
        }
        if others:
            config["harness_version"] = harness.harness_version()
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(json.dumps(results_json(results, config), indent=1) + "\n")
    return results

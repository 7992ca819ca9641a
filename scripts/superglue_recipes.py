"""Write the shipped SuperGLUE recipes, recipes/superglue-<task>-<method>.yaml, from the two
tables below (one row a task, one row a method): the settings live here once, the 30 YAML
files are their output. A test checks the shipped files equal what this writes.

    python scripts/superglue_recipes.py           # (re)write the recipes
    python scripts/superglue_recipes.py --check   # exit 1 when a shipped file differs

The budget (issue 21): each recipe trains in at most 10 minutes of a 2-core CPU (mezo:
15), with or without native bf16, on SmolLM2-135M. The settings and how they were chosen
(held-out parts of the train splits, never the val splits) are in BENCHMARKS.md,
"SuperGLUE: every method against zero-shot".
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "lomotune" / "recipes"


@dataclass(frozen=True)
class Task:
    folder: str  # the official layout's folder name
    train: int  # examples in the official train split
    val: int
    epochs: float  # passes over the trained examples
    max_length: int  # tokens: above the longest example of train (SmolLM2's tokenizer)
    examples: int = 1000  # at most this many train examples (a fixed sample) are trained on


# Lengths measured with SmolLM2's tokenizer on the official train files (prompt + answer):
# CB max 282, RTE 308, COPA 24, WiC 109, WSC 142 tokens; means CB 95, RTE 82, COPA 16,
# WiC 54, WSC 58. The binding budget is a 2-core CPU without native bf16 (fp32, AVX2):
# full fine-tuning of SmolLM2-135M ran 108 tokens/s there (AMD EPYC, BENCHMARKS.md), so
# a recipe trains on at most ~55k tokens (examples x epochs x mean length); COPA's short
# examples are bound by the per-step cost instead (adalomo 2.45 s, adamw 2.24 s a step at
# batch 8 there: 5 epochs were 10.2 minutes of steps, 3.5 are 7.1).
TASKS = {
    "rte": Task("RTE", 2490, 277, epochs=1, max_length=320, examples=640),
    "cb": Task("CB", 250, 56, epochs=2.25, max_length=320),
    "copa": Task("COPA", 400, 100, epochs=3.5, max_length=64),
    "wic": Task("WiC", 5428, 638, epochs=1, max_length=128),
    "wsc": Task("WSC", 554, 104, epochs=1.5, max_length=160),
}


@dataclass(frozen=True)
class MethodSetup:
    why: str  # the recipe's first comment line after the task's
    precision: str
    optimizer: dict
    batch_size: int = 8
    # Times the task's epochs: below 1 where a step costs more than full fine-tuning's
    # (LoRA's extra matmuls and NF4 dequantization on a CPU), above where it costs less.
    epochs_factor: float = 1.0


METHODS = {
    "lomo": MethodSetup(
        "LOMO (arXiv 2306.09782): fused SGD, linear schedule with warmup, gradient norm "
        "clipped at 1.0 (the previous step's norm: no second backward), as its paper",
        "auto",
        {
            "lr": 1.0e-2,
            "schedule": "linear",
            "warmup_steps": 10,
            "clip": {"mode": "previous", "max_norm": 1.0},
        },
    ),  # fmt: skip
    "adalomo": MethodSetup(
        "AdaLomo (arXiv 2310.10195): LOMO with a factored second moment and update-RMS "
        "clipping at 1.0",
        "auto",
        {"lr": 1.0e-3, "schedule": "linear", "warmup_steps": 10},
    ),
    "mezo": MethodSetup(
        "MeZO (arXiv 2305.17333): forward passes only, on LoRA adapters (r 8 on every "
        "linear layer; the paper's MeZO (LoRA): lr 1e-4, eps 1e-2): a zeroth-order "
        "estimate's noise grows with the parameters perturbed, and full-parameter MeZO "
        "needs ~10^4 steps where this budget holds a few hundred",
        "auto",
        {"lr": 1.0e-4, "schedule": "constant", "zo_eps": 1.0e-2, "lora": {"r": 8, "alpha": 16}},
        epochs_factor=2.2,
    ),  # fmt: skip
    "qlora-sgd": MethodSetup(
        "QLoRA base (arXiv 2305.14314): NF4 weights frozen, LoRA adapters (r 64, all "
        "linear layers) trained by fused SGD",
        "auto",
        {"lr": 3.0e-1, "schedule": "linear", "warmup_steps": 10, "lora": {"r": 64, "alpha": 16}},
        epochs_factor=0.7,  # 1.42x full fine-tuning's step time (AVX2, fp32)
    ),  # fmt: skip
    "adamw": MethodSetup(
        "AdamW as the HF Trainer runs it: fp32 master weights, bf16 autocast where the "
        "hardware has bf16 (precision auto), linear schedule",
        "auto",
        {"lr": 3.0e-5, "schedule": "linear", "warmup_steps": 10},
    ),
    "lora-adamw": MethodSetup(
        "LoRA as people run it (peft adapters r 8 on every linear layer, AdamW) over the "
        "unquantized base: the LOMO paper's LoRA comparison",
        "auto",
        {"lr": 3.0e-4, "schedule": "linear", "warmup_steps": 10, "lora": {"r": 8, "alpha": 16}},
        epochs_factor=0.7,  # 1.26x full fine-tuning's step time (AVX2, fp32)
    ),  # fmt: skip
}


def recipe_text(task_name: str, method_name: str) -> str:
    import yaml

    task, setup = TASKS[task_name], METHODS[method_name]
    name = f"superglue-{task_name}-{method_name}"
    header = [
        f"SuperGLUE {task.folder} with {method_name}, on SmolLM2-135M in at most "
        f"{15 if method_name == 'mezo' else 10} minutes of a 2-core CPU.",
        setup.why + ".",
        "Written by scripts/superglue_recipes.py (edit its tables, not this file); lr "
        "chosen on held-out parts of the train splits, steps by the budget (BENCHMARKS.md).",
        "Prompt and answer are lm-evaluation-harness 0.4.13's, as `lomotune eval` scores "
        f"them (the loss falls on the answer only). {task.folder} has {task.train} train, "
        f"{task.val} val examples; at most {task.examples} are trained on (a fixed sample).",
        f"Point data.superglue_dir at the SuperGLUE files ({task.folder}/train.jsonl and "
        f"{task.folder}/val.jsonl, official or hub layout); left out, they come from the hub.",
        f"Then: lomotune eval --model runs/{name} --tasks {task_name} --data-dir DIR",
    ]
    body = {
        "model": {"name": "smollm2-135m", "precision": setup.precision,
                  "activation_checkpointing": True},
        "data": {"source": f"superglue:{task_name}", "superglue_dir": None, "split": "train",
                 "eval_split": "val", "num_examples": task.examples, "format": "prompt-completion",
                 "max_length": task.max_length},
        "optimizer": {"name": method_name, **setup.optimizer},
        "training": {"batch_size": setup.batch_size,
                     "epochs": round(task.epochs * setup.epochs_factor, 4),  # no float noise in the YAML
                     "eval_every": 0, "save_every": 0, "seed": 42,
                     "output_dir": f"runs/{name}"},
        "hardware": {"gpus": "auto"},
    }  # fmt: skip
    comments = "".join(f"# {line}\n" for line in _wrap(header))
    return comments + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def _wrap(lines: list[str], width: int = 88) -> list[str]:
    import textwrap

    return [w for line in lines for w in textwrap.wrap(line, width)]


def all_recipes() -> dict[Path, str]:
    return {RECIPES / f"superglue-{t}-{m}.yaml": recipe_text(t, m) for t in TASKS for m in METHODS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare, write nothing")
    args = p.parse_args()
    stale = [path for path, text in all_recipes().items() if not path.exists()
             or path.read_text() != text]  # fmt: skip
    if args.check:
        for path in stale:
            print(f"{path.name} differs from scripts/superglue_recipes.py's tables")
        return 1 if stale else 0
    for path in stale:
        path.write_text(all_recipes()[path])
        print(f"wrote {path.relative_to(RECIPES.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmarks (bench_memory.py, bench_speed.py, bench_gpu_memory.py) share: their
rows, the recipe and batch of a row, the common options, the commit measured, table cells.

A row is a method of the registry (lomotune/methods.py), run as `lomotune train` runs it:
its weights in fp32 where it keeps fp32 master weights below fp32 (the loss then under
autocast to --precision), a 4-bit base and LoRA adapters where its entry says so. Or a
variant of a method, named by the method and a suffix, where the entry's fields admit it:

- `-ref`: the reference implementation of lomo_optim 0.1.1 (lomo, adalomo);
- `-nosr`: optimizer.stochastic_rounding false, for a fused plain-SGD step, whose small
  bf16 updates are lost when rounded to nearest;
- `-amp`: a method with fp32 master weights computing in bf16 whatever --precision (at
  --precision fp32, the HF Trainer's `bf16=True` beside plain fp32; at bf16 the method).

`no_grad` is no method: the forward and the loss under torch.no_grad, the inference
reference the methods' memory is measured against.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lomotune import methods
from lomotune.methods import Method

FORWARD_ONLY = "no_grad"  # lomotune.estimate.simulate counts it under the same name
GiB = 1024**3

# The class of lomo_optim 0.1.1 that implements each method: its `-ref` row.
REFERENCES = {"lomo": "Lomo", "adalomo": "AdaLomo"}


@dataclass(frozen=True)
class Variant:
    summary: str  # {name}: the method's name; {ref}: its lomo_optim class
    admits: Callable[[Method], bool]


VARIANTS = {
    "-ref": Variant(
        "lomo_optim.{ref} 0.1.1 (reference), fused_backward(loss, lr)",
        lambda m: m.name in REFERENCES,
    ),
    "-nosr": Variant(
        "{name} with optimizer.stochastic_rounding false (round to nearest)",
        lambda m: m.fused and m.plain_sgd_step,
    ),
    "-amp": Variant(
        "{name} on fp32 master weights, forward in bf16 autocast (HF Trainer bf16=True)",
        lambda m: m.fp32_master_weights,
    ),
}

# Every row: the forward alone, then each method followed by its variants.
ROWS: tuple[str, ...] = (
    FORWARD_ONLY,
    *(
        row
        for m in methods.REGISTRY.values()
        for row in (m.name, *(m.name + s for s, v in VARIANTS.items() if v.admits(m)))
    ),
)


def method_of(row: str) -> tuple[Method, str]:
    """(the registry entry a row runs, its variant's suffix: '' for the method itself)."""
    if row in methods.REGISTRY:
        return methods.REGISTRY[row], ""
    for suffix, variant in VARIANTS.items():
        entry = methods.REGISTRY.get(row.removesuffix(suffix))
        if row.endswith(suffix) and entry is not None and variant.admits(entry):
            return entry, suffix
    raise ValueError(f"no bench row {row!r}; known: {', '.join(ROWS)}")


def describe(row: str) -> str:
    if row == FORWARD_ONLY:
        return "forward + loss under torch.no_grad (inference reference)"
    entry, suffix = method_of(row)
    if not suffix:
        return entry.summary
    return VARIANTS[suffix].summary.format(name=entry.name, ref=REFERENCES.get(entry.name))


def recipe_precision(row: str, precision: str) -> str:
    """The recipe's model.precision of a row at --precision `precision`."""
    return "bf16" if row.endswith("-amp") else precision


def weights_precision(row: str, precision: str) -> str:
    """The precision a row's weights are loaded in (as `lomotune train` loads them)."""
    if row == FORWARD_ONLY:
        return precision
    return "fp32" if method_of(row)[0].fp32_master_weights else precision


def bench_recipe(cfg, row: str, args: argparse.Namespace):
    """The recipe whose engine a row runs (`build_engine` of lomotune train); `cfg` is
    the model section at --precision."""
    from lomotune.recipe import LoraConfig, OptimizerConfig, Recipe, TrainingConfig

    entry, suffix = method_of(row)
    return Recipe(
        model=cfg.model_copy(update={"precision": recipe_precision(row, cfg.precision)}),
        optimizer=OptimizerConfig(
            name=entry.name,
            lr=args.lr,
            lora=LoraConfig() if entry.trains_adapters_only else None,
            stochastic_rounding=suffix != "-nosr",
        ),
        training=TrainingConfig(max_steps=args.warmup + args.steps),
    )


def random_batch(args: argparse.Namespace, vocab: int) -> dict:
    """`--batch` x `--seq` uniformly random token ids (seeded), labels on all, no padding."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def library_version() -> str:
    """The commit the library was measured at, '+dirty' when lomotune/ has local changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "lomotune") else "")


def write_json(path: str | None, key: str, rows: list[dict]) -> None:
    """--json: the rows under `key`, beside the commit measured; nothing without a path."""
    if path:
        Path(path).write_text(json.dumps({"lomotune": library_version(), key: rows}, indent=1))


# ---------------------------------------------------------------------------------------
# Options


def parser(doc: str, methods_help: str) -> argparse.ArgumentParser:
    """The options of every benchmark: which rows, the batch, the loss chunk, the JSON."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", help=methods_help)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument(
        "--loss-chunk",
        type=int,
        help="model.loss_chunk_tokens (default: the recipe's default)",
    )
    p.add_argument("--json", help="write every number measured here")
    return p


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that run real steps on a real model."""
    p.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="bf16", help="bf16, fp32, or a comma list")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lr", type=float, default=1e-5)


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.loss_chunk is None:
        from lomotune.recipe import ModelConfig

        args.loss_chunk = ModelConfig().loss_chunk_tokens
    return args


def chosen_rows(
    p: argparse.ArgumentParser, args: argparse.Namespace, known, default, what: str
) -> list[str]:
    """The rows --methods names (`default` when none); any not in `known` is an error."""
    rows = [m.strip() for m in (args.methods or "").split(",") if m.strip()] or list(default)
    unknown = [m for m in rows if m not in known]
    if unknown:
        p.error(f"{what} {list(known)}; not {unknown}")
    return rows


# ---------------------------------------------------------------------------------------
# Table cells


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def update_s(r: dict) -> str:
    u = r.get("median_update_s")
    return "-" if u is None else f"{u:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"

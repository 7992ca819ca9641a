"""`lomotune estimate`: the setup (a recipe's, or the defaults, then the options), each
method's estimate (the formulas, or one step simulated under fake tensors), the largest
batch that fits with --max-batch, and the report (a table, JSON, a PNG)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lomotune import estimate as est
from lomotune.estimate import report
from lomotune.recipe import load_recipe


@dataclass(frozen=True)
class EstimateOptions:
    recipe: Path | None = None  # a recipe file; None: the defaults and --model
    overrides: tuple[str, ...] = ()
    model: str | None = None
    method: str | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    precision: str | None = None
    gpus: int | None = None
    checkpointing: bool | None = None
    compare: bool = False  # every method side by side
    simulate: bool = False  # one real step under fake tensors
    max_batch: bool = False  # the largest batch that fits `gpu_mem`
    gpu_mem: float = 24.0  # GiB


@dataclass
class Estimated:
    """What `run_estimate` found, for `show`."""

    name: str  # the model
    setup: est.Setup
    results: list[est.Estimate]  # one a method
    notes: list[str]
    fitting: dict[str, int] | None  # method -> largest batch, with --max-batch
    simulated: bool
    gpu_mem: float

    @property
    def title(self) -> str:
        s = self.setup
        return (
            f"{self.name}: batch {s.batch_size} x {s.seq_len}, {s.precision}, "
            f"checkpointing {'on' if s.checkpointing else 'off'}, {s.gpus} GPU(s)"
            + (", simulated" if self.simulated else "")
        )


def run_estimate(opts: EstimateOptions) -> Estimated:
    """Every estimate the options ask for; EstimateError (or RecipeError) says what is wrong."""
    if not (0 < opts.gpu_mem < float("inf")):
        raise est.EstimateError(
            f"--gpu-mem: {opts.gpu_mem:g} is not a size; give the GPU's memory in GiB, e.g. 24"
        )
    notes: list[str] = []
    if opts.recipe is not None:
        parsed = load_recipe(opts.recipe, list(opts.overrides))
        name, setup, notes = est.setup_from_recipe(parsed)
    else:
        name = opts.model or "smollm2-135m"
        setup = est.Setup(method="lomo", batch_size=8, seq_len=512)
    given = {
        "method": opts.method,
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len,
        "precision": opts.precision,
        "gpus": opts.gpus,
        "checkpointing": opts.checkpointing,
    }
    setup = dataclasses.replace(setup, **{k: v for k, v in given.items() if v is not None})
    name = opts.model or name
    config = est.resolve_config(name)
    methods = list(est.METHODS) if opts.compare else [setup.method]
    if opts.simulate and opts.compare:
        methods = [m for m in methods if m in est.SIMULATED_METHODS]
    results = []
    for m in methods:
        one = dataclasses.replace(setup, method=m)
        if opts.simulate:
            results.append(est.simulated_estimate(config, one))
        else:
            results.append(est.estimate(est.shape_of(config), one))
    fitting = None
    if opts.max_batch:
        fitting = {
            m: est.max_batch(config, dataclasses.replace(setup, method=m), opts.gpu_mem)
            for m in methods
        }
    if opts.simulate:
        notes.append("simulated: MemTracker's categories; temporaries of backward are one part")
    return Estimated(name, setup, results, notes, fitting, opts.simulate, opts.gpu_mem)


def show(done: Estimated, json_out: bool = False, plot_path: Path | None = None) -> None:
    """Print the table (or JSON with `json_out`) and draw the PNG at `plot_path`."""
    if json_out:
        out = report.as_json(done.results, done.notes)
        for m, b in (done.fitting or {}).items():
            out[m]["max_batch"] = b
        print(json.dumps(out, indent=1))
    else:
        console = Console()
        for note in done.notes:
            console.print(f"note: {note}", highlight=False)
        console.print(report.table(done.results, done.title))
        for line in report.peak_lines(done.results):
            console.print(line, highlight=False)
        for m, b in (done.fitting or {}).items():
            console.print(
                f"{m}: largest batch of {done.setup.seq_len} tokens in {done.gpu_mem:g} GiB: {b}"
            )
    if plot_path is not None:
        report.plot(done.results, plot_path, done.title)

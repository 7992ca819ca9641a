"""The `lomotune` command. Parses arguments, calls the library, prints. No logic here."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lomotune.errors import LomotuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune every parameter of a language model with memory close to inference.",
)
err = Console(stderr=True)
SHIPPED_RECIPES = Path(__file__).parent / "recipes"


def show_version(asked: bool) -> None:
    if asked:
        import platform

        from lomotune import __version__

        print(f"lomotune {__version__} (python {platform.python_version()})")
        raise typer.Exit(0)


@app.callback()
def start(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=show_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Before any command: third-party messages the user cannot act on are silenced."""
    from lomotune.quiet import silence_third_party_noise

    silence_third_party_noise()


def fail(message: str, code: int, echo: bool = True) -> None:
    """Exit with `code`; `echo=False` for an error that rank 0 of a run already printed.
    A process started by `lomotune train`'s launcher hands the message to the launcher,
    which prints the first failed process's once."""
    # Only a training imported lomotune.distributed (and with it torch); other commands
    # need not.
    launch = None
    if "lomotune.distributed" in sys.modules:
        from lomotune.distributed import launch
    if launch is not None and launch.hand_to_launcher(message, code):
        raise typer.Exit(code)
    if code == 2 and launch is not None and launch.another_local_rank():
        echo = False  # under torchrun: printed once per machine, by local rank 0
    if echo:
        # the message is text, not markup: `lomotune[wandb]` or a list must print as written
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def command(name: str | None = None):
    """`app.command()`, and a LomotuneError the command raises ends it with its message
    and exit code: the one place lomotune's errors become exits."""

    def register(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except LomotuneError as e:
                fail(str(e), e.exit_code, echo=not e.printed_by_rank_0)

        return app.command(name=name)(run)

    return register


def find_recipe(name: str) -> Path:
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = SHIPPED_RECIPES / f"{name}.yaml"
    return shipped if shipped.exists() else path


@command()
def train(
    recipe: Annotated[
        str, typer.Argument(help="recipe YAML file, or the name of a shipped recipe")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, e.g. optimizer.lr=3e-5")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace what the output folder holds")] = False,
    resume: Annotated[
        bool, typer.Option(help="continue from the latest complete checkpoint")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="resume even if the recipe differs from the checkpoint's")
    ] = False,
    plain: Annotated[bool, typer.Option(help="plain log lines instead of the live view")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="print the resolved recipe, data counts, steps and memory estimate, then exit"
        ),
    ] = False,
    nodes: Annotated[int | None, typer.Option(help="hardware.nodes: machines in the run")] = None,
    node_rank: Annotated[
        int | None, typer.Option(help="hardware.node_rank: this machine's number")
    ] = None,
    master_addr: Annotated[
        str | None, typer.Option(help="hardware.master_addr: the machine of node_rank 0")
    ] = None,
    master_port: Annotated[
        int | None, typer.Option(help="hardware.master_port: a free port there")
    ] = None,
) -> None:
    """Fine-tune a model as a recipe says: live dashboard, checkpoints, final model.
    Several processes (hardware.gpus > 1, or gpus 0 with processes > 1) are started here
    through torch's elastic launcher; under torchrun each process is one of them."""
    from lomotune.checkpoint import EXIT_WRITE_FAILED
    from lomotune.distributed import checks, launch
    from lomotune.recipe import RecipeError, load_recipe
    from lomotune.train import EXIT_SIGINT
    from lomotune.train import train as run_training

    given = {"nodes": nodes, "node_rank": node_rank, "master_addr": master_addr}
    given["master_port"] = master_port
    overrides = [
        *(overrides or []),
        *(f"hardware.{k}={v}" for k, v in given.items() if v is not None),
    ]
    flags = [f"--{name}" for name, on in [("overwrite", overwrite), ("resume", resume), ("force", force), ("plain", plain)] if on]  # fmt: skip
    try:
        parsed = load_recipe(find_recipe(recipe), overrides)
        if dry_run:  # before any process is launched: one report, nothing written
            from lomotune.dry_run import dry_run as describe

            size = launch.processes_per_node(parsed.hardware) * parsed.hardware.nodes
            print(describe(parsed, size))
            return
        if launch.needs_launch(parsed):
            size = launch.processes_per_node(parsed.hardware) * parsed.hardware.nodes
            refused = checks.refusal(parsed, size)
            if refused:
                raise RecipeError([refused], recipe)
            launch.launch(parsed, ["train", recipe, *overrides, *flags])
            return
        run_training(
            parsed,
            overwrite=overwrite,
            resume=resume,
            force=force,
            live=False if plain else None,
            recipe_file=find_recipe(recipe),
        )
    except OSError as e:  # a full disk, a folder gone: the system's reason, not a traceback
        where = f": {e.filename}" if e.filename else ""
        fail(
            f"{e.strerror or e}{where}. Checkpoints already saved are intact: fix this and "
            "continue with --resume",
            EXIT_WRITE_FAILED,
        )
    except RuntimeError as e:  # dist.DistError is one
        lost = launch.lost_peer(e)
        if lost is None:
            raise
        fail(lost, 1)  # under lomotune's launcher: handed over, which names the dead process
    except KeyboardInterrupt:
        fail(
            "interrupted before a step could finish (a second Ctrl-C, or during start-up); "
            "the last complete checkpoint, if any, is intact: continue with --resume",
            EXIT_SIGINT,
        )


@command()
def recipes() -> None:
    """List the shipped recipes."""
    import yaml

    # Names are never cut (a pipe or an 80-column terminal cut them with "..."); the
    # folder is one line below, where it can be copied whole.
    table = Table("name", "method", "model", "data")
    for column in table.columns:
        column.overflow = "fold"  # narrower than 80 columns: the rest on the next line
    for path in sorted(SHIPPED_RECIPES.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        table.add_row(
            path.stem,
            str(raw.get("optimizer", {}).get("name", "lomo")),
            str(raw.get("model", {}).get("name", "smollm2-135m")),
            str(raw.get("data", {}).get("source", "")),
        )
    console = Console()
    console.print(table)
    console.print(
        f"run one by name from any folder (lomotune train quickstart); the files: {SHIPPED_RECIPES}",
        highlight=False,
        soft_wrap=True,
    )


@command()
def models(
    fetch: Annotated[
        str | None, typer.Option(help="fetch and convert this built-in model now")
    ] = None,
) -> None:
    """List the built-in model aliases and whether each is in the cache."""
    from lomotune.builtin_models import (
        BUILTIN_MODELS,
        TINY_ALIAS,
        builtin_path,
        fetch_builtin,
        is_cached,
    )

    if fetch is not None:
        if fetch not in BUILTIN_MODELS:
            fail(f"no built-in model {fetch!r}; built-in: {', '.join(BUILTIN_MODELS)}", 2)
        fetch_builtin(BUILTIN_MODELS[fetch])
    # Aliases are never cut and descriptions wrap (no "..."); the cache folder is one line
    # below, where it can be copied whole.
    table = Table("alias", "cached", "description")
    for column in table.columns:
        column.overflow = "fold"
    for alias, m in BUILTIN_MODELS.items():
        table.add_row(alias, "yes" if is_cached(alias) else "no", m.description)
    table.add_row(TINY_ALIAS, "-", "2-layer Llama with random weights, built in memory (tests)")
    console = Console()
    console.print(table)
    console.print(
        f"cached in {builtin_path('x').parent} (a model not cached is fetched on first use)",
        highlight=False,
        soft_wrap=True,
    )


@command()
def plot(run_dir: Annotated[Path, typer.Argument(help="a run's output folder")]) -> None:
    """Redraw the PNG of loss, tokens/s and memory of a run."""
    from lomotune.plot import plot_run

    print(plot_run(run_dir))


@command()
def export(
    adapter: Annotated[
        Path, typer.Argument(help="a qlora-sgd run's folder, its model/ or a PEFT adapter folder")
    ],
    out: Annotated[Path, typer.Argument(help="where to write the merged model")],
    merge: Annotated[bool, typer.Option(help="merge the adapter into the base weights")] = True,
    base: Annotated[
        str | None,
        typer.Option(help="base model (default: the one the adapter or the run's recipe names)"),
    ] = None,
    precision: Annotated[str, typer.Option(help="bf16 | fp16 | fp32")] = "bf16",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
) -> None:
    """Write a full model from a LoRA adapter (`--merge`)."""
    from lomotune.export import merge_adapter

    if not merge:
        fail(
            "only --merge is supported: the adapter folder itself is already the unmerged export", 2
        )
    print(merge_adapter(base, adapter, out, precision, overwrite=overwrite))


@command()
def estimate(
    recipe: Annotated[str | None, typer.Argument(help="recipe YAML (or shipped name)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value")] = None,
    model: Annotated[str | None, typer.Option(help="alias, folder, hub id or known shape")] = None,
    method: Annotated[str | None, typer.Option(help="lomo | adalomo | mezo | ...")] = None,
    batch_size: Annotated[int | None, typer.Option(help="per GPU")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sequence")] = None,
    precision: Annotated[str | None, typer.Option(help="bf16 | fp16 | fp32")] = None,
    gpus: Annotated[int | None, typer.Option(help="FSDP over N GPUs (per-rank peak)")] = None,
    checkpointing: Annotated[bool | None, typer.Option(help="activation checkpointing")] = None,
    compare: Annotated[bool, typer.Option(help="every method side by side")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="stacked bar PNG")] = None,
    simulate: Annotated[bool, typer.Option(help="one real step under fake tensors")] = False,
    max_batch: Annotated[bool, typer.Option(help="largest batch that fits --gpu-mem")] = False,
    gpu_mem: Annotated[float, typer.Option(help="GiB of the GPU for --max-batch")] = 24.0,
) -> None:
    """Predict the peak GPU memory of a training step, before anything runs."""
    from lomotune.estimate.command import EstimateOptions, run_estimate, show

    opts = EstimateOptions(
        find_recipe(recipe) if recipe is not None else None,
        tuple(overrides or ()),
        model,
        method,
        batch_size,
        seq_len,
        precision,
        gpus,
        checkpointing,
        compare,
        simulate,
        max_batch,
        gpu_mem,
    )
    show(run_estimate(opts), json_out, plot_path)


@command(name="eval")
def evaluate(
    model: Annotated[
        str, typer.Option(help="run folder, model folder, adapter folder, alias or hub id")
    ],
    tasks: Annotated[
        str,
        typer.Option(help="boolq,cb,copa,multirc,record,rte,wic,wsc, superglue, or harness tasks"),
    ],
    data_dir: Annotated[
        Path | None, typer.Option(help="SuperGLUE folder (official or hub layout); else the hub")
    ] = None,
    split: Annotated[str, typer.Option(help="val | train | test")] = "val",
    limit: Annotated[int | None, typer.Option(help="the first N examples of each task")] = None,
    batch_size: Annotated[int, typer.Option(help="contexts (and choice rows) per forward")] = 8,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16")] = "auto",
    protocol: Annotated[
        str, typer.Option(help="harness (lm-eval 0.4.13) | lomo (LOMO paper)")
    ] = "harness",
    num_fewshot: Annotated[int, typer.Option(help="solved train examples before each")] = 0,
    output: Annotated[Path | None, typer.Option(help="write results + predictions as JSON")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --output file")] = False,
    include_path: Annotated[
        Path | None, typer.Option(help="folder of your own lm-evaluation-harness task YAMLs")
    ] = None,
) -> None:
    """Score a model on SuperGLUE by the log-likelihood of each answer; any other task
    name by lm-evaluation-harness (pip install 'lomotune[harness]')."""
    from lomotune.evaluate.command import EvalOptions, run_eval
    from lomotune.evaluate.report import ScoringProgress, results_table

    opts = EvalOptions(
        model,
        tasks,
        data_dir,
        split,
        limit,
        batch_size,
        precision,
        protocol,
        num_fewshot,
        output,
        overwrite,
        include_path,
    )
    results = run_eval(opts, ScoringProgress())
    Console().print(results_table(results))


def main() -> None:
    app(prog_name="lomotune")


if __name__ == "__main__":
    sys.exit(main())

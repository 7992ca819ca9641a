"""The recipe: one YAML file (plus `key=value` overrides) -> one validated `Recipe`.

Every problem in a recipe is collected and reported together, each with the key path
and how to fix it (`RecipeError`). Unknown keys are errors with a "did you mean".
Defaults live here, in the schema, and nowhere else.
"""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lomotune import methods
from lomotune.errors import LomotuneError

# auto: bf16 where the hardware computes in it natively, else fp32 (see precision.py).
Precision = Literal["auto", "bf16", "fp16", "fp32"]
MethodName = Literal[methods.NAMES]  # type: ignore[valid-type]


class RecipeError(LomotuneError):
    """A recipe that cannot run. `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        lines = [f"{self.source} has {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class Section(BaseModel):
    # No float key means anything at inf or nan (optimizer.lr=inf turns every weight
    # non-finite at step 1): refused with the key's name like any other bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="built-in alias, local folder, or hub id")
    precision: Precision = "auto"
    activation_checkpointing: bool = True
    trust_remote_code: bool = False
    # Label tokens per chunk of the chunked loss: the fp32 logits never exist whole. A
    # chunk costs ~12 bytes x vocab per token in backward (bf16 logits, fp32 copy, softmax,
    # its gradient): 256 x 49152 x 12 = 151 MB for SmolLM2, twice its checkpointed
    # activations at batch 4 x 512 (measured with MemTracker; 1024 tokens: 632 MB).
    loss_chunk_tokens: int = Field(256, ge=16)


class DataConfig(Section):
    source: str = Field("builtin:dates", description="file, hub:org/name, or builtin:NAME")
    format: Literal["text", "prompt-completion", "alpaca", "chat"] = "prompt-completion"
    split: str = "train"
    eval_split: str | None = Field(None, description="a split of the source; else eval_fraction")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(512, ge=8)
    packing: bool = False
    train_on_prompt: bool = False
    on_bad_rows: Literal["error", "skip"] = "error"
    # Field names, for sources whose columns are named otherwise.
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    messages_field: str = "messages"
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template, or a file holding one: replaces the tokenizer's",
    )
    # Built-in generated datasets: how many examples; superglue:TASK: at most this many
    # train examples (a seed-0 sample, as the LOMO repository takes its 1000).
    num_examples: int = Field(2000, ge=1)
    superglue_dir: str | None = Field(
        None,
        description="SuperGLUE files (official or hub layout) for superglue:TASK; else the hub",
    )


class ClipConfig(Section):
    mode: Literal["none", "exact", "previous", "per-tensor"] = "none"
    max_norm: float = Field(1.0, gt=0.0)


class LoraConfig(Section):
    # QLoRA's settings (arXiv 2305.14314, Appendix B): r 64, alpha 16, dropout 0.1 for
    # models up to 13B and 0.05 from 33B (None picks by the model's size).
    r: int = Field(64, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class OptimizerConfig(Section):
    name: MethodName = "lomo"
    lr: float | None = Field(None, gt=0.0, description="None = the method's default")
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    clip: ClipConfig = ClipConfig()
    gradient_accumulation: int = Field(1, ge=1)
    # bf16 weights of fused methods: round updates stochastically so that small updates
    # are not lost.
    stochastic_rounding: bool = True
    # fp16 dynamic loss scaling (fused methods).
    loss_scale: float = Field(2.0**16, gt=0.0)
    loss_scale_window: int = Field(1000, ge=1)
    # AdamW and Adam-mini.
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    # AdaLomo (arXiv 2310.10195; lomo-optim's defaults): (eps1 added to G^2, eps2 the
    # floor of the parameter RMS that scales lr), the update-RMS clip, and the decay
    # exponent of the second moment (beta_t = 1 - t^decay_rate).
    adalomo_eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = Field(1.0, gt=0.0)
    decay_rate: float = Field(-0.8, lt=0.0)
    # MeZO: perturbation size (paper: 1e-3) and number of directions per step (n-SPSA).
    zo_eps: float = Field(1e-3, gt=0.0)
    zo_directions: int = Field(1, ge=1)
    # LoRA adapters: required by qlora-sgd, optional for mezo.
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _method_lr(self) -> OptimizerConfig:
        if self.lr is None:
            self.lr = methods.method(self.name).lr
        return self


def _batch_size(value: Any) -> Any:
    """One problem for a bad batch size (not one per member of `int | "auto"`)."""
    if value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(
        f"training.batch_size: should be a whole number of at least 1, or auto (got {value!r})"
    )


class TrainingConfig(Section):
    batch_size: Annotated[int | Literal["auto"], BeforeValidator(_batch_size)] = Field(
        8, description="auto = the largest the memory estimate fits, at most 1/16 of the rows"
    )
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    eval_every: int = Field(50, ge=0)
    eval_batches: int | None = Field(None, ge=1, description="cap on eval batches; None = all")
    save_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = Field(42, ge=0, lt=2**64, description="any integer from 0 to 2^64 - 1")
    output_dir: str = "runs/default"
    max_bad_steps: int = Field(
        5, ge=1, description="stop after this many non-finite steps in a row"
    )
    # Exact-match accuracy by greedy generation, before and after training
    # (built-in tasks and prompt-completion data).
    generate_eval_examples: int = Field(0, ge=0)
    generate_max_new_tokens: int = Field(16, ge=1)
    # Tasks scored (log-likelihood, as `lomotune eval`) at each eval and at the end:
    # SuperGLUE on its val split (files from data.superglue_dir, else the hub), any other
    # name by lm-evaluation-harness (pip install 'lomotune[harness]').
    eval_tasks: list[str] = Field(default_factory=list)
    # a folder of your own lm-evaluation-harness task YAMLs (from the current folder):
    eval_tasks_include_path: str | None = None
    eval_tasks_limit: int | None = Field(None, ge=1, description="first N val examples a task")
    # Where the numbers go besides the dashboard: metrics.jsonl always, TensorBoard event
    # files (output_dir/tensorboard), W&B (offline in output_dir/wandb unless logged in).
    # (names: lomotune/loggers.py's LOGGERS)
    loggers: list[str] = Field(default_factory=lambda: ["jsonl"])

    @model_validator(mode="after")
    def _known_tasks(self) -> TrainingConfig:
        from lomotune.evaluate.harness import check_task_names
        from lomotune.evaluate.superglue import TASKS

        given = self.eval_tasks_include_path
        include = Path(given).expanduser() if given is not None else None
        if include is not None and not include.is_dir():
            raise ValueError(f"training.eval_tasks_include_path: {given} is not a folder")
        others = [t for t in self.eval_tasks if t not in TASKS]
        problems = check_task_names(others, list(TASKS), include)
        if problems:
            raise ValueError("\n".join(f"training.eval_tasks: {p}" for p in problems))
        return self

    @field_validator("loggers")
    @classmethod
    def _logger_packages(cls, names: list[str]) -> list[str]:
        from lomotune.loggers import logger_problems

        problems = logger_problems(names)
        if problems:
            raise ValueError("\n".join(problems))
        return names


class HardwareConfig(Section):
    gpus: int | Literal["auto"] = Field("auto", description="0 = CPU; auto = one GPU if present")
    nodes: int = Field(1, ge=1, description="machines; each runs gpus (or processes) processes")
    node_rank: int = Field(0, ge=0, description="this machine's number, 0 .. nodes-1")
    master_addr: str = Field("127.0.0.1", description="address of the machine with node_rank 0")
    master_port: int = Field(29500, ge=1, le=65535, description="a free port on that machine")
    processes: int = Field(1, ge=1, description="CPU processes when gpus is 0")
    threads: int | None = Field(None, ge=1, description="CPU threads; None = torch's default")


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()
    hardware: HardwareConfig = HardwareConfig()
    resume: Literal["never", "auto"] = "never"

    @model_validator(mode="after")
    def _check_combinations(self) -> Recipe:
        problems = combination_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def combination_problems(r: Recipe) -> list[str]:
    """Settings that are each valid but cannot go together. One line per problem."""
    problems = []
    opt = r.optimizer
    if r.training.max_steps is None and r.training.epochs is None:
        problems.append("training: set training.max_steps or training.epochs")
    if r.training.max_steps is not None and r.training.epochs is not None:
        problems.append(
            "training: both max_steps and epochs are set; choose one (remove the other)"
        )
    method = methods.method(opt.name)
    if method.fused and opt.gradient_accumulation > 1:
        problems.append(
            f"optimizer.gradient_accumulation: {opt.name} applies each update inside "
            "backward, so gradients from several micro-batches cannot be summed first. "
            "Set gradient_accumulation: 1 and raise training.batch_size instead (with "
            "model.activation_checkpointing: true to keep activations small), or use "
            "adamw/sgd/adam-mini/mezo, which can accumulate"
        )
    if not method.fused and opt.clip.mode == "previous":
        problems.append(
            f"optimizer.clip.mode: 'previous' saves the second backward of fused methods; "
            f"{opt.name} has every gradient at once, so use clip.mode: exact"
        )
    if isinstance(r.hardware.gpus, int) and r.hardware.gpus < 0:
        problems.append("hardware.gpus: must be 0 (CPU), a GPU count, or auto")
    if r.hardware.node_rank >= r.hardware.nodes:
        problems.append(
            f"hardware.node_rank: {r.hardware.node_rank} with {r.hardware.nodes} node(s); "
            "number the machines 0 .. nodes-1"
        )
    if r.hardware.processes > 1 and r.hardware.gpus != 0:
        problems.append(
            "hardware.processes: is the number of CPU processes (with gpus: 0); on GPUs "
            "set hardware.gpus to the number of GPUs per machine instead"
        )
    if method.engine == "zeroth-order" and opt.clip.mode != "none":
        problems.append(
            "optimizer.clip.mode: mezo estimates one scalar per direction; there is no "
            "gradient to clip. Set clip.mode: none"
        )
    if method.quantized_base and r.model.precision == "fp16":
        problems.append(
            "model.precision: qlora-sgd computes in bf16 or fp32 over its 4-bit base; "
            "set model.precision: bf16"
        )
    for key in methods.METHOD_ONLY_KEYS:
        # Compared with the default rather than "was it written": a resolved recipe saved
        # by a run lists every key, and must load again.
        default = OptimizerConfig.model_fields[key].default
        if key not in method.keys and getattr(opt, key) != default:
            problems.append(
                f"optimizer.{key}: {opt.name} does not use it (only "
                f"{', '.join(methods.readers_of(key))} do). Remove optimizer.{key} or change "
                "optimizer.name"
            )
    if method.engine == "optimizer" and r.model.precision == "fp16":
        problems.append(
            f"model.precision: {opt.name} has no fp16 loss scaling (gradients underflow, and "
            "in pure fp16 AdamW's eps does too: a zero gradient becomes NaN on step 1). Set "
            "model.precision: bf16, fp32 or auto"
        )
    if opt.lora is not None and method.lora == "no":
        with_lora = [n for n, m in methods.REGISTRY.items() if m.lora != "no"]
        problems.append(
            f"optimizer.lora: {opt.name} trains every parameter; LoRA adapters are for "
            f"{', '.join(with_lora)}. Remove optimizer.lora or change optimizer.name"
        )
    several = r.hardware.nodes > 1 or r.hardware.processes > 1
    several = several or (isinstance(r.hardware.gpus, int) and r.hardware.gpus > 1)
    harness_tasks = [t for t in r.training.eval_tasks if t not in superglue_tasks()]
    if harness_tasks and several:
        # The harness would run every doc on every rank of a sharded model: not tried.
        problems.append(
            f"training.eval_tasks: harness tasks ({', '.join(harness_tasks)}) are scored in "
            "one process; remove them here and run lomotune eval on the saved model"
        )
    return problems


def superglue_tasks() -> list[str]:
    from lomotune.evaluate.superglue import TASKS

    return list(TASKS)


# ---------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults when `path` is None), apply
    `key.path=value` overrides, validate. Raises RecipeError with every problem."""
    source = str(path) if path is not None else "recipe"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise RecipeError(problems, source)
    recipe = validate_recipe(raw, source)
    if path is not None:
        recipe = resolve_paths(recipe, Path(path).resolve().parent)
    return recipe


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(
            [f"no such file: {path}. Check the path (`lomotune recipes` lists the shipped ones)"],
            str(path),
        )
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError([f"not valid YAML{where}: {problem}"], str(path)) from None
    except OSError as e:
        raise RecipeError([f"cannot read it: {e.strerror}"], str(path)) from None
    except UnicodeDecodeError as e:  # random bytes, a binary file given as the recipe
        raise RecipeError(
            [f"not a YAML recipe: byte {e.start} is not UTF-8 text. Give the recipe's .yaml file"],
            str(path),
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(
            [
                f"the top level must be a mapping of sections (model:, data:, ...), not a {type(raw).__name__}"
            ],
            str(path),
        )
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`optimizer.lr=3e-5` -> raw["optimizer"]["lr"] = 3e-5 (the value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: write it as key.path=value, e.g. optimizer.lr=3e-5")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: {key!r} is not a key path like optimizer.lr")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError([describe_error(err, raw) for err in e.errors()], source) from None


# The names other trainers (Hugging Face TrainingArguments, torchtune, axolotl, litgpt)
# give lomotune's keys, by section: spelling is no guide to these (difflib takes
# `learning_rate` for `decay_rate`), so they are looked up before the closest spelling.
KEY_ALIASES: dict[str, dict[str, str]] = {
    "": {"optim": "optimizer", "trainer": "training", "train": "training", "dataset": "data"},
    "model": {
        "model_name": "name",
        "model_name_or_path": "name",
        "pretrained_model_name_or_path": "name",
        "path": "name",
        "dtype": "precision",
        "torch_dtype": "precision",
        "gradient_checkpointing": "activation_checkpointing",
    },
    "data": {
        "path": "source",
        "dataset": "source",
        "train_file": "source",
        "data_files": "source",
        "max_seq_length": "max_length",
        "max_seq_len": "max_length",
        "seq_len": "max_length",
        "sequence_len": "max_length",
        "cutoff_len": "max_length",
        "block_size": "max_length",
        "sample_packing": "packing",
    },
    "optimizer": {
        "learning_rate": "lr",
        "method": "name",
        "optim": "name",
        "type": "name",
        "lr_scheduler": "schedule",
        "lr_scheduler_type": "schedule",
        "scheduler": "schedule",
        "warmup": "warmup_steps",
        "num_warmup_steps": "warmup_steps",
        "max_grad_norm": "clip.max_norm",
        "gradient_clipping": "clip.max_norm",
        "gradient_accumulation_steps": "gradient_accumulation",
        "grad_accum": "gradient_accumulation",
        "adam_epsilon": "eps",
        "epsilon": "eps",
    },
    "training": {
        "per_device_train_batch_size": "batch_size",
        "train_batch_size": "batch_size",
        "micro_batch_size": "batch_size",
        "num_train_epochs": "epochs",
        "num_epochs": "epochs",
        "steps": "max_steps",
        "num_steps": "max_steps",
        "max_iters": "max_steps",
        "total_steps": "max_steps",
        "output": "output_dir",
        "out_dir": "output_dir",
        "save_steps": "save_every",
        "eval_steps": "eval_every",
        "logging_steps": "log_every",
        "save_total_limit": "keep_checkpoints",
    },
    "hardware": {"num_gpus": "gpus", "devices": "gpus", "num_threads": "threads"},
}


def describe_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = section_model(loc[:-1])
        known = list(parent.model_fields) if parent is not None else []
        alias = KEY_ALIASES.get(".".join(loc[:-1]), {}).get(loc[-1])
        guess = [alias] if alias else difflib.get_close_matches(loc[-1], known, n=1)
        hint = (
            f"did you mean {'.'.join([*loc[:-1], guess[0]])}?"
            if guess
            else f"known keys here: {', '.join(known)}"
        )
        return f"{key}: unknown key; {hint}"
    if kind == "value_error":
        # Our combination checks: each line already names its key.
        return err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    if kind == "literal_error":
        return f"{key}: {given!r} is not allowed; {err['msg'].lower()}"
    return f"{key}: {err['msg'].lower()} (got {given!r})"


def section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if sub is None:
            return None
        model = sub
    return model


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Local paths in a recipe are relative to the recipe file, not to the shell."""
    src = recipe.data.source
    if ":" not in src.split("/")[0] and not Path(src).is_absolute():
        candidate = base / src
        if candidate.exists():
            recipe.data.source = str(candidate)
    template = recipe.data.chat_template  # a file beside the recipe (else a template)
    if template and "{" not in template:
        with contextlib.suppress(OSError):  # a name too long for a file is no file
            if (base / template).is_file():
                recipe.data.chat_template = str(base / template)
    folder = recipe.data.superglue_dir
    if folder is not None and not Path(folder).is_absolute() and (base / folder).is_dir():
        recipe.data.superglue_dir = str(base / folder)
    name = recipe.model.name
    if (name.startswith(".") or "/" in name) and not Path(name).is_absolute():
        candidate = base / name
        if candidate.exists():
            recipe.model.name = str(candidate)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

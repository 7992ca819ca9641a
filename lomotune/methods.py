"""The training methods: one entry each. Every list of methods in lomotune derives from here.

A method is what `optimizer.name` names: how its engine runs (an update fused into
backward, forward passes only, or a torch optimizer after a full backward), its learning
rate, the recipe keys only it reads, how it runs on several processes, and what the
estimator must count for it. Adding a method is its update rule (or optimizer), its entry
below, and its tests.

Nothing here imports torch: the recipe schema, the estimator and the CLI read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a method's engine runs a step (optim/__init__.py builds the engine from it).
EngineKind = Literal["fused", "zeroth-order", "optimizer"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line, for tables and --help
    engine: EngineKind
    lr: float  # used when the recipe sets no optimizer.lr
    usual_lr: tuple[float, float]  # outside this range a warning names it
    lr_source: str  # where the default comes from
    # Several processes: "sharded" = FSDP2 (weights, gradients and state split over the
    # ranks); "replicated" = data parallel, every rank holds the whole model.
    processes: Literal["sharded", "replicated"]
    # optimizer.* keys that only some methods read: set for another method, they are refused.
    keys: frozenset[str] = frozenset()
    # LoRA adapters: "required" (trains only adapters), "optional" (optimizer.lora allowed).
    lora: Literal["no", "optional", "required"] = "no"
    quantized_base: bool = False  # the base weights frozen in 4-bit NF4 (QLoRA)
    # The update is lr x gradient added to the weight: in bf16, steps below the weight's
    # spacing are lost unless rounded stochastically.
    plain_sgd_step: bool = False
    # Below fp32, keeps fp32 master weights (and fp32 state) and computes the forward and
    # backward under bf16/fp16 autocast: the HF Trainer's `bf16=True`, the LOMO paper's AdamW.
    fp32_master_weights: bool = False

    @property
    def fused(self) -> bool:
        """The update is applied inside backward: no gradient survives a micro-batch."""
        return self.engine == "fused"

    @property
    def trains_adapters_only(self) -> bool:
        return self.lora == "required"


_ADAM_KEYS = frozenset({"betas", "eps"})
_FUSED_KEYS = frozenset({"stochastic_rounding"})

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "lomo",
            "LOMO: SGD applied inside backward (arXiv 2306.09782)",
            engine="fused",
            # The LOMO paper trains LLaMA on SuperGLUE at 3e-2 with global-norm clipping at
            # 1.0; without clipping (the default here) 1e-2 is the safer start.
            lr=1e-2,
            usual_lr=(1e-4, 1e-1),
            lr_source="LOMO paper: 3e-2 with clip 1.0",
            processes="sharded",
            keys=_FUSED_KEYS,
            plain_sgd_step=True,
        ),
        Method(
            "adalomo",
            "AdaLomo: LOMO with a factored second moment (arXiv 2310.10195)",
            engine="fused",
            lr=1e-3,
            usual_lr=(1e-5, 1e-2),
            lr_source="AdaLomo paper and lomo-optim: 1e-3",
            processes="sharded",
            keys=_FUSED_KEYS | {"adalomo_eps", "clip_threshold", "decay_rate"},
        ),
        Method(
            "mezo",
            "MeZO: zeroth-order SGD, forward passes only (arXiv 2305.17333)",
            engine="zeroth-order",
            lr=1e-6,
            usual_lr=(1e-8, 1e-4),
            lr_source="MeZO paper, full-parameter: 1e-6/1e-7",
            processes="replicated",
            keys=frozenset({"zo_eps", "zo_directions"}),
            lora="optional",
        ),
        Method(
            "qlora-sgd",
            "QLoRA base (4-bit NF4) + LoRA adapters, fused SGD (arXiv 2305.14314)",
            engine="fused",
            # QLoRA's 2e-4 is for paged AdamW; plain SGD on adapters (B starts at zero,
            # alpha/r 0.25) needs a far larger step. Measured (BENCHMARKS.md): held-out CB
            # 42 acc at 3e-1, 36 at 1e-1; the quickstart in 60 steps: loss 1.54 -> 0.12 and
            # 23/40 exact at 3e-1, 1.52 -> 0.71 at 1e-1, -> 1.31 at 2e-2.
            lr=3e-1,
            usual_lr=(1e-4, 1.0),
            lr_source="SGD on LoRA adapters, chosen on held-out CB; QLoRA's Adam uses 2e-4",
            processes="replicated",
            keys=_FUSED_KEYS,
            lora="required",
            quantized_base=True,
            plain_sgd_step=True,
        ),
        Method(
            "adamw",
            "baseline: AdamW, fp32 master weights + autocast below fp32 (HF Trainer's bf16)",
            engine="optimizer",
            lr=2e-5,
            usual_lr=(1e-6, 1e-3),
            lr_source="full fine-tuning with AdamW: 1e-5 to 5e-5",
            processes="sharded",
            keys=_ADAM_KEYS,
            fp32_master_weights=True,
        ),
        Method(
            "adamw-pure",
            "baseline: AdamW with weights and state in the model's precision (pure bf16)",
            engine="optimizer",
            lr=2e-5,
            usual_lr=(1e-6, 1e-3),
            lr_source="as adamw",
            processes="sharded",
            keys=_ADAM_KEYS,
        ),
        Method(
            "sgd",
            "baseline: plain SGD after a full backward",
            engine="optimizer",
            lr=1e-2,
            usual_lr=(1e-4, 1e-1),
            lr_source="as lomo",
            processes="sharded",
            plain_sgd_step=True,
        ),
        Method(
            "adam-mini",
            "baseline: Adam-mini, one second moment per block (arXiv 2406.16793)",
            engine="optimizer",
            lr=2e-5,
            usual_lr=(1e-6, 1e-3),
            lr_source="Adam-mini paper: AdamW's learning rate",
            processes="replicated",
            keys=_ADAM_KEYS,
        ),
        Method(
            "lora-adamw",
            "baseline: LoRA adapters (peft) + AdamW over the unquantized base",
            engine="optimizer",
            lr=2e-4,
            usual_lr=(1e-5, 3e-3),
            lr_source="LoRA and QLoRA papers: 1e-4 to 3e-4 with AdamW",
            processes="replicated",
            keys=_ADAM_KEYS,
            lora="required",
        ),
    )
}

NAMES: tuple[str, ...] = tuple(REGISTRY)
FUSED: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.fused)
# Every key that some method reads and others refuse.
METHOD_ONLY_KEYS: tuple[str, ...] = tuple(sorted(set().union(*(m.keys for m in REGISTRY.values()))))


def method(name: str) -> Method:
    """The entry of `name` (a validated recipe's optimizer.name)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"no method {name!r}; known: {', '.join(NAMES)}") from None


def readers_of(key: str) -> tuple[str, ...]:
    """The methods that read the method-only optimizer key `key`."""
    return tuple(n for n, m in REGISTRY.items() if key in m.keys)

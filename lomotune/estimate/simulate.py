"""`--simulate`: one real training step of lomotune's own engine and loss on a model
built under `FakeTensorMode`, every allocation counted by PyTorch's `MemTracker`.

Fake tensors have shapes, dtypes and devices but no storage: a LLaMA-7B step runs in
seconds and uses no memory. `MemTracker` (a TorchDispatchMode) follows every storage that
an op creates and keeps the running total and its peak: what a GPU's caching allocator
reports as `max_memory_allocated`, without its 512-byte rounding, fragmentation, the CUDA
context or cuBLAS workspaces (the analytic estimate shows those apart).

What cannot run on values that do not exist is answered by `_NoValues`, a dispatch mode
between the fake tensors and the tracker, so that the engines run unchanged:
- a Python number read from a tensor (`float(loss)`, `int(mask.sum())`) is 1: the step
  is then "finite", and every label token counts;
- a boolean-mask selection, or `nonzero` (the label positions in `causal_lm_loss`), keeps
  every element: the simulated batch has a label on every token and no padding, so that
  is exactly what a real step of the same batch selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lomotune import methods
from lomotune.errors import LomotuneError
from lomotune.recipe import ClipConfig, OptimizerConfig

aten = torch.ops.aten
# bitsandbytes' 4-bit weights do not exist under fake tensors, and LoRA adapters are not
# built in the simulated model: those methods have the analytic estimate only.
SIMULATED_METHODS = tuple(
    n for n, m in methods.REGISTRY.items() if not (m.quantized_base or m.lora == "required")
)
# Not a training method: the forward and loss under torch.no_grad, the inference peak
# that the fused methods are measured against.
FORWARD_ONLY = "no_grad"


class SimulationError(LomotuneError):
    """A configuration that cannot be simulated; the message says why."""


@dataclass
class Simulated:
    method: str
    peak_bytes: int  # every tensor alive at the worst moment of the step
    parts: dict[str, int]  # MemTracker's categories at that moment


class _NoValues(TorchDispatchMode):
    """Answers the data-dependent questions of a step on fake tensors (see module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
        if func is aten.index.Tensor:
            src, indices = args
            masks = [i for i in indices if i is not None and i.dtype == torch.bool]
            if masks:
                # Every mask element is True: the selected rows are all of them.
                (mask,) = masks
                rest = src.shape[mask.dim() :]
                out = torch.empty((mask.numel(), *rest), dtype=src.dtype, device=src.device)
                return out
        if func is aten.nonzero.default:
            t = args[0]
            return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
        return func(*args, **kwargs)


def step_tracker():
    """A MemTracker that accepts a module called several times in one forward (the loss
    calls the output head once per chunk; MeZO and AdamW's second step run the model
    again). Only the global peak is read, so the per-module statistics of an earlier
    call are simply dropped, and the per-module peaks are not kept at all: MemTracker
    updates them after every op by walking every tracked module, which is most of a
    simulation's time (a 4-layer test model: about 2x faster without it)."""
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            if not self._mod_tracker.is_bw:
                self.memory_tracking.pop(module, None)
            super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = deepcopy(snapshot)

    return StepTracker()


def build_fake_model(config, dtype: torch.dtype):
    """The causal LM of `config` with fake parameters in `dtype` (built in that dtype from
    the start: `.to()` cannot change a fake parameter's dtype in place)."""
    from transformers import AutoModelForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # dtype given as well: a config that names its own (a built-in alias's saved
        # float32) would otherwise win over the default, whatever --precision says.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def simulate_step(
    config,
    method: str,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "bf16",
    checkpointing: bool = True,
    loss_chunk_tokens: int | None = None,
    attention: str = "sdpa",
) -> Simulated:
    """Peak memory of one training step (the second for optimizers whose state appears
    at the first step) of `method` on the model of `config`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lomotune.loss import causal_lm_loss
    from lomotune.models import DTYPES
    from lomotune.precision import under_autocast
    from lomotune.recipe import ModelConfig

    if method not in (*methods.NAMES, FORWARD_ONLY):
        raise SimulationError(f"no method {method!r}; known: {', '.join(methods.NAMES)}")
    if method not in (*SIMULATED_METHODS, FORWARD_ONLY):
        raise SimulationError(
            f"{method} cannot be simulated (its 4-bit weights or LoRA adapters are not built "
            "under fake tensors); use the analytic estimate (drop --simulate)"
        )
    if loss_chunk_tokens is None:
        loss_chunk_tokens = ModelConfig().loss_chunk_tokens
    config = _training_config(config, attention)
    with FakeTensorMode(allow_non_fake_inputs=False), _NoValues():
        torch.manual_seed(0)
        autocast = method in methods.REGISTRY and methods.method(method).fp32_master_weights
        autocast = autocast and precision != "fp32"
        # fp32 master weights under autocast, as `lomotune train` runs them
        model = build_fake_model(config, torch.float32 if autocast else DTYPES[precision])
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        loss_fn = partial(causal_lm_loss, model, chunk_tokens=loss_chunk_tokens)
        if autocast:
            loss_fn = under_autocast(loss_fn, precision, "cpu")
        engine = _build_engine(method, model, loss_fn, precision)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            # The first step creates the state; the second, measured, holds it all along.
            # The first runs untracked (the tracker costs a quarter of a step's time):
            # the state it leaves is handed to the tracker below.
            engine.step([batch], 1e-5)
        tracker = step_tracker()
        tracker.track_external(model, ids, optimizer)
        with tracker:
            engine.step([batch], 1e-5)
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
        parts = {str(getattr(k, "value", k)): int(v) for k, v in snapshot.items() if k != "Total"}
        return Simulated(method=method, peak_bytes=int(snapshot["Total"]), parts=parts)


def _training_config(config, attention: str):
    config = type(config).from_dict(config.to_dict())
    config.use_cache = False
    config._attn_implementation = attention
    return config


class _ForwardOnly:
    """`FORWARD_ONLY`'s engine: the loss of the batch, nothing kept for a backward."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def step(self, batches, lr: float) -> None:
        with torch.no_grad():
            for batch in batches:
                self.loss_fn(batch)


def _build_engine(method: str, model, loss_fn, precision: str):
    """The engine `lomotune train` builds for `method` (optim.build_engine's choices)."""
    from lomotune.optim.engine import DynamicLossScale, FusedEngine
    from lomotune.optim.slices import slice_bytes_for

    if method == FORWARD_ONLY:
        return _ForwardOnly(loss_fn)
    if method in ("lomo", "adalomo"):
        if method == "adalomo":
            from lomotune.optim.adalomo import AdaLomoRule

            rule = AdaLomoRule()
        else:
            from lomotune.optim.lomo import LomoRule

            rule = LomoRule()
        scale = DynamicLossScale(2.0**16, 1000) if precision == "fp16" else None
        # The fake tensors are on the CPU; the step simulated is a GPU's: its slices.
        return FusedEngine(
            model, rule, loss_fn, clip=ClipConfig(), loss_scale=scale,
            slice_bytes=slice_bytes_for("cuda"),
        )  # fmt: skip
    if method == "mezo":
        from lomotune.optim.mezo import MezoEngine

        return MezoEngine(model, loss_fn)
    from lomotune.optim.baseline import OptimizerEngine, build_optimizer

    # The GPU's optimizer: fused AdamW (no parameter-sized temporary), not the CPU's
    # foreach one (a sqrt(v) of every parameter), which the fake CPU tensors would pick.
    optimizer = build_optimizer(model, OptimizerConfig(name=method, lr=1e-5), device_type="cuda")
    return OptimizerEngine(model, optimizer, loss_fn, clip=ClipConfig())

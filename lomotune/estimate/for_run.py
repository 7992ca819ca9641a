"""The estimate beside a training run: what a recipe is predicted to need on the device
at hand (set next to the measured peak at the end), `training.batch_size: auto`, and
the batch that would have fit when a run stops out of memory.

What is compared with what:
- on a GPU the measured peak is the CUDA allocator's `max_memory_allocated`: the same
  quantity as the estimate's "tensors at the peak" (the CUDA context is apart in both);
- on a CPU the measured peak is the process's RSS, which also holds the Python and torch
  runtime, the tokenizer and the data. The run therefore also records its step memory:
  the largest rise of RSS within one step (from its start to its peak), the first step
  left out (it pages in memory-mapped weights, creates optimizer state, imports code),
  set against the estimate's tensors beyond the weights and optimizer state. It also
  holds the malloc arenas' slack: the nearest measured number a CPU run has without a
  tracker, comparable on a real model, not on a tiny one (a few MiB of tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lomotune.estimate.analytic import Estimate, EstimateError, GiB, Setup, estimate
from lomotune.estimate.shapes import shape_of

# Share of a device that `batch_size: auto` fills: the estimate is within 10% of a
# simulated step, and the allocator's fragmentation (GPU) or other processes and the
# malloc arenas (CPU) need the rest.
GPU_MARGIN = 0.9
CPU_MARGIN = 0.8
# A batch that swallows the data set leaves a run of a handful of updates (900 rows in one
# batch: one update per epoch, and the fused methods cannot accumulate), which no memory
# saving is worth: auto keeps an epoch at least this many updates long where the data
# allows.
MIN_UPDATES_PER_EPOCH = 16


@dataclass(frozen=True)
class Budget:
    bytes: int
    reason: str  # for people: "90% of the 23.50 GiB free on the GPU"


def device_budget(device: torch.device, *, whole_device: bool = False) -> Budget | None:
    """The bytes a run may use on `device`: what is free now (for `batch_size: auto`,
    taken before the model is loaded) or, with whole_device, the device's size (for the
    advice after an out-of-memory stop). None where the system does not say."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        have, what = (total, "of the GPU's") if whole_device else (free, "free on the GPU:")
        return Budget(int(have * GPU_MARGIN), f"{GPU_MARGIN:.0%} {what} {have / GiB:.2f} GiB")
    key = "MemTotal" if whole_device else "MemAvailable"
    have = _meminfo_bytes(key)
    if have is None:
        return None
    what = "RAM" if whole_device else "RAM available:"
    return Budget(int(have * CPU_MARGIN), f"{CPU_MARGIN:.0%} of the {what} {have / GiB:.2f} GiB")


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    memory = psutil.virtual_memory()
    return int(memory.total if key == "MemTotal" else memory.available)


def run_setup(recipe, config, device_type: str, world_size: int, batch_size: int) -> Setup:
    """The estimate's Setup for a resolved recipe: `batch_size` is the recipe's (split
    over the processes), sequences are data.max_length long (the longest a batch gets)."""
    lora = recipe.optimizer.lora
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    return Setup(
        method=recipe.optimizer.name,
        batch_size=math.ceil(batch_size / world_size),
        seq_len=recipe.data.max_length,
        precision=recipe.model.precision,
        checkpointing=recipe.model.activation_checkpointing,
        gpus=world_size,
        attention="eager" if attention == "eager" else "sdpa",
        loss_chunk_tokens=recipe.model.loss_chunk_tokens,
        device="cuda" if device_type == "cuda" else "cpu",
        lora_rank=lora.r if lora else 64,
    )


def needed_bytes(e: Estimate, device_type: str) -> int:
    """What must fit: the tensors, plus the CUDA context and allocator slack on a GPU."""
    return e.total_bytes if device_type == "cuda" else e.tensor_bytes


def predict(recipe, config, device_type: str, world_size: int, batch: int) -> Estimate:
    """The estimate of the recipe's step at `batch`; EstimateError says what it does not
    cover."""
    setup = run_setup(recipe, config, device_type, world_size, batch)
    return estimate(shape_of(config), setup)


def largest_batch(
    recipe, config, device_type: str, world_size: int, budget: Budget, limit: int
) -> int:
    """The largest batch (a multiple of the processes, at most `limit`) whose estimate
    fits the budget; 0 when not even one row a process fits."""
    shape = shape_of(config)
    base = run_setup(recipe, config, device_type, world_size, world_size)

    def fits(rows_per_process: int) -> bool:
        e = estimate(shape, replace(base, batch_size=rows_per_process))
        return needed_bytes(e, device_type) <= budget.bytes

    return largest_fitting(fits, max(1, limit // world_size)) * world_size


def largest_fitting(fits, limit: int) -> int:
    """The largest n in 1..limit with fits(n) (fits holds up to some n, then never
    again), found by doubling then bisecting; 0 when fits(1) does not hold."""
    if not fits(1):
        return 0
    lo, hi = 1, limit + 1  # fits(lo); hi is the first known not to (or past the limit)
    probe = 2
    while probe <= limit:
        if not fits(probe):
            hi = probe
            break
        lo, probe = probe, probe * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def choose_batch_size(
    recipe, config, device_type: str, world_size: int, budget: Budget | None, rows: int
) -> tuple[int, str]:
    """(batch size, why) for `training.batch_size: auto`: the largest batch the estimate
    fits in `budget`, at most the one that keeps an epoch of the `rows` training rows
    MIN_UPDATES_PER_EPOCH updates long (at least one row a process). Raises EstimateError."""
    if budget is None:
        raise EstimateError(
            "this system does not say how much memory is free (/proc/meminfo, psutil)"
        )
    rows_per_update = MIN_UPDATES_PER_EPOCH * recipe.optimizer.gradient_accumulation
    cap = max(world_size, rows // rows_per_update // world_size * world_size)
    batch = largest_batch(recipe, config, device_type, world_size, budget, limit=cap)
    seq = recipe.data.max_length
    if batch == 0:
        one = predict(recipe, config, device_type, world_size, world_size)
        raise EstimateError(
            f"not even 1 sequence of {seq} tokens fits: the estimate needs "
            f"{needed_bytes(one, device_type) / GiB:.2f} GiB, the budget is {budget.reason}"
        )
    e = predict(recipe, config, device_type, world_size, batch)
    why = (
        f"training.batch_size auto: {batch} ({recipe.optimizer.name}, sequences of up to {seq} "
        f"tokens: the estimate at {batch} is {needed_bytes(e, device_type) / GiB:.2f} GiB, "
        f"within {budget.reason}"
    )
    if batch + world_size > cap:
        updates = rows // (batch * recipe.optimizer.gradient_accumulation)
        why += (
            f"; at most {cap} so that an epoch of the {rows} training rows is {updates} "
            f"updates, not a handful: auto keeps at least {MIN_UPDATES_PER_EPOCH} where the "
            "data allows)"
        )
    else:
        more = predict(recipe, config, device_type, world_size, batch + world_size)
        why += f"; {batch + world_size} would need {needed_bytes(more, device_type) / GiB:.2f} GiB)"
    return batch, why


def comparison(e: Estimate | None, note: str | None, step_memory: int | None, kind: str) -> dict:
    """The summary's memory entries: predicted next to measured, and what is comparable.
    `step_memory`: the largest rise of the measured memory within a step, over every
    step but the first (None after a single step)."""
    out: dict = {"peak_memory_predicted": e.tensor_bytes if e else None}
    if e is None:
        out["peak_memory_predicted_note"] = note
        return out
    out["peak_memory_predicted_at"] = e.phase
    out["peak_memory_predicted_parts"] = {k: v for k, v in e.parts.items() if k != "cuda_overhead"}
    if kind.startswith("cuda"):
        out["memory_compare"] = "peak memory (allocator) against predicted: the same tensors"
    else:
        persistent = ("weights", "lora_adapters", "optimizer_state")
        out["step_memory"] = step_memory
        out["step_memory_predicted"] = e.tensor_bytes - sum(e.parts.get(k, 0) for k in persistent)
        out["memory_compare"] = (
            "process RSS holds the runtime and the data: compare step memory (the largest "
            "rise of RSS within a step, first step left out) with its prediction (the "
            "tensors beyond the weights and optimizer state)"
        )
    return out

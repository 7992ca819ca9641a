"""The fused-update engine: each parameter is updated inside backward, the moment its
gradient is complete, and the gradient is freed at once (LOMO, arXiv 2306.09782).

`register_post_accumulate_grad_hook` (PyTorch >= 2.1) fires once per parameter after
its gradient has been fully accumulated: for tied weights (embedding = lm_head) both
uses are summed before the hook runs, and no scan over all parameters is needed (the
reference LOMO hook fires before the gradient is written and scans every parameter).

What each step does, in order:
1. forward; a non-finite loss skips the step before anything is applied;
2. a norm pass, only when needed (clip.mode exact, the first step of clip.mode previous,
   and every fp16 step): backward with the graph kept, hooks add up squared gradient
   norms and drop the gradients; fp16 overflow is found here, so nothing is applied from
   a bad step;
3. the update pass: backward; each hook checks its gradient, then lets the update rule
   walk the parameter in row slices (fp32, unscaled and clipped: slices.SlicedUpdate),
   each slice written back (stochastic rounding for bf16) before the next is made, so
   the update's temporaries stay within `slice_bytes` whatever the tensor; then the
   gradient is freed.

A non-finite gradient never reaches a weight. Each hook checks its gradient on the
device (no sync) and folds the answer into a running flag; from the first bad tensor on,
every update of the step is gated to change nothing (weights and optimizer state). After
backward one sync reads the flags: the step is reported as skipped, naming the tensors.
What a fused step cannot undo: tensors whose hooks fired *before* the bad one already
hold their update. Only a norm pass (clip.mode exact, and every fp16 step) sees every
gradient before anything is applied, and then nothing is.

The update rule (lomo: SGD, adalomo: factored Adafactor-style) is a small object with
per-parameter state; the engine's `state_dict` carries that state, the loss scale and
the clipping memory, so that a resume is exact.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from lomotune.distributed.rows import (
    local_shard,
    rows_as_dtensor,
    rows_of_rank,
    sum_over_ranks,
    sum_replicated_gradient,
    whole_rows,
)
from lomotune.optim import kernels
from lomotune.optim.seeds import mix64
from lomotune.optim.slices import SlicedUpdate, all_finite, slice_bytes_for, sum_of_squares
from lomotune.recipe import ClipConfig

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], tuple[torch.Tensor, int]]  # batch -> (summed loss, label tokens)


@dataclass
class StepResult:
    loss: float  # mean loss per label token over the step's micro-batches
    tokens: int  # non-padding input tokens processed
    loss_tokens: int  # tokens that carried a label
    grad_norm: float | None = None  # global norm before clipping, when it was computed
    # Why the step was bad ("non-finite loss", "fp16 overflow", "non-finite gradient"),
    # and what it did or did not apply, naming the tensors.
    skipped: str | None = None
    detail: str | None = None
    loss_scale: float | None = None  # fp16 only


class UpdateRule(Protocol):
    """One optimizer's update of one parameter, given its complete gradient."""

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def apply(
        self,
        update: SlicedUpdate,  # the parameter and its gradient, fp32 in row slices
        state: dict[str, torch.Tensor],
        lr: float,
        step: int,  # 1-based number of this update
        ok: torch.Tensor,  # 0-dim bool on the device: False = change nothing (NaN-safe)
    ) -> None: ...


class Engine(Protocol):
    """What the trainer and checkpoints use of every engine (FusedEngine, MezoEngine,
    OptimizerEngine): one training step, the loss alone (evaluation), and state that
    resumes exactly."""

    loss_fn: LossFn
    # Wall seconds spent in the updates (the fused hooks' updates, MeZO's update,
    # optimizer.step) since a caller last set it; None, the default, times nothing. A
    # benchmark sets 0.0 and reads it after its steps (see `timed_update`).
    update_seconds: float | None

    def step(self, batches: list[Batch], lr: float) -> StepResult: ...

    def state_dict(self, gather: bool = True) -> tuple[dict[str, torch.Tensor], dict]: ...

    def state_template(
        self, saved: dict[str, tuple[torch.Size, torch.dtype]]
    ) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...

    def close(self) -> None: ...


class DynamicLossScale:
    """fp16 loss scaling: halve on overflow, double after `window` clean steps."""

    def __init__(self, scale: float, window: int, min_scale: float = 1.0):
        self.scale = scale
        self.window = window
        self.min_scale = min_scale
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.min_scale, self.scale / 2)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.window:
                self.scale *= 2
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


def timed_update(engine: Engine, device: torch.device, update: Callable, *args) -> None:
    """`update(*args)`; while `engine.update_seconds` is not None its wall time is added
    there, `device` synchronized before and after (a GPU runs kernels asynchronously: else
    the time would be their launch, not their run)."""
    if engine.update_seconds is None:
        update(*args)
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    update(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    engine.update_seconds += time.perf_counter() - started


def count_tokens(batch: Batch) -> int:
    """Tokens that are not padding (the loader counts them; packed batches have no mask)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class FusedEngine:
    """Applies `rule` to every trainable parameter of `model` inside backward."""

    def __init__(
        self,
        model: torch.nn.Module,
        rule: UpdateRule,
        loss_fn: LossFn,
        *,
        clip: ClipConfig,
        stochastic_rounding: bool = True,
        loss_scale: DynamicLossScale | None = None,
        seed: int = 0,
        slice_bytes: int | None = None,  # None: the budget of the parameters' device
    ):
        self.model = model
        self.rule = rule
        self.loss_fn = loss_fn
        self.clip = clip
        self.stochastic_rounding = stochastic_rounding
        self.loss_scale = loss_scale
        self.seed = seed
        # Temporaries of one update, whatever the tensor.
        device = next((local_shard(p)[0].device for p in model.parameters()), None)
        self.slice_bytes = slice_bytes or slice_bytes_for(device.type if device else "cuda")
        self.step_count = 0  # updates applied so far
        self.previous_norm: float | None = None
        self.update_seconds: float | None = None  # see Engine
        # Trainable parameters, each once (tied weights appear once in named_parameters).
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Under FSDP2 (several processes) each parameter is a DTensor: the rule sees and
        # keeps state for this rank's shard only; norms are summed over ranks.
        self.sharded = any(local_shard(p)[0] is not p for p in self.params)
        self.states: list[dict[str, torch.Tensor]] = [
            rule.init_state(local_shard(p)[0].detach()) for p in self.params
        ]
        # Per-step settings read by the hooks.
        self._mode = "idle"  # "norm" | "update" | "idle"
        # Per parameter, in the order the hooks fired: (index, squared norm) and
        # (index, gradient finite). Read once after backward: one sync per step.
        self._sq_parts: list[tuple[int, torch.Tensor]] | None = None
        self._finite: list[tuple[int, torch.Tensor]] = []
        self._ok: torch.Tensor | None = None  # all gradients so far finite (on the device)
        self._lr = 0.0
        self._grad_factor = 1.0  # 1 / loss scale * global clip coefficient
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, p in enumerate(self.params)
        ]

    # -- the compiled kernels ----------------------------------------------------------

    def prepare_kernels(self) -> str | None:
        """On a GPU, build every update kernel this run will call, as its hooks will call
        them, and check them against the eager ops (kernels.prepare), before training:
        None when the hooks will run them, else why not (the eager ops run)."""
        device = local_shard(self.params[0])[0].device if self.params else None
        if device is None or device.type == "cpu":
            return None
        return kernels.prepare(device, self._kernel_checks())

    def _kernel_checks(self) -> dict[str, kernels.Check]:
        """One update of a small matrix and a small vector per trainable dtype, with this
        run's rule, weight decay, clipping (a tensor factor per tensor), rounding and (under
        FSDP2) a shard's offset: each variant a compiled kernel specializes on."""
        rule = copy.copy(self.rule)
        if getattr(rule, "sum_over_shards", None) is not None:
            rule.sum_over_shards = None  # one device's update: the collective is no kernel
        per_tensor = self.clip.mode == "per-tensor"
        checks: dict[str, kernels.Check] = {}
        dtypes = sorted({local_shard(p)[0].dtype for p in self.params}, key=str)
        for dtype in dtypes:
            rounding = dtype == torch.bfloat16 and self.stochastic_rounding
            if rounding:
                checks["rounding"] = kernels.rounding_check
            for shape in ((6, 40), (40,)):
                for start in (0, 240) if self.sharded else (0,):
                    name = f"{type(rule).__name__} update ({dtype}, {shape}, offset {start})"
                    checks[name] = _update_check(rule, dtype, shape, start, per_tensor, rounding)
        return checks

    # -- the step ----------------------------------------------------------------------

    def step(self, batches: list[Batch], lr: float) -> StepResult:
        if len(batches) != 1:
            raise ValueError("a fused engine updates inside backward: one micro-batch per step")
        batch = batches[0]
        loss_sum, n = self.loss_fn(batch)
        tokens = count_tokens(batch)
        loss = loss_sum / max(n, 1)
        loss_value = float(loss.detach())
        scale = self.loss_scale.scale if self.loss_scale else None
        result = StepResult(loss=loss_value, tokens=tokens, loss_tokens=n, loss_scale=scale)
        if not math.isfinite(loss_value):
            result.skipped = "non-finite loss"
            return result
        scaled = loss * scale if scale else loss

        needs_norm_pass = (
            self.clip.mode == "exact"
            or (self.clip.mode == "previous" and self.previous_norm is None)
            or self.loss_scale is not None
        )
        unscale = 1.0 / scale if scale else 1.0
        clip_coef = 1.0
        if needs_norm_pass:
            norm, bad = self._backward_for_norm(scaled)
            norm *= unscale
            result.grad_norm = norm
            if not math.isfinite(norm):
                if self.loss_scale is not None:
                    self.loss_scale.update(overflow=True)
                result.skipped = (
                    "fp16 overflow" if self.loss_scale is not None else "non-finite gradient"
                )
                result.detail = f"in {self._describe(bad)}; nothing applied (norm pass first)"
                return result
            if self.clip.mode in ("exact", "previous"):
                clip_coef = min(1.0, self.clip.max_norm / (norm + 1e-6))
            if self.clip.mode == "previous":
                self.previous_norm = norm
        elif self.clip.mode == "previous":
            clip_coef = min(1.0, self.clip.max_norm / (self.previous_norm + 1e-6))

        self.step_count += 1
        self._lr = lr
        self._grad_factor = unscale * clip_coef
        track = self.clip.mode == "previous" and not needs_norm_pass
        self._sq_parts = [] if track else None
        self._finite, self._ok = [], None
        self._mode = "update"
        try:
            scaled.backward()
        finally:
            self._mode = "idle"
        norm, finite = self._read_step()  # the step's one sync
        fired = [index for index, _ in self._finite]
        bad = [index for index, f in zip(fired, finite, strict=True) if not f]
        if track:
            # This step's norm, measured on the way, clips the next step; after a bad
            # step the next one measures its own norm first.
            self.previous_norm = norm * unscale if math.isfinite(norm) and not bad else None
            result.grad_norm = norm * unscale
        if bad:
            applied = fired.index(bad[0])
            result.skipped = "non-finite gradient"
            result.detail = (
                f"in {self._describe(bad)}; the {applied} tensor(s) whose hooks fired before "
                f"it kept their update, the other {len(fired) - applied} were left unchanged "
                "(clip.mode: exact checks every gradient before applying any)"
            )
        if self.loss_scale is not None:
            self.loss_scale.update(overflow=bool(bad))
        return result

    def _backward_for_norm(self, loss: torch.Tensor) -> tuple[float, list[int]]:
        """(global gradient norm, indices of parameters whose squared norm is not finite)."""
        self._sq_parts = []
        self._mode = "norm"
        try:
            loss.backward(retain_graph=True)
        finally:
            self._mode = "idle"
        indices = [index for index, _ in self._sq_parts]
        parts = self._sq_values()
        bad = [i for i, v in zip(indices, parts, strict=True) if not math.isfinite(v)]
        return math.sqrt(sum(parts)), bad

    def _sq_values(self) -> list[float]:
        parts, self._sq_parts = self._sq_parts or [], None
        if not parts:
            return []
        device = parts[0][1].device
        stacked = torch.stack([p.to(device) for _, p in parts])
        # Sharded: each rank squared its own rows; one all-reduce gives every parameter's.
        return (sum_over_ranks(stacked) if self.sharded else stacked).tolist()

    def _read_step(self) -> tuple[float, list[bool]]:
        """(this step's gradient norm when tracked, else nan; per fired hook: finite?).
        One device sync for both."""
        sq = self._sq_parts or []
        values = [p for _, p in sq] + [f.float() for _, f in self._finite]
        self._sq_parts = None
        if not values:
            return math.nan, []
        device = values[0].device
        stacked = torch.stack([v.to(device) for v in values])
        ranks = 1
        if self.sharded:  # squared norms of the shards and finite flags, summed over ranks
            stacked, ranks = sum_over_ranks(stacked), torch.distributed.get_world_size()
        read = stacked.tolist()
        norm = math.sqrt(sum(read[: len(sq)])) if sq else math.nan
        return norm, [v == ranks for v in read[len(sq) :]]

    def _describe(self, indices: list[int]) -> str:
        names = [self.names[i] for i in indices]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return shown or "the gradients"

    # -- the hook ----------------------------------------------------------------------

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = sum_replicated_gradient(param.grad)  # data parallel: every rank's rows
            param.grad = None  # freed now, whatever happens below
            if self._mode == "norm":
                self._sq_parts.append(
                    (index, sum_of_squares(local_shard(grad)[0], self.slice_bytes))
                )
            elif self._mode == "update":
                timed_update(self, param.device, self._update, index, param, grad)

        return hook

    @torch.no_grad()
    def _update(self, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        param, offset = local_shard(param)  # this rank's rows under FSDP2, else the whole
        grad = local_shard(grad)[0]
        # A first read-only pass over the gradient, slice by slice: is it finite (and its
        # squared norm, when clipping needs it)? Only then may any slice be applied.
        needs_norm = self._sq_parts is not None or self.clip.mode == "per-tensor"
        if needs_norm:
            sq = sum_of_squares(grad, self.slice_bytes)
            if self._sq_parts is not None:
                self._sq_parts.append((index, sq))
            finite = sq.isfinite()
        else:
            finite = all_finite(grad, self.slice_bytes)
        self._finite.append((index, finite))
        # From the first bad gradient on, nothing of this step is applied.
        ok = finite if self._ok is None else self._ok.to(finite.device) & finite
        self._ok = ok
        factor: float | torch.Tensor = self._grad_factor
        if self.clip.mode == "per-tensor":
            norm = (sum_over_ranks(sq) if self.sharded else sq).sqrt() * self._grad_factor
            factor = (self.clip.max_norm / (norm + 1e-6)).clamp(max=1.0) * self._grad_factor
        rounding = param.dtype == torch.bfloat16 and self.stochastic_rounding
        update = SlicedUpdate(
            param, grad, factor, budget=self.slice_bytes, start=offset,
            # Keyed by (run seed, step, parameter), indexed by the element's place in the
            # whole tensor: the noise does not depend on the order in which hooks fire,
            # on slicing or on sharding, and a resumed run draws what a straight run would.
            round_key=mix64(self.seed, self.step_count, index) if rounding else None,
        )  # fmt: skip
        self.rule.apply(update, self.states[index], self._lr, self.step_count, ok)

    # -- state -------------------------------------------------------------------------

    def state_dict(self, gather: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors by '<param name>/<state key>', JSON-able scalars). Sharded, a state
        tensor cut by its parameter's rows is gathered whole (a collective), so the format
        is one process's; with `gather=False` it is the DTensor of this rank's rows, for a
        sharded checkpoint."""
        by_rows = whole_rows if gather else rows_as_dtensor
        tensors = {
            f"{name}/{key}": t if self._whole_on_every_rank(key, p) else by_rows(t, p)
            for name, p, st in zip(self.names, self.params, self.states, strict=True)
            for key, t in st.items()
        }
        meta = {
            "step_count": self.step_count,
            "previous_norm": self.previous_norm,
            "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None,
        }
        return tensors, meta

    def state_template(
        self, saved: dict[str, tuple[torch.Size, torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        """Empty tensors, shaped as this process holds its state (DTensors of its rows when
        sharded), for a sharded checkpoint to be read into; `saved` (the shapes and dtypes
        it holds) is not needed: every parameter has its state from the start."""
        return {k: torch.empty_like(t) for k, t in self.state_dict(gather=False)[0].items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Tensors whole (the format of one process) or, from a sharded checkpoint, as
        `state_template` made them."""
        for name, p, st in zip(self.names, self.params, self.states, strict=True):
            for key in st:
                t = tensors[f"{name}/{key}"]
                st[key].copy_(t if self._whole_on_every_rank(key, p) else rows_of_rank(t, p))
        self.step_count = int(meta["step_count"])
        self.previous_norm = meta["previous_norm"]
        if self.loss_scale is not None and meta.get("loss_scale"):
            self.loss_scale.load_state_dict(meta["loss_scale"])

    def _whole_on_every_rank(self, key: str, param: torch.Tensor) -> bool:
        """A state tensor that is not cut by the parameter's rows (AdaLomo's column
        statistics of a matrix): every rank holds it whole."""
        whole_on_every_rank = getattr(self.rule, "whole_on_every_rank", None)
        return whole_on_every_rank is not None and whole_on_every_rank(key, param)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _update_check(
    rule: UpdateRule,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    start: int,
    per_tensor: bool,
    rounding: bool,
) -> kernels.Check:
    """Two steps of `rule` on one small parameter on a device (the second with the state
    of the first): the weights and the state it leaves, as `kernels.prepare` compares them."""

    @torch.no_grad()  # as in the hooks: grad mode is part of what a compiled kernel is
    def check(device: torch.device) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        # a Parameter, as the hooks get it (whether it requires grad is part of a kernel too)
        param = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype).to(device))
        grads = [(torch.randn(shape, generator=g) * 0.01).to(dtype).to(device) for _ in "ab"]
        state = rule.init_state(param)
        factor = torch.full((), 0.5, device=device) if per_tensor else 0.5
        ok = torch.ones((), dtype=torch.bool, device=device)
        for step, grad in enumerate(grads, start=1):
            key = mix64(7, step, 0) if rounding else None
            update = SlicedUpdate(param, grad, factor, round_key=key, start=start)
            rule.apply(update, state, 1e-2, step, ok)
        return [param.detach(), *state.values()]

    return check

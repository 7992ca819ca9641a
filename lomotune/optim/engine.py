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
3. the update pass: backward; each hook unscales and clips its gradient, lets the
   update rule change the parameter (in fp32), writes it back (stochastic rounding for
   bf16) and frees the gradient.

The update rule (lomo: SGD, adalomo: factored Adafactor-style) is a small object with
per-parameter state; the engine's `state_dict` carries that state, the loss scale and
the clipping memory, so that a resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from lomotune.optim.rounding import stochastic_round_into
from lomotune.recipe import ClipConfig

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], tuple[torch.Tensor, int]]  # batch -> (summed loss, label tokens)


@dataclass
class StepResult:
    loss: float  # mean loss per label token over the step's micro-batches
    tokens: int  # non-padding input tokens processed
    loss_tokens: int  # tokens that carried a label
    grad_norm: float | None = None  # global norm before clipping, when it was computed
    skipped: str | None = None  # why the step applied nothing ("non-finite loss", "fp16 overflow")
    loss_scale: float | None = None  # fp16 only


class UpdateRule(Protocol):
    """One optimizer's update of one parameter, given its complete gradient."""

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def apply(
        self,
        param: torch.Tensor,  # fp32 working copy, updated in place
        grad: torch.Tensor,  # fp32, unscaled and clipped; the rule may modify it
        state: dict[str, torch.Tensor],
        lr: float,
        step: int,  # 1-based number of this update
    ) -> None: ...


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
    ):
        self.model = model
        self.rule = rule
        self.loss_fn = loss_fn
        self.clip = clip
        self.stochastic_rounding = stochastic_rounding
        self.loss_scale = loss_scale
        self.seed = seed
        self.step_count = 0  # updates applied so far
        self.previous_norm: float | None = None
        # Trainable parameters, each once (tied weights appear once in named_parameters).
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.states: list[dict[str, torch.Tensor]] = [rule.init_state(p) for p in self.params]
        self._generators: dict[torch.device, torch.Generator] = {}
        # Per-step settings read by the hooks.
        self._mode = "idle"  # "norm" | "update" | "idle"
        self._sq_parts: list[torch.Tensor] | None = None  # per-parameter squared norms
        self._lr = 0.0
        self._grad_factor = 1.0  # 1 / loss scale * global clip coefficient
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, p in enumerate(self.params)
        ]

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
            norm = self._backward_for_norm(scaled) * unscale
            result.grad_norm = norm
            if not math.isfinite(norm):
                if self.loss_scale is not None:
                    self.loss_scale.update(overflow=True)
                result.skipped = (
                    "fp16 overflow" if self.loss_scale is not None else "non-finite gradient"
                )
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
        self._mode = "update"
        try:
            scaled.backward()
        finally:
            self._mode = "idle"
        if track:
            # This step's norm, measured on the way, clips the next step.
            self.previous_norm = self._total_norm() * unscale
            result.grad_norm = self.previous_norm
        if self.loss_scale is not None:
            self.loss_scale.update(overflow=False)
        return result

    def _backward_for_norm(self, loss: torch.Tensor) -> float:
        self._sq_parts = []
        self._mode = "norm"
        try:
            loss.backward(retain_graph=True)
        finally:
            self._mode = "idle"
        return self._total_norm()

    def _total_norm(self) -> float:
        # One device sync per step, not one per parameter.
        parts, self._sq_parts = self._sq_parts, None
        if not parts:
            return 0.0
        return math.sqrt(float(torch.stack([p.to(parts[0].device) for p in parts]).sum()))

    # -- the hook ----------------------------------------------------------------------

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None  # freed now, whatever happens below
            if self._mode == "norm":
                self._sq_parts.append(grad.detach().float().pow(2).sum())
            elif self._mode == "update":
                self._update(index, param, grad)

        return hook

    @torch.no_grad()
    def _update(self, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        # The hook already took the gradient off the parameter, so nothing else holds it:
        # an fp32 gradient is modified in place, not copied (one copy less per tensor).
        g = grad.float()
        if self._sq_parts is not None:
            self._sq_parts.append(g.pow(2).sum())
        if self._grad_factor != 1.0:
            g.mul_(self._grad_factor)
        if self.clip.mode == "per-tensor":
            g.mul_((self.clip.max_norm / (g.norm() + 1e-6)).clamp(max=1.0))
        working = param if param.dtype == torch.float32 else param.float()
        self.rule.apply(working, g, self.states[index], self._lr, self.step_count)
        if working is not param:
            if param.dtype == torch.bfloat16 and self.stochastic_rounding:
                stochastic_round_into(param, working, self._generator(index, param.device))
            else:
                param.copy_(working)

    def _generator(self, index: int, device: torch.device) -> torch.Generator:
        # Seeded from (run seed, step, parameter): the noise does not depend on the order
        # in which hooks fire, and a resumed run draws exactly what a straight run would.
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + self.step_count) * 100_003 + index)
        return gen

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors by '<param name>/<state key>', JSON-able scalars)."""
        tensors = {
            f"{name}/{key}": t
            for name, st in zip(self.names, self.states, strict=True)
            for key, t in st.items()
        }
        meta = {
            "step_count": self.step_count,
            "previous_norm": self.previous_norm,
            "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for name, st in zip(self.names, self.states, strict=True):
            for key in st:
                st[key].copy_(tensors[f"{name}/{key}"])
        self.step_count = int(meta["step_count"])
        self.previous_norm = meta["previous_norm"]
        if self.loss_scale is not None and meta.get("loss_scale"):
            self.loss_scale.load_state_dict(meta["loss_scale"])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

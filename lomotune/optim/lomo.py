"""LOMO (arXiv 2306.09782): plain SGD, applied by the fused engine inside backward."""

from __future__ import annotations

import torch

from lomotune.optim.slices import SlicedUpdate, must_gate


class LomoRule:
    """p <- p - lr * (g + weight_decay * p): torch.optim.SGD without momentum.
    Clipping and loss scaling are applied to g by the engine before this runs."""

    def __init__(self, weight_decay: float = 0.0):
        self.weight_decay = weight_decay

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}  # SGD keeps nothing between steps

    def apply(self, update: SlicedUpdate, state, lr: float, step: int, ok: torch.Tensor) -> None:
        # Elementwise: one pass over the slices.
        gate = must_gate(ok)
        for _, param, grad in update.update():
            if self.weight_decay:
                grad.add_(param, alpha=self.weight_decay)  # coupled, as torch.optim.SGD
            if gate:  # a gated update adds exactly zero (masked_fill replaces NaN too)
                grad.masked_fill_(~ok, 0.0)
            param.add_(grad, alpha=-lr)

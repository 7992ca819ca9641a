"""LOMO (arXiv 2306.09782): plain SGD, applied by the fused engine inside backward."""

from __future__ import annotations

import torch

from lomotune.optim import kernels
from lomotune.optim.rounding import rounded_elementwise
from lomotune.optim.slices import SlicedUpdate, must_gate


class LomoRule:
    """p <- p - lr * (g + weight_decay * p): torch.optim.SGD without momentum.
    Clipping and loss scaling are applied to g by the engine before this runs."""

    def __init__(self, weight_decay: float = 0.0):
        self.weight_decay = weight_decay

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}  # SGD keeps nothing between steps

    def apply(self, update: SlicedUpdate, state, lr: float, step: int, ok: torch.Tensor) -> None:
        device = update.param.device
        # The whole tensor in one kernel: nothing to slice, no temporaries (False: the
        # kernel failed, the eager ops below run).
        if (
            kernels.available(device)
            and update.param.is_contiguous()
            and kernels.run(
                lomo_update_elementwise_, device,
                update.param.view(-1), update.grad.reshape(-1), update.factor,
                torch.full((), lr, device=device), self.weight_decay, ok,
                update.round_key_int64, update.start,
            )
        ):  # fmt: skip
            return
        # Elementwise: one pass over the slices.
        gate = must_gate(ok)
        for _, param, grad in update.update():
            if self.weight_decay:
                grad.add_(param, alpha=self.weight_decay)  # coupled, as torch.optim.SGD
            if gate:  # a gated update adds exactly zero (masked_fill replaces NaN too)
                grad.masked_fill_(~ok, 0.0)
            param.add_(grad, alpha=-lr)


def lomo_update_elementwise_(
    param: torch.Tensor,  # flat, fp32 or bf16: updated in place
    grad: torch.Tensor,  # flat, the parameter's complete gradient
    factor: float | torch.Tensor,
    lr: torch.Tensor,  # 0-dim fp32: a float would be compiled as a constant (fma takes
    # no symbolic float), and every new learning rate would compile anew inside backward
    weight_decay: float,
    ok: torch.Tensor,
    round_key: int | None,  # as_int64; None: round to nearest (fp32: exact)
    start: int,
) -> None:
    """LomoRule's update of a whole tensor as one elementwise expression, for
    torch.compile only: the same operations in the same order as the sliced eager path,
    whose `add_(x, alpha=a)` rounds once (a fused multiply-add on the CPU's vector units
    and on a GPU); `prims.fma` says so to the compiler (run eagerly it would not)."""
    p = param.float()
    g = grad.float() * factor
    if weight_decay:
        g = torch.ops.prims.fma(p, weight_decay, g)
    g = torch.where(ok, g, 0.0)
    new = torch.ops.prims.fma(g, -lr.expand_as(g), p)
    if round_key is not None and param.dtype == torch.bfloat16:
        new = rounded_elementwise(new, round_key, start)
    param.copy_(new)

"""The loss of a data-parallel batch, the same on N processes as on one.

Data: every rank reads the same global batch (same loader, same seed) and computes the
loss of its contiguous share of the rows (`DataParallelLoss`); gradients are summed over
ranks and the loss is divided by the global label-token count, so N processes compute
the one-process step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lomotune.distributed.group import World, collective_device


class DataParallelLoss:
    """Wraps a loss function (batch -> (summed loss, label tokens)): each rank computes
    the loss of its share of the batch's rows, and one all-reduce of two scalars gives the
    global sum and count. The returned sum has the global value (so every rank sees the
    same loss and skips the same steps) and the gradient of the rank's own share."""

    def __init__(self, loss_fn, world: World):
        self.loss_fn = loss_fn
        self.world = world

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        rows = batch["input_ids"].shape[0]
        share = {
            k: v.tensor_split(self.world.size)[self.world.rank]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows
            else v
            for k, v in batch.items()
        }
        local_sum, local_count = self.loss_fn(share)
        totals = torch.tensor(
            [float(local_sum.detach()), float(local_count)],
            dtype=torch.float64,
            device=collective_device(),
        )
        dist.all_reduce(totals)
        global_sum = totals[0].to(local_sum.device, local_sum.dtype)
        return local_sum + (global_sum - local_sum.detach()), int(totals[1].item())

"""AdaLomo (arXiv 2310.10195): LOMO with an Adafactor-style adaptive learning rate,
applied by the fused engine inside backward.

For a matrix parameter (n, m) with gradient G at step t (Algorithm 1 of the paper, and
`lomo_optim.AdaLomo` 0.1.1, which this reproduces):

    beta_t = 1 - t ** decay_rate                        t = 1, 2, ...: beta_1 = 0
    R_t = beta_t R_{t-1} + (1 - beta_t) mean_m(G^2 + eps1)       (n,)  row means
    C_t = beta_t C_{t-1} + (1 - beta_t) mean_n(G^2 + eps1)       (m,)  column means
    V_t = R_t C_t / mean(R_t)                            (n, m), never stored
    U_t = G / sqrt(V_t);  U_t /= max(1, RMS(U_t) / clip_threshold)
    lr_t = lr * max(eps2, RMS(theta_{t-1}))
    theta_t = theta_{t-1} (1 - lr_t weight_decay) - lr_t U_t

Other parameters (vectors: norms, biases) keep the full second moment V_t, same shape.
A parameter of more than two dimensions (MoE experts: (experts, out, in)) is a stack of
matrices: each is factored, clipped and scaled by its own RMS.
Only trainable parameters get state: O(n + m) floats per matrix, fp32, on its device.
Weight decay is decoupled and scaled by lr_t, before the update, as the reference does;
the paper's Algorithm 1 has none. Loss scaling and gradient-norm clipping are done by the
engine before `apply` sees the gradient.

On several processes (FSDP2) a matrix or vector arrives as this rank's rows (dim-0
shard): the row statistics R are local, while the column means C, mean(R), both RMS and
the finite-gradient flag need every rank's rows. `sum_over_shards` (a sum over ranks)
gives them: one collective for C, mean(R), RMS(theta) and the flag, one for RMS(U), so
the result is the one-process update. A stack of matrices is sharded by whole matrices
(dim 0 is the expert): all its statistics are local.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class AdaLomoRule:
    def __init__(
        self,
        weight_decay: float = 0.0,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if decay_rate >= 0:
            raise ValueError(
                f"decay_rate must be negative (beta_t = 1 - t**decay_rate); got {decay_rate=}"
            )
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be positive; got {clip_threshold=}")
        self.weight_decay = weight_decay
        self.eps = eps
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.sum_over_shards = sum_over_shards  # None: every parameter is whole here

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=param.device)

        if param.dim() >= 2:
            # Factored over the last two dimensions, one (rows, cols) pair per matrix: a
            # stack of MoE experts (experts, out, in) is `experts` matrices, as Adafactor
            # treats it, not one matrix and not a full second moment.
            *lead, rows, cols = param.shape
            return {
                "exp_avg_sq_row": zeros((*lead, rows)),
                "exp_avg_sq_col": zeros((*lead, cols)),
            }
        return {"exp_avg_sq": zeros(tuple(param.shape))}

    def whole_on_every_rank(self, key: str, param: torch.Tensor) -> bool:
        """Sharded by rows (FSDP2), a matrix's column statistics are still whole on each
        rank (summed over every rank's rows); its other state follows its rows."""
        return key == "exp_avg_sq_col" and param.dim() == 2

    @torch.no_grad()
    def apply(self, param, grad, state, lr: float, step: int, ok: torch.Tensor) -> None:
        # param: fp32 (..., n, m) or a vector, updated in place; grad: fp32, same shape.
        # `step` is 1-based (the engine counts before the update), so beta_1 = 0: the first
        # step's second moment is exactly G^2 + eps1, as in Adafactor. `ok` False (a bad
        # gradient in this step): weights and state stay exactly as they were.
        beta = 1.0 - math.pow(step, self.decay_rate)
        sharded = self.sum_over_shards is not None and param.dim() <= 2
        shard = _Shard(self.sum_over_shards, param) if sharded else None
        update = grad.square().add_(self.eps[0])  # G^2 + eps1; its buffer becomes U_t
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]  # (..., n), (..., m)
            new_row = row.mul(beta).add_(update.mean(dim=-1), alpha=1.0 - beta)
            if shard:
                col_mean, row_mean, ok = shard.row_means(ok, update, new_row.unsqueeze(-1))
            else:
                col_mean, row_mean = update.mean(dim=-2), new_row.mean(dim=-1, keepdim=True)
            new_col = col.mul(beta).add_(col_mean, alpha=1.0 - beta)
            row.copy_(torch.where(ok, new_row, row))  # O(n + m): cheap to gate
            col.copy_(torch.where(ok, new_col, col))
            # rsqrt(V_t) = rsqrt(R_t / mean(R_t)) rsqrt(C_t), as an outer product.
            r_factor = (new_row / row_mean).rsqrt_().unsqueeze(-1)
            c_factor = new_col.rsqrt().unsqueeze(-2)  # (..., 1, m)
            torch.mul(r_factor, c_factor, out=update)
        else:
            v = state["exp_avg_sq"]
            new_v = v.mul(beta).add_(update, alpha=1.0 - beta)
            if shard:  # every rank's flag, and RMS(theta) on the way
                ok = shard.row_means(ok)[-1]
            v.copy_(torch.where(ok, new_v, v))
            torch.rsqrt(new_v, out=update)
        update.mul_(grad)
        update_rms = shard.rms(update) if shard else _rms(update)
        update.div_((update_rms / self.clip_threshold).clamp_(min=1.0))
        # Tensors, not Python floats: no device sync inside backward. Gated by `ok`.
        param_rms = shard.param_rms if shard else _rms(param)
        lr_t = param_rms.clamp_(min=self.eps[1]).mul_(lr).mul_(ok)
        if self.weight_decay:
            param.mul_(1.0 - lr_t * self.weight_decay)
        update.masked_fill_(~ok, 0.0)  # NaN-safe: a gated step subtracts exactly zero
        param.sub_(update.mul_(lr_t))


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square per matrix (over the last two dimensions; a vector whole), shaped
    to broadcast against `t`."""
    if t.dim() <= 2:
        return t.norm(2) / math.sqrt(t.numel())
    per_matrix = t.shape[-2] * t.shape[-1]
    return torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True) / math.sqrt(per_matrix)


class _Shard:
    """Statistics of a matrix or vector of which this rank holds some rows (dim 0; maybe
    none), summed over the ranks by `sum_over_shards`."""

    def __init__(self, sum_over_shards: Callable[[torch.Tensor], torch.Tensor], param):
        self.sum = sum_over_shards
        self.param = param
        self.per_row = math.prod(param.shape[1:])  # elements in a row (1 for a vector)
        self.rows = torch.tensor([float(param.shape[0])], device=param.device)
        self.param_rms: torch.Tensor | None = None

    def row_means(self, ok: torch.Tensor, *per_row: torch.Tensor):
        """(each of `per_row` averaged over every rank's rows, ..., the flag of every
        rank): one collective, which also counts the rows and gives RMS(theta) of the
        weights before the update."""
        local = [t.sum(dim=0) for t in per_row] + [self.param.square().sum().view(1), self.rows]
        flag = (~ok).float().view(1)
        summed = self.sum(torch.cat([t.reshape(-1) for t in local] + [flag]))
        *means, param_sq, self.rows, bad = summed.split([t.numel() for t in local] + [1])
        self.param_rms = (param_sq / (self.rows * self.per_row)).sqrt().view(())
        means = [m.view_as(t) / self.rows for m, t in zip(means, local[:-2], strict=True)]
        return (*means, ok & (bad == 0).view(()))

    def rms(self, t: torch.Tensor) -> torch.Tensor:
        """RMS of the whole tensor of which `t` holds this rank's rows (after `row_means`,
        which counted every rank's rows)."""
        return (self.sum(t.square().sum().view(1)) / (self.rows * self.per_row)).sqrt().view(())

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

The update is applied in row slices (optim/slices.py), in two passes: statistics, then
the update, with no full-size temporary. Every statistic that crosses rows (column sums,
mean(R), RMS(U), RMS(theta), the flag) is an fp64 sum, so slices and shards add up to the
whole tensor's value; RMS(U) needs C_t, known only after the last row, so the first pass
keeps S_j = sum_i G_ij^2 / R_i and uses sum U^2 = mean(R) sum_j S_j / C_j. Sharded, all
of them travel in one collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lomotune.optim import kernels
from lomotune.optim.rounding import rounded_elementwise
from lomotune.optim.slices import SlicedUpdate, must_gate, squares_fp64


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
    def apply(self, update: SlicedUpdate, state, lr: float, step: int, ok: torch.Tensor) -> None:
        # `step` is 1-based (the engine counts before the update), so beta_1 = 0: the first
        # step's second moment is exactly G^2 + eps1, as in Adafactor. `ok` False (a bad
        # gradient in this step, here or on another rank): weights and state stay exactly
        # as they were.
        beta = 1.0 - math.pow(step, self.decay_rate)
        sharded = self.sum_over_shards is not None and len(update.shape) <= 2
        combine = _Combine(self.sum_over_shards if sharded else None, ok)
        factored = "exp_avg_sq_row" in state
        stats = _factored_statistics if factored else _full_statistics
        scale, update_rms, param_rms, ok = stats(update, state, beta, self.eps[0], combine)
        clip = (update_rms / self.clip_threshold).clamp_(min=1.0)
        # Tensors, not Python floats: nothing is read back to the host inside backward,
        # and nothing is copied to the device from it (tests/test_gpu_standin.py). Gated
        # by `ok`.
        lr_t = param_rms.clamp_(min=self.eps[1]).mul_(lr).mul_(ok)
        device = update.param.device
        # Pass 2 over the whole tensor in one kernel (pass 1 stays sliced eager ops); False:
        # the kernel failed, the eager ops below run. A plain tensor: dynamo would compile
        # a Parameter's shapes as constants.
        if (
            kernels.available(device)
            and len(update.shape) <= 2
            and kernels.run(
                adalomo_update_elementwise_, device,
                update.param.detach(), update.grad, update.factor, scale.rows, scale.cols, clip,
                lr_t, self.weight_decay, ok, update.round_key_int64, update.start,
            )
        ):  # fmt: skip
            return
        gate = must_gate(ok)
        for rows, param, grad in update.update():
            u = scale.apply_(grad, rows).div_(clip)  # U_t, RMS-clipped (grad is ours)
            if self.weight_decay:
                param.mul_(1.0 - lr_t * self.weight_decay)
            if gate:  # NaN-safe: a gated step subtracts exactly zero
                u.masked_fill_(~ok, 0.0)
            param.sub_(u.mul_(lr_t))


@dataclass
class Scale:
    """rsqrt(V_t): for a matrix (or a stack) the outer product of `rows` (..., n) and
    `cols` (..., 1, m); for a vector `rows` alone, elementwise (`cols` None)."""

    rows: torch.Tensor
    cols: torch.Tensor | None

    def apply_(self, grad: torch.Tensor, rows: slice) -> torch.Tensor:
        """grad (a slice of rows) times rsqrt(V_t), in place: no slice-sized temporary."""
        if self.cols is None:
            return grad.mul_(self.rows[rows])
        return grad.mul_(self.rows[rows].unsqueeze(-1)).mul_(self.cols)


Statistics = tuple[Scale, torch.Tensor, torch.Tensor, torch.Tensor]  # +RMS(U), RMS(theta), ok


def adalomo_update_elementwise_(
    param: torch.Tensor,  # (n, m) or (n,), fp32 or bf16: updated in place
    grad: torch.Tensor,  # its complete gradient
    factor: float | torch.Tensor,  # loss unscale x clip coefficient
    scale_rows: torch.Tensor,
    scale_cols: torch.Tensor | None,  # Scale's factors
    clip: torch.Tensor,  # max(1, RMS(U_t) / clip_threshold)
    lr_t: torch.Tensor,  # gated by ok
    weight_decay: float,
    ok: torch.Tensor,
    round_key: int | None,  # as_int64; None: round to nearest (fp32: exact)
    start: int,
) -> None:
    """AdaLomoRule's pass 2 over a whole matrix or vector as one elementwise expression,
    for torch.compile (kernels.py): the same operations, in the same order, as the sliced
    eager loop in `apply`."""
    p = param.float()
    u = grad.float() * factor
    u = u * scale_rows if scale_cols is None else u * scale_rows.unsqueeze(-1) * scale_cols
    u = u / clip
    if weight_decay:
        p = p * (1.0 - lr_t * weight_decay)
    new = p - torch.where(ok, u, 0.0) * lr_t
    if round_key is not None and param.dtype == torch.bfloat16:
        new = rounded_elementwise(new, round_key, start)
    param.copy_(new)


class _Combine:
    """Sums of per-shard statistics over the ranks that hold a parameter's rows, with the
    finite flag of every rank, in one collective; on one process, the local values."""

    def __init__(self, sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None, ok):
        self.sum = sum_over_shards
        self.ok = ok

    def __call__(self, *parts: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.sum is None:
            return list(parts), self.ok
        flag = (~self.ok).double().view(1)
        summed = self.sum(torch.cat([t.reshape(-1).double() for t in parts] + [flag]))
        *sums, bad = summed.split([t.numel() for t in parts] + [1])
        return [s.view_as(t) for s, t in zip(sums, parts, strict=True)], self.ok & (bad == 0).view(
            ()
        )


def _factored_statistics(
    update: SlicedUpdate, state, beta: float, eps1: float, combine: _Combine
) -> Statistics:
    """Pass 1 for a matrix (n, m) in row slices, or a stack (..., n, m) in one slice:
    R_t and C_t (committed to `state` when ok), and per matrix RMS(U_t) and RMS(theta)."""
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]  # (..., n), (..., m)
    *_, n, m = update.shape
    f64 = {"dtype": torch.float64, "device": col.device}
    new_row = torch.empty_like(row)
    col_sum = torch.zeros(col.shape, **f64)  # sum_i G_ij^2
    s = torch.zeros_like(col_sum)  # sum_i G_ij^2 / R_i
    param_sq = _per_matrix(torch.zeros((), **f64), update)
    for rows, param, grad in update.read():
        g2 = grad.square()  # (r, m) or (..., n, m)
        new_row[rows] = row[rows].mul(beta).add_(g2.mean(dim=-1).add_(eps1), alpha=1 - beta)
        # Both column sums in one fp64 product, [1; 1/R_i] @ G^2: one fp64 copy of the
        # slice (a reduction with dtype=float64 makes one per sum).
        r64 = new_row[rows].double()
        sums = torch.stack([torch.ones_like(r64), r64.reciprocal()], dim=-2) @ g2.double()
        col_sum += sums[..., 0, :]
        s += sums[..., 1, :]
        param_sq = param_sq + _matrix_sum_sq(param)
    row_sum = new_row.sum(dim=-1, keepdim=True, dtype=torch.float64)  # (..., 1)
    # The row count is summed over shards with the statistics: made on the device by
    # torch.full (torch.tensor(n, device=...) would be a blocking host-to-device copy on a
    # GPU, in every hook).
    (col_sum, s, param_sq, row_sum, n), ok = combine(
        col_sum, s, param_sq, row_sum, torch.full((), float(n), **f64)
    )
    new_col = col.mul(beta).add_(col_sum.div_(n).add_(eps1).float(), alpha=1 - beta)
    row.copy_(torch.where(ok, new_row, row))  # O(n + m): cheap to gate
    col.copy_(torch.where(ok, new_col, col))
    row_mean = row_sum.div_(n)  # (..., 1), fp64: mean(R_t) over every rank's rows
    mean_u2 = s.div_(new_col).sum(dim=-1, keepdim=True).mul_(row_mean).div_(n * m)
    # rsqrt(V_t) = rsqrt(R_t / mean(R_t)) rsqrt(C_t), as an outer product per slice.
    r_factor = (new_row / row_mean.float()).rsqrt_()  # (..., n)
    c_factor = new_col.rsqrt().unsqueeze(-2)  # (..., 1, m)
    update_rms = _per_matrix(mean_u2.float().sqrt(), update)
    param_rms = param_sq.div_(n * m).float().sqrt_()
    return Scale(r_factor, c_factor), update_rms, param_rms, ok


def _full_statistics(
    update: SlicedUpdate, state, beta: float, eps1: float, combine: _Combine
) -> Statistics:
    """Pass 1 for a vector (norm weights, biases): V_t whole (it is small), RMS(U_t) and
    RMS(theta), in element slices."""
    v = state["exp_avg_sq"]
    new_v = torch.empty_like(v)
    flat_v, flat_new = v.view(-1), new_v.view(-1)  # a 0-dim parameter is one row
    u2 = torch.zeros((), dtype=torch.float64, device=v.device)
    param_sq = torch.zeros_like(u2)
    for rows, param, grad in update.read():
        g2 = grad.square()
        flat_new[rows] = flat_v[rows].mul(beta).add_(g2 + eps1, alpha=1 - beta)
        u2 += g2.div_(flat_new[rows]).sum(dtype=torch.float64)
        param_sq += squares_fp64(param).sum()
    numel = torch.full((), float(v.numel()), dtype=torch.float64, device=v.device)  # no copy
    (u2, param_sq, numel), ok = combine(u2, param_sq, numel)
    v.copy_(torch.where(ok, new_v, v))
    rsqrt_v = new_v.rsqrt().view(-1)
    numel = numel.clamp(min=1.0)
    update_rms = u2.div_(numel).float().sqrt_()
    param_rms = param_sq.div_(numel).float().sqrt_()
    return Scale(rsqrt_v, None), update_rms, param_rms, ok


def _matrix_sum_sq(t: torch.Tensor) -> torch.Tensor:
    """sum(t^2) in fp64 over the last two dimensions (a row slice of a matrix: all of it),
    shaped (..., 1, 1) for a stack."""
    if t.dim() <= 2:
        return squares_fp64(t).sum()
    return t.square().sum(dim=-1).double().sum(dim=-1)[..., None, None]


def _per_matrix(t: torch.Tensor, update: SlicedUpdate) -> torch.Tensor:
    """A per-matrix value (..., 1) or scalar, shaped to broadcast against a slice."""
    return t.unsqueeze(-1) if len(update.shape) > 2 and t.dim() else t

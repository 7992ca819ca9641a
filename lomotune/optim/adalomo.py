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
Only trainable parameters get state: O(n + m) floats per matrix, fp32, on its device.
Weight decay is decoupled and scaled by lr_t, before the update, as the reference does;
the paper's Algorithm 1 has none. Loss scaling and gradient-norm clipping are done by the
engine before `apply` sees the gradient.
"""

from __future__ import annotations

import math

import torch


class AdaLomoRule:
    def __init__(
        self,
        weight_decay: float = 0.0,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
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

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=param.device)

        if param.dim() == 2:
            rows, cols = param.shape
            return {"exp_avg_sq_row": zeros(rows), "exp_avg_sq_col": zeros(cols)}
        return {"exp_avg_sq": zeros(*param.shape)}

    @torch.no_grad()
    def apply(self, param, grad, state, lr: float, step: int) -> None:
        # param: fp32 (n, m) or any other shape, updated in place; grad: fp32, same shape.
        # `step` is 1-based (the engine counts before the update), so beta_1 = 0: the first
        # step's second moment is exactly G^2 + eps1, as in Adafactor.
        beta = 1.0 - math.pow(step, self.decay_rate)
        update = grad.square().add_(self.eps[0])  # G^2 + eps1; its buffer becomes U_t
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]  # (n,), (m,)
            row.mul_(beta).add_(update.mean(dim=-1), alpha=1.0 - beta)
            col.mul_(beta).add_(update.mean(dim=-2), alpha=1.0 - beta)
            # rsqrt(V_t) = rsqrt(R_t / mean(R_t)) rsqrt(C_t), as an outer product.
            r_factor = (row / row.mean()).rsqrt_().unsqueeze(-1)  # (n, 1)
            c_factor = col.rsqrt().unsqueeze(-2)  # (1, m)
            torch.mul(r_factor, c_factor, out=update)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta).add_(update, alpha=1.0 - beta)
            torch.rsqrt(v, out=update)
        update.mul_(grad)
        update.div_((_rms(update) / self.clip_threshold).clamp_(min=1.0))
        # Tensors, not Python floats: no device sync inside backward.
        lr_t = _rms(param).clamp_(min=self.eps[1]).mul_(lr)
        if self.weight_decay:
            param.mul_(1.0 - lr_t * self.weight_decay)
        param.sub_(update.mul_(lr_t))


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())

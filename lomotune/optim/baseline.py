"""The baselines: an ordinary optimizer (AdamW, SGD, Adam-mini) stepping after a full
backward, with gradient accumulation. Same surface as the fused engine, so that a
comparison differs in the method only."""

from __future__ import annotations

import contextlib
import io

import torch

from lomotune.distributed.rows import (
    local_shard,
    shard_like,
    sum_over_ranks,
    sum_replicated_gradient,
    whole,
)
from lomotune.optim.engine import Batch, LossFn, StepResult, count_tokens, timed_update
from lomotune.recipe import ClipConfig, OptimizerConfig


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, *, device_type: str | None = None
) -> torch.optim.Optimizer:
    """torch's optimizer for a baseline method, in its fastest form on the parameters'
    device, or on `device_type` when given (the simulation's fake tensors are on the CPU
    but stand for a GPU's step: "cuda")."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    device_type = device_type or params[0].device.type
    if cfg.name in ("adamw", "adamw-pure", "lora-adamw"):
        # fused kernels on CUDA, foreach elsewhere: the fastest torch offers per device.
        fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **fast
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.name == "adam-mini":
        from adam_mini import Adam_mini

        config = model.config
        # Adam-mini prints a line per parameter block while it partitions: keep that off
        # the dashboard.
        with contextlib.redirect_stdout(io.StringIO()):
            optimizer = Adam_mini(
                named,
                lr=cfg.lr,
                betas=cfg.betas,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
                dim=config.hidden_size,
                n_heads=config.num_attention_heads,
                n_kv_heads=getattr(config, "num_key_value_heads", None)
                or config.num_attention_heads,
                verbose=False,
            )
        # Adam-mini 1.1 takes any name containing "final_layer" for an output layer and
        # fails on OPT's and GPT-NeoX's `final_layer_norm` (an IndexError on a 1-D
        # weight): their output layers are found by "lm_head" / "embed" anyway.
        optimizer.output_names.discard("final_layer")
        # Adam-mini takes torch.cuda.device_count() as its world size and all-gathers its
        # blocks' sizes over that many ranks, as if each held a shard. Here every
        # parameter is whole on its rank (one process, or data parallel: its gradient is
        # summed over ranks before the step), so it is one rank of its own.
        optimizer.world_size = 1
        return optimizer
    raise ValueError(f"not a baseline optimizer: {cfg.name}")


class OptimizerEngine:
    """backward over every micro-batch (gradients summed), clip, optimizer.step()."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        clip: ClipConfig,
    ):
        if clip.mode == "previous":
            raise ValueError(
                "clip.mode previous is for fused methods; a baseline has every gradient at once: use exact"
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.clip = clip
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step_count = 0
        self.update_seconds: float | None = None  # see engine.Engine

    def step(self, batches: list[Batch], lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total_loss, tokens = 0.0, 0
        for batch in batches:
            loss_sum, _ = self.loss_fn(batch)
            # Each micro-batch weighs by its label tokens: the sum is the mean over all.
            (loss_sum / max(label_tokens, 1)).backward()
            total_loss += float(loss_sum.detach())
            tokens += count_tokens(batch)
        for p in self.params:  # data parallel: each rank's rows summed (sharded: done)
            if p.grad is not None:
                sum_replicated_gradient(p.grad)
        result = StepResult(
            loss=total_loss / max(label_tokens, 1), tokens=tokens, loss_tokens=label_tokens
        )
        if not torch.isfinite(torch.tensor(result.loss)):
            self.optimizer.zero_grad(set_to_none=True)
            result.skipped = "non-finite loss"
            return result
        bad = self._non_finite_gradients()
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            result.skipped = "non-finite gradient"
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            result.detail = f"in {shown}; nothing applied"
            return result
        if self.clip.mode == "exact":
            result.grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.params, self.clip.max_norm)
            )
        elif self.clip.mode == "per-tensor":
            for p in self.params:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], self.clip.max_norm)
        timed_update(self, self.params[0].device, self.optimizer.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return result

    def _non_finite_gradients(self) -> list[str]:
        """Names of parameters whose gradient holds a NaN or inf (one sync for all)."""
        with_grad = [
            (n, p.grad) for n, p in zip(self.names, self.params, strict=True) if p.grad is not None
        ]
        if not with_grad:
            return []
        device = local_shard(with_grad[0][1])[0].device
        # Sharded: each rank checks its own rows; one all-reduce of the flags names them
        # all: a tensor is finite when every rank's part is (the flags sum to the ranks).
        finite = torch.stack(
            [local_shard(g)[0].sum().isfinite().float().to(device) for _, g in with_grad]
        )
        ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        counts = sum_over_ranks(finite).tolist()
        return [n for (n, _), c in zip(with_grad, counts, strict=True) if c < ranks]

    def state_dict(self, gather: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """Optimizer state as (tensors keyed 'index/key', JSON-able rest); the state of
        sharded parameters gathered whole (a collective), so the format is one process's,
        or with `gather=False` left as this rank's shards (DTensors), for a sharded
        checkpoint."""
        sd = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, state in sd["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}/{key}"] = whole(value) if gather else value
                else:
                    scalars[f"{index}/{key}"] = value
        meta = {
            "step_count": self.step_count,
            "param_groups": sd["param_groups"],
            "scalars": scalars,
        }
        return tensors, meta

    def state_template(
        self, saved: dict[str, tuple[torch.Size, torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        """Empty tensors for the state a sharded checkpoint holds (`saved`: key -> whole
        shape and dtype), each as this process holds it: the optimizer creates its state at
        its first step, so the shapes come from the checkpoint. A tensor shaped as its
        parameter (a moment) takes the parameter's shards; others (step counts) are whole."""
        out = {}
        for key, (shape, dtype) in saved.items():
            param = self.params[int(key.split("/", 1)[0])]
            out[key] = (
                torch.empty_like(param, dtype=dtype)
                if shape == param.shape
                else torch.empty(shape, dtype=dtype)
            )
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Tensors whole (the format of one process) or, from a sharded checkpoint, as
        `state_template` made them."""
        state: dict[int, dict] = {}
        for flat, value in [*tensors.items(), *meta["scalars"].items()]:
            index, key = flat.split("/", 1)
            param = self.params[int(index)]  # sharded: the state takes the parameter's shards
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value = shard_like(value, param)
            state.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step_count = int(meta["step_count"])

    def close(self) -> None:
        pass

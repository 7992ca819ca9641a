"""A model on the run's processes: FSDP2 shards for the methods that shard, equal
replicas for the others (`distribute`), and the whole model back from its shards.

What each method does with N processes:
- lomo, adalomo (and sgd, adamw): FSDP2 (`fully_shard`), each decoder layer a unit, the root
  (embeddings, final norm, head: tied weights stay in one unit) another. The fused
  update runs in FSDP's post-accumulate-grad hook on the rank's local shard, after the
  reduce-scatter: no rank ever holds a full gradient. AdaLomo's statistics over a
  matrix's rows (column means, RMS) are summed over ranks by the rule itself.
- mezo: data parallel, every rank holds the whole model; the perturbations come from the
  shared seed, so only the two scalar losses of a direction are summed over ranks.
- qlora-sgd (and mezo with adapters): data parallel over the adapters. bitsandbytes'
  4-bit weights (packed uint8 with a quantization state beside them) are not tensors
  FSDP2 can cut into dim-0 shards, so every rank holds the frozen 4-bit base whole; an
  adapter's gradient is summed over ranks in its hook, before the fused update.
- adam-mini: data parallel, gradients summed over ranks before `optimizer.step()`.
  Adam-mini's own sharded path all-reduces its norm statistics through
  `torch.cuda.current_device()` even for CPU tensors, so it cannot run sharded on CPU,
  and on GPUs it is untested here: every rank keeps the whole model and its state.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from lomotune import methods
from lomotune.distributed.group import World
from lomotune.distributed.loss import DataParallelLoss
from lomotune.distributed.rows import is_sharded
from lomotune.recipe import Recipe


def shards(recipe: Recipe) -> bool:
    """Whether the recipe's method runs on FSDP2 shards (else data parallel)."""
    # Else data parallel: every rank holds the whole model; mezo sums its scalar losses,
    # the others their gradients.
    return methods.method(recipe.optimizer.name).processes == "sharded"


def distribute(
    model: torch.nn.Module,
    loss_fn,
    recipe: Recipe,
    world: World,
    device: torch.device,
    weights: torch.nn.Module | None = None,
):
    """Shard `model` in place for methods that shard (FSDP2: each decoder layer a unit,
    the rest the root unit), or make its replicas equal for the others, and return the
    loss function every engine calls: the rank's share of each batch, summed over ranks
    (`DataParallelLoss`). A sharded `model` arrives on the meta device on every rank;
    `weights` is the whole model in rank 0's CPU memory (None on the other ranks), whose
    tensors are sent one by one as shards: no device ever holds the whole model."""
    if shards(recipe):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )
        from torch.distributed.fsdp import (
            FSDPModule,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        # Gradients are reduce-scattered in fp32 whatever the weights' dtype: a bf16 sum
        # over N ranks rounds at every addition (each shard's gradient is cast back to
        # the weights' dtype after the sum).
        mp_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        # Layers free their gathered weights after forward; the root keeps its own
        # (embeddings, norm, head: backward needs them at once). FSDP2's defaults, said
        # here because `whole_model` sets them back.
        for layer in model.get_decoder().layers:
            fully_shard(layer, reshard_after_forward=True, mp_policy=mp_policy)
        fully_shard(model, reshard_after_forward=False, mp_policy=mp_policy)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Summed, not averaged: DataParallelLoss divides by the global token
                # count. Plain sums: gloo has no pre-multiplied or averaging reduction.
                # (`refusal` checked that this torch has both.)
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        model.to_empty(device=device)  # this rank's shards, uninitialized
        set_model_state_dict(  # rank 0 sends each tensor's shards, one tensor at a time
            model,
            weights.state_dict() if world.is_main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        # Computed, not saved (RoPE's inverse frequencies): rank 0's, sent to the others.
        computed = dict(weights.named_buffers()) if world.is_main else {}
        for name, buffer in model.named_buffers():
            if world.is_main:
                buffer.copy_(computed[name])
            dist.broadcast(buffer, src=0)
        # The chunked loss calls the decoder and the head's weight itself, not
        # model.forward: make it an entry point that unshards the root unit as forward would.
        model.lomotune_loss = loss_fn
        register_fsdp_forward_method(model, "lomotune_loss")
        loss_fn = model.lomotune_loss
    else:
        # Replicas must start equal (as DDP makes them): rank 0's trainable weights.
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    return DataParallelLoss(loss_fn, world)


@contextlib.contextmanager
def whole_model(model: torch.nn.Module):
    """Every FSDP2 unit of `model` gathered whole on this rank for the duration (a
    collective on entry), so that forward passes need no collective and may differ
    between ranks (generation: each rank its own prompts, stopping when they are done).
    Resharded on exit. A model that is not sharded: nothing to do."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:  # the same order on every rank
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)  # as `distribute` set them
        model.set_reshard_after_forward(False, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (CPU), gathered from the shards; a collective
    every rank must call. None for a model that is not sharded (its own state is whole)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if getattr(model.config, "tie_word_embeddings", False):  # saved once, as unsharded
        for key in getattr(model, "_tied_weights_keys", None) or []:
            state.pop(key, None)
    return state

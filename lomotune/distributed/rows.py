"""Sharded tensors (FSDP2's DTensors) as the engines and checkpoints see them: whether a
model is sharded, a rank's local part, the whole tensor, per-row state cut or gathered as its parameter is, and
gradients or statistics summed over ranks. Each works as well in a single process, where
every tensor is whole."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_shard(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part of a sharded parameter or gradient, the flat offset of its first
    element in the whole tensor); a plain tensor is its own part at offset 0."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, 0
    local = t.to_local()
    # FSDP2 shards dim 0 in equal chunks (the last may be shorter or empty).
    rows_per_rank = -(-t.shape[0] // t.device_mesh.size())
    return local, dist.get_rank() * rows_per_rank * math.prod(t.shape[1:])


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank (a collective); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut into the shards of `param` (as it is when `param` is whole, or
    when `t` is already sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or isinstance(t, DTensor):
        return t
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements)


def rows_as_dtensor(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A tensor of per-row state of which this rank holds the rows of its shard of
    `param` (dim 0, cut as FSDP2 cuts `param`), as the DTensor of the whole (no copy, no
    collective: what a sharded checkpoint writes); as it is when `param` is not sharded."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return t
    shape = (param.shape[0], *t.shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(
        t, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride
    )


def whole_rows(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A per-row state tensor of `param` (see `rows_as_dtensor`) gathered whole on every
    rank (a collective); as it is when `param` is not sharded."""
    return whole(rows_as_dtensor(t, param))


def rows_of_rank(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a per-row state tensor of `param`: cut from a whole one, or
    the local part of one already sharded (`rows_as_dtensor`, read back from a sharded
    checkpoint)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(t, DTensor):
        return t.to_local()
    if not isinstance(param, DTensor):
        return t
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements).to_local()


def sum_replicated_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a parameter every rank holds whole (data parallel), summed over
    ranks in place: each rank's is of its own rows of the batch. A sharded gradient
    (FSDP2's reduce-scatter summed it already) and a single process: as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor) and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grad)
    return grad


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank (unchanged in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t

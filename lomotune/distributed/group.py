"""The process group of a run with several processes, this process's place in it
(`World`), and the collectives the run itself makes between ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from lomotune.distributed.launch import die_with_launcher, under_launcher
from lomotune.errors import LomotuneError
from lomotune.recipe import Recipe


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    # The process group was created by `join` (and `leave` destroys it); a caller that
    # made its own (a program running several trainings) keeps it.
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


ALONE = World()  # a run in one process


def join(recipe: Recipe) -> World:
    """The process group of a launched run (World() when alone); an existing one (made by
    the program that calls `train`) is used as it is. Call `leave(world)` at the end."""
    if not under_launcher():
        return ALONE
    die_with_launcher()
    world = World(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        size=int(os.environ["WORLD_SIZE"]),
    )
    if world.size == 1:
        return world
    on_gpu = recipe.hardware.gpus != 0 and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(world.local_rank)
    if dist.is_initialized():
        return world
    # A peer that died is noticed by the launcher within a second; the timeout only
    # bounds a hang that no process death explains.
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=10))
    return replace(world, owns_group=True)


def leave(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def device_of(world: World, recipe: Recipe) -> torch.device | None:
    """The GPU of this local rank, or None to let the single-process rules pick."""
    if world.is_distributed and recipe.hardware.gpus != 0:
        return torch.device("cuda", world.local_rank)
    return None


# Rank 0 alone may work for long inside `share_from_main` (writing a large model's
# checkpoint or final folder, hashing every shard file: minutes at disk speed for tens of
# GB) while the others wait for its answer. They wait in a gloo group of their own with
# this timeout: the run's group keeps its 10 minutes, the hang detector of the training
# collectives, which a slow disk must not trip.
RANK_0_ALONE_TIMEOUT = timedelta(hours=2)
_waiting_groups: dict = {}  # the run's group -> its group for waiting on rank 0


def _waiting_group():
    """The group `share_from_main` waits in (made once per process group, by every rank
    at the same call: `share_from_main` is called by every rank in the same order)."""
    run_group = dist.group.WORLD
    if run_group not in _waiting_groups:
        _waiting_groups.clear()  # a destroyed run group took its subgroups with it
        _waiting_groups[run_group] = dist.new_group(backend="gloo", timeout=RANK_0_ALONE_TIMEOUT)
    return _waiting_groups[run_group]


def share_from_main(world: World, make):
    """Run `make()` on rank 0 only and return its value (or raise its exception) on every
    rank: decisions about the output folder are taken once, files rank 0 writes alone are
    written once. The other ranks wait up to RANK_0_ALONE_TIMEOUT."""
    if not world.is_distributed:
        return make()
    group = _waiting_group()
    box: list = [None]
    if world.is_main:
        try:
            box[0] = ("value", make())
        except Exception as e:  # handed to every rank, raised there too
            # Class, args and attributes: our errors' __init__ takes more than a message.
            box[0] = ("error", (type(e), e.args, vars(e)))
            error = e
    dist.broadcast_object_list(box, src=0, group=group)
    kind, payload = box[0]
    if kind == "value":
        return payload
    if world.is_main:
        raise error
    cls, args, attributes = payload
    copy = cls.__new__(cls)
    copy.args = args
    copy.__dict__.update(attributes)
    if isinstance(copy, LomotuneError):
        copy.printed_by_rank_0 = True  # rank 0 prints it; the others exit quietly
    raise copy


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is true on one (a signal seen by some ranks only)."""
    if not world.is_distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_floats(world: World, value: float) -> list[float]:
    """`value` of every rank, in rank order."""
    if not world.is_distributed:
        return [value]
    t = torch.zeros(world.size, dtype=torch.float64, device=collective_device())
    t[world.rank] = value
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(world: World, value) -> list:
    """`value` of every rank (picklable), in rank order, on every rank."""
    if not world.is_distributed:
        return [value]
    out: list = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

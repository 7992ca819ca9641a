"""Several processes: launching them, the process group, sharding, and rank helpers.

How a run with N processes starts:

    lomotune train recipe.yaml          hardware.gpus: 2 (or gpus: 0, processes: 2)
      -> `launch`: torch's elastic launcher (what `torchrun` and `tune run` use) starts
         N copies of `python -m lomotune train recipe.yaml ...` with RANK, WORLD_SIZE,
         LOCAL_RANK, MASTER_ADDR in their environment, and stops them all when one dies
    each copy, or each copy started by `torchrun -m lomotune train ...` directly:
      -> `under_launcher()` is true: never launched again
      -> `join(recipe)`: the process group (nccl on GPUs, gloo on CPU), one GPU per
         local rank

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

Data: every rank reads the same global batch (same loader, same seed) and computes the
loss of its contiguous share of the rows (`DataParallelLoss`); gradients are summed over
ranks and the loss is divided by the global label-token count, so N processes compute
the one-process step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lomotune import methods
from lomotune.errors import LomotuneError
from lomotune.recipe import HardwareConfig, Recipe

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# Set by `launch` for its workers: a folder where a worker that stops with an error leaves
# its message (`hand_to_launcher`), for the launcher to print once.
MESSAGES_VARIABLE = "LOMOTUNE_LAUNCHER_MESSAGES"
# Set by `launch` for its workers: the launcher's pid, whose death ends them too.
LAUNCHER_PID_VARIABLE = "LOMOTUNE_LAUNCHER_PID"


class LaunchError(LomotuneError):
    """Workers that failed; carries the exit code to hand back to the shell."""


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


# ---------------------------------------------------------------------------------------
# Launching


def under_launcher() -> bool:
    """Started by torchrun or by `launch` (never launch again from inside)."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def processes_per_node(hw: HardwareConfig) -> int:
    if hw.gpus == 0:
        return hw.processes
    if hw.gpus == "auto":
        return 1
    return hw.gpus


def needs_launch(recipe: Recipe) -> bool:
    hw = recipe.hardware
    return not under_launcher() and processes_per_node(hw) * hw.nodes > 1


def launch(recipe: Recipe, argv: list[str]) -> None:
    """Run `python -m lomotune <argv>` in every process of this node through torch's
    elastic launcher; returns when all finished, raises LaunchError when one failed
    (the others are stopped by the launcher within its monitor interval) or when the
    launcher was stopped by a signal.

    The workers run in sessions of their own (the elastic launcher starts them so): Ctrl-C
    in a terminal reaches the launcher alone, which passes it on to each worker once;
    each saves a checkpoint and exits as one process does. A worker that stops with an
    error leaves its message for the launcher (`hand_to_launcher`), which prints the
    first failed worker's once, instead of a line from every rank and the launcher's."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    hw = recipe.hardware
    config = LaunchConfig(
        min_nodes=hw.nodes,
        max_nodes=hw.nodes,
        nproc_per_node=processes_per_node(hw),
        run_id="lomotune",
        rdzv_backend="static",  # as torchrun with --master-addr/--node-rank
        rdzv_endpoint=f"{hw.master_addr}:{hw.master_port}",
        rdzv_configs={"rank": hw.node_rank, "timeout": 300},
        max_restarts=0,  # a failed rank fails the run: its checkpoint is the restart
        monitor_interval=0.2,
        # Passed on to the workers, which finish their step and save; they get a minute
        # before they are killed.
        signals_to_handle="SIGINT,SIGTERM,SIGHUP,SIGQUIT",
        shutdown_timeout=60,
    )
    # The launcher's own log lines ("failed (exitcode: 2) local_rank: 0 ...") repeat, less
    # clearly, what the message printed below says.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith(
            "torch.distributed.launcher"
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="lomotune-messages-") as messages:
        os.environ[MESSAGES_VARIABLE] = messages
        os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())
        try:
            elastic_launch(config, sys.executable)("-m", "lomotune", *argv)
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e):
                raise
            raise LaunchError(
                f"hardware.master_port: {hw.master_port} on {hw.master_addr} is in use (another "
                "run?). Pass --master-port with a free port, the same on every machine",
                2,
            ) from None
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            handed = _handed_message(Path(messages), rank)
            if handed is not None:  # the worker's own message: once, with its exit code
                raise LaunchError(*handed) from None
            how = (
                f"was stopped by {failure.signal_name()}"
                if failure.exitcode < 0
                else f"exited with code {failure.exitcode}"
            )
            raise LaunchError(
                f"process {rank} {how}; the other processes were stopped (its message, if any, "
                "is above). Checkpoints already complete are intact: continue with --resume",
                failure.exitcode if failure.exitcode > 0 else 1,
            ) from None
        except SignalException as e:  # Ctrl-C or kill: passed on, the workers have stopped
            for rank in range(processes_per_node(hw) * hw.nodes):
                handed = _handed_message(Path(messages), rank)
                if handed is not None:
                    raise LaunchError(*handed) from None
            raise LaunchError(
                f"stopped by {e.sigval.name} before the processes could save a checkpoint; the "
                "last complete checkpoint, if any, is intact: continue with --resume",
                128 + e.sigval.value,
            ) from None
        finally:
            os.environ.pop(MESSAGES_VARIABLE, None)
            os.environ.pop(LAUNCHER_PID_VARIABLE, None)


def die_with_launcher() -> None:
    """A worker of `launch` ends when its launcher dies, however it dies: `kill -9` of
    the launcher left the workers training and writing checkpoints, a second writer
    that a later --resume would meet. Linux: the kernel sends SIGKILL at the parent's
    death (prctl PR_SET_PDEATHSIG); elsewhere a thread watches the parent's pid. A kill
    loses only the step under way: checkpoints are atomic."""
    launcher = os.environ.get(LAUNCHER_PID_VARIABLE)
    if not launcher or not under_launcher():
        return
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:

        def watch() -> None:
            while os.getppid() == int(launcher):
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, daemon=True, name="lomotune-launcher-watch").start()
    if os.getppid() != int(launcher):  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGKILL)


def hand_to_launcher(message: str, exit_code: int) -> bool:
    """Under lomotune's own launcher, leave this worker's error message for the launcher to
    print (every rank of a run often stops with the same one); False elsewhere (under
    torchrun, or alone): print it yourself."""
    folder = os.environ.get(MESSAGES_VARIABLE)
    if not folder or not under_launcher():
        return False
    record = {"message": message, "exit_code": exit_code}
    (Path(folder) / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(record))
    return True


def lost_peer(error: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run is gone
    (gloo: "Connection reset by peer"; nccl: a DistBackendError), else None. The launcher
    names the process that died; this one need not print the collective's traceback."""
    if not under_launcher() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    text = str(error)
    peer_gone = isinstance(error, dist.DistError) or any(
        sign in text
        for sign in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    )
    if not peer_gone:
        return None
    return (
        f"process {os.environ.get('RANK')} lost another process of the run in a collective "
        f"({text.strip().splitlines()[0][:160]}); checkpoints already complete are intact: "
        "continue with --resume"
    )


def another_local_rank() -> bool:
    """A process of a launched run other than its machine's local rank 0 (under torchrun,
    which prints no worker's message for it). A bad input (exit 2: the recipe, a file) is
    the same in every process of a machine: local rank 0 alone prints it."""
    return under_launcher() and os.environ.get("LOCAL_RANK", "0") != "0"


def _handed_message(folder: Path, rank: int) -> tuple[str, int] | None:
    path = folder / f"rank-{rank}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["message"], record["exit_code"]


# ---------------------------------------------------------------------------------------
# The process group


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
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_floats(world: World, value: float) -> list[float]:
    """`value` of every rank, in rank order."""
    if not world.is_distributed:
        return [value]
    t = torch.zeros(world.size, dtype=torch.float64, device=_collective_device())
    t[world.rank] = value
    dist.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# Methods on several processes


def missing_gpus(hw: HardwareConfig) -> str | None:
    """Why the GPUs the recipe asks for are not all here (None when they are)."""
    available = torch.cuda.device_count()
    if isinstance(hw.gpus, int) and hw.gpus > available:
        return f"hardware.gpus: {hw.gpus} asked for, {available} present. Set hardware.gpus: {available} (0 = CPU) or auto"
    return None


# The oldest torch lomotune runs on, as pyproject.toml requires it (a test compares them).
TORCH_FLOOR = "2.12"


def torch_lacks_sum_reduction() -> str | None:
    """Why this torch cannot sum a sharded method's gradients over ranks (None when it
    can): FSDP2 averages them unless told otherwise, and the loss is already divided by
    the global token count, so every step would be N times too small on N processes."""
    from torch.distributed.fsdp import FSDPModule

    for name in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms"):
        if not hasattr(FSDPModule, name):
            return (
                f"torch {torch.__version__} has no FSDPModule.{name}, which sharded methods "
                "need to sum gradients over processes (FSDP2 would average them: N-times "
                f"smaller steps on N processes). Install torch>={TORCH_FLOOR}, as lomotune "
                "requires"
            )
    return None


def refusal(recipe: Recipe, world_size: int) -> str | None:
    """Why this recipe cannot run on `world_size` processes (None when it can)."""
    if world_size <= 1:
        return None
    if missing_gpus(recipe.hardware):
        return missing_gpus(recipe.hardware)
    if shards(recipe) and torch_lacks_sum_reduction():
        return torch_lacks_sum_reduction()
    if recipe.training.batch_size != "auto" and recipe.training.batch_size < world_size:
        return (
            f"training.batch_size: {recipe.training.batch_size} rows cannot be split over "
            f"{world_size} processes; set it to at least {world_size}"
        )
    return None


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


def gather_objects(world: World, value) -> list:
    """`value` of every rank (picklable), in rank order, on every rank."""
    if not world.is_distributed:
        return [value]
    out: list = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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
            device=_collective_device(),
        )
        dist.all_reduce(totals)
        global_sum = totals[0].to(local_sum.device, local_sum.dtype)
        return local_sum + (global_sum - local_sum.detach()), int(totals[1].item())

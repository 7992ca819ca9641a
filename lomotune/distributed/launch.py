"""Starting a run's processes and ending them.

How a run with N processes starts:

    lomotune train recipe.yaml          hardware.gpus: 2 (or gpus: 0, processes: 2)
      -> `launch`: torch's elastic launcher (what `torchrun` and `tune run` use) starts
         N copies of `python -m lomotune train recipe.yaml ...` with RANK, WORLD_SIZE,
         LOCAL_RANK, MASTER_ADDR in their environment, and stops them all when one dies
    each copy, or each copy started by `torchrun -m lomotune train ...` directly:
      -> `under_launcher()` is true: never launched again
      -> `group.join(recipe)`: the process group (nccl on GPUs, gloo on CPU), one GPU per
         local rank
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch.distributed as dist

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

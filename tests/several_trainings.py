"""Several `lomotune train` commands, one after the other, in each process of a run that
torchrun started (`torchrun --nproc-per-node 2 tests/several_trainings.py COMMANDS.json`):
the imports and the process group are paid for once, not once a command. Each command
goes through the CLI as `torchrun -m lomotune train ...` would take it; `train` uses the
process group made here and leaves it for the next command.

A command ["copy", SRC, DST] copies a finished run's folder (rank 0, then every rank
waits), so that a later command can continue a copy of it.

No plots (a second of matplotlib a run; tested elsewhere). Exits with the first failing command's code, after printing which it was."""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from lomotune import train
from lomotune.cli import app

if __name__ == "__main__":
    # The PNG costs a second of matplotlib a run and is not what these runs test.
    train.plot_quietly = lambda run: None
    dist.init_process_group("gloo")
    for args in json.loads(Path(sys.argv[1]).read_text()):
        if args[0] == "copy":
            if dist.get_rank() == 0:
                shutil.copytree(args[1], args[2])
            dist.barrier()
            continue
        code = app(args, standalone_mode=False, prog_name="lomotune")
        if code:
            print(f"command failed with exit code {code}: lomotune {' '.join(args)}", flush=True)
            sys.exit(code)
    dist.destroy_process_group()

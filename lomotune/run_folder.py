"""A run's output folder: what a run writes there, the lock that keeps a second run out,
and what `--overwrite` may remove.

    runs/quickstart/
        .lomotune.lock     held (flock) by the run writing here; gone when it ends
        recipe.yaml        the resolved recipe, headed "# resolved recipe, written by lomotune"
        metrics.jsonl, summary.json, training.png
        checkpoints/, model/ (and .partial-model/ while the final model is written)

`--overwrite` removes those entries and nothing else: a folder that is not a run (no
lomotune recipe.yaml and no checkpoints/), or one holding the recipe, the data or the
model the run reads, is refused, so `training.output_dir=. --overwrite` cannot empty a
user's folder.

The lock is an exclusive `flock` on `.lomotune.lock`, held for the run's life. The kernel
drops it when the process dies, however it dies: a lock file left by a killed run holds
no lock and the next run takes it (stale locks need no guessing from pids). The file
records who holds it, so a refused run can name the other process.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from lomotune.errors import LomotuneError

LOCK_FILE = ".lomotune.lock"
RECIPE_HEADER = "# resolved recipe, written by lomotune"
# Everything a run writes into its output folder (the lock aside, which its holder removes).
RUN_ENTRIES = (
    "recipe.yaml",
    "metrics.jsonl",
    "summary.json",
    "training.png",
    "checkpoints",
    "model",
    ".partial-model",
)


class FolderInUse(LomotuneError):
    """Another live process holds the output folder's lock; the message names it."""


class OutputLock:
    """The exclusive lock of one output folder. `acquire` creates the folder when missing
    (and `release` removes it again if the run left it empty: a refused start writes
    nothing)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd: int | None = None
        self._created: Path | None = None  # the topmost folder acquire created

    def acquire(self) -> None:
        """Take the lock or raise FolderInUse (OSError where the folder cannot be made)."""
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing[-1] if missing else None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUse(holder) from None
            # The holder before us may have removed the file between our open and our
            # flock: then we hold a lock on a name nobody sees. Take the file that is there.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["lomotune", *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held: a run that opens the name afterwards gets a new file.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created is not None:  # made by acquire and left empty: remove it again
            for folder in [self.folder, *self.folder.parents]:
                try:
                    folder.rmdir()
                except OSError:  # not empty: something was written
                    break
                if folder == self._created:
                    break


def _read_holder(fd: int) -> str:
    """'process 1234 on host, started 2026-12-06 04:00:00 (lomotune train ...)'."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return (
            f"process {record['pid']} on {record['host']}, started {record['started']} "
            f"({record['command']})"
        )
    except (OSError, ValueError, KeyError):  # the holder is between open and write
        return "a process that is starting"


def contents(folder: Path) -> list[Path]:
    """What the folder holds, its lock file aside."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name != LOCK_FILE)


def is_run(folder: Path) -> bool:
    """Written by a lomotune run: its resolved recipe.yaml, or a checkpoint (complete or
    not: a run killed in its first save has written nothing else yet)."""
    return has_run_recipe(folder) or any((folder / "checkpoints").glob("*step-*"))


def has_run_recipe(folder: Path) -> bool:
    """`folder/recipe.yaml` is one a run wrote (its header says so)."""
    recipe = folder / "recipe.yaml"
    if not recipe.is_file():
        return False
    with open(recipe, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(RECIPE_HEADER)


def inputs_inside(folder: Path, inputs: dict[str, str | None]) -> list[str]:
    """'what: path' for each input (recipe file, data file, model folder) that lies in
    `folder`; the run's own recipe.yaml is not one (the run writes it again)."""
    root = folder.resolve()
    found = []
    for what, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        resolved = Path(path).resolve()
        if resolved == root / "recipe.yaml" and is_run(folder):
            continue
        if resolved == root or root in resolved.parents:
            found.append(f"{what} {path}")
    return found


def remove_run_outputs(folder: Path) -> list[str]:
    """Remove what a run wrote into `folder` (RUN_ENTRIES); returns the names of what
    else is there, which stays."""
    for name in RUN_ENTRIES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return [p.name for p in contents(folder)]


def enclosing_run_part(folder: Path) -> Path | None:
    """The `checkpoints/` or `model/` folder of another run that `folder` lies in (that
    run's checkpoint rotation or --overwrite would delete it), else None."""
    resolved = folder.resolve()
    for parent in resolved.parents:
        for part in ("checkpoints", "model", ".partial-model"):
            inner = parent / part
            if (inner == resolved or inner in resolved.parents) and has_run_recipe(parent):
                return inner
    return None

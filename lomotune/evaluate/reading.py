"""Read a SuperGLUE split from a local folder (official or hub layout) or the hub.

Official layout: `<dir>/BoolQ/val.jsonl`, one JSON object a line as released (labels as
strings or booleans, WSC spans under "target", MultiRC and ReCoRD nested).
Hub layout: `<dir>/boolq/validation.jsonl` or `<dir>/boolq/validation-*.parquet`, the
flat rows of the hub dataset `aps/super_glue` (class ids). Without a folder the hub
dataset itself is read (needs a network or the datasets cache).
Every record is checked; a bad one stops the run with its file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from lomotune.evaluate.task import EvalDataError, MalformedRecord, Task

HUB_DATASET = "aps/super_glue"
SPLITS = ("val", "train", "test")  # official names; the hub calls val "validation"


def hub_split(split: str) -> str:
    return "validation" if split == "val" else split


def read_split(task: Task, split: str, data_dir: Path | None) -> tuple[list[dict], str]:
    """The docs of `task`'s `split` and where they were read from."""
    if split not in SPLITS:
        raise EvalDataError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if data_dir is None:
        return _read_hub(task, split), f"hub:{HUB_DATASET}/{task.hub_config}/{hub_split(split)}"
    official = data_dir / task.official_folder
    hub = data_dir / task.hub_config
    if official.is_dir():
        path = official / f"{split}.jsonl"
        if not path.exists():
            raise EvalDataError(
                f"{path} does not exist ({task.name} has {_listing(official)}); "
                f"choose another --split"
            )
        return _read_jsonl(path, task.from_official), str(path)
    if hub.is_dir():
        name = hub_split(split)
        jsonl, parquet = hub / f"{name}.jsonl", sorted(hub.glob(f"{name}-*.parquet"))
        if jsonl.exists():
            return _read_jsonl(jsonl, _one(task.from_hub)), str(jsonl)
        if parquet:
            return _read_parquet(parquet, task.from_hub), str(parquet[0].parent)
        raise EvalDataError(
            f"{hub} has no {name}.jsonl or {name}-*.parquet ({_listing(hub)}); "
            "choose another --split"
        )
    raise EvalDataError(
        f"no folder for {task.name} in {data_dir}: expected {official} (official layout) or "
        f"{hub} (hub layout); point --data-dir at the folder that holds it, or leave "
        f"--tasks {task.name} out"
    )


def _one(from_hub):
    return lambda record: [from_hub(record)]


def _read_jsonl(path: Path, convert) -> list[dict]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                docs.extend(convert(json.loads(line)))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            except MalformedRecord as e:
                raise EvalDataError(f"{path} line {number}: {e}") from None
    if not docs:
        raise EvalDataError(f"{path} holds no examples")
    return docs


def _read_parquet(paths: list[Path], from_hub) -> list[dict]:
    import pyarrow.parquet as pq

    docs = []
    for path in paths:
        for row, record in enumerate(pq.read_table(path).to_pylist()):
            try:
                docs.append(from_hub(record))
            except MalformedRecord as e:
                raise EvalDataError(f"{path} row {row}: {e}") from None
    return docs


def _read_hub(task: Task, split: str) -> list[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split(split))
    except Exception as e:  # no network, no such split: the library's reason, for people
        raise EvalDataError(
            f"could not read {HUB_DATASET} ({task.hub_config}, {hub_split(split)}) from the hub: "
            f"{e}. Without a network, pass --data-dir with the official SuperGLUE files"
        ) from None
    docs = []
    for row, record in enumerate(rows):
        try:
            docs.append(task.from_hub(record))
        except MalformedRecord as e:
            raise EvalDataError(f"{HUB_DATASET} {task.hub_config} row {row}: {e}") from None
    return docs


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names) if names else "nothing"

"""Read raw rows from where `data.source` points: a local file, a hub dataset, or a
built-in generator. Rows are plain dicts; each keeps a number that a person can find in
the file (the 1-based line for .jsonl and .csv, the 1-based row otherwise).

Local files are read directly (json, csv, pyarrow) rather than through
`datasets.load_dataset`: that way a bad row is reported by its real line number (a jsonl
line that is not JSON becomes a bad row, not a pyarrow traceback), csv values stay text
(pandas would turn a completion " 122" into the number 122), and nothing is copied into
the datasets cache. Hub datasets go through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lomotune.data import builtin
from lomotune.data.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SOURCE_FORMS = (
    "a file (.jsonl, .json, .csv, .parquet), hub:org/name, builtin:NAME, or superglue:TASK"
)


@dataclass(frozen=True)
class Row:
    number: int  # 1-based line (jsonl, csv) or row (json, parquet, hub, builtin)
    data: dict[str, Any] | None  # None when the row could not be parsed at all
    problem: str | None = None  # why `data` is None (e.g. "not valid JSON: ...")


@dataclass(frozen=True)
class RawRows:
    origin: str  # what to call this source in messages: a path, "hub:org/name split train"
    unit: str  # "line" or "row": how `Row.number` counts
    rows: list[Row]

    def columns(self) -> list[str]:
        """Field names of the first parsed rows: named in errors about missing fields."""
        seen: dict[str, None] = {}
        for row in self.rows[:20]:
            if row.data is not None:
                seen.update(dict.fromkeys(row.data))
        return list(seen)


def read_source(
    source: str,
    split: str = "train",
    *,
    num_examples: int,
    seed: int,
    superglue_dir: str | None = None,
) -> RawRows:
    """Rows of `split` of `source` (file, hub:org/name, builtin:NAME, superglue:TASK)."""
    if source.startswith("superglue:"):
        from lomotune.data.superglue import read_superglue

        return read_superglue(source, split, superglue_dir, max_examples=num_examples)
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        rows = builtin.generate(name, num_examples, seed)
        return RawRows(source, "row", [Row(i + 1, r) for i, r in enumerate(rows)])
    if source.startswith("hub:"):
        return read_hub(source.removeprefix("hub:"), split)
    path = Path(source)
    if split != "train":
        raise DataError(
            f"data.split: {source} is a single file, so it has no split {split!r}. Remove "
            "data.split (a file is read whole); for held-out rows use data.eval_fraction, "
            "or data.eval_split: path/to/eval_file"
        )
    return read_file(path)


def read_eval_source(
    source: str,
    eval_split: str,
    *,
    num_examples: int,
    seed: int,
    superglue_dir: str | None = None,
) -> RawRows:
    """Rows of the held-out split: a second split of a hub or SuperGLUE dataset, or a
    second file next to a local one (a relative path is tried next to the source file
    first)."""
    if source.startswith("superglue:"):
        from lomotune.data.superglue import read_superglue

        return read_superglue(source, eval_split, superglue_dir, max_examples=None)
    if source.startswith("builtin:"):
        raise DataError(
            f"data.eval_split: {source} is generated and has a single split. Remove "
            "data.eval_split and hold out rows with data.eval_fraction"
        )
    if source.startswith("hub:"):
        return read_hub(source.removeprefix("hub:"), eval_split)
    path = Path(eval_split)
    beside = Path(source).parent / eval_split
    if not path.is_absolute() and not path.exists() and beside.exists():
        path = beside
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(
            f"data.eval_split: for a local source ({source}) eval_split is the path of a "
            f"second file (.jsonl, .json, .csv, .parquet), not {eval_split!r}"
        )
    return read_file(path)


def read_hub(name: str, split: str) -> RawRows:
    origin = f"hub:{name} (split {split})"
    if not name or "://" in name:
        raise DataError(f"data.source: hub:{name} is not a dataset id; write hub:org/name")
    import datasets  # slow import (~1 s): only when a hub source is used

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types: not found, no network, bad split
        raise DataError(
            f"data.source: cannot load {origin}: {type(e).__name__}: {e}. Check the dataset "
            f"id and data.split at https://huggingface.co/datasets/{name}; without a "
            "network, download it elsewhere and point data.source at a local file"
        ) from None
    rows = [Row(i + 1, dict(r)) for i, r in enumerate(ds)]
    return _nonempty(RawRows(origin, "row", rows))


def read_file(path: Path) -> RawRows:
    if not path.exists():
        raise DataError(
            f"data.source: no such file: {path}. Check the path (relative paths are "
            f"resolved from the recipe's folder), or use {SOURCE_FORMS}"
        )
    if path.is_dir():
        raise DataError(f"data.source: {path} is a folder; point data.source at one data file")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise DataError(
            f"data.source: cannot read {path}: unknown extension {suffix or '(none)'!r}. "
            f"Supported: {', '.join(EXTENSIONS)}; rename the file if its content is one of these"
        )
    try:
        raw = readers[suffix](path)
    except UnicodeDecodeError:
        raise DataError(f"data.source: {path} is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"data.source: cannot read {path}: {e.strerror or e}") from None
    return _nonempty(raw)


def _nonempty(raw: RawRows) -> RawRows:
    if not raw.rows:
        raise DataError(
            f"data.source: {raw.origin} has no rows. Check that it is the right file and "
            "that it is not empty"
        )
    return raw


def _read_jsonl(path: Path) -> RawRows:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often the last one) are not rows
            rows.append(_json_row(number, line))
    return RawRows(str(path), "line", rows)


def _json_row(number: int, text: str) -> Row:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(number, None, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(value, dict):
        return Row(number, None, f"a JSON {type(value).__name__}, not an object")
    return Row(number, value)


def _read_json(path: Path) -> RawRows:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return RawRows(str(path), "row", [])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # One object per line saved as .json (datasets' `to_json` does this).
            return _read_jsonl(path)
        raise DataError(
            f"data.source: {path} is not valid JSON: {e.msg} at line {e.lineno}, column "
            f"{e.colno}. Fix the file, or save it as .jsonl (one object per line)"
        ) from None
    records = _json_records(value)
    if records is None:
        raise DataError(
            f"data.source: {path} holds JSON that is not a dataset. Expected a list of "
            'objects, {"data": [objects]}, or {"column": [values], ...} with equal lengths'
        )
    rows = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict):
            rows.append(Row(i + 1, rec))
        else:
            rows.append(Row(i + 1, None, f"a JSON {type(rec).__name__}, not an object"))
    return RawRows(str(path), "row", rows)


def _json_records(value: Any) -> list | None:
    """The three layouts seen in the wild: a list of records; one key ("data", "rows",
    "train", ...) holding that list (SQuAD style); or columns of equal length."""
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        return None
    lists = {k: v for k, v in value.items() if isinstance(v, list)}
    record_lists = [v for v in lists.values() if v and all(isinstance(r, dict) for r in v)]
    if len(record_lists) == 1:
        return record_lists[0]
    if lists and len(lists) == len(value) and len({len(v) for v in lists.values()}) == 1:
        names = list(lists)
        return [dict(zip(names, vals, strict=True)) for vals in zip(*lists.values(), strict=True)]
    return None


def _read_csv(path: Path) -> RawRows:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return RawRows(str(path), "line", [])
        header = [h.strip() for h in header]
        end_of_previous = reader.line_num
        for record in reader:
            # A quoted field may span lines: the record starts after the previous one.
            number, end_of_previous = end_of_previous + 1, reader.line_num
            if not record:
                continue  # blank line
            if len(record) != len(header):
                problem = f"{len(record)} fields where the header has {len(header)}"
                rows.append(Row(number, None, problem))
                continue
            rows.append(Row(number, dict(zip(header, record, strict=True))))
    return RawRows(str(path), "line", rows)


def _read_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq  # datasets' own parquet reader

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise DataError(f"data.source: {path} is not a readable parquet file: {e}") from None
    return RawRows(str(path), "row", [Row(i + 1, r) for i, r in enumerate(table.to_pylist())])

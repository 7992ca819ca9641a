"""The tokenized dataset, cached on disk: a second run over the same file, recipe and
tokenizer skips reading, rendering and tokenizing.

The key covers everything the result depends on: the data section of the recipe, the
seed, the tokenizer (its vocabulary, normalizer and chat template), the source file's
size and modification time, and lomotune's version (built-in generators may change).
Hub datasets are not cached here: `datasets` caches them itself. The cache is JSON, so
nothing in it is ever executed on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lomotune import __version__
from lomotune.cache import cache_root
from lomotune.recipe import DataConfig

FORMAT = 1


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int) -> str | None:
    """A stable key for this data + tokenizer, or None when it should not be cached."""
    if cfg.source.startswith(("hub:", "superglue:")):  # no single file whose stat to key on
        return None
    files = []
    if not cfg.source.startswith("builtin:"):
        source = Path(cfg.source)
        candidates = [source]
        if cfg.eval_split:
            candidates += [Path(cfg.eval_split), source.parent / cfg.eval_split]
        for path in candidates:
            if path.is_file():
                st = path.stat()
                files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    identity = {
        "format": FORMAT,
        "lomotune": __version__,
        "data": cfg.model_dump(mode="json"),
        "seed": seed,
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text += repr(getattr(tokenizer, "chat_template", None)) + repr(tokenizer.all_special_tokens)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(key: str) -> Path:
    return cache_root() / "data" / f"{key}.json"


def load_cached(key: str):
    """The PreparedData of `key` from disk, or None (missing or unreadable: rebuilt)."""
    path = cache_path(key)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        from lomotune.data.pipeline import DataStats, PreparedData, TokenizedExample

        def examples(rows):
            return [TokenizedExample(ids, labels) for ids, labels in rows]

        return PreparedData(
            train=examples(raw["train"]),
            eval=examples(raw["eval"]),
            eval_pairs=[tuple(p) for p in raw["eval_pairs"]],
            stats=DataStats(**raw["stats"]),
            pad_id=raw["pad_id"],
            add_bos=raw["add_bos"],
            bad_row_examples=[tuple(b) for b in raw["bad_row_examples"]],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str, data) -> None:
    """Write atomically; a cache that cannot be written is only a slower next run."""
    path = cache_path(key)
    payload = {
        "train": [[e.input_ids, e.labels] for e in data.train],
        "eval": [[e.input_ids, e.labels] for e in data.eval],
        "eval_pairs": data.eval_pairs,
        "stats": dataclasses.asdict(data.stats),
        "pad_id": data.pad_id,
        "add_bos": data.add_bos,
        "bad_row_examples": data.bad_row_examples,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except OSError:
        pass

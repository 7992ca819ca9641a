"""Where lomotune keeps what it can rebuild: converted models, tokenized datasets.

`LOMOTUNE_CACHE` moves it (default: the platform's user cache folder). Deleting it only
costs time."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_root() -> Path:
    return Path(os.environ.get("LOMOTUNE_CACHE", user_cache_dir("lomotune")))

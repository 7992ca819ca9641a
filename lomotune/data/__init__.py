"""The data pipeline: sources -> formats -> pipeline (tokenize, mask, truncate, split) ->
loader (bucket or pack, collate). `prepare_data` and `BatchLoader` are all a run needs."""

from lomotune.data.errors import DataError
from lomotune.data.loader import BatchLoader
from lomotune.data.pipeline import DataStats, PreparedData, TokenizedExample, prepare_data

__all__ = [
    "BatchLoader",
    "DataError",
    "DataStats",
    "PreparedData",
    "TokenizedExample",
    "prepare_data",
]

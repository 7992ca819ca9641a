"""From `data:` in a recipe to token ids and labels: read -> render -> split -> tokenize ->
mask -> truncate. `prepare_data` is the one entry point; batching is in loader.py.

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts them),
-100 where there is no loss. labels[0] is always -100: nothing predicts the first token,
and in a packed row this keeps the last token of one example from predicting the first
of the next.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lomotune.data.cache import cache_key, load_cached, store
from lomotune.data.errors import DataError
from lomotune.data.formats import Rendered, render_rows
from lomotune.data.sources import RawRows, read_eval_source, read_source
from lomotune.recipe import DataConfig

IGNORE = -100  # label of a position that is not trained (torch cross_entropy's ignore_index)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where there is no loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class DataStats:
    source: str
    format: str
    rows_read: int = 0  # train and eval sources together
    bad_rows_skipped: int = 0
    truncated: int = 0  # longer than max_length: cut at the end
    dropped: int = 0  # nothing left to learn after the cut (the answer was cut off)
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    train_loss_tokens: int = 0
    mean_length: float = 0.0  # train examples, after truncation
    max_length: int = 0  # longest train example, after truncation
    longest_before_truncation: int = 0
    from_cache: bool = False  # tokenized by an earlier run (see data/cache.py)

    def summary(self) -> str:
        parts = [
            f"{self.source} ({self.format}): {self.rows_read} rows",
            f"{self.train_examples} train / {self.eval_examples} eval examples",
            f"{self.train_tokens} train tokens ({self.train_loss_tokens} with loss)",
            f"length mean {self.mean_length:.1f} max {self.max_length}",
        ]
        if self.bad_rows_skipped:
            parts.append(f"{self.bad_rows_skipped} bad rows skipped")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (answer beyond max_length)")
        return ", ".join(parts)


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    # (prompt as the model sees it, expected answer) of every eval row, for exact-match
    # generation: prompt-completion, alpaca and builtin sources; [] for text and chat.
    # The answer keeps its leading space (" 14/03/2021"): compare stripped.
    eval_pairs: list[tuple[str, str]]
    stats: DataStats
    pad_id: int  # what the loader pads with; never attended to and never in the loss
    add_bos: bool = False  # the tokenizer puts BOS first by default, so examples start with it
    bad_row_examples: list[tuple[int, str]] = field(default_factory=list)


def fingerprint(examples: list[TokenizedExample]) -> str:
    """The sha256 of a tokenized set (every example's ids and labels, in order): what a
    checkpoint was trained on, whatever file, hub set or format it came from. A data file
    edited under a run changes it; the same data read again does not."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray([len(ex.input_ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def prepare_data(
    cfg: DataConfig, tokenizer: Any, seed: int, *, use_cache: bool = True
) -> PreparedData:
    """Read, render, split and tokenize the data that `cfg` describes (or take the result
    of an identical earlier call from the cache). Raises DataError with the fix for every
    problem a person can fix."""
    key = cache_key(cfg, tokenizer, seed) if use_cache else None
    if key is not None:
        cached = load_cached(key)
        if cached is not None:
            cached.stats.from_cache = True
            return cached
    data = _prepare(cfg, tokenizer, seed)
    if key is not None:
        store(key, data)
    return data


def _prepare(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    stats = DataStats(source=cfg.source, format=cfg.format)
    raw = read_source(
        cfg.source,
        cfg.split,
        num_examples=cfg.num_examples,
        seed=seed,
        superglue_dir=cfg.superglue_dir,
    )
    train_rows, bad = render_rows(raw, cfg, tokenizer)
    stats.rows_read, stats.bad_rows_skipped = len(raw.rows), bad.count
    _require_rows(train_rows, raw)

    if cfg.eval_split is not None:
        raw_eval = read_eval_source(
            cfg.source,
            cfg.eval_split,
            num_examples=cfg.num_examples,
            seed=seed,
            superglue_dir=cfg.superglue_dir,
        )
        eval_rows, bad_eval = render_rows(raw_eval, cfg, tokenizer)
        stats.rows_read += len(raw_eval.rows)
        stats.bad_rows_skipped += bad_eval.count
    else:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, seed)

    tok = Tokenize(tokenizer, cfg)
    train = tok.examples(train_rows, stats)
    evaluation = tok.examples(eval_rows, stats)
    if not train:
        raise DataError(
            f"data.max_length: every training example was cut before its answer at "
            f"max_length {cfg.max_length} tokens (longest example "
            f"{stats.longest_before_truncation} tokens, median {tok.median_length}). "
            f"Raise data.max_length to {stats.longest_before_truncation} to keep every "
            "example, or shorten the prompts"
        )
    lengths = [len(e) for e in train]
    stats.train_examples, stats.eval_examples = len(train), len(evaluation)
    stats.train_tokens = sum(lengths)
    stats.train_loss_tokens = sum(e.num_loss_tokens for e in train)
    stats.mean_length = stats.train_tokens / len(train)
    stats.max_length = max(lengths)
    pairs = [r.eval_pair for r in eval_rows if r.eval_pair is not None]
    return PreparedData(
        train=train,
        eval=evaluation,
        eval_pairs=pairs if len(pairs) == len(eval_rows) else [],
        stats=stats,
        pad_id=pad_id(tokenizer),
        add_bos=tok.bos is not None,
        bad_row_examples=list(bad.examples or []),
    )


def split_rows(rows: list[Rendered], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out the last `fraction` of a seeded shuffle (at least one row when fraction
    > 0 and there are two rows or more; never all of them)."""
    if fraction == 0 or len(rows) < 2:
        return rows, []
    order = np.random.default_rng([_u64(seed), 0x5E1]).permutation(len(rows))
    n_eval = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    n_train = len(rows) - n_eval
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train:]]


class Tokenize:
    """Render -> ids and labels. Each segment is tokenized on its own, as generation will
    see it: the prompt alone, then the answer the model produces after it."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.bos = default_bos(tokenizer)
        self.eos = tokenizer.eos_token_id
        if self.eos is None and cfg.format != "chat":
            raise DataError(
                "model: the tokenizer has no eos_token, so an example cannot end. Use the "
                "model's own tokenizer, or set tokenizer.eos_token before preparing data"
            )
        self.lengths: list[int] = []  # before truncation, for the all-dropped message

    @property
    def median_length(self) -> int:
        return int(statistics.median(self.lengths)) if self.lengths else 0

    def examples(self, rows: list[Rendered], stats: DataStats) -> list[TokenizedExample]:
        texts = [s.text for r in rows for s in r.segments]
        # One batched call: the fast tokenizers work through a list in Rust, far faster
        # than a call per segment.
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out, k = [], 0
        for r in rows:
            seg_ids = ids[k : k + len(r.segments)]
            k += len(r.segments)
            example = self.build(r, seg_ids)
            self.lengths.append(len(example))
            stats.longest_before_truncation = max(stats.longest_before_truncation, len(example))
            if len(example) > self.cfg.max_length:
                stats.truncated += 1
                example = TokenizedExample(
                    example.input_ids[: self.cfg.max_length], example.labels[: self.cfg.max_length]
                )
            if example.num_loss_tokens == 0:
                stats.dropped += 1  # its answer was cut off: it would only cost compute
                continue
            out.append(example)
        return out

    def build(self, r: Rendered, seg_ids: list[list[int]]) -> TokenizedExample:
        everything = self.cfg.train_on_prompt
        input_ids: list[int] = []
        labels: list[int] = []
        if self.bos is not None and not r.templated:
            input_ids.append(self.bos)
            labels.append(IGNORE)
        for seg, tokens in zip(r.segments, seg_ids, strict=True):
            input_ids += tokens
            labels += tokens if (seg.reply or everything) else [IGNORE] * len(tokens)
        if not r.templated:
            # EOS ends the answer: the model learns to stop. Chat templates end each
            # assistant turn with their own marker, inside the reply segment.
            input_ids.append(self.eos)
            labels.append(self.eos)
        if labels:
            labels[0] = IGNORE
        return TokenizedExample(input_ids, labels)


def default_bos(tokenizer: Any) -> int | None:
    """BOS id if this tokenizer puts BOS first by default (Llama 2/3 do, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    return bos if with_special and with_special[0] == bos else None


def pad_id(tokenizer: Any) -> int:
    # Padding is masked out of attention and loss, so any id will do; prefer the real one.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _require_rows(rows: list[Rendered], raw: RawRows) -> None:
    if not rows:
        raise DataError(
            f"data.source: every row of {raw.origin} was a bad row and was skipped; "
            "nothing is left to train on. Set data.on_bad_rows: error to see why"
        )


def _u64(seed: int) -> int:
    return seed & 0xFFFF_FFFF_FFFF_FFFF  # numpy seeds must be non-negative

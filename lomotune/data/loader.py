"""Batches, deterministic and resumable: the batches of epoch e are a pure function of
(seed, e), so a run resumed at (epoch, index) sees exactly the batches an uninterrupted run
would have seen from there. Nothing is carried from one batch to the next but the position.

Without packing, batches are length-bucketed: a seeded permutation is cut into windows of
`bucket_window` batches, each window sorted by length and cut into batches, and the batch
order shuffled; padding stays small and every epoch differs.

With packing, examples are placed whole into rows of exactly `max_length` tokens (first
fit, once, from a seeded permutation; never split across rows) and the rows are shuffled
each epoch. `position_ids` restart at 0 at every example. A packed batch carries NO
attention_mask on purpose: transformers (masking_utils.find_packed_sequence_indices) keeps
packed examples from attending to each other only when attention_mask is None, reading
the example boundaries from position_ids; with a mask they would see each other. It also
needs `use_cache=False` in the forward call: with a KV cache (a Llama's default, even in
training mode) the separation is skipped as silently. tests/test_data.py checks both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lomotune.data.errors import DataError
from lomotune.data.pipeline import IGNORE, TokenizedExample

Batch = dict[str, torch.Tensor]
OPEN_ROWS = 64  # rows a packing pass keeps open: first fit in O(examples x OPEN_ROWS)


class BatchLoader:
    """Yields `(epoch, index, batch)` forever. `batch` is a dict of tensors:

    input_ids       (B, T) long
    labels          (B, T) long, -100 on prompt, padding and each example's first token
    attention_mask  (B, T) long, 0 on padding. Unpacked batches only (see module doc)
    position_ids    (B, T) long, restarting at 0 at every example. Packed batches only
    num_tokens      () long, tokens that are not padding
    num_loss_tokens () long, labels that are not -100

    Pass input_ids, attention_mask (when present) and position_ids (when present) to the
    model with use_cache=False; `batch.get("attention_mask")` is None for a packed batch,
    as it must be. The two counts are not model inputs: do not pass them on.
    With packing, `batch_size` counts rows of `max_length` tokens, not examples.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch_size: int,
        seed: int,
        pad_id: int,
        packing: bool = False,
        max_length: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        bucket_window: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise DataError("no examples to batch: the train (or eval) set is empty")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed & 0xFFFF_FFFF_FFFF_FFFF  # numpy seeds must be non-negative
        self.pad_id = pad_id
        self.packing = packing
        self.max_length = max_length
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_window = bucket_window
        if packing:
            if max_length is None:
                raise ValueError("packing needs max_length: the length of every packed row")
            self.rows = pack(self.examples, max_length, self.seed)
        n = len(self.rows) if packing else len(self.examples)
        self._batches = n // batch_size if drop_last else -(-n // batch_size)
        if self._batches == 0:
            what = "packed rows" if packing else "examples"
            raise DataError(
                f"training.batch_size {batch_size} is larger than the {n} {what} available, "
                "and the last incomplete batch is dropped: lower training.batch_size or use "
                "more data"
            )
        self._plan: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    def __len__(self) -> int:
        return self._batches

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`, as lists of example indices (packed: row indices)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, 1, epoch])
        n = len(self.rows) if self.packing else len(self.examples)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.packing:
            # Sort within windows (not globally) so that the batches of an epoch still
            # mix examples from all over the dataset.
            lengths = np.array([len(self.examples[i]) for i in order])
            window = self.bucket_window * self.batch_size
            order = np.concatenate(
                [
                    order[s : s + window][np.argsort(-lengths[s : s + window], kind="stable")]
                    for s in range(0, n, window)
                ]
            )
        batches = [order[s : s + self.batch_size].tolist() for s in range(0, n, self.batch_size)]
        batches = batches[: self._batches]  # drop_last
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (epoch, batches)
        return batches

    def batch(self, epoch: int, index: int) -> Batch:
        indices = self.epoch_plan(epoch)[index]
        if self.packing:
            return collate_packed(
                [self.rows[i] for i in indices], self.examples, self.max_length, self.pad_id
            )
        return collate([self.examples[i] for i in indices], self.pad_id)

    def iterate(
        self, start_epoch: int = 0, start_index: int = 0
    ) -> Iterator[tuple[int, int, Batch]]:
        """From batch `start_index` of epoch `start_epoch` on, forever. To resume, save the
        position of the next batch to train on and start there."""
        if not 0 <= start_index < self._batches:
            raise ValueError(f"start_index {start_index} outside 0..{self._batches - 1}")
        epoch, index = start_epoch, start_index
        while True:
            yield epoch, index, self.batch(epoch, index)
            index += 1
            if index == self._batches:
                epoch, index = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (epoch 0) of batches: for evaluation."""
        for index in range(self._batches):
            yield self.batch(0, index)


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e)] = torch.tensor(e.input_ids)
        labels[b, : len(e)] = torch.tensor(e.labels)
        attention_mask[b, : len(e)] = 1
    labels[:, 0] = IGNORE  # nothing predicts the first token
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "num_tokens": attention_mask.sum(),
        "num_loss_tokens": (labels != IGNORE).sum(),
    }


def collate_packed(
    rows: Sequence[list[int]], examples: Sequence[TokenizedExample], max_length: int, pad_id: int
) -> Batch:
    input_ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), max_length), dtype=torch.long)
    num_tokens = 0
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            input_ids[b, at : at + len(e)] = torch.tensor(e.input_ids)
            labels[b, at : at + len(e)] = torch.tensor(e.labels)
            labels[b, at] = IGNORE  # the previous example's last token must not predict it
            position_ids[b, at : at + len(e)] = torch.arange(len(e))
            at += len(e)
        # Padding at the end of a row is one more "example" of its own: it comes after
        # every real token (causal), has no labels, and restarts its positions.
        position_ids[b, at:] = torch.arange(max_length - at)
        num_tokens += at
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "num_tokens": torch.tensor(num_tokens),
        "num_loss_tokens": (labels != IGNORE).sum(),
    }


def pack(examples: Sequence[TokenizedExample], max_length: int, seed: int) -> list[list[int]]:
    """Example indices of each row of at most `max_length` tokens. First fit over a seeded
    permutation, with up to OPEN_ROWS rows open at once; when none has room and the limit
    is reached, the fullest row is closed."""
    order = np.random.default_rng([seed, 2]).permutation(len(examples))
    closed: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []  # (free tokens, example indices)
    for i in order.tolist():
        n = len(examples[i])
        if n > max_length:
            raise DataError(
                f"an example of {n} tokens does not fit a packed row of max_length "
                f"{max_length}: prepare the data with the same data.max_length"
            )
        slot = next((k for k, (free, _) in enumerate(open_rows) if free >= n), None)
        if slot is None:
            if len(open_rows) == OPEN_ROWS:
                fullest = min(range(len(open_rows)), key=lambda k: open_rows[k][0])
                closed.append(open_rows.pop(fullest)[1])
            open_rows.append((max_length, []))
            slot = len(open_rows) - 1
        free, members = open_rows[slot]
        members.append(i)
        open_rows[slot] = (free - n, members)
    return closed + [members for _, members in open_rows]

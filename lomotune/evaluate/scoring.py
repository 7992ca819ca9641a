"""Log-likelihood of continuations given contexts: the one computation behind
multiple-choice evaluation.

Tokens are those lm-evaluation-harness scores: whitespace at the end of a context moves
to the start of its continuation, context + continuation is tokenized whole, and the
continuation's tokens are what follows the context's own tokens.

Each distinct context is run through the model once: a batch of contexts, left-padded
(explicit position ids from the attention mask, so padding shifts no position), gives
the KV cache and the next-token distribution at its last position. That distribution
scores every continuation's first token, so one-token choices (yes/no, True/False) cost
one forward of the context and nothing else. Longer continuations then run on the
cache, right-padded behind their context. The vocabulary projection is only computed
where a continuation token is predicted, never over the whole context.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

TokenPair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> TokenPair:
    """(context, continuation) token ids as the harness forms them (its `_encode_pair`);
    a context too long for the model loses its start (as the harness's left truncation)."""
    if not context:
        raise ValueError("an empty context has no next-token distribution to score")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} adds no token to its context")
    # The model sees context + continuation[:-1]: at most max_length tokens.
    overflow = len(context_ids) + len(continuation_ids) - 1 - max_length
    if overflow > 0:
        context_ids = context_ids[overflow:]
    return context_ids, continuation_ids


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module,
    pairs: list[TokenPair],
    *,
    batch_size: int,
    pad_id: int,
    on_progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each pair, in the
    order given. `batch_size` contexts run together, and as many continuation rows.
    Longest contexts first (least padding; a memory problem shows at once); the order
    depends only on the tokens, so results are the same run to run.
    `on_progress(n)` is called after each batch with the number of pairs scored."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        by_context.setdefault(tuple(context), []).append(i)
    contexts = sorted(by_context, key=lambda c: (-len(c), c))
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(contexts), batch_size):
            batch = contexts[start : start + batch_size]
            members = [by_context[c] for c in batch]
            continuations = [[pairs[i][1] for i in group] for group in members]
            batch_scores = _score_contexts(model, batch, continuations, batch_size, pad_id)
            for group, group_scores in zip(members, batch_scores, strict=True):
                for i, score in zip(group, group_scores, strict=True):
                    scores[i] = score
            if on_progress is not None:
                on_progress(sum(len(group) for group in members))
    finally:
        model.train(was_training)
    return scores


def _score_contexts(
    model: torch.nn.Module,
    contexts: list[tuple[int, ...]],
    continuations: list[list[list[int]]],  # per context, its continuations
    rows_per_forward: int,
    pad_id: int,
) -> list[list[float]]:
    device = next(model.parameters()).device
    # Padded on the host and copied once per tensor: a tensor per row would be a blocking
    # copy (and a sync) per row on a GPU. Left padding: every context ends at `width`.
    width = max(len(c) for c in contexts)
    ids = _to(device, [[pad_id] * (width - len(c)) + list(c) for c in contexts])
    mask = _to(device, [[0] * (width - len(c)) + [1] * len(c) for c in contexts])
    lengths = _to(device, [len(c) for c in contexts])
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    next_token = out.logits[:, -1].float().log_softmax(-1)  # (contexts, vocab)
    cache = out.past_key_values

    # Every continuation's first token in one indexing op and one read (not one read,
    # a device sync on a GPU, per choice).
    firsts = [(row, cont[0]) for row, conts in enumerate(continuations) for cont in conts]
    rows, tokens = zip(*firsts, strict=True)
    picked = iter(next_token[list(rows), list(tokens)].tolist())
    scores = [[next(picked) for _ in conts] for conts in continuations]
    longer = [  # (context row, index among its continuations, tokens)
        (row, k, cont)
        for row, conts in enumerate(continuations)
        for k, cont in enumerate(conts)
        if len(cont) > 1
    ]
    for start in range(0, len(longer), rows_per_forward):
        chunk = longer[start : start + rows_per_forward]
        rest = _continuation_logprobs(model, cache, mask, lengths, chunk, pad_id)
        for (row, k, _), logprob in zip(chunk, rest, strict=True):
            scores[row][k] += logprob
    return scores


def _continuation_logprobs(
    model: torch.nn.Module,
    cache: DynamicCache,
    context_mask: torch.Tensor,  # (contexts, width), left-padded
    context_lengths: torch.Tensor,  # (contexts,)
    chunk: list[tuple[int, int, list[int]]],
    pad_id: int,
) -> list[float]:
    """log p(tokens 2..n of each continuation), each row on its context's cache."""
    device = context_mask.device
    rows = _to(device, [row for row, _, _ in chunk])
    inputs = [cont[:-1] for _, _, cont in chunk]  # the last token is only predicted
    steps = max(len(t) for t in inputs)
    # Right padding: real tokens follow the context. Built on the host, one copy each.
    ids = _to(device, [t + [pad_id] * (steps - len(t)) for t in inputs])
    step_mask = _to(device, [[1] * len(t) + [0] * (steps - len(t)) for t in inputs])
    # Where each predicted token is, listed on the host: no boolean mask, whose gather has
    # a data-dependent size (a sync).
    predicted = [(i, j, y) for i, (_, _, cont) in enumerate(chunk) for j, y in enumerate(cont[1:])]
    at_row, at_step, targets = (
        _to(device, list(column)) for column in zip(*predicted, strict=True)
    )
    # Each row gets its own copy of its context's keys and values (indexing copies).
    row_cache = DynamicCache(
        ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers]
    )
    positions = context_lengths[rows, None] + torch.arange(steps, device=device)
    out = model(
        input_ids=ids,
        attention_mask=torch.cat([context_mask[rows], step_mask], dim=1),
        position_ids=positions,
        past_key_values=row_cache,
        use_cache=True,
    )
    logprobs = out.logits[at_row, at_step].float().log_softmax(-1)  # (predicted tokens, vocab)
    # Summed in float64: a long continuation's total is exact to its tokens' rounding.
    picked = logprobs.gather(1, targets[:, None])[:, 0].double()
    per_row = torch.zeros(len(chunk), dtype=torch.float64, device=device)
    per_row.index_add_(0, at_row, picked)
    return per_row.tolist()  # one read for the chunk


def _to(device: torch.device, values: list) -> torch.Tensor:
    """Integers from the host as one int64 tensor on `device` (one copy)."""
    return torch.tensor(values, dtype=torch.long).to(device)

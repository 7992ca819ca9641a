"""Cross-entropy of a linear output projection, computed chunk by chunk, with the
projection's weight gradient accumulated in one buffer.

    loss = sum_i CE(transform(hidden_i @ weight.T), label_i)

Autograd through per-chunk checkpoints (the general path in `loss.causal_lm_loss`)
makes every chunk's weight gradient a fresh (vocab x hidden) tensor and sums it into the
one accumulated so far: up to three head-sized tensors alive at once, besides the
chunk's logits, log-probabilities and their gradient. This function's backward recomputes
each chunk's logits, turns them into d(loss)/d(logits) in place, and adds their product
with the chunk's hidden states into one preallocated gradient (`addmm_`): at any moment
one weight gradient, the hidden states' gradient and one chunk's logits (in fp32, and
below fp32 also in the model's dtype) are alive; a softcapped head adds tanh's slope for
a 1/16 row block of the chunk at a time. The forward keeps no logits either (one chunk's
at a time, log-sum-exp taken in place).
The same idea as Liger-Kernel's and Apple's cut-cross-entropy fused linear
cross-entropy, written for CPU and any device with plain torch ops; the gradient is
formed in backward (not in forward, as Liger does) so that a loss scale applied to the
loss reaches it before any rounding to bf16 / fp16.

A tied weight (the input embedding is the output head) has a second use: autograd holds
the head's gradient until the embedding's backward has made a dense (vocab x hidden)
gradient of its own, then sums the two. `TiedGradient` passes the head's gradient buffer
from this loss's backward to `tied_embedding`'s, which adds the embedding rows into it:
one vocab-sized gradient through the whole backward, never two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class LogitTransform:
    """What a family's head does to the projection before the loss:
    `softcap * tanh(z * multiplier / softcap)` (no tanh when softcap is None)."""

    multiplier: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits * self.multiplier if self.multiplier != 1.0 else logits
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """The same, in place on a private fp32 buffer."""
        if self.multiplier != 1.0:
            logits.mul_(self.multiplier)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def derivative(self, transformed: torch.Tensor) -> torch.Tensor | None:
        """d(transformed)/d(logits) elementwise, from the transformed logits (None: the
        constant multiplier alone). tanh' = 1 - tanh^2, with tanh = transformed / softcap."""
        if self.softcap is None:
            return None
        return (transformed / self.softcap).square_().neg_().add_(1.0).mul_(self.multiplier)


PLAIN = LogitTransform()
# A softcapped head's slope in backward is formed for this many row blocks of a loss chunk
# in turn: its fp32 temporary is 1/16 of the chunk's logits (the estimator counts it).
SLOPE_BLOCKS = 16


class TiedGradient:
    """The gradient buffer of a weight that is both the output head and the input
    embedding, on its way from the loss's backward (which runs first) to the embedding's
    (which runs last and hands it to autograd whole)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self) -> torch.Tensor | None:
        buffer, self.buffer = self.buffer, None
        return buffer


def linear_cross_entropy(
    hidden: torch.Tensor,  # (N, H): the hidden states at the label positions
    weight: torch.Tensor,  # (V, H): the output projection, no bias
    labels: torch.Tensor,  # (N,): every one a class index (no ignore_index)
    chunk_tokens: int,
    transform: LogitTransform = PLAIN,
    tied: TiedGradient | None = None,
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of `transform(hidden @ weight.T)` against
    `labels`; logits are in fp32 as `F.cross_entropy(logits.float(), ...)` would see them.
    With `tied`, the weight's gradient is left there for `tied_embedding`'s backward
    (which must be part of the same graph) instead of being returned to autograd."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1; got {chunk_tokens}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, transform, tied)


def tied_embedding(
    ids: torch.Tensor,  # (B, T) token ids
    weight: torch.Tensor,  # (V, H): the embedding, also the head `linear_cross_entropy` uses
    padding_idx: int | None,
    tied: TiedGradient,
    scale: torch.Tensor | None = None,  # 0-dim, in weight's dtype
) -> torch.Tensor:
    """`F.embedding(ids, weight, padding_idx)` (times `scale`, as Gemma's scaled embedding
    computes it), whose weight gradient (`scale` times the output's gradient, in the
    weight's dtype as autograd's product rounds it) is added into the head's gradient
    buffer left in `tied` (the padding row gets none, as F.embedding's)."""
    return _TiedEmbedding.apply(ids, weight, padding_idx, tied, scale)


def _transformed_logits(
    hidden: torch.Tensor, weight: torch.Tensor, transform: LogitTransform
) -> torch.Tensor:
    """(c, V) fp32 logits of one chunk, transformed in place: a buffer of its own."""
    logits = (hidden @ weight.t()).float()  # the model's dtype, then fp32 as the loss sees it
    return transform.apply_(logits)


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits -> exp(logits - rowmax) in place; returns (rowmax, row sums), both (c, 1)."""
    rowmax = logits.amax(dim=1, keepdim=True)
    logits.sub_(rowmax).exp_()
    return rowmax, logits.sum(dim=1, keepdim=True)


def _logit_gradient_(
    logits: torch.Tensor,  # (c, V) fp32, transformed: overwritten
    labels: torch.Tensor,  # (c,)
    transform: LogitTransform,
    grad_total: torch.Tensor,
) -> torch.Tensor:
    """transformed logits t -> d(loss)/d(logits before the transform), in place:
    (softmax(t) - onehot(label)) x the incoming gradient x dt/dz.

    A softcap's slope dt/dz = 1 - (t / softcap)^2 needs t, which the softmax overwrites:
    it is formed first, SLOPE_BLOCKS row blocks of the chunk at a time (the softmax is a
    row's own business), so that its temporary is a 1/SLOPE_BLOCKS part of the chunk
    rather than a second fp32 chunk."""
    rows = logits.shape[0]
    step = rows if transform.softcap is None else -(-rows // SLOPE_BLOCKS)
    for start in range(0, rows, step):
        block, y = logits[start : start + step], labels[start : start + step]
        slope = transform.derivative(block)  # (r, V), before the softmax overwrites t
        _, sums = _exp_shifted_(block)
        block.div_(sums)  # softmax(t)
        block[torch.arange(y.shape[0], device=y.device), y] -= 1.0
        block.mul_(grad_total)
        if slope is not None:
            block.mul_(slope)
        elif transform.multiplier != 1.0:
            block.mul_(transform.multiplier)
        del slope
    return logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, transform, tied):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = _transformed_logits(hidden[start:end], weight, transform)
            picked = logits.gather(1, labels[start:end, None])  # (c, 1)
            rowmax, sums = _exp_shifted_(logits)
            # CE = logsumexp(z) - z[label] = log(sum exp(z - max)) + max - z[label]
            total += (sums.log_() + rowmax - picked).sum()
            del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_tokens, ctx.transform, ctx.tied = chunk_tokens, transform, tied
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        hidden, weight, labels = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        transform: LogitTransform = ctx.transform
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            h, y = hidden[start:end], labels[start:end]
            logits = _transformed_logits(h, weight, transform)
            grad_logits = _logit_gradient_(logits, y, transform, grad_total)
            # the matmuls run in the model's dtype (a copy unless fp32: free the fp32 one)
            grad_logits = grad_logits.to(weight.dtype)
            del logits
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            del grad_logits
        if ctx.tied is not None and grad_weight is not None:
            ctx.tied.buffer, grad_weight = grad_weight, None  # the embedding returns it
        return grad_hidden, grad_weight, None, None, None, None


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, tied, scale):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tied, ctx.scale = padding_idx, tied, scale
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        out = torch.nn.functional.embedding(ids, weight, padding_idx)
        return out if scale is None else out * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad_weight = ctx.tied.take()
        if grad_weight is None:  # the loss's backward did not run (or made none)
            grad_weight = grad_out.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        if ctx.scale is not None:
            grad_out = grad_out * ctx.scale  # what autograd's product rule gives the lookup
        if ctx.padding_idx is not None:
            # F.embedding gives the padding row no gradient: keep the head's for it exactly
            # (a copy of one row, rather than a data-dependent selection of the tokens)
            head_row = grad_weight[ctx.padding_idx].clone()
        _add_rows_(grad_weight, ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]))
        if ctx.padding_idx is not None:
            grad_weight[ctx.padding_idx] = head_row
        return None, grad_weight, None, None, None


def _add_rows_(
    grad_weight: torch.Tensor,  # (V, H): the head's gradient, the embedding's added in place
    ids: torch.Tensor,  # (N,) token ids, repeated as often as the text repeats them
    rows: torch.Tensor,  # (N, H): each token's gradient row
) -> None:
    """grad_weight[i] += sum of the rows of the tokens whose id is i.

    Below fp32, `index_add_` would round the head's row once per token added (on CUDA in
    atomics' order: not even deterministic): a frequent token's row, added thousands of
    times, drifts far from its sum. As F.embedding's CUDA backward does, each id's rows
    are summed in fp32 (sorted by id: a segment per id, fixed shapes, no host read), and
    the head's row plus that sum is rounded once. Temporaries: three (N, H) fp32 buffers,
    the size of a layer's activations, never a vocab-sized one."""
    if grad_weight.dtype == torch.float32:
        grad_weight.index_add_(0, ids, rows)
        return
    sorted_ids, order = ids.sort(stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = starts.cumsum(0).sub_(1)  # (N,): the rank of each token's id among the ids
    sums = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    sums.index_add_(0, segment, rows.index_select(0, order).float())
    # Every token of an id computes the same new row: duplicate writes agree.
    new = grad_weight.index_select(0, sorted_ids).float().add_(sums.index_select(0, segment))
    grad_weight.index_copy_(0, sorted_ids, new.to(grad_weight.dtype))

"""A causal LM's loss, computed in chunks: only the label positions are projected to the
vocabulary, a chunk at a time, with the family's logit transform (softcapping, scaling);
a family whose head the chunked path cannot reproduce uses the model's own forward.
The fused projection + cross-entropy itself is `linear_cross_entropy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lomotune.linear_cross_entropy import (
    PLAIN,
    LogitTransform,
    TiedGradient,
    linear_cross_entropy,
    tied_embedding,
)


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body that returns hidden states, output projection) of a causal LM,
    looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


# What each family's forward does to the output projection before its loss (read from
# transformers' modeling files). The chunked loss reproduces it; a family not listed
# here falls back to the model's own forward(labels=...), never a silently wrong loss.
PLAIN_HEAD_FAMILIES = {
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "phi3",
    "opt", "gpt_neox", "olmo", "olmo2", "smollm3", "starcoder2", "gemma",
}  # fmt: skip


LOGIT_TRANSFORMS: dict[str, Callable[[object], LogitTransform]] = {
    "gemma2": lambda c: LogitTransform(softcap=c.final_logit_softcapping),
    "gemma3_text": lambda c: LogitTransform(softcap=c.final_logit_softcapping),
    "granite": lambda c: LogitTransform(multiplier=1.0 / c.logits_scaling),
    "granitemoe": lambda c: LogitTransform(multiplier=1.0 / c.logits_scaling),
    "cohere": lambda c: LogitTransform(multiplier=c.logit_scale),
    "cohere2": lambda c: LogitTransform(multiplier=c.logit_scale),
    "falcon_h1": lambda c: LogitTransform(multiplier=c.lm_head_multiplier),
}


@dataclass(frozen=True)
class LossPath:
    """How lomotune computes a model's loss: chunked (with the family's logit transform,
    if any), or the model's own forward when the chunked path cannot reproduce it."""

    chunked: bool
    transform: LogitTransform = PLAIN
    reason: str = ""  # why the model's own loss is used


def loss_path(model: torch.nn.Module) -> LossPath:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    family = getattr(config, "model_type", None)
    if getattr(config, "output_router_logits", False):
        return LossPath(False, reason=f"{family} adds its router's load-balancing loss")
    if family in LOGIT_TRANSFORMS:
        return LossPath(True, LOGIT_TRANSFORMS[family](config))
    if family in PLAIN_HEAD_FAMILIES:
        return LossPath(True)
    return LossPath(False, reason=f"the chunked loss does not know the {family!r} head")


def loss_note(model: torch.nn.Module) -> str | None:
    """One line for the start of a run when the model's own (unchunked) loss is used."""
    path = loss_path(model)
    if path.chunked:
        return None
    return (
        f"loss: {path.reason}, so its own forward(labels=...) computes the loss; the full "
        "logits tensor is kept (more memory than the chunked loss)"
    )


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the label tokens, and their count.

    Only positions with a label are projected to the vocabulary, `chunk_tokens` at a
    time: the (tokens x vocab) fp32 logits never exist whole, and are recomputed chunk by
    chunk in backward. The projection is the model's own output module followed by the
    family's logit transform (softcapping, scaling). A plain `nn.Linear` head goes
    through `linear_cross_entropy` (one weight-gradient buffer for all chunks); any other
    (a LoRA adapter on it, a bias, a quantized or sharded module) is called as a module,
    each chunk under activation checkpointing. A trained weight that is both a plain
    `nn.Embedding` (or Gemma's scaled one) and that head is looked up by
    `tied_embedding`, whose backward adds into the head's gradient: no second
    vocab-sized gradient at the end of backward.
    """
    path = loss_path(model)
    if not path.chunked:
        return _own_loss(model, batch)
    body, head = split_head(model)
    fused = type(head) is torch.nn.Linear and head.bias is None
    tied = TiedGradient() if fused and _tied_lookup(body, head) else None
    with _embedding_into(tied, body.get_input_embeddings()):
        hidden = body(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    # The label positions as indices, found once here (the step's one data-dependent
    # shape: a sync on a GPU). A boolean-mask gather `hidden[keep]` would find them again
    # in backward (its gradient is a masked scatter): a second sync, inside backward.
    index = (labels != -100).reshape(-1).nonzero().squeeze(1)  # (N,)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
    y = labels.reshape(-1).index_select(0, index)  # (N,)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    if fused:
        return linear_cross_entropy(h, head.weight, y, chunk_tokens, path.transform, tied), n

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        logits = path.transform(head(h_chunk).float())  # (n, vocab)
        return F.cross_entropy(logits, y_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        total = total + checkpoint(chunk_loss, h[start:end], y[start:end], use_reentrant=False)
    return total, n


def _tied_lookup(body: torch.nn.Module, head: torch.nn.Module) -> bool:
    """The body's input embedding is the head's trained weight, in a lookup that
    `tied_embedding` reproduces: a plain `nn.Embedding` or Gemma's scaled one, with no
    max_norm, no frequency scaling, no sparse gradient."""
    embed = body.get_input_embeddings()
    return (
        (type(embed) is torch.nn.Embedding or type(embed) in _scaled_embedding_types())
        and embed.weight is head.weight
        and embed.weight.requires_grad
        and embed.max_norm is None
        and not embed.scale_grad_by_freq
        and not embed.sparse
    )


def _scaled_embedding_types() -> tuple[type, ...]:
    """Gemma's embeddings (transformers' modeling_gemma*.py): `F.embedding(ids, weight,
    padding_idx) * embed_scale.to(weight.dtype)` and nothing else; `_embedding_into`
    passes that scale to `tied_embedding`."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    return (
        GemmaTextScaledWordEmbedding,
        Gemma2TextScaledWordEmbedding,
        Gemma3TextScaledWordEmbedding,
    )


@contextlib.contextmanager
def _embedding_into(tied: TiedGradient | None, embed: torch.nn.Module):
    """While the body runs, the embedding's output is replaced by `tied_embedding`'s (the
    same values; the module's own lookup and its graph are dropped at once), so that its
    backward adds into the head's gradient. The body is called as usual, with input ids,
    and other hooks on the embedding (transformers' input-grad hook) still see the output."""
    if tied is None:
        yield
        return

    scaled = type(embed) is not torch.nn.Embedding  # Gemma's: `_tied_lookup` lets no other by

    def lookup(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # the scale cast to the weight's dtype, as Gemma's own forward casts it
        scale = module.embed_scale.to(module.weight.dtype) if scaled else None
        return tied_embedding(args[0], module.weight, module.padding_idx, tied, scale)

    handle = embed.register_forward_hook(lookup, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _own_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The model's forward(labels=...) mean loss, as (sum, count) like the chunked path."""
    n = int((batch["labels"][:, 1:] != -100).sum())
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        use_cache=False,
    )
    if n == 0:
        return out.logits.sum() * 0.0, 0
    return out.loss.float() * n, n

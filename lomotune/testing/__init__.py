"""Tiny, randomly initialised models and a character tokenizer, built in memory.

Used by the tests and by `model.name: tiny-llama` so that the whole path can be run
in seconds with no download. Nothing here is meant to learn anything useful.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every printable ASCII character is one token."""
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<pad>",
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(vocab_size: int = 128, tie: bool = True, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llama(
    seed: int = 0, tie: bool = True, layers: int = 2, dtype=torch.float32
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        tiny_llama_config(len(SPECIAL_TOKENS) + len(string.printable), tie, layers)
    )
    return model.to(dtype)


def random_batches(
    n: int, vocab: int = 105, batch: int = 3, length: int = 12, seed: int = 1
) -> list[dict]:
    """`n` batches of random token ids shaped like the loader's: the first 4 positions of
    each row are a prompt (label -100) and the first row ends in 3 padding positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # a prompt
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding in the first row
        labels[0, -3:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out

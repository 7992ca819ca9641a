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


# Every family the loss is checked on: the smallest config of each that still exercises
# what makes the family different (GQA, softcapping, logit scaling, biases, MoE routing).
_COMMON = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2}
_DECODER = {
    **_COMMON,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    # family: (transformers config class, its arguments)
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", {**_DECODER, "sliding_window": None}),
    "qwen2": ("Qwen2Config", _DECODER),
    "qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**_DECODER, "head_dim": 8, "final_logit_softcapping": 0.5}),
    "gemma3_text": (
        "Gemma3TextConfig",
        {**_DECODER, "head_dim": 8, "final_logit_softcapping": 0.7, "sliding_window": 16},
    ),
    "granite": ("GraniteConfig", {**_DECODER, "logits_scaling": 4.0}),
    "cohere": (
        "CohereConfig",
        {**_DECODER, "logit_scale": 0.25, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    ),
    "phi3": (
        "Phi3Config",
        {**_DECODER, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    ),
    "opt": (
        "OPTConfig",
        {
            **_COMMON,
            "ffn_dim": 64,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 32,
            "dropout": 0.0,
        },
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {**_COMMON, "intermediate_size": 64, "num_attention_heads": 4, "rotary_pct": 0.5},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            **_DECODER,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "decoder_sparse_step": 1,
        },
    ),
}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    """A randomly initialised causal LM of `family` (a key of TINY_FAMILIES)."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, kwargs = TINY_FAMILIES[family]
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)

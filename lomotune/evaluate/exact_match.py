"""Exact-match accuracy by greedy generation: does the model write the answer?"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    samples: list[tuple[str, str, str]]  # (prompt, expected, generated), a few for show


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],  # (prompt, expected answer)
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    keep_samples: int = 3,
) -> ExactMatch:
    """Greedy-decode each prompt; correct when the generated text, stripped, equals the
    expected answer, stripped. Prompts are left-padded so that a batch decodes together.
    This process decodes alone: a model sharded over several processes must be gathered
    whole first (`distributed.sharding.whole_model`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, samples = 0, []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                # transformers would keep the ranks of an FSDP model in step (an
                # all-reduce per token); gathered whole, each rank decodes its own prompts.
                synced_gpus=False,
            )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for (prompt, expected), text in zip(chunk, texts, strict=True):
                ok = text.strip() == expected.strip()
                correct += ok
                if len(samples) < keep_samples:
                    samples.append((prompt, expected, text))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    total = len(pairs)
    return ExactMatch(
        accuracy=correct / total if total else 0.0, correct=correct, total=total, samples=samples
    )

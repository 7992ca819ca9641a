"""`--protocol lomo` against hand-written prompts and a re-statement of the LOMO
repository's eval_step: per choice, cross-entropy over the label tokens (the last
source token, the answer, EOS), smallest loss wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lomotune.evaluate import lomo_protocol
from lomotune.evaluate.reading import read_split
from lomotune.evaluate.superglue import TASKS
from lomotune.testing import tiny_llama, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "superglue" / "official"


def docs(name):
    return read_split(TASKS[name], "val", FIXTURES)[0]


def test_prompts_are_the_lomo_repository_prompts():
    p = lomo_protocol.PROMPTS
    assert lomo_protocol.source(p["rte"], docs("rte")[1]) == (
        'No rain fell in May.\nDoes this mean that "It rained in May." is true? Yes or No?\n'
        "Answer: "
    )
    assert lomo_protocol.source(p["copa"], docs("copa")[1]) == "I tipped the bottle. so "
    assert p["copa"].choices(docs("copa")[1])[1] == "The liquid in the bottle poured out."
    assert lomo_protocol.source(p["multirc"], docs("multirc")[0]) == (
        "Anna bought two apples. She gave one to Ben.\n"
        "Question: How many apples did Anna buy?\n"
        'I found this answer "Two". Is that correct? Yes or No?\nAnswer: '
    )
    record = docs("record")[0]
    assert lomo_protocol.source(p["record"], record) == (
        "Paris hosted the Games. London watched.\n- Paris won the bid\n- London lost\n"
        '@placeholder celebrated the result\nQuestion: What is the "@placeholder"?\nAnswer: '
    )
    assert p["record"].choices(record) == ["London", "Paris"] and p["record"].gold(record) == 1


def reference_label_loss(model, tokenizer, source: str, target: str) -> tuple[float, int]:
    """The repository's _tokenize_fn and eval_step for one sequence: summed
    cross-entropy over the labels, and how many labels."""
    input_ids = tokenizer.encode(source + target) + [tokenizer.eos_token_id]
    labels = list(input_ids)
    for i in range(len(tokenizer.encode(source)) - 1):
        labels[i] = -100
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), reduction="sum")
    return float(loss), sum(1 for y in labels[1:] if y != -100)


@pytest.mark.parametrize("name", ["copa", "multirc", "record", "wsc"])
def test_scores_equal_the_repository_computation(name):
    model, tok = tiny_llama(seed=5).eval(), tiny_tokenizer()
    task, prompt = TASKS[name], lomo_protocol.PROMPTS[name]
    read = docs(name)
    result = lomo_protocol.evaluate_lomo(model, tok, task, read, source_name="x", batch_size=3)
    correct = correct_per_token = 0
    for doc, pred in zip(read, result.scores.predictions, strict=True):
        losses = [
            reference_label_loss(model, tok, lomo_protocol.source(prompt, doc), choice)
            for choice in prompt.choices(doc)
        ]
        assert pred["loglikelihoods"] == pytest.approx([-s for s, _ in losses], abs=1e-4)
        sums = [s for s, _ in losses]
        correct += sums.index(min(sums)) == prompt.gold(doc)
        per_token = [s / n for s, n in losses]
        correct_per_token += per_token.index(min(per_token)) == prompt.gold(doc)
    assert result.scores.metrics["acc"] == correct / len(read)
    assert result.scores.metrics["acc_per_token"] == correct_per_token / len(read)


def test_sample_keeps_small_splits_and_draws_1000():
    small = [{"idx": i} for i in range(999)]
    assert lomo_protocol.sample(small) == small
    big = [{"idx": i} for i in range(1500)]
    drawn = lomo_protocol.sample(big)
    assert len(drawn) == 1000 and len({d["idx"] for d in drawn}) == 1000
    assert drawn == lomo_protocol.sample(big)

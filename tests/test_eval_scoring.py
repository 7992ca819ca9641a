"""Log-likelihood scoring against a plain loop: one (context, continuation) at a time,
the whole sequence through the model, summing the continuation tokens' log-probs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lomotune.evaluate.reading import read_split
from lomotune.evaluate.run import evaluate_task, pairs_of
from lomotune.evaluate.scoring import encode_pair, loglikelihoods
from lomotune.evaluate.superglue import TASKS
from lomotune.testing import tiny_llama, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "superglue" / "official"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3).eval()


def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # as the harness: fp32
    return sum(float(logprobs[len(context) - 1 + k, token]) for k, token in enumerate(continuation))


def random_pairs(seed: int) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1-20 tokens, each with 1-4 continuations of 1-6 tokens (one-token
    continuations take the cache-free path; longer ones the shared-context path)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(9):
        context = [rng.randrange(5, 100) for _ in range(rng.randrange(1, 21))]
        for _ in range(rng.randrange(1, 5)):
            pairs.append((context, [rng.randrange(5, 100) for _ in range(rng.randrange(1, 7))]))
    return pairs


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batched_shared_context_scores_equal_the_plain_loop(model, batch_size):
    pairs = random_pairs(seed=batch_size)
    assert any(len(c) == 1 for _, c in pairs) and any(len(c) > 3 for _, c in pairs)
    expected = [reference_loglikelihood(model, c, t) for c, t in pairs]
    done = []
    got = loglikelihoods(model, pairs, batch_size=batch_size, pad_id=0, on_progress=done.append)
    assert got == pytest.approx(expected, abs=1e-5)
    assert sum(done) == len(pairs)


def test_scores_do_not_depend_on_the_batch():
    model = tiny_llama(seed=4).eval()
    pairs = random_pairs(seed=11)
    alone = loglikelihoods(model, pairs, batch_size=1, pad_id=0)
    batched = loglikelihoods(model, pairs, batch_size=8, pad_id=0)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert loglikelihoods(model, pairs, batch_size=8, pad_id=0) == batched  # deterministic


def test_trailing_context_whitespace_moves_to_the_continuation():
    tok = tiny_tokenizer()  # one token per character
    context, continuation = encode_pair(tok, "ab \n", "c", max_length=100)
    assert tok.decode(context) == "ab"
    assert tok.decode(continuation) == " \nc"
    # Too long: the context loses its start, the model sees at most max_length tokens.
    context, continuation = encode_pair(tok, "abcdef", " xy", max_length=6)
    assert tok.decode(context) == "cdef"  # 4 + the 2 continuation tokens fed = 6


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_scores_as_the_plain_loop(model, name):
    """The whole path on the fixtures: prompts -> tokens -> scores -> metrics."""
    task, tok = TASKS[name], tiny_tokenizer()
    docs, source = read_split(task, "val", FIXTURES)
    result = evaluate_task(model, tok, task, docs, source=source, batch_size=2)
    expected = [
        reference_loglikelihood(model, *encode_pair(tok, c, t, 512))
        for c, t in pairs_of(task, docs, [""] * len(docs))
    ]
    got = [ll for p in result.scores.predictions for ll in p["loglikelihoods"]]
    assert got == pytest.approx(expected, abs=1e-5)
    assert result.n == len(docs)


def test_a_batch_copies_to_the_device_and_reads_back_a_fixed_number_of_times(model):
    """Host<->device traffic of one batch does not grow with its rows: a tensor made from
    host data (a copy to a GPU), a boolean-mask gather or nonzero (a data-dependent size),
    a scalar read (a sync) are counted by a dispatch mode on a batch of 2 and of 8 contexts
    (each with a 1-token and a 4-token continuation); the scores still equal the loop's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    host_ops = {
        "aten.lift_fresh.default",
        "aten.nonzero.default",
        "aten._local_scalar_dense.default",
    }

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            boolean_index = str(func) == "aten.index.Tensor" and any(
                i is not None and i.dtype == torch.bool for i in args[1]
            )
            self.n += str(func) in host_ops or boolean_index
            return func(*args, **(kwargs or {}))

    def count(rows: int) -> int:
        rng = random.Random(rows)
        pairs = []
        for k in range(rows):  # lengths differ: padding in every batch
            context = [rng.randrange(5, 100) for _ in range(2 + k)]
            pairs += [(context, [7]), (context, [rng.randrange(5, 100) for _ in range(4)])]
        with Count() as counted:
            got = loglikelihoods(model, pairs, batch_size=rows, pad_id=0)
        expected = [reference_loglikelihood(model, c, x) for c, x in pairs]
        assert got == pytest.approx(expected, abs=1e-4)
        return counted.n

    assert count(8) == count(2)

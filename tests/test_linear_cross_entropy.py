"""The chunked linear cross-entropy (one weight-gradient buffer for all chunks) against
F.cross_entropy on the full logits, with each family's logit transform written out here
independently; through whole models against their own forward(labels=...) loss; and
its memory, counted on fake tensors, against one weight gradient + one chunk's logits."""

import pytest
import torch
import torch.nn.functional as F

from lomotune.linear_cross_entropy import LogitTransform, linear_cross_entropy
from lomotune.models import causal_lm_loss
from lomotune.testing import random_batches, tiny_model

MiB = 2**20

# (our transform, the same function written independently as the families write it)
TRANSFORMS = {
    "plain": (LogitTransform(), lambda z: z),
    "softcap (gemma2)": (LogitTransform(softcap=0.5), lambda z: torch.tanh(z / 0.5) * 0.5),
    "divided (granite)": (LogitTransform(multiplier=1 / 4.0), lambda z: z / 4.0),
    "scaled (cohere)": (LogitTransform(multiplier=3.0), lambda z: z * 3.0),
    "scaled and softcapped": (
        LogitTransform(multiplier=2.0, softcap=0.7),
        lambda z: torch.tanh(z * 2.0 / 0.7) * 0.7,
    ),
}


def leaves(n=37, hidden=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, y


def assert_close_to_the_largest(got, expected, largest=None, tolerance=1e-6, name=""):
    """Equal to `tolerance` of the largest magnitude (of `expected`, or `largest` when
    given): fp32 sums in another order (chunk by chunk) differ by a few ulps of the
    largest gradient, a wrong derivative by far more."""
    largest = float(expected.abs().max()) if largest is None else largest
    torch.testing.assert_close(
        got.double(), expected.double(), atol=tolerance * largest, rtol=0, msg=name or None
    )


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_loss_and_gradients_equal_cross_entropy_on_full_logits(name):
    ours, reference = TRANSFORMS[name]
    h, w, y = leaves()
    loss = linear_cross_entropy(h, w, y, chunk_tokens=8, transform=ours)  # 5 chunks, last short
    (loss * 2.5).backward()  # an incoming gradient other than 1 (a loss scale, a mean)
    # the reference in fp64: both fp32 computations are within a few 1e-7 of it
    h_ref = h.detach().double().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    ref = F.cross_entropy(reference(h_ref @ w_ref.t()), y, reduction="sum")
    (ref * 2.5).backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_close_to_the_largest(h.grad, h_ref.grad)
    assert_close_to_the_largest(w.grad, w_ref.grad)


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_theirs():
    h, w, y = leaves()
    w.requires_grad_(False)
    linear_cross_entropy(h, w, y, chunk_tokens=16).backward()
    h_ref = h.detach().clone().requires_grad_()
    F.cross_entropy(h_ref @ w.t(), y, reduction="sum").backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)


def own_loss_sum(model, batch):
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    )  # fmt: skip
    return out.loss * int((batch["labels"][:, 1:] != -100).sum())


# untied plain, tied + softcap, untied divided, tied + scaled, tied with a padding row
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "cohere", "opt"])
def test_every_gradient_of_a_model_equals_its_own_loss(family):
    model = tiny_model(family)
    ref = tiny_model(family)
    batch = random_batches(1, vocab=96, batch=3, length=12)[0]
    total, _ = causal_lm_loss(model, batch, chunk_tokens=7)
    assert type(total.grad_fn).__name__ == "_LinearCrossEntropyBackward"  # the fused path
    total.backward()
    expected = own_loss_sum(ref, batch)
    expected.backward()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    largest = max(float(q.grad.abs().max()) for q in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close_to_the_largest(p.grad, q.grad, largest, name=name)


def test_a_head_that_is_not_a_plain_linear_keeps_the_checkpointed_path():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    batch = random_batches(1, vocab=96, batch=3, length=12)[0]
    total, _ = causal_lm_loss(model, batch, chunk_tokens=7)
    assert type(total.grad_fn).__name__ != "_LinearCrossEntropyBackward"
    assert total.item() == pytest.approx(own_loss_sum(model, batch).item(), rel=1e-6)


def test_loss_backward_holds_one_head_gradient_and_one_chunks_logits():
    """Counted on fake tensors at a shape where the head dominates: vocab 32000 x hidden
    512 (fp32, 62.5 MiB), 4096 label tokens in chunks of 1024 (125 MiB of fp32 logits).
    Everything the loss backward allocates beyond the weights is at most one head
    gradient + one chunk's logits + the hidden states at the label positions (8 MiB,
    counted whole when backward slices them) + 1 MiB. Measured here: 195.6 MiB. The
    checkpointed path (autograd summing per-chunk gradients; forced by making the head
    any other module) measured 437.5 MiB in this test; with the hidden states' gradient
    and chunks of 128 tokens it holds three head-sized gradients at once (187.5 MiB)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig

    from lomotune.estimate.simulate import _NoValues, build_fake_model, step_tracker

    vocab, hidden, tokens, chunk = 32000, 512, 4096, 1024
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=8, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    with FakeTensorMode(), _NoValues():
        model = build_fake_model(config, torch.float32)
        for p in model.parameters():  # the head's gradient alone: the body adds nothing
            p.requires_grad_(p is model.lm_head.weight)
        ids = torch.randint(0, vocab, (4, tokens // 4 + 1))
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        total, n = causal_lm_loss(model, batch, chunk_tokens=chunk)
        assert n == tokens
        tracker = step_tracker()
        tracker.track_external(model)
        with tracker:
            total.backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    weights = sum(p.numel() for p in model.parameters()) * 4
    head_gradient, logits, head_input = vocab * hidden * 4, chunk * vocab * 4, tokens * hidden * 4
    beyond_weights = peak - weights
    assert beyond_weights <= head_gradient + logits + head_input + MiB, beyond_weights / MiB

"""The chunked linear cross-entropy (one weight-gradient buffer for all chunks) against
F.cross_entropy on the full logits, with each family's logit transform written out here
independently; through whole models against their own forward(labels=...) loss; and
its memory, counted on fake tensors, against one weight gradient + one chunk's logits."""

import pytest
import torch
import torch.nn.functional as F

from lomotune.linear_cross_entropy import (
    LogitTransform,
    TiedGradient,
    linear_cross_entropy,
    tied_embedding,
)
from lomotune.loss import causal_lm_loss
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


def assert_every_gradient_equals_the_models_own(total, model, ref, batch):
    """`total` (our summed loss of `model`) and its gradients = `ref`'s own forward."""
    total.backward()
    expected = own_loss_sum(ref, batch)
    expected.backward()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    largest = max(float(q.grad.abs().max()) for q in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close_to_the_largest(p.grad, q.grad, largest, name=name)


# untied plain, tied + softcap, untied divided, tied + scaled, tied with a padding row
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "cohere", "opt"])
def test_every_gradient_of_a_model_equals_its_own_loss(family):
    model = tiny_model(family)
    ref = tiny_model(family)
    batch = random_batches(1, vocab=96, batch=3, length=12)[0]
    total, _ = causal_lm_loss(model, batch, chunk_tokens=7)
    assert type(total.grad_fn).__name__ == "_LinearCrossEntropyBackward"  # the fused path
    assert_every_gradient_equals_the_models_own(total, model, ref, batch)


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
    vocab, hidden, tokens, chunk = 32000, 512, 4096, 1024
    # the head's gradient alone: the body (one layer) is frozen and adds nothing
    beyond_weights = loss_backward_beyond_weights(llama_32000x512(tied=False, layers=1), chunk)
    head_gradient, logits, head_input = vocab * hidden * 4, chunk * vocab * 4, tokens * hidden * 4
    assert beyond_weights <= head_gradient + logits + head_input + MiB, beyond_weights / MiB


def llama_32000x512(tied: bool, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=8, tie_word_embeddings=tied, use_cache=False,
    )  # fmt: skip


def loss_backward_beyond_weights(
    config,
    chunk: int,
    trained: tuple[str, ...] = ("lm_head.weight",),
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, int] = (4, 1025),
) -> int:
    """Peak bytes that `causal_lm_loss`'s backward allocates beyond the weights, counted
    on fake tensors: `config`'s model in `dtype`, `tokens` (batch, length) with a label on
    every one, only the parameters named in `trained` trained (a tied head's weight is
    the embedding's too). Default: 4096 label tokens; the head's weight alone trained."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lomotune.estimate.simulate import _NoValues, build_fake_model, step_tracker

    with FakeTensorMode(), _NoValues():
        model = build_fake_model(config, dtype)
        named = dict(model.named_parameters(remove_duplicate=False))
        wanted = {id(named[name]) for name in trained}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        ids = torch.randint(0, config.vocab_size, tokens)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        total, n = causal_lm_loss(model, batch, chunk_tokens=chunk)
        assert n == tokens[0] * (tokens[1] - 1)
        tracker = step_tracker()
        tracker.track_external(model)
        with tracker:
            total.backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    return peak - sum(p.numel() for p in model.parameters()) * p.element_size()


def graph_nodes(tensor: torch.Tensor, weight: torch.Tensor | None = None) -> set[str]:
    """Names of the backward nodes of `tensor`'s graph (only those that feed `weight`'s
    gradient directly, when given)."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        feeds = [getattr(n, "variable", None) is weight for n, _ in node.next_functions]
        if weight is None or any(feeds):
            names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def batch_with_padding_tokens(pad_id: int) -> dict:
    """Padded positions carry the padding token: F.embedding gives its row no gradient."""
    batch = random_batches(1, vocab=96, batch=3, length=12)[0]
    batch["input_ids"][batch["attention_mask"] == 0] = pad_id
    return batch


# plain nn.Embedding (Llama, OPT, Cohere) and Gemma's scaled one (times sqrt(hidden))
@pytest.mark.parametrize("family", ["tied-llama", "opt", "cohere", "gemma2", "gemma3_text"])
def test_a_tied_embedding_adds_into_the_heads_gradient_and_every_gradient_is_right(family):
    from lomotune.testing import tiny_llama

    build = (lambda: tiny_llama(tie=True)) if family == "tied-llama" else lambda: tiny_model(family)
    model, ref = build(), build()
    embed = model.get_input_embeddings()
    assert embed.weight is model.get_output_embeddings().weight and embed.padding_idx is not None
    batch = batch_with_padding_tokens(embed.padding_idx)
    total, _ = causal_lm_loss(model, batch, chunk_tokens=7)
    # the weight's gradient comes from these two, the second adding into the first's
    users = graph_nodes(total, embed.weight)
    assert users == {"_LinearCrossEntropyBackward", "_TiedEmbeddingBackward"}
    assert_every_gradient_equals_the_models_own(total, model, ref, batch)


def test_a_tied_weight_has_one_vocab_sized_gradient_through_backward():
    """A tied vocab 32000 x hidden 512 fp32 weight (62.5 MiB) and no layers, 4096 label
    tokens in chunks of 128: the loss backward and the embedding's backward are all there
    is. Beyond the weights, the peak is one weight gradient + one chunk's logits (15.6 MiB)
    + three (tokens x hidden) tensors (the head's input, its gradient, the embedding's
    output gradient: 8 MiB each) + 1 MiB. Measured here: 102.5 MiB. Before the embedding
    added into the head's gradient (autograd holding the head's gradient while the
    embedding's backward made its own and summed them): 203.8 MiB, three weight-sized
    tensors at the end of backward (also three on real CPU tensors)."""
    vocab, hidden, tokens, chunk = 32000, 512, 4096, 128
    beyond_weights = loss_backward_beyond_weights(llama_32000x512(tied=True, layers=0), chunk)
    head_gradient, logits, token_states = vocab * hidden * 4, chunk * vocab * 4, tokens * hidden * 4
    assert beyond_weights <= head_gradient + logits + 3 * token_states + MiB, beyond_weights / MiB


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_softcapped_heads_loss_backward_is_what_the_estimator_counts(precision):
    """Gemma 2's softcapped head, vocab 8192 x hidden 64, 1024 label tokens in chunks of
    256, the head and the final norm trained: the loss backward holds what the estimator's
    loss phase counts (one chunk of logits with tanh's slope, `loss_chunk_bytes`; the loss
    input's gradient; the head's gradient) within 1% (the rest: per-row sums and indices).
    Measured here: fp32 11.01 MiB (counted 11.00), bf16 13.26 (13.25). Before the slope
    was formed in row blocks it was a second fp32 chunk beside the logits: 18.51 and
    21.26 MiB."""
    from transformers import Gemma2Config

    from lomotune.estimate import Setup, estimate
    from lomotune.estimate.analytic import BYTES, Shape

    config = Gemma2Config(
        vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        final_logit_softcapping=30.0, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    simulated = loss_backward_beyond_weights(
        config, 256, ("lm_head.weight", "model.norm.weight"), dtype, tokens=(1, 1025)
    )
    # the loss terms do not depend on the layers (which the formulas do not know for Gemma)
    shape = Shape(
        family="llama", vocab=8192, hidden=64, intermediate=128, layers=1, heads=4,
        kv_heads=2, tied=False, max_positions=2048, softcapped=True,
    )  # fmt: skip
    est = estimate(shape, Setup("lomo", 1, 1025, precision, loss_chunk_tokens=256))
    assert est.phase == "loss backward"
    # the loss input (kept by the forward) is counted too when backward slices it
    head_gradient, head_input = 8192 * 64 * BYTES[precision], 1024 * 64 * BYTES[precision]
    counted = est.parts["logits_loss"] + head_gradient + head_input
    assert abs(simulated / counted - 1) < 0.01, (simulated / MiB, counted / MiB)


def test_gemmas_scaled_tied_embedding_has_one_vocab_sized_gradient_through_backward():
    """The same count for Gemma 2 (its embedding multiplies the lookup by sqrt(hidden);
    softcapped head): vocab 32000 x hidden 512 fp32, no layers, 4096 label tokens in
    chunks of 128. Beyond the weights: one weight gradient + one chunk's logits with
    tanh's slope for 1/16 of it + four (tokens x hidden) tensors (the head's input, its
    gradient, the embedding's output gradient and its scaled copy) + 1 MiB. Measured
    here: 102.5 MiB; with Gemma's embedding left to autograd (its own dense gradient,
    then summed with the head's): 187.5 MiB, three weight-sized tensors."""
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=0,
        num_attention_heads=8, num_key_value_heads=8, head_dim=64,
        final_logit_softcapping=30.0, tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    beyond_weights = loss_backward_beyond_weights(config, 128)
    vocab, hidden, tokens, chunk = 32000, 512, 4096, 128
    head_gradient, logits, token_states = vocab * hidden * 4, chunk * vocab * 4, tokens * hidden * 4
    assert beyond_weights <= head_gradient + logits * 17 // 16 + 4 * token_states + MiB, (
        beyond_weights / MiB
    )


BF16_ROUNDING = 2.0**-8  # bf16 keeps 8 significant bits: a rounding moves a value <= 2^-8 of it


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-scaled"])
def test_bf16_loss_and_gradients_equal_cross_entropy_on_bf16_logits(tied):
    """bf16 weights and hidden states, 96 label tokens in 4 chunks of 24, against
    F.cross_entropy on the full logits computed the same way (one bf16 matmul, then
    .float()); tied: the weight is also a scaled embedding (Gemma's, scale sqrt(64) in
    bf16) in front of a tanh, through `tied_embedding`.

    The tolerance, element by element, counts the bf16 roundings in which the two may
    differ, each <= 2^-8 of the value rounded, and every value rounded is a partial sum
    of terms whose absolute values sum to S, so |ours - reference| <= roundings x 2^-8
    x S. The logits: a matmul of a chunk's rows may round differently from the whole
    one's (one rounding); d(loss)/d(logits) is the same fp32 value up to a few fp32 ulps,
    so its cast to bf16 may differ by one rounding. The hidden states' gradient: that
    term's rounding, and the product's rounding on either side (3). The weight's
    gradient: the term's rounding, the head's gradient added chunk by chunk into a bf16
    buffer (4 roundings of a partial sum) where the reference rounds one fp32 matmul
    once (1); tied, also each token's embedding row added in bf16 on both sides (2 per
    token of the row), the reference's sum of its two gradients (1), and the embedding
    rows' own terms (the hidden gradient's 3, tanh's backward 1, the scale's 1)."""
    import math

    n, hidden, vocab, chunk, grad_total = 96, 64, 256, 24, 2.5
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(vocab, hidden, generator=g) * 0.3).bfloat16()
    h0 = torch.randn(n, hidden, generator=g).bfloat16()
    ids = torch.randint(0, vocab, (n,), generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    scale = torch.tensor(math.sqrt(hidden)).to(torch.bfloat16)

    def run(loss_fn, embed_fn):
        w = w0.clone().requires_grad_()
        x = embed_fn(w) if tied else h0.clone().requires_grad_()
        h = torch.tanh(x) if tied else x
        h.retain_grad()
        loss = loss_fn(h, w)
        (loss * grad_total).backward()
        return loss, w.grad, h.grad, h.detach()

    tied_gradient = TiedGradient()
    ours = run(
        lambda h, w: linear_cross_entropy(h, w, y, chunk, tied=tied_gradient if tied else None),
        lambda w: tied_embedding(ids, w, None, tied_gradient, scale),
    )
    reference = run(
        lambda h, w: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"),
        lambda w: F.embedding(ids, w) * scale,
    )
    (loss, grad_w, grad_h, h), (loss_ref, grad_w_ref, grad_h_ref, h_ref) = ours, reference
    assert torch.equal(h, h_ref)  # the same forward up to the loss
    # the loss: a token's cross-entropy moves by at most 2x the largest change of a logit
    # (its gradient's 1-norm is <= 2), a logit's by one rounding
    logits = (h_ref @ w0.t()).float()
    bound_loss = n * 2 * BF16_ROUNDING * float(logits.abs().max())
    assert loss.item() == pytest.approx(loss_ref.item(), abs=bound_loss)
    # the terms: |d(loss)/d(logits)|, in bf16 as both cast it
    terms = ((logits.softmax(1) - F.one_hot(y, vocab)) * grad_total).bfloat16().abs().float()
    bound_h = 3 * BF16_ROUNDING * (terms @ w0.abs().float())
    assert ((grad_h.float() - grad_h_ref.float()).abs() <= bound_h).all()
    roundings = torch.full((vocab, 1), 1 + n // chunk + 1.0)
    sums = terms.t() @ h_ref.abs().float()  # (V, H)
    if tied:
        roundings += 2 * torch.bincount(ids, minlength=vocab)[:, None] + 1 + 5
        grad_x = (grad_h_ref.float() * (1 - h_ref.float() ** 2)).abs() * float(scale)
        sums += torch.zeros(vocab, hidden).index_add_(0, ids, grad_x)
    difference = (grad_w.float() - grad_w_ref.float()).abs()
    assert (difference <= roundings * BF16_ROUNDING * sums).all()


def _index_add_as_cuda_atomics(self, dim, index, source, alpha=1):
    """Tensor.index_add_ as CUDA runs it: one atomic add per source row, each rounded to
    the tensor's dtype (the CPU's kernel sums below fp32 more carefully)."""
    assert dim == 0 and alpha == 1
    for i, row in zip(index.tolist(), source, strict=True):
        self[i] = (self[i].float() + row.float()).to(self.dtype)
    return self


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tied_embeddings_rows_are_summed_in_fp32_and_rounded_once(dtype, monkeypatch):
    """A frequent token's embedding rows, added into a bf16 head gradient: the result is
    the head's row plus the rows' sum, rounded once (as F.embedding's CUDA backward sums
    in fp32), against that sum in fp64, even where index_add_ rounds once per token as
    CUDA's atomics do."""
    monkeypatch.setattr(torch.Tensor, "index_add_", _index_add_as_cuda_atomics)
    g = torch.Generator().manual_seed(0)
    vocab, hidden = 16, 32
    ids = torch.randint(0, vocab, (4, 300), generator=g)
    ids[:, ::2] = 3  # one token half of the text
    head = (torch.randn(vocab, hidden, generator=g) * 0.1).to(dtype)
    grad_out = (torch.randn(4, 300, hidden, generator=g) * 0.01).to(dtype)
    weight = torch.zeros(vocab, hidden, dtype=dtype, requires_grad=True)
    tied = TiedGradient()
    tied.buffer = head.clone()  # as the loss's backward leaves it
    tied_embedding(ids, weight, 0, tied).backward(grad_out)
    flat = grad_out.reshape(-1, hidden).double()
    expected = head.double().index_add(0, ids.reshape(-1), flat)
    expected[0] = head[0].double()  # the padding row keeps the head's gradient alone
    assert torch.equal(weight.grad, expected.to(dtype))

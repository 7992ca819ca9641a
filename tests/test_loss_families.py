"""The chunked loss of every architecture family a user would bring equals the model's
own forward(labels=...) loss, and one LOMO step through it (activation checkpointing on,
as by default) equals torch.optim.SGD on that loss. Families whose head does more than a
linear projection (softcapping, scaling) are checked to differ from a plain projection,
so that these tests fail for a loss that drops the transform."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lomotune.loss import causal_lm_loss, loss_note, loss_path
from lomotune.optim.engine import FusedEngine
from lomotune.optim.lomo import LomoRule
from lomotune.recipe import ClipConfig
from lomotune.testing import TINY_FAMILIES, random_batches, tiny_model

VOCAB = 96
TRANSFORMED = ("gemma2", "gemma3_text", "granite", "cohere")


def batches(n=1):
    return random_batches(n, vocab=VOCAB, batch=3, length=12)


def own_loss(model, batch):
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    ).loss  # fmt: skip


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_chunked_loss_equals_the_models_own_loss(family):
    model = tiny_model(family)
    assert loss_path(model).chunked and loss_note(model) is None
    batch = batches()[0]
    total, n = causal_lm_loss(model, batch, chunk_tokens=7)  # several chunks
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert float(total) / n == pytest.approx(float(own_loss(model, batch)), abs=1e-5)


@pytest.mark.parametrize("family", TRANSFORMED)
def test_a_plain_projection_would_be_wrong_for_transformed_heads(family):
    model = tiny_model(family)
    batch = batches()[0]
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    plain = F.cross_entropy(
        F.linear(hidden[:, :-1][keep], model.get_output_embeddings().weight), labels[keep]
    )
    assert abs(float(plain) - float(own_loss(model, batch))) > 1e-3


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_one_lomo_step_equals_torch_sgd(family):
    lr = 0.5
    model = tiny_model(family).train()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = batches()[0]
    engine = FusedEngine(
        model, LomoRule(), lambda b: causal_lm_loss(model, b, 7), clip=ClipConfig()
    )
    result = engine.step([batch], lr)
    engine.close()
    sgd = torch.optim.SGD(ref.parameters(), lr=lr)
    loss = own_loss(ref, batch)
    loss.backward()
    sgd.step()
    assert result.skipped is None and result.loss == pytest.approx(float(loss), abs=1e-5)
    moved = 0.0
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=2e-6, rtol=0), name
        assert p.grad is None, name  # freed inside backward
    with torch.no_grad():
        moved = max(
            float((p - q).abs().max())
            for p, q in zip(tiny_model(family).parameters(), model.parameters(), strict=True)
        )
    assert moved > 1e-3


def test_lora_on_the_output_head_takes_part_in_the_loss():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    )
    with torch.no_grad():  # lora_B starts at zero: make the head's adapter matter
        for name, p in model.named_parameters():
            if "lm_head" in name and "lora_B" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    batch = batches()[0]
    total, n = causal_lm_loss(model, batch, 7)
    assert float(total) / n == pytest.approx(float(own_loss(model, batch)), abs=1e-5)


def test_an_unknown_head_uses_the_models_own_loss_and_says_so():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)).eval()
    assert not loss_path(model).chunked
    assert "'gpt2' head" in loss_note(model) and "forward(labels=...)" in loss_note(model)
    batch = batches()[0]
    total, n = causal_lm_loss(model, batch, 7)
    assert float(total) / n == pytest.approx(float(own_loss(model, batch)), abs=1e-6)
    total.backward()  # and it trains
    assert model.lm_head.weight.grad is not None


def test_moe_with_router_loss_uses_the_models_own_loss():
    model = tiny_model("qwen3_moe")
    model.config.output_router_logits = True  # the load-balancing loss joins the loss
    assert "load-balancing" in loss_note(model)
    batch = batches()[0]
    total, n = causal_lm_loss(model, batch, 7)
    with_aux = float(own_loss(model, batch))
    assert float(total) / n == pytest.approx(with_aux, abs=1e-6)
    model.config.output_router_logits = False
    assert abs(with_aux - float(own_loss(model, batch))) > 1e-6  # the aux loss is there

"""qlora-sgd: LoRA adapters over an NF4 base (bitsandbytes, on CPU), trained by the fused
engine and checked against torch.optim.SGD; adapter save/load; merge into the base."""

import json
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lomotune.export import ExportError, OutputExistsError, merge_adapter
from lomotune.lora import (
    add_lora_adapters,
    keep_4bit_layers_trainable,
    tensor_bytes,
)
from lomotune.loss import causal_lm_loss
from lomotune.models import count_parameters, load_model
from lomotune.optim.engine import FusedEngine
from lomotune.optim.lomo import LomoRule
from lomotune.recipe import ClipConfig, LoraConfig, ModelConfig
from lomotune.testing import SPECIAL_TOKENS, random_batches, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")
from peft import PeftModel  # noqa: E402

VOCAB = len(SPECIAL_TOKENS) + len(string.printable)
# No dropout: the tests compare gradients and steps between copies.
LORA = LoraConfig(r=8, alpha=16, dropout=0.0)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved as a model folder. Wider than lomotune.testing's (hidden 32) so
    that every weight spans several 64-weight NF4 blocks and the quantization constants
    do not dominate its size."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def load_base(path, precision="fp32", quantize=True):
    # fp32 compute over the NF4 weights: the fused update can then be compared exactly.
    return load_model(
        ModelConfig(name=str(path), precision=precision), CPU, quantize_4bit=quantize
    ).model


def lora_model(path, seed=0, **kw):
    base = load_base(path, **kw)
    torch.manual_seed(seed)  # the same lora_A initialisation in every copy
    model = add_lora_adapters(base, LORA)
    model.train()  # activation checkpointing runs only in training mode
    return model


def make_batches(n, batch=3, length=12, seed=1):
    return random_batches(n, VOCAB, batch, length, seed)


def train_fused(model, batches, lr):
    engine = FusedEngine(
        model, LomoRule(), lambda b: causal_lm_loss(model, b, 64), clip=ClipConfig()
    )
    losses = [engine.step([b], lr).loss for b in batches]
    engine.close()
    return losses


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def base_state(model):
    """Every non-adapter tensor, 4-bit weights and their quantization state included."""
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


LR = 0.5


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A LoRA model over the 4-bit base after 3 fused SGD steps, and its saved adapter."""
    model = lora_model(base_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = base_state(model)
    losses = train_fused(model, make_batches(3), LR)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)  # PEFT format, as train writes a run's model/
    return model, before, base_before, losses, adapter_dir


def test_base_is_nf4_with_double_quant_and_only_adapters_train(base_dir):
    model = lora_model(base_dir)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * len(LINEARS)  # every decoder linear layer, not the head
    for name, m in quantized.items():
        assert isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8, name
        assert m.weight.quant_state.quant_type == "nf4", name
        assert m.weight.quant_state.nested, name  # double quantization: absmax quantized again
        assert m.compute_dtype == torch.float32, name
        assert m.weight.quant_state.absmax.dtype == torch.uint8, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(quantized)  # one A and one B per 4-bit layer
    # Activation checkpointing is on (non-reentrant) and the model is in training mode.
    layer = model.get_base_model().model.layers[0]
    assert layer.gradient_checkpointing and layer.training

    total, trainable = count_parameters(model)
    per_layer = sum(LORA.r * (m.in_features + m.out_features) for m in quantized.values())
    assert trainable == per_layer
    full = LlamaForCausalLM.from_pretrained(base_dir)
    assert total == sum(p.numel() for p in full.parameters()) + per_layer


def test_fused_sgd_changes_only_adapters_and_equals_torch_sgd(base_dir, trained):
    model, before, base_before, losses, _ = trained
    # Reference: an identical copy, ordinary backward, torch.optim.SGD over the adapters.
    ref = lora_model(base_dir)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    ref_losses = []
    for b in make_batches(3):
        total, n = causal_lm_loss(ref, b, 64)
        loss = total / n
        ref_losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert losses[-1] < losses[0]

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name} kept a gradient"
        if not p.requires_grad:
            continue
        diff = (p - ref_params[name]).abs().max().item()
        assert diff < 1e-5, f"{name}: fused vs torch SGD differ by {diff}"
        # lora_B starts at zero (so lora_A gets no gradient on step 1): both move by step 3.
        assert not torch.equal(p, before[name]), f"{name} did not change"
    for name, t in base_state(model).items():
        assert torch.equal(t, base_before[name]), f"base tensor {name} changed"


def test_bf16_compute_and_checkpointing_without_input_grads(base_dir):
    # The default qlora-sgd setting: bf16 compute over NF4, adapters in fp32. Without
    # the embedding-output-requires-grad hook (that reentrant checkpointing needs, and
    # prepare_model_for_kbit_training would add), non-reentrant checkpointing still
    # delivers the adapters' gradients.
    model = lora_model(base_dir, precision="bf16")
    model.get_base_model().disable_input_require_grads()
    seen = []
    model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(out.requires_grad)
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    base_before = base_state(model)
    losses = train_fused(model, make_batches(3), LR)
    assert seen and not any(seen)
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert p.grad is None, name
        if name in before:
            assert not torch.equal(p, before[name]), f"{name} did not change"
    assert all(torch.equal(t, base_before[k]) for k, t in base_state(model).items())


def test_saved_adapter_reloads_on_a_fresh_4bit_base(base_dir, trained):
    model, *_, adapter_dir = trained
    assert (adapter_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_model.safetensors").exists()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["r"] == LORA.r and config["lora_alpha"] == LORA.alpha

    reloaded = PeftModel.from_pretrained(load_base(base_dir), adapter_dir)
    keep_4bit_layers_trainable(reloaded)  # the same 4-bit kernel as the trained model
    batch = make_batches(1, seed=7)[0]
    diff = (logits(model, batch) - logits(reloaded, batch)).abs().max().item()
    assert diff == 0.0, f"reloaded adapter changes the logits by {diff}"


def test_4bit_linear_weights_take_about_a_quarter_of_bf16(base_dir):
    q4 = load_base(base_dir, precision="bf16")
    bf16 = load_base(base_dir, precision="bf16", quantize=False)
    bf16_modules = dict(bf16.named_modules())
    seen: set[int] = set()
    q_bytes = b_bytes = 0
    for name, m in q4.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            q_bytes += tensor_bytes(m.weight, seen)  # packed NF4 + absmax + both codes
            ref = bf16_modules[name].weight
            assert ref.dtype == torch.bfloat16
            b_bytes += ref.numel() * ref.element_size()
    ratio = q_bytes / b_bytes
    print(f"4-bit linear layers: {q_bytes} bytes, bf16: {b_bytes} bytes, ratio {ratio:.3f}")
    # 4 bits a weight (0.25) + an 8-bit absmax per 64 weights + per-layer codes (~0.03 here).
    assert 0.25 < ratio < 0.35


def test_merge_adapter_equals_peft_model_on_full_precision_base(base_dir, trained, tmp_path):
    *_, adapter_dir = trained
    batch = make_batches(1, seed=7)[0]
    base = load_base(base_dir, quantize=False)
    base_logits = logits(base, batch)
    peft_logits = logits(PeftModel.from_pretrained(base, adapter_dir), batch)

    out = tmp_path / "merged"
    merge_adapter(None, adapter_dir, out, "fp32")  # the base named in adapter_config.json
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.config.use_cache
    merged_logits = logits(merged, batch)
    diff = (merged_logits - peft_logits).abs().max().item()
    moved = (merged_logits - base_logits).abs().max().item()
    print(f"merged vs peft logits: {diff:.2e}; adapters moved the logits by {moved:.2e}")
    assert moved > 1e-2  # the adapters do something, so the comparison means something
    assert diff < 1e-4

    with pytest.raises(OutputExistsError, match="overwrite=True"):
        merge_adapter(base_dir, adapter_dir, out, "fp32")
    assert (out / "model.safetensors").exists()  # left as it was
    with pytest.raises(ExportError, match="4-bit"):
        merge_adapter(base_dir, adapter_dir, tmp_path / "other", "nf4")
    merge_adapter(base_dir, adapter_dir, out, "bf16", overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_an_eval_forward_does_not_break_later_training(base_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval-mode no-grad
    forward, after which no gradient flows through them; our eval passes must not."""
    batch = make_batches(1)[0]

    def adapter_grads(model):
        model.zero_grad()
        total, n = causal_lm_loss(model, batch, 64)
        (total / n).backward()
        return {
            k: p.grad.clone()
            for k, p in model.named_parameters()
            if "lora_A" in k and p.grad is not None
        }

    model = lora_model(base_dir, precision="bf16")
    with torch.no_grad():  # lora_B starts at zero: give lora_A a gradient to carry
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-2, generator=torch.Generator().manual_seed(0))
    before = adapter_grads(model)
    model.eval()
    with torch.no_grad():
        causal_lm_loss(model, batch, 64)
    model.train()
    after = adapter_grads(model)
    assert before and set(before) == set(after)
    for k in before:
        assert torch.allclose(before[k], after[k], rtol=1e-3, atol=1e-8), k
    packed = [
        m
        for m in model.modules()
        if getattr(
            getattr(getattr(m, "weight", None), "quant_state", None),
            "packing_format_for_cpu",
            False,
        )
    ]
    assert not packed

"""Models by the names people type: every known shape against the model transformers
builds from it, head_dim that is not hidden / heads, and hub ids without a network."""

from __future__ import annotations

import socket

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from lomotune.estimate import EstimateError, Setup, estimate, resolve_config, shape_of
from lomotune.estimate.shapes import KNOWN_SHAPES, source_of
from lomotune.estimate.simulate import simulate_step


@pytest.mark.parametrize("key", list(KNOWN_SHAPES))
def test_every_known_shape_counts_the_parameters_transformers_builds(key):
    config = resolve_config(key)
    with torch.device("meta"):  # no memory: 405B parameters are shapes only
        model = AutoModelForCausalLM.from_config(config)
    built = sum(p.numel() for p in model.parameters())
    # Left out by the formulas: Qwen3's and Gemma 3's q/k norms, Gemma's two extra norms
    # a layer (Qwen2.5 is kept in Llama's layout, without its q/k/v biases)
    assert shape_of(config).params() == pytest.approx(built, rel=1e-4, abs=0)
    assert source_of(key)


def test_llama_3_1_8b_by_its_hub_id_has_its_published_size():
    # 8,030,261,248: embeddings 2 x 128256 x 4096, 32 layers of 218,112,000, final norm
    assert shape_of(resolve_config("meta-llama/Llama-3.1-8B")).params() == 8_030_261_248


def wide_heads() -> LlamaConfig:
    """head_dim 64 with 4 heads on a hidden size of 128: q is twice as wide as the
    hidden state (as Qwen3-0.6B's 16 x 128 from 1024)."""
    return LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    )


def test_a_head_dim_of_its_own_counts_q_and_o_at_their_width():
    config = wide_heads()
    model = AutoModelForCausalLM.from_config(config)
    assert shape_of(config).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["lomo", "adalomo", "mezo", "adamw", "adam-mini"])
def test_a_head_dim_of_its_own_agrees_with_simulation_within_10_percent(method):
    config = wide_heads()
    for ckpt in (True, False):
        sim = simulate_step(config, method, batch_size=4, seq_len=128, checkpointing=ckpt)
        device = "cuda" if method in ("lomo", "adalomo") else "cpu"  # as test_estimate
        est = estimate(shape_of(config), Setup(method, 4, 128, checkpointing=ckpt, device=device))
        assert est.tensor_bytes / sim.peak_bytes == pytest.approx(1, abs=0.10), (method, ckpt)


@pytest.fixture
def no_network(monkeypatch):
    """No route to the hub, and a record of every config read from it."""

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reads = []

    def from_pretrained(name, *args, local_files_only=False, **kwargs):
        reads.append((name, local_files_only))
        assert local_files_only, "went to the network, which is not there"
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    return reads


@pytest.mark.parametrize(
    "name, key",
    [
        ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("Qwen/Qwen3-0.6B", "qwen3-0.6b"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("google/gemma-3-1b-it", "gemma-3-1b"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
        ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
        ("mistralai/Mistral-Nemo-Instruct-2407", "mistral-nemo-12b"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k"),
        ("microsoft/phi-4", "phi-4"),
        ("HuggingFaceTB/SmolLM3-3B", "smollm3-3b"),
    ],
)
def test_hub_ids_of_known_shapes_resolve_without_a_network(no_network, name, key):
    expected = shape_of(resolve_config(key))
    assert shape_of(resolve_config(name)) == expected
    assert no_network == []  # the hub was never asked


def test_an_unknown_hub_id_without_a_network_fails_at_once_with_the_way_out(no_network):
    with pytest.raises(EstimateError) as e:
        resolve_config("some-org/some-model-7b")
    message = str(e.value)
    # the cache was looked at, the network not (no retries): then the known shapes and
    # how to point at a local config.json
    assert no_network == [("some-org/some-model-7b", True)]
    assert "no network" in message and "llama-3.1-8b" in message and "qwen3-8b" in message
    assert "config.json in a folder" in message


def test_the_estimate_command_takes_a_hub_id_offline(no_network):
    from typer.testing import CliRunner

    from lomotune.cli import app

    done = CliRunner().invoke(app, ["estimate", "--model", "Qwen/Qwen3-8B", "--json"])
    assert done.exit_code == 0, done.output
    missing = CliRunner().invoke(app, ["estimate", "--model", "some-org/some-model"])
    assert missing.exit_code == 2 and "config.json in a folder" in " ".join(missing.output.split())


def test_a_near_miss_of_a_known_shape_offline_names_it(no_network):
    with pytest.raises(EstimateError, match="Did you mean qwen3-8b"):
        resolve_config("Qwen/Qwen3-8.0B")

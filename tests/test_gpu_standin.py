"""One training step of every fused method and baseline on the meta device, lomotune's
own engine and loss, as a GPU stand-in (DESIGN.md, "The GPU path, checked without a
GPU").

The meta device follows CUDA's device-mixing rule (a 0-dim CPU scalar may mix in, any
other CPU tensor raises), every host read of it (`.item()`, `bool()`, `float()`,
`.tolist()`, `.cpu()`) raises at its line, autograd and post-accumulate hooks run, and
every `device.type != "cpu"` branch takes its GPU side. So a step that completes here
mixes no devices; reading the host is what a GPU calls a sync. `_HostReads` answers each
read with a value and records its line, so that the step runs on and its syncs can be
counted; a read made inside backward (autograd's graph task running) fails the test with
its line. `torch.tensor(x, device=...)` is a blocking host-to-device copy on CUDA that
meta cannot see: it is watched by name.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lomotune.loss import causal_lm_loss
from lomotune.optim import build_engine
from lomotune.recipe import Recipe
from lomotune.testing import random_batches, tiny_llama

aten = torch.ops.aten
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class _HostReads(TorchDispatchMode):
    """Answers a host read of a meta tensor with a plausible value (a count 4, a loss
    1.0, a flag True, a nonzero that keeps every element) and records where it was made:
    `file:function` of the innermost frame outside torch."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []
        self.in_backward: list[str] = []

    def _record(self) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        f = frames[-1]
        site = f"{f.filename.rsplit('/', 1)[-1]}:{f.name}"
        self.sites.append(site)
        if torch._C._current_graph_task_id() != -1:
            self.in_backward.append(f"{f.filename}:{f.lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else None
        on_meta = isinstance(t, torch.Tensor) and t.device.type == "meta"
        if on_meta and func is aten._local_scalar_dense.default:
            self._record()
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 4
        to_host = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if on_meta and func is aten._to_copy.default and to_host:  # .tolist(), .cpu()
            self._record()
            return torch.ones(t.shape, dtype=kwargs.get("dtype") or t.dtype)
        if on_meta and func is aten.nonzero.default:  # a data-dependent shape: a sync
            self._record()
            return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
        return func(*args, **kwargs)


def _watch_host_to_device_copies(monkeypatch) -> list[str]:
    """Every `torch.tensor(..., device=<not the CPU>)` made inside backward, by line."""
    copies: list[str] = []
    real = torch.tensor

    def tensor(*args, **kwargs):
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type != "cpu"
        if to_device and torch._C._current_graph_task_id() != -1:
            f = traceback.extract_stack()[-2]
            copies.append(f"{f.filename}:{f.lineno}")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    return copies


def _meta_step(method: str, precision: str, clip: str, monkeypatch) -> list[str]:
    """One step of `method` on a tiny LLaMA on the meta device; the host reads' sites."""
    recipe = Recipe(
        model={"name": "tiny-llama", "precision": precision},
        optimizer={"name": method, "clip": {"mode": clip, "max_norm": 1.0}},
        training={"max_steps": 1},
    )
    model = tiny_llama(tie=True, dtype=DTYPES[precision]).to("meta")
    batch = {k: v.to("meta") for k, v in random_batches(1)[0].items()}
    engine = build_engine(recipe, model, lambda b: causal_lm_loss(model, b, 7))
    copies = _watch_host_to_device_copies(monkeypatch)
    reads = _HostReads()
    with reads:
        result = engine.step([batch], 1e-3)
    engine.close()
    assert result.skipped is None, result
    assert not reads.in_backward, f"a host read inside backward: {reads.in_backward}"
    assert not copies, f"a blocking host-to-device copy inside backward: {copies}"
    return reads.sites


# Reads that every step makes outside backward: transformers' SDPA mask helper asks
# whether the padding mask is all ones; the loss finds its label positions (nonzero);
# the engine counts the step's tokens and reads the loss.
FORWARD = [
    "masking_utils.py:_ignore_causal_mask_sdpa",
    "loss.py:causal_lm_loss",
    "engine.py:count_tokens",
    "engine.py:step",
]
# A fused step reads its gradients' flags (and tracked norm) once after backward, and a
# norm pass reads the squared norms once before the update pass.
FUSED_UPDATE = ["engine.py:_read_step"]
NORM_PASS = ["engine.py:_sq_values"]


@pytest.mark.parametrize("method", ["lomo", "adalomo"])
@pytest.mark.parametrize(
    "precision, clip",
    [
        ("bf16", "none"),
        ("bf16", "exact"),
        ("bf16", "previous"),
        ("bf16", "per-tensor"),
        ("fp32", "none"),
        ("fp16", "none"),
    ],
)
def test_a_fused_step_on_the_gpu_stand_in(method, precision, clip, monkeypatch):
    sites = _meta_step(method, precision, clip, monkeypatch)
    # clip.mode exact, the first step of `previous` and every fp16 step run a norm pass
    norm_pass = clip in ("exact", "previous") or precision == "fp16"
    expected = FORWARD + (NORM_PASS if norm_pass else []) + FUSED_UPDATE
    assert sorted(sites) == sorted(expected)


# A baseline counts its label tokens (one read per micro-batch) and reads each
# micro-batch's loss, then its gradients' finite flags once; clip.mode exact reads the norm.
BASELINE = [
    "baseline.py:<genexpr>",
    "masking_utils.py:_ignore_causal_mask_sdpa",
    "loss.py:causal_lm_loss",
    "baseline.py:step",
    "engine.py:count_tokens",
    "baseline.py:_non_finite_gradients",
]


# adamw below fp32 runs under CUDA autocast, which the meta device has no kernel for:
# its fp32 step stands for its path; adamw-pure takes AdamW's bf16 path.
@pytest.mark.parametrize("method", ["adamw-pure", "sgd"])
@pytest.mark.parametrize(
    "precision, clip",
    [("bf16", "none"), ("bf16", "exact"), ("bf16", "per-tensor"), ("fp32", "none")],
)
def test_a_baseline_step_on_the_gpu_stand_in(method, precision, clip, monkeypatch):
    sites = _meta_step(method, precision, clip, monkeypatch)
    expected = BASELINE + (["baseline.py:step"] if clip == "exact" else [])
    assert sorted(sites) == sorted(expected)


def test_adamw_in_fp32_on_the_gpu_stand_in(monkeypatch):
    method, precision, clip = "adamw", "fp32", "exact"
    sites = _meta_step(method, precision, clip, monkeypatch)
    expected = BASELINE + (["baseline.py:step"] if clip == "exact" else [])
    assert sorted(sites) == sorted(expected)


def test_the_stand_in_catches_a_read_and_a_copy_inside_backward(monkeypatch):
    """What the steps above must not do, done in a hook: both are caught, by line."""
    p = torch.nn.Parameter(torch.ones(3, device="meta"))

    def hook(param: torch.Tensor) -> None:
        bool(param.grad.sum() > 0)  # a sync on a GPU
        torch.tensor(2.0, device=param.device)  # a blocking copy on a GPU

    p.register_post_accumulate_grad_hook(hook)
    copies = _watch_host_to_device_copies(monkeypatch)
    reads = _HostReads()
    with reads:
        (p * 2).sum().backward()
    assert len(reads.in_backward) == 1 and len(copies) == 1
    assert reads.in_backward[0].endswith(f":{hook.__code__.co_firstlineno + 1}")
    assert copies[0].endswith(f":{hook.__code__.co_firstlineno + 2}")

"""Elementwise updates compiled into one kernel each, on a GPU.

Eager torch runs a fused rule's update of a bf16 slice as some 25 passes over memory
(fp32 copies of weight and gradient, the gate, the add; for the rounding the hash's
integer ops, the masks, the add and the store; counted from the code, not measured),
where the update needs one: read the weight and the gradient, write the weight (6 bytes
an element). Written as one elementwise function of the weight, the gradient and the
element's index, torch.compile (Triton on a GPU) makes it a single kernel that moves
those 6 bytes and allocates nothing.

A CPU keeps the eager ops: compiling there needs a C++ compiler on the user's machine
and some 20 s at the first step, for an update that is a few % of a CPU step. The tests
compile the same functions on the CPU (inductor's C++ backend) and compare them with the
eager path and with references.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}
_why_not: dict[str, str | None] = {}  # per device: why its kernels cannot run (None: they can)


def why_not_compiled(device: torch.device) -> str | None:
    """Why updates on `device` do not run as compiled kernels, or None when they do: on a
    GPU with Triton (torch.compile's GPU backend, shipped with torch's CUDA and ROCm
    wheels) whose probe kernel built and gave the eager path's bits. Probed once per
    device, at the first call (`lomotune train` asks before training: no compile inside
    backward)."""
    if device.type == "cpu":
        return "a CPU runs the eager ops"
    key = str(device)  # asked by every fused hook: answered once per device
    if key not in _why_not:
        if importlib.util.find_spec("triton") is None:
            _why_not[key] = (
                "Triton, torch.compile's GPU backend, is not installed (`pip install triton`)"
            )
        else:
            _why_not[key] = probe(device)
    return _why_not[key]


def available(device: torch.device) -> bool:
    """Whether updates on `device` run as compiled kernels (see why_not_compiled)."""
    return why_not_compiled(device) is None


def probe(device: torch.device) -> str | None:
    """Build the stochastic-rounding kernel on `device` (its hash's 64-bit integer
    arithmetic is what a backend would get wrong) and check its bits against the eager
    CPU path on a few values: None when right, else what went wrong, for a warning."""
    from lomotune.optim.rounding import as_int64, round_elementwise_into, stochastic_round_into

    key = 2**64 - 1
    x = torch.linspace(-3.0, 3.0, 64) * 1e-3
    expected = torch.empty(64, dtype=torch.bfloat16)
    stochastic_round_into(expected, x.clone(), key, 0)
    out = torch.empty(64, dtype=torch.bfloat16, device=device)
    try:
        compiled(round_elementwise_into)(out, x.to(device), as_int64(key), 0)
        got = out.cpu()
    except Exception as e:  # any failure to build or run it: the eager ops still work
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"torch.compile could not build the update kernel ({type(e).__name__}: {first})"
    if not torch.equal(got.view(torch.int16), expected.view(torch.int16)):
        return "the compiled update kernel gave other bits than the eager ops on a probe"
    return None


def compiled(fn: Callable) -> Callable:
    """`fn` compiled once per process, with dynamic shapes and scalars, so that every
    tensor, slice and step reuses one kernel (callers pass flat tensors)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]

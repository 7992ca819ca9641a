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


def available(device: torch.device) -> bool:
    """Whether updates on `device` run as compiled kernels: on a GPU, when Triton
    (torch.compile's GPU backend, shipped with torch's CUDA and ROCm wheels) is
    installed."""
    return device.type != "cpu" and importlib.util.find_spec("triton") is not None


def compiled(fn: Callable) -> Callable:
    """`fn` compiled once per process, with dynamic shapes and scalars, so that every
    tensor, slice and step reuses one kernel (callers pass flat tensors)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]

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

Nothing compiles inside backward: `FusedEngine.prepare_kernels` builds, before training,
each kernel as the run's hooks will call it (a compiled kernel is specialized on dtypes,
grad mode, a float's presence, branches taken), and checks its bits against the eager
ops. A device not prepared, or whose kernels failed that check, runs the eager ops; a
kernel that fails later in a hook warns once and leaves the eager ops for the device.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}
# Per device (canonical key): why its kernels do not run (None: they do), answered by
# `prepare` before training; a device never prepared runs the eager ops.
_why_not: dict[str, str | None] = {}
_forced: bool | None = None  # `prepare`'s own runs: compiled (True) or eager (False)

# The kernels' calls of one run on a device: each builds small tensors there, runs an
# update through the code a run uses, and returns what it wrote (compared bit for bit).
Check = Callable[[torch.device], list[torch.Tensor]]


def device_key(device: torch.device) -> str:
    """One key per physical device: "cuda" means the current GPU, so it is "cuda:0" there,
    as the hooks (which see the parameters' devices) ask."""
    if device.index is None and device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def why_not_compiled(device: torch.device) -> str | None:
    """Why updates on `device` do not run as compiled kernels, or None when they do: on a
    GPU whose kernels `prepare` built and found right before training."""
    if device.type == "cpu":
        return "a CPU runs the eager ops"
    return _why_not.get(device_key(device), "the kernels were not built before training")


def available(device: torch.device) -> bool:
    """Whether updates on `device` run as compiled kernels (see why_not_compiled)."""
    if _forced is not None:
        return _forced
    return why_not_compiled(device) is None


def prepare(device: torch.device, checks: dict[str, Check]) -> str | None:
    """Build every kernel a run will call on `device`, each as the run will call it, and
    check its bits against the eager ops on the CPU: None when all are right (the hooks
    then call them, with nothing left to compile inside backward), else why not, for a
    warning (the eager ops then run). Answered once per device."""
    if device.type == "cpu":
        return why_not_compiled(device)
    key = device_key(device)
    if key not in _why_not:
        if importlib.util.find_spec("triton") is None:
            _why_not[key] = (
                "Triton, torch.compile's GPU backend, is not installed (`pip install triton`)"
            )
        else:
            _why_not[key] = probe(device, checks)
    return _why_not[key]


def probe(device: torch.device, checks: dict[str, Check]) -> str | None:
    """Run each check compiled on `device` and eagerly on the CPU: None when every tensor
    has the same bits, else what went wrong."""
    global _forced
    for name, check in checks.items():
        try:
            _forced = False
            expected = check(torch.device("cpu"))
            _forced = True
            got = [t.cpu() for t in check(device)]
        except Exception as e:  # any failure to build or run it: the eager ops still work
            return f"torch.compile could not build the {name} kernel ({_first_line(e)})"
        finally:
            _forced = None
        if not all(_same_bits(a, b) for a, b in zip(expected, got, strict=True)):
            return f"the compiled {name} kernel gave other bits than the eager ops on a probe"
    return None


def rounding_check(device: torch.device) -> list[torch.Tensor]:
    """The stochastic-rounding kernel (its hash's 64-bit integer arithmetic is what a
    backend would get wrong), at the largest key, from element 0 and from an offset."""
    from lomotune.optim.rounding import stochastic_round_into

    out = []
    for start in (0, 1000):
        x = torch.linspace(-3.0, 3.0, 64, device=device) * 1e-3
        got = torch.empty(64, dtype=torch.bfloat16, device=device)
        stochastic_round_into(got, x, 2**64 - 1, start)
        out.append(got)
    return out


def run(fn: Callable, device: torch.device, *args) -> bool:
    """Call `fn` compiled; False when that fails (the caller then runs the eager ops):
    the first failure on a device warns once, and the device runs the eager ops from then
    on. Nothing is written before a kernel runs, so nothing is half done."""
    try:
        compiled(fn)(*args)
        return True
    except Exception as e:
        if _forced:  # `probe` asks: it reports the failure
            raise
        key = device_key(device)
        if _why_not.get(key) is None:
            why = f"the compiled {fn.__name__} failed ({_first_line(e)}); eager ops from now on"
            _why_not[key] = why
            warnings.warn(why, RuntimeWarning, stacklevel=2)
        return False


def compiled(fn: Callable) -> Callable:
    """`fn` compiled once per process, with dynamic shapes and scalars, so that every
    tensor, slice and step reuses one kernel (callers pass flat tensors)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


def _first_line(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"

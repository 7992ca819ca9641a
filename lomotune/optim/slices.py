"""One parameter's fused update, walked in slices of rows so that its temporaries stay
within a fixed budget whatever the tensor's size.

At the moment a hook fires, the whole-tensor update of a bf16 parameter holds, beside
the gradient itself: an fp32 copy of the gradient, an fp32 working copy of the weights,
the rounding noise and its masks (about 14 bytes an element: 1.5 GiB for a 128k x 4096
embedding). Sliced, the same update holds them for `budget` bytes' worth of rows at a
time, and nothing else is ever copied whole.

Slicing changes no result: elementwise work is the same per element, and every sum that
crosses slices (squared norms, AdaLomo's column statistics and update RMS) is
accumulated in fp64 per slice and across slices, so its fp32 value does not depend on
where the slices were cut (tested bitwise against a single slice). The rounding noise is
a function of the element's index (rounding.noise16), the same sliced or whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lomotune.optim.rounding import as_int64, stochastic_round_into

DEFAULT_SLICE_BYTES = 64 << 20  # on a GPU (its caching allocator reuses the blocks)
# On a CPU `lomotune train` fixes glibc's mmap threshold at 4 MiB (allocator.py): a
# temporary of 4 MiB or more is mapped afresh each time and every page of it faults on
# first touch. Slices of 3 MiB of temporaries (some 157k elements: 0.6 MB in fp32, 1.2 MB
# in fp64) stay on the heap, whose freed blocks are reused. Measured on SmolLM2-135M (AMD
# EPYC, 2 cores), with AdaLomo's fewer temporaries: its update in a 4 x 512 fp32 step
# 1.26 -> 0.67 s (BENCHMARKS.md, "Issue 15, next stop").
CPU_SLICE_BYTES = 3 << 20
# Temporaries per element of a slice, at most (bf16 AdaLomo's statistics pass): fp32
# gradient and weight copies 8, G^2 4, its fp64 copy for the column sums 8.
TEMP_BYTES_PER_ELEMENT = 20

Slice = tuple[slice, torch.Tensor, torch.Tensor]  # (rows, param fp32, grad fp32)


def slice_bytes_for(device_type: str) -> int:
    """The temporaries' budget of one slice on a device of this type ("cpu", "cuda")."""
    return CPU_SLICE_BYTES if device_type == "cpu" else DEFAULT_SLICE_BYTES


def rows_per_slice(t: torch.Tensor, budget: int) -> int:
    """How many dim-0 rows of `t` one slice holds. A tensor of three or more dimensions
    (a stack of expert matrices) is one slice: AdaLomo factors each matrix whole."""
    if t.dim() == 0 or t.dim() >= 3:
        return max(1, t.shape[0] if t.dim() else 1)
    row = t[0].numel() if t.shape[0] else 1
    return max(1, budget // (TEMP_BYTES_PER_ELEMENT * max(row, 1)))


def _rows(t: torch.Tensor, budget: int) -> Iterator[slice]:
    n = t.shape[0] if t.dim() else 1
    step = rows_per_slice(t, budget)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(1) if t.dim() == 0 else t


def sum_of_squares(t: torch.Tensor, budget: int = DEFAULT_SLICE_BYTES) -> torch.Tensor:
    """sum(t ** 2) as a 0-dim fp32 tensor, slice by slice (no full-size copy)."""
    t = _as_rows(t)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for rows in _rows(t, budget):
        total += squares_fp64(t[rows]).sum()
    return total.float()


def squares_fp64(t: torch.Tensor) -> torch.Tensor:
    """The squares of a slice summed per row, as fp64: (rows,), or a vector's squares
    (elements,). A row's sum (its fp32 norm, squared in fp64) does not depend on how many
    rows the slice has, and fp64 then adds rows without a rounding that slicing could
    change (short of a tie at fp64 precision): an fp32 total independent of where slices
    were cut. The norm reads the rows in place: `t.square().sum()` would allocate a
    slice-sized temporary (on a CPU freshly mapped pages each time: ten times slower)."""
    if t.dim() <= 1:
        return t.double().square()
    dims = tuple(range(1, t.dim()))
    return torch.linalg.vector_norm(t, dim=dims, dtype=torch.float32).double().square()


def all_finite(t: torch.Tensor, budget: int = DEFAULT_SLICE_BYTES) -> torch.Tensor:
    """0-dim bool: no NaN or inf in `t`. A sum is non-finite when any element is (a
    finite sum overflowing fp32 would need gradients near 1e38): one reduction a slice."""
    t = _as_rows(t)
    total = torch.zeros((), dtype=torch.float32, device=t.device)
    for rows in _rows(t, budget):
        total += t[rows].sum(dtype=torch.float32)
    return total.isfinite()


def must_gate(ok: torch.Tensor) -> bool:
    """Whether an update must be masked by the step's flag `ok`. On a CPU the flag is read
    for free (there is no device to wait for), so a good step, the usual case, skips the
    masking pass over every slice; on a GPU reading it would stall backward (a sync), so
    the mask is always applied there."""
    return ok.device.type != "cpu" or not bool(ok)


class SlicedUpdate:
    """The complete gradient of one parameter (this rank's shard), handed to an update
    rule in row slices of fp32, scaled by `factor` (loss unscale x clip coefficient).

    `read()` walks (rows, param, grad) read-only, for statistics; `update()` walks them
    writable: the rule changes `param` in place, and each slice is written back into
    the parameter (stochastically rounded when `round_key` is given) before the next is
    made. For an fp32 parameter `param` is the parameter's own rows, and in `update()`
    `grad` is the gradient's own rows (the hook owns the gradient: no copy)."""

    def __init__(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        factor: float | torch.Tensor,
        *,
        budget: int = DEFAULT_SLICE_BYTES,
        round_key: int | None = None,
        start: int = 0,  # flat index of param's first element in the whole tensor
    ):
        self.param = _as_rows(param)
        self.grad = _as_rows(grad)
        self.factor = factor
        self.budget = budget
        self.round_key = round_key
        # The key as a compiled kernel takes it (kernels.py), None: no stochastic rounding.
        self.round_key_int64 = None if round_key is None else as_int64(round_key)
        self.start = start
        self.shape = tuple(param.shape)
        self.row_elements = self.param[0].numel() if self.param.shape[0] else 0

    def _grad(self, rows: slice, writable: bool) -> torch.Tensor:
        g = self.grad[rows]
        if g.dtype != torch.float32:
            g = g.float()  # a copy: scale it in place
        elif not writable:
            return g if _is_one(self.factor) else g * self.factor
        return g if _is_one(self.factor) else g.mul_(self.factor)

    def read(self) -> Iterator[Slice]:
        for rows in _rows(self.param, self.budget):
            yield rows, self.param[rows].float(), self._grad(rows, writable=False)

    def update(self) -> Iterator[Slice]:
        for rows in _rows(self.param, self.budget):
            target = self.param[rows]
            working = target.float() if target.dtype != torch.float32 else target
            yield rows, working, self._grad(rows, writable=True)
            if working is target:
                continue
            if self.round_key is not None:
                first = self.start + rows.start * self.row_elements
                stochastic_round_into(target, working, self.round_key, first)
            else:
                target.copy_(working)


def _is_one(factor: float | torch.Tensor) -> bool:
    return isinstance(factor, float | int) and factor == 1.0

"""Stochastic rounding of fp32 values to bf16, with noise from a counter-based hash.

bf16 keeps 8 bits of mantissa: near a weight of 0.05 its spacing is 2.4e-4, so an SGD
update of lr * grad = 1e-6 rounds back to the same weight every time and training does
not move at all. Rounding up with probability equal to the discarded fraction makes the
expected result exactly the fp32 value, at the cost of one random 16-bit number per
element.

The random number of element k of a stream is a pure function of (key, k): lane k % 4 of
splitmix64(key + (k // 4) * golden). So a tensor updated in row slices draws exactly the
noise it would draw whole, a shard draws what the same rows draw unsharded, and one
64-bit hash serves four elements (measured on this CPU for the 28M-element SmolLM2
embedding: about 4x cheaper than drawing int64 words from the CPU generator).

On a CPU the rounding runs as eager torch ops (one hash per 4 elements). On a GPU the
same noise and the same bits for every finite value come from one elementwise function
(`rounded_elementwise`, compiled: see kernels.py): each element hashes its own index (the
hash is free beside the memory traffic there), with the masks for NaN and range folded
in. A NaN stays a NaN, but not always with the same bits: the eager ops' fp32 -> bf16
conversion on a CPU writes 0xFFFF, the compiled Triton code (run by Triton's interpreter,
tests/test_triton_kernels.py) the canonical 0x7FC0.
"""

from __future__ import annotations

import torch

from lomotune.optim import kernels

BF16_MAX = 3.3895313892515355e38  # the largest finite bf16 (bits 0x7F7F)
_MASK64 = (1 << 64) - 1
# splitmix64's constants (Steele, Lea, Flood 2014), as the signed int64 torch computes
# with: multiplication wraps modulo 2^64 either way.
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def as_int64(v: int) -> int:
    """v modulo 2^64 as torch's signed int64 holds it."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _xor_logical_shift_(z: torch.Tensor, shift: int) -> torch.Tensor:
    """z ^= z >>> shift (logical: torch's >> on int64 copies the sign bit)."""
    return z.bitwise_xor_((z >> shift).bitwise_and_((1 << (64 - shift)) - 1))


def noise16(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,) int32 in [0, 2^16): the noise of elements start .. start + n - 1 of stream `key`.
    Element k is bits 16 (k % 4) .. 16 (k % 4) + 15 of splitmix64(key + (k // 4) golden)."""
    first, end = start // 4, (start + n + 3) // 4
    z = torch.arange(first, end, dtype=torch.int64, device=device)
    z.mul_(as_int64(_GOLDEN)).add_(as_int64(key))
    _xor_logical_shift_(z, 30).mul_(as_int64(_MUL1))
    _xor_logical_shift_(z, 27).mul_(as_int64(_MUL2))
    _xor_logical_shift_(z, 31)
    # The four 16-bit lanes of each word, low lane first (how `view` reads them on the
    # little-endian machines torch runs on); int16 is signed, so mask after widening.
    lanes = z.view(torch.int16)[start - 4 * first :][:n]
    return lanes.to(torch.int32).bitwise_and_(0xFFFF)


def hash64_at(key: int, counter: torch.Tensor) -> torch.Tensor:
    """splitmix64(key + counter golden) of each int64 `counter`, as int64 bits: exact
    integer arithmetic, so the same bits on every device. `key` as a signed int64
    (`as_int64`): compiled, it is a symbolic integer that must stay within int64."""
    z = counter * as_int64(_GOLDEN) + key
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * as_int64(_MUL1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * as_int64(_MUL2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def noise16_at(key: int, index: torch.Tensor) -> torch.Tensor:
    """The noise of the elements at `index` (int64) of stream `key`, as noise16 gives it,
    computed per element (one hash each): an elementwise function of the index, so that
    it fuses with the rounding into one kernel."""
    z = hash64_at(key, index >> 2)
    return ((z >> ((index & 3) * 16)) & 0xFFFF).to(torch.int32)


def rounded_elementwise(x: torch.Tensor, key: int, start: int) -> torch.Tensor:
    """stochastic_round_into's result as one elementwise expression of x (fp32) and the
    element index, in fp32 (each value exactly a bf16; x is left unchanged; `key`
    as_int64): what torch.compile fuses into one pass on a GPU."""
    index = torch.arange(start, start + x.numel(), device=x.device).view(x.shape)
    x = torch.where(x.isnan(), float("nan"), x)  # the canonical NaN (see below)
    in_range = (x <= BF16_MAX) & (x >= -BF16_MAX)
    noise = torch.where(in_range, noise16_at(key, index), 0)
    bits = (x.view(torch.int32) + noise) & -65536
    return bits.view(torch.float32)


def round_elementwise_into(out: torch.Tensor, x: torch.Tensor, key: int, start: int) -> None:
    out.copy_(rounded_elementwise(x, key, start))


def stochastic_round_into(out: torch.Tensor, x: torch.Tensor, key: int, start: int = 0) -> None:
    """out (bf16) <- x (fp32) rounded up or down with probabilities that make the
    expectation exactly x; the noise is elements start .. of stream `key` (see noise16).
    x may be used as scratch: its values may be lost.

    Exact and unbiased for every finite value up to bf16's largest (the sign of zero and
    subnormals included); a value already representable in bf16 comes back unchanged
    (its low 16 bits are zero, so no noise can carry). Non-finite values stay as they
    are: an inf stays that inf, a NaN stays NaN. A finite value beyond bf16's largest
    becomes the largest, never an inf."""
    assert x.dtype == torch.float32 and out.dtype == torch.bfloat16, (x.dtype, out.dtype)
    assert x.is_contiguous(), "x is rounded in place through its bits"
    if kernels.available(x.device):
        # One dimension whatever the tensor's, so that one compiled graph serves them all.
        flat_out, flat_x = (out.view(-1), x.view(-1)) if out.is_contiguous() else (out, x)
        if kernels.run(round_elementwise_into, x.device, flat_out, flat_x, as_int64(key), start):
            return
    noise = noise16(key, start, x.numel(), x.device).view(x.shape)
    if _may_hold_special_values(x):
        # A NaN whose payload lies in the low 16 bits alone would truncate to inf, and
        # 0x7FFFFFFF plus noise would carry into the sign bit: make every NaN the
        # canonical 0x7FC00000 (payload in the kept bits), leaving infinities alone.
        x.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=float("-inf"))
        # No noise past bf16's largest (NaN compares false): truncation then keeps an
        # inf and a NaN, and rounds a finite value there down to the largest, not to inf.
        noise.mul_(x <= BF16_MAX).mul_(x >= -BF16_MAX)  # one byte an element at a time
    # bf16 is the top 16 bits of fp32. Adding the noise to the low bits carries into the
    # kept bits with probability (low bits / 2^16); then truncate. fp32 is sign-magnitude,
    # so this rounds the magnitude: unbiased for negative values too.
    bits = x.view(torch.int32)
    bits.add_(noise).bitwise_and_(-65536)
    out.copy_(x)  # exact: the low 16 bits are zero


def _may_hold_special_values(x: torch.Tensor) -> bool:
    """False when every value of x is finite and within bf16's range: then no masks are
    needed. On a CPU one read (min and max in one pass) answers it without a device
    sync; elsewhere the masks are always applied."""
    if x.device.type != "cpu" or x.numel() == 0:
        return x.numel() > 0
    low, high = torch.aminmax(x)  # NaN propagates: then the comparisons are False
    return not (bool(low >= -BF16_MAX) and bool(high <= BF16_MAX))


def stochastic_round_to_bf16(x: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
    """x (fp32, left unchanged) -> a new bf16 tensor, stochastically rounded (see
    stochastic_round_into)."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    stochastic_round_into(out, x.contiguous().clone(), key, start)
    return out

"""Stochastic rounding of fp32 values to bf16.

bf16 keeps 8 bits of mantissa: near a weight of 0.05 its spacing is 2.4e-4, so an SGD
update of lr * grad = 1e-6 rounds back to the same weight every time and training does
not move at all. Rounding up with probability equal to the discarded fraction makes the
expected result exactly the fp32 value, at the cost of one random integer per element.
"""

from __future__ import annotations

import torch


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x (fp32) -> bf16, rounding each element up or down with probabilities that make
    the expectation exactly x. Deterministic for a given generator state."""
    assert x.dtype == torch.float32, x.dtype
    bits = x.view(torch.int32)
    # bf16 is the top 16 bits of fp32. Adding a uniform 16-bit integer to the low bits
    # carries into the kept bits with probability (low bits / 2^16); then truncate.
    # The fp32 layout is sign-magnitude, so this rounds the magnitude: unbiased for
    # negative values too.
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    rounded = (bits + noise).bitwise_and_(-65536)  # clear the low 16 bits
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero

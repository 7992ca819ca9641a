"""Seeds for torch generators, derived from tuples of integers.

Every random draw of a step (MeZO's perturbation z, the noise of stochastic rounding) is
seeded from (run seed, step, parameter, ...) alone: a resumed run draws exactly what a
straight run would, and the draws do not depend on the order in which hooks fire.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps). Nearby tuples give unrelated seeds,
    and any integer a user can type is folded into range: the result always fits
    `torch.Generator.manual_seed` (0 to 2^64 - 1)."""
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h

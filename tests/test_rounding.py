"""Stochastic rounding fp32 -> bf16 at its edges: every finite value rounds to one of its
two bf16 neighbours with the probabilities that make it unbiased; NaN, inf, the sign of
zero and subnormals come through; nothing finite becomes inf. The reference here works
on the bit patterns with Python integers, independently of the tensor code."""

import re
import shutil
import struct
import threading

import pytest
import torch

from lomotune.optim import kernels
from lomotune.optim.rounding import (
    as_int64,
    noise16,
    noise16_at,
    round_elementwise_into,
    stochastic_round_into,
    stochastic_round_to_bf16,
)

# What a GPU runs is compiled; on a CPU inductor compiles the same function to C++.
needs_a_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler"
)
BF16_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7F0000))[0]


def bits_to_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32_tensor(bit_patterns) -> torch.Tensor:
    return torch.tensor(bit_patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


def draws(x: torch.Tensor, n: int = 4000) -> torch.Tensor:
    """n roundings of each element of x -> (n, len(x)) fp32 values."""
    big = x.repeat(n)
    return stochastic_round_to_bf16(big, key=0).float().view(n, -1)


@pytest.mark.parametrize(
    "pattern", [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0xFFC00001, 0x7F80FFFF]
)
def test_nan_stays_nan_whatever_its_payload(pattern):
    # CUDA's canonical NaN 0x7FFFFFFF used to become -0.0, 0x7F800001 inf.
    out = draws(f32_tensor([pattern]), 500)
    assert bool(out.isnan().all())


def test_infinities_and_signed_zeros_come_through_exactly():
    x = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
    out = draws(x, 500)
    assert bool((out[:, 0] == float("inf")).all()) and bool((out[:, 1] == float("-inf")).all())
    assert bool((out[:, 2:] == 0).all())
    signs = torch.signbit(out[:, 2:])
    assert not bool(signs[:, 0].any()) and bool(signs[:, 1].all())


def test_finite_values_beyond_bf16_max_saturate_never_inf():
    x = torch.tensor([3.3961e38, -3.4e38, BF16_MAX, torch.finfo(torch.float32).max])
    out = draws(x, 500)
    assert bool(out.isfinite().all())
    assert bool((out.abs() == BF16_MAX).all())


@pytest.mark.parametrize(
    "pattern",
    [
        0x3F80_1234,  # 1.0 + a little
        0xBF80_C000,  # negative: the magnitude is rounded
        0x0000_8001,  # a subnormal, between 0 and the smallest bf16 subnormal's neighbour
        0x8012_7FFF,  # a negative subnormal
        0x7F7E_F000,  # just below bf16's largest
        0x3A83_126F,  # 1e-3: an everyday update size
    ],
)
def test_each_finite_value_rounds_to_a_neighbour_without_bias(pattern):
    low = pattern & 0xFFFF
    down = bits_to_f32(pattern & 0xFFFF0000)
    up = bits_to_f32((pattern & 0xFFFF0000) + 0x10000)  # next bf16 away from zero
    p_up = low / 65536
    n = 20000
    out = draws(f32_tensor([pattern]), n)[:, 0]
    is_up = out == up
    assert bool(((out == down) | is_up).all())  # only the two neighbours
    frequency = float(is_up.float().mean())
    sd = (p_up * (1 - p_up) / n) ** 0.5
    assert abs(frequency - p_up) < 5 * sd + 1e-9, (frequency, p_up)
    # The mean of the draws is the fp32 value (within the sampling error).
    x = bits_to_f32(pattern)
    assert abs(float(out.double().mean()) - x) < 5 * sd * abs(up - down) + 1e-45


def test_representable_values_are_returned_exactly():
    x = torch.randn(1000).bfloat16().float()
    assert torch.equal(draws(x, 3), x.repeat(3, 1))


MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> int:
    """One splitmix64 output for `state` (Steele, Lea, Flood 2014), in Python integers."""
    z = state & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@pytest.mark.parametrize("key", [0, 12345, 2**63 + 7, 2**64 - 1])
def test_noise_is_the_documented_counter_hash(key):
    start, n = 4 * 1000 + 3, 41  # starts inside a word, ends inside another
    expected = [
        (splitmix64(key + (k // 4) * 0x9E3779B97F4A7C15) >> (16 * (k % 4))) & 0xFFFF
        for k in range(start, start + n)
    ]
    assert noise16(key, start, n).tolist() == expected


def test_a_slice_draws_the_same_noise_as_the_whole():
    whole = noise16(7, 0, 1000)
    for start, n in [(0, 1), (1, 6), (5, 300), (999, 1)]:
        assert torch.equal(noise16(7, start, n), whole[start : start + n])
    x = torch.randn(10, 100)
    rows = torch.cat(
        [stochastic_round_to_bf16(x[r : r + 3], 9, start=r * 100) for r in (0, 3, 6, 9)]
    )
    assert torch.equal(rows, stochastic_round_to_bf16(x, 9))


def test_noise_is_uniform_over_16_bits():
    noise = noise16(3, 0, 1 << 18).float()
    assert abs(float(noise.mean()) - 32767.5) < 5 * 18918 / 512  # 5 standard errors
    counts = torch.bincount(noise16(3, 0, 1 << 18) >> 12, minlength=16).float()
    assert float(((counts - 16384) ** 2 / 16384).sum()) < 45  # chi-square, 15 dof


@pytest.mark.parametrize("key", [0, 12345, 2**63 + 7, 2**64 - 1])
def test_per_element_noise_is_the_counter_hash_noise(key):
    # The GPU kernel hashes each element's own index; it must draw what noise16 draws.
    start, n = 4 * 977 + 1, 4099
    index = torch.arange(start, start + n)
    assert torch.equal(noise16_at(as_int64(key), index), noise16(key, start, n))


def special_and_random_values() -> torch.Tensor:
    special = f32_tensor(
        [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0x7F80FFFF, 0x7F800000, 0xFF800000,
         0x00000000, 0x80000000, 0x00008001, 0x80127FFF, 0x7F7EF000, 0x7F7F0000, 0x7F7FFFFF,
         0xFF7FFFFF, 0x3F801234, 0xBF80C000]
    )  # fmt: skip
    randoms = torch.randn(64, 101, generator=torch.Generator().manual_seed(5)) * 1e-2
    return torch.cat([special, randoms.view(-1)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def reference_rounding(x: torch.Tensor, key: int, start: int) -> torch.Tensor:
    """The rounding written from its definition with Python integers: NaN stays a NaN,
    beyond bf16's range truncates, everything else adds the element's noise to the
    low 16 bits and truncates."""
    noise = [
        (splitmix64(key + (k // 4) * 0x9E3779B97F4A7C15) >> (16 * (k % 4))) & 0xFFFF
        for k in range(start, start + x.numel())
    ]
    out = []
    for bits, r in zip(x.reshape(-1).view(torch.int32).tolist(), noise, strict=True):
        bits &= 0xFFFFFFFF
        value = bits_to_f32(bits)
        if value != value:
            out.append(0x7FC0)
        elif abs(value) > BF16_MAX:
            out.append(bits >> 16)
        else:
            out.append(((bits + r) & 0xFFFFFFFF) >> 16)
    signed = [b - 0x10000 if b >= 0x8000 else b for b in out]
    return torch.tensor(signed, dtype=torch.int16).view(torch.bfloat16).view(x.shape)


def rounded_by(round_into, x: torch.Tensor, key: int, start: int) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    round_into(out, x.clone(), key, start)
    return out


@pytest.mark.parametrize("key, start", [(3, 0), (2**64 - 1, 4 * 1000 + 3)])
def test_elementwise_rounding_gives_the_bits_of_the_definition(key, start):
    x = special_and_random_values()
    expected = reference_rounding(x, key, start)
    eager = rounded_by(stochastic_round_into, x, key, start)
    elementwise = rounded_by(round_elementwise_into, x, as_int64(key), start)
    nan = expected.isnan()
    # every NaN stays a NaN (its payload aside); every other value has the reference's bits
    assert bool(eager[nan].isnan().all()) and bool(elementwise[nan].isnan().all())
    assert same_bits(eager[~nan], expected[~nan])
    assert same_bits(elementwise[~nan], expected[~nan])


@needs_a_compiler
def test_compiled_rounding_is_one_kernel_with_the_same_bits():
    # What a GPU runs is this function compiled; on a CPU inductor compiles it to C++.
    # Two shapes, keys and starts: one compiled graph serves every slice and step.
    from torch._inductor.utils import run_and_get_code

    x = special_and_random_values()
    compiled = kernels.compiled(round_elementwise_into)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _, code = run_and_get_code(compiled, out, x, as_int64(2**64 - 1), 4003)
    nan = x.isnan()
    expected = reference_rounding(x, 2**64 - 1, 4003)
    assert bool(out[nan].isnan().all()) and same_bits(out[~nan], expected[~nan])
    # On a GPU the hooks run on autograd's device thread, not the main one; the output
    # is a slice of rows of the parameter, written in place, the rows around untouched.
    y = torch.randn(33, 7)
    param = torch.zeros(40, 7, dtype=torch.bfloat16)
    worker = threading.Thread(target=compiled, args=(param[5:38], y, 11, 35))
    worker.start()
    worker.join()
    assert same_bits(param[5:38], reference_rounding(y, 11, 35))
    assert not bool(param[:5].any()) and not bool(param[38:].any())
    # one loop over the elements: index, hash, masks, add and the bf16 store fused
    assert len(set(re.findall(r"cpp_fused\w+", "\n".join(code)))) == 1


@needs_a_compiler
def test_the_gpu_path_serves_every_shape_with_one_compiled_graph(monkeypatch):
    # stochastic_round_into as a GPU runs it (the compiled kernel), here on the CPU: a
    # matrix, a vector and a stack of matrices, each the bits of the definition, and
    # no recompilation per shape (start 0 and start > 0 may be two graphs).
    from torch._dynamo.utils import counters

    monkeypatch.setattr(kernels, "available", lambda device: True)
    counters.clear()
    for shape, start in [((7, 5), 3), ((40,), 0), ((2, 3, 4), 8), ((9, 6), 100)]:
        x = torch.randn(shape) * 1e-3
        out = torch.empty(shape, dtype=torch.bfloat16)
        stochastic_round_into(out, x.clone(), 21, start)
        assert same_bits(out, reference_rounding(x, 21, start)), shape
    assert counters["stats"]["unique_graphs"] <= 2

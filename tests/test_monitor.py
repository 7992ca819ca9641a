"""Meters: memory (process RSS on CPU), throughput arithmetic, MFU, byte formatting."""

from __future__ import annotations

import time

import pytest
import torch

from lomotune.monitor import MemoryMeter, Throughput, format_bytes, mfu, peak_flops_for

MB = 10**6
ALLOC = 200 * MB


def _allocate_and_free(seconds: float = 0.0) -> None:
    x = torch.ones(ALLOC // 4, dtype=torch.float32)  # ones: every page is touched
    time.sleep(seconds)
    del x


def test_cpu_meter_kind_and_readings():
    meter = MemoryMeter(torch.device("cpu"))
    assert meter.kind == "process RSS"
    current = meter.current_bytes()
    assert 10 * MB < current < 64 * 1024 * MB  # a Python process with torch loaded
    with open("/proc/self/status") as f:  # the kernel's own count, read independently
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert abs(current - rss) < 0.05 * rss
    assert meter.process_peak_bytes() >= meter.peak_bytes() * 0.9
    assert meter.reserved_bytes() is None
    assert set(meter.as_metrics()) == {"mem_current", "mem_peak", "mem_kind"}


def test_cpu_peak_rises_by_the_allocation_and_resets():
    meter = MemoryMeter("cpu")
    meter.reset_peak()
    base = meter.peak_bytes()
    x = torch.ones(ALLOC // 4)
    meter.sample()
    del x
    rise = meter.peak_bytes() - base
    assert 0.7 * ALLOC <= rise <= 1.3 * ALLOC, rise
    # freed (glibc returns a block this large to the kernel): current drops, peak stays
    assert meter.current_bytes() < base + 0.3 * ALLOC
    meter.reset_peak()
    assert meter.peak_bytes() - base < 0.3 * ALLOC


def test_background_sampler_sees_a_peak_nobody_sampled():
    meter = MemoryMeter("cpu", interval_s=0.01)
    with meter:
        meter.reset_peak()
        base = meter.peak_bytes()
        _allocate_and_free(seconds=0.15)  # no sample() while the tensor lives
        rise = meter.peak_bytes() - base
    assert meter._thread is None  # stopped by __exit__
    assert 0.7 * ALLOC <= rise <= 1.3 * ALLOC, rise


def test_throughput_arithmetic():
    tp = Throughput(window=2)
    assert tp.last is None and tp.smoothed is None and tp.overall is None
    tp.record(100, 0.5)
    tp.record(300, 0.5)
    tp.record(600, 1.0)
    assert tp.last == pytest.approx(600.0)
    assert tp.smoothed == pytest.approx((300 + 600) / 1.5)  # last two steps
    assert tp.overall == pytest.approx(1000 / 2.0)
    assert tp.per_device(4) == pytest.approx(125.0)
    assert (tp.steps, tp.total_tokens) == (3, 1000)
    with pytest.raises(ValueError, match="positive time"):
        tp.record(10, 0.0)


def test_mfu_none_on_cpu_and_unknown(monkeypatch):
    assert peak_flops_for("cpu") is None
    assert mfu(1000.0, 135_000_000, peak_flops_for("cpu")) is None
    assert mfu(None, 135_000_000, 989e12) is None
    assert mfu(10_000.0, 10**9, 989e12) == pytest.approx(6e13 / 989e12)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, expected in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops_for("cuda:0") == expected, name


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.00 KiB"
    assert format_bytes(1536 * 1024) == "1.50 MiB"
    assert format_bytes(int(1.23 * 1024**3)) == "1.23 GiB"
    assert format_bytes(3 * 1024**4) == "3.00 TiB"
    assert format_bytes(5 * 1024**5) == "5120.00 TiB"
    assert format_bytes(-2048) == "-2.00 KiB"
    assert format_bytes(1024**3, precision=1) == "1.0 GiB"

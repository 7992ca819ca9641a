"""Memory and throughput meters, and model FLOPs utilisation (MFU).

Every number here is measured, never assumed:
- memory on CUDA is the caching allocator's count of bytes held by tensors (its peak
  is exact: the allocator records it), plus what it has reserved from the driver;
- memory on CPU is the resident set size (RSS) of this process, read from
  /proc/self/statm. The kernel keeps only a lifetime peak (ru_maxrss) that cannot be
  reset, so the peak since `reset_peak()` is found by sampling: at every `sample()` and
  from a background thread every 20 ms, which sees the peak inside a backward pass.
  A sampled peak can miss a spike shorter than the interval: it is a lower bound.
- MFU uses the 6*N FLOPs-per-token rule and a table of published peak numbers; where the
  device is not in the table (or is a CPU) it is None, never a guess.

The meters are plain objects with no global state, so that a sharded run can later
reduce them across ranks (for example the max of `peak_bytes()` over processes).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections import deque

import torch

KIND_CUDA = "cuda allocator"
KIND_RSS = "process RSS"
# Only where /proc is missing and psutil is not installed (macOS, BSD): the resource
# module gives the lifetime peak alone, so "current" is that peak and the label says so.
KIND_RSS_LIFETIME = "process peak RSS (lifetime)"


def format_bytes(n: float, precision: int = 2) -> str:
    """1288490188 -> '1.20 GiB'. Binary units (KiB = 1024 B)."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.{precision}f} {unit}"
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------
# Memory


def _rss_from_proc() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """The lifetime peak RSS of this process (getrusage; cannot be reset)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def _current_rss_reader():
    """Pick how to read the current RSS once: /proc, else psutil, else None."""
    if _rss_from_proc() is not None:
        return _rss_from_proc
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    return lambda: int(process.memory_info().rss)


class MemoryMeter:
    """Current and peak memory of one device, as this process sees it.

    On CUDA: allocator counters (`torch.cuda.memory_allocated` and friends); `start()` and
    `stop()` do nothing because the allocator tracks its own peak.
    On CPU: process RSS; call `start()` to run the background sampler (or use the meter
    as a context manager), and `sample()` whenever a reading is wanted at a known point.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.02):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self._is_cuda = self.device.type == "cuda"
        self._read_rss = None if self._is_cuda else _current_rss_reader()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        if not self._is_cuda:
            self.reset_peak()

    @property
    def kind(self) -> str:
        """What the numbers are: 'cuda allocator', 'process RSS' (or the lifetime fallback)."""
        if self._is_cuda:
            return KIND_CUDA
        return KIND_RSS if self._read_rss is not None else KIND_RSS_LIFETIME

    # -- readings ---------------------------------------------------------------------

    def current_bytes(self) -> int:
        if self._is_cuda:
            return int(torch.cuda.memory_allocated(self.device))
        if self._read_rss is None:
            return _max_rss_bytes()
        return int(self._read_rss())

    def sample(self) -> int:
        """Read the current value and fold it into the peak; returns the current value."""
        current = self.current_bytes()
        if not self._is_cuda:
            with self._lock:
                self._peak = max(self._peak, current)
        return current

    def peak_bytes(self) -> int:
        """The high-water mark since the last `reset_peak()` (on CPU: sampled, so a bound
        from below; it includes a reading taken now)."""
        if self._is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        self.sample()
        with self._lock:
            return self._peak

    def reset_peak(self) -> None:
        if self._is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        current = self.current_bytes()
        with self._lock:
            self._peak = current

    def reserved_bytes(self) -> int | None:
        """Bytes the CUDA caching allocator holds from the driver; None on CPU."""
        if self._is_cuda:
            return int(torch.cuda.memory_reserved(self.device))
        return None

    def process_peak_bytes(self) -> int:
        """Lifetime peak RSS of the process (ru_maxrss): the kernel's own number."""
        return _max_rss_bytes()

    def as_metrics(self) -> dict:
        """The keys the dashboard and the metrics log expect."""
        return {
            "mem_current": self.current_bytes(),
            "mem_peak": self.peak_bytes(),
            "mem_kind": self.kind,
        }

    # -- background sampler (CPU only) ---------------------------------------------------

    def start(self) -> MemoryMeter:
        if self._is_cuda or self._read_rss is None or self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="lomotune-memory-sampler", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemoryMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# Throughput


class Throughput:
    """Tokens per second, from (tokens, seconds) recorded once per optimizer step.

    `smoothed` is total tokens over total seconds across the last `window` steps (a ratio
    of sums, so a fast short step does not count as much as a slow long one).
    """

    def __init__(self, window: int = 20):
        if window < 1:
            raise ValueError(f"Throughput window must be >= 1, got {window=}")
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self.steps = 0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"a step must take a positive time, got {seconds=}")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens=}")
        self._recent.append((int(tokens), float(seconds)))
        self.steps += 1
        self.total_tokens += int(tokens)
        self.total_seconds += float(seconds)

    @property
    def last(self) -> float | None:
        """Tokens/s of the last step."""
        if not self._recent:
            return None
        tokens, seconds = self._recent[-1]
        return tokens / seconds

    @property
    def smoothed(self) -> float | None:
        if not self._recent:
            return None
        return sum(t for t, _ in self._recent) / sum(s for _, s in self._recent)

    @property
    def overall(self) -> float | None:
        if self.steps == 0:
            return None
        return self.total_tokens / self.total_seconds

    def per_device(self, n_devices: int) -> float | None:
        """Tokens per device per second (TGS), over the whole run."""
        if n_devices < 1:
            raise ValueError(f"n_devices must be >= 1, got {n_devices=}")
        overall = self.overall
        return None if overall is None else overall / n_devices


# ---------------------------------------------------------------------------------------
# MFU

# Peak dense bf16 tensor-core FLOP/s (no sparsity), from NVIDIA's data sheets, matched
# against torch.cuda.get_device_name(). Order matters: the first match wins.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989e12),
    (("H100", "HBM3"), 989e12),  # H100 SXM5 reports "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989e12),
    (("H100", "PCIE"), 756e12),
    (("A100",), 312e12),  # SXM4 and PCIe alike
)


def peak_flops_for(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a known CUDA device; None for CPUs and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    for needles, flops in PEAK_BF16_FLOPS:
        if all(needle in name for needle in needles):
            return flops
    return None


def mfu(tokens_per_s: float | None, n_params: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

    Training costs ~6*N FLOPs per token (2N forward, 4N backward; Kaplan et al. 2020,
    PaLM appendix B). This excludes attention's seq-length term and the recomputation of
    activation checkpointing, so it is the conventional, slightly low, figure.
    `tokens_per_s` and `peak_flops` are per device. None where either is unknown.
    """
    if tokens_per_s is None or peak_flops is None or peak_flops <= 0:
        return None
    return 6 * n_params * tokens_per_s / peak_flops

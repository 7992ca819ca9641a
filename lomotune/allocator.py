"""The CPU allocator: give freed tensor memory back to the system.

glibc's malloc serves a large request with mmap and returns it on free, but each such
free raises its mmap threshold (up to 32 MiB), after which blocks of that size come from
the heap, which keeps them after they are freed. A training step allocates and frees
tensors of many sizes (loss chunks, layer recomputation, gradients), so the process
keeps the high-water mark of every size: measured on SmolLM2-135M fp32, batch 4 x 512,
LOMO's peak RSS was 2.22 GiB with the default and 1.43 GiB with a fixed 4 MiB threshold
(mezo: 1.06 GiB; BENCHMARKS.md). A fixed threshold (mallopt M_MMAP_THRESHOLD) also
stops the dynamic adjustment of the trim threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20  # tensors of 4 MiB or more are mapped, and unmapped on free


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))

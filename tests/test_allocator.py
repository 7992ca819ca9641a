"""On glibc, freed tensor memory goes back to the system once `return_freed_memory` has
fixed the mmap threshold; by default the heap keeps it (measured in fresh processes)."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from lomotune.allocator import return_freed_memory
from lomotune.monitor import _rss_from_proc
if sys.argv[1] == "fixed":
    assert return_freed_memory()
# A step-like pattern: tensors of a few sizes, each freed before a slightly larger one.
for size in range(5, 45):
    t = torch.ones(size << 18)  # 5 to 44 MiB of fp32
    del t
kept = [torch.ones(1 << 16) for _ in range(64)]  # small tensors stay live on the heap
base = _rss_from_proc()
for size in range(5, 30):
    t = torch.ones(size << 18)
    u = torch.ones((size + 1) << 18)
    del t, u
print((_rss_from_proc() - base) >> 20)
"""


def grown_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_tensors_are_returned_with_the_fixed_threshold():
    assert grown_mib("fixed") < 8
    assert grown_mib("default") > 20  # the measurement can see what it guards against

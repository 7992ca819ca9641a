"""The update kernels' Triton source (what inductor writes for a CUDA GPU), run by Triton's
interpreter on the CPU, against the eager ops' bits: tests/triton_kernels_on_cpu.py, in a
process of its own (the interpreter, the stand-in driver and the shim are process-wide).

Needs the `triton` wheel (`pip install triton`: some 290 MB, so not in the dev extra);
skipped without it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)"
)


def test_the_triton_source_of_every_update_kernel_gives_the_eager_bits(tmp_path):
    script = Path(__file__).with_name("triton_kernels_on_cpu.py")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
    )
    lines = run.stdout.splitlines()
    checks = [line for line in lines if line.startswith(("ok", "FAIL"))]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    # rounding at two keys and offsets; LOMO and AdaLomo (with and without weight decay),
    # bf16 and fp32, float and tensor factors, a shard's offset, matrix and vector
    assert len(checks) == 20 and all(line.startswith("ok") for line in checks), run.stdout
    # a NaN stays a NaN; its bits differ (the eager ops' fp32 -> bf16 conversion on the
    # CPU writes 0xffff, the Triton code the canonical 0x7fc0)
    assert "NaN where a NaN went in: True" in run.stdout
    assert "Triton source: True" in run.stdout

"""Which floating-point precision to train in: `model.precision: auto` asks the hardware.

bf16 halves the bytes of weights and activations, but it is only faster where the
hardware computes in bf16. On a CPU without native bf16 instructions torch emulates it:
measured on a 2-core AMD EPYC Zen 3 (AVX2 only), the quickstart took 55 s a step in bf16
against 3.6 s in fp32. So `auto` picks:

- a CUDA GPU that supports bf16 (Ampere and newer): bf16;
- a CPU with native bf16 arithmetic (AVX512_BF16 or AMX on x86, the BF16 extension on
  Arm), as torch will actually use it: bf16;
- anything else: fp32.

fp16 is never picked by `auto`: it needs loss scaling, and bf16 or fp32 is always there.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16" | "fp16" | "fp32"
    reason: str  # one line for the start of a run
    warning: str | None = None  # an explicit choice that will run slowly here


def resolve_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """`requested` (auto | bf16 | fp16 | fp32) on `device` -> the precision to use."""
    if device.type == "cuda":
        native, why = cuda_bf16(device)
    else:
        native, why = cpu_bf16()
    if requested == "auto":
        precision = "bf16" if native else "fp32"
        return PrecisionChoice(precision, f"precision auto -> {precision}: {why}")
    warning = None
    if requested == "bf16" and not native:
        fast = "fp32" if device.type == "cpu" else "fp16 or fp32"
        warning = (
            f"model.precision is bf16, but {why}: bf16 is emulated here and runs many times "
            f"slower (55 s against 3.6 s a step was measured on such a CPU). Set "
            f"model.precision: auto (or {fast}) unless you need bf16 weights"
        )
    return PrecisionChoice(requested, f"precision {requested} (set in the recipe)", warning)


def cuda_bf16(device: torch.device) -> tuple[bool, str]:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"{name} computes in bf16"
    return False, f"{name} has no native bf16"


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 arithmetic, the reason in words) for this CPU as torch uses it."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        if arm_has_bf16():
            return True, "this Arm CPU has the BF16 extension"
        return False, "this Arm CPU has no BF16 extension"
    if machine not in ("x86_64", "amd64", "x86", "i686"):
        return False, f"bf16 support on {machine} CPUs is not known to lomotune"
    has_avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    has_amx = torch.cpu._is_amx_tile_supported()
    if not (has_avx512_bf16 or has_amx):
        level = torch.backends.cpu.get_cpu_capability()
        return False, f"this CPU ({level}) has no AVX512_BF16 or AMX instructions"
    # The instructions exist, but torch may be told not to use them: ATEN_CPU_CAPABILITY
    # limits torch's own kernels (get_cpu_capability reflects it), ONEDNN_MAX_CPU_ISA the
    # matrix multiplications. Either one below AVX-512 makes bf16 emulated again.
    level = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    onednn_limited = onednn and not (
        onednn == "ALL" or "BF16" in onednn or "AMX" in onednn or "AVX10" in onednn
    )
    if not level.startswith("AVX512") or onednn_limited:
        limit = f"ONEDNN_MAX_CPU_ISA={onednn}" if onednn_limited else f"torch runs at {level}"
        return False, f"this CPU has bf16 instructions but {limit}"
    what = "AMX" if has_amx else "AVX512_BF16"
    return True, f"this CPU computes in bf16 ({what})"


def arm_has_bf16() -> bool:
    if platform.system() == "Darwin":
        done = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True
        )
        return done.stdout.strip() == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(
                line.startswith("Features") and "bf16" in line.split(":", 1)[1].split()
                for line in f
            )
    except OSError:
        return False


def under_autocast(loss_fn, precision: str, device_type: str):
    """`loss_fn` with its forward under autocast to `precision` (bf16 or fp16): the mixed
    precision of methods that keep fp32 master weights (the HF Trainer's `bf16=True`).
    Matmuls run in the low precision; weights, their gradients and the optimizer state
    stay fp32, so an update smaller than bf16's spacing still lands. Backward runs outside
    the context, as torch.autocast asks."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def loss_under_autocast(batch):
        with torch.autocast(device_type, dtype=dtype):
            return loss_fn(batch)

    return loss_under_autocast

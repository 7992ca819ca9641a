"""`model.precision: auto` follows what the hardware computes in natively."""

import pytest
import torch

import lomotune.precision as precision
from lomotune.precision import resolve_precision

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, *, bf16: bool, amx: bool = False, level: str = "AVX512", arch="x86_64"):
    monkeypatch.setattr(precision.platform, "machine", lambda: arch)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the machine's own setting


def test_avx2_only_cpu_gets_fp32(monkeypatch):
    fake_cpu(monkeypatch, bf16=False, level="AVX2")
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "fp32" and choice.warning is None
    assert "AVX2" in choice.reason and "no AVX512_BF16 or AMX" in choice.reason


@pytest.mark.parametrize("amx", [False, True])
def test_native_bf16_cpu_gets_bf16(monkeypatch, amx):
    fake_cpu(monkeypatch, bf16=not amx, amx=amx)
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "bf16" and ("AMX" if amx else "AVX512_BF16") in choice.reason


def test_bf16_instructions_that_torch_is_told_not_to_use_count_as_none(monkeypatch):
    fake_cpu(monkeypatch, bf16=True, level="AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert resolve_precision("auto", CPU).precision == "fp32"
    fake_cpu(monkeypatch, bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto", CPU).precision == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert resolve_precision("auto", CPU).precision == "bf16"


def test_arm_asks_for_the_bf16_extension(monkeypatch):
    fake_cpu(monkeypatch, bf16=False, arch="aarch64")
    monkeypatch.setattr(precision, "arm_has_bf16", lambda: True)
    assert resolve_precision("auto", CPU).precision == "bf16"
    monkeypatch.setattr(precision, "arm_has_bf16", lambda: False)
    assert resolve_precision("auto", CPU).precision == "fp32"


def test_explicit_choices_are_kept_and_slow_bf16_warned(monkeypatch):
    fake_cpu(monkeypatch, bf16=False, level="AVX2")
    for p in ("fp32", "fp16"):
        assert resolve_precision(p, CPU) == precision.PrecisionChoice(
            p, f"precision {p} (set in the recipe)"
        )
    slow = resolve_precision("bf16", CPU)
    assert slow.precision == "bf16" and "emulated" in slow.warning
    assert "model.precision: auto (or fp32)" in slow.warning


def test_auto_never_picks_fp16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    assert resolve_precision("auto", torch.device("cuda")).precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    assert resolve_precision("auto", torch.device("cuda")).precision == "bf16"

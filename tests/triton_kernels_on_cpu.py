"""The update kernels' Triton source, as inductor generates it for a CUDA GPU, run by
Triton's interpreter on the CPU (DESIGN.md, "The GPU path, checked without a GPU"), and
compared bit for bit with the eager ops: `python tests/triton_kernels_on_cpu.py` prints
one line per check and exits 1 when any differs.

What makes it run without a GPU: TRITON_INTERPRET=1 (set before triton is imported);
inductor's CPU backend set to "triton"; a stand-in active driver whose target is an H100
(GPUTarget("cuda", 90, 32)), so inductor writes the code it writes for one; and a shim
for the two libdevice calls the interpreter lacks (`isnan`, `fma`: the interpreter's own
`tl.fma` rounds once, as the GPU's does). It checks bits, not PTX or speed."""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402
from triton.runtime import driver  # noqa: E402

from lomotune.optim import kernels  # noqa: E402
from lomotune.optim.adalomo import AdaLomoRule  # noqa: E402
from lomotune.optim.engine import _update_check  # noqa: E402
from lomotune.optim.lomo import LomoRule  # noqa: E402
from lomotune.optim.rounding import as_int64, round_elementwise_into, stochastic_round_into  # noqa: E402


class StandInH100(DriverBase):
    """The active driver inductor asks for its target; the tensors stay on the CPU."""

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self):
        raise NotImplementedError


def rounding_at(key: int, start: int, nan: bool = False):
    """The rounding kernel alone, at a key and an element offset (a shard's)."""

    def check(device: torch.device) -> list[torch.Tensor]:
        x = torch.linspace(-3.0, 3.0, 999, device=device) * 1e-3
        x[::7] *= 1e30  # some beyond bf16's largest finite value
        if nan:
            x[::5] = float("nan")
        out = torch.empty(999, dtype=torch.bfloat16, device=device)
        if kernels.available(device):  # `probe` runs this compiled, then eagerly
            kernels.compiled(round_elementwise_into)(out, x, as_int64(key), start)
        else:
            stochastic_round_into(out, x, key, start)
        return [out]

    return check


def main() -> int:
    driver.set_active(StandInH100())
    torch._inductor.config.cpu_backend = "triton"
    libdevice.isnan = lambda x: x != x
    libdevice.fma = lambda a, b, c: tl.fma(a, b, c)
    checks = {
        "rounding, key 2^64-1 from element 0": rounding_at(2**64 - 1, 0),
        "rounding, key 2^63 from element 2^40+3": rounding_at(2**63, 2**40 + 3),
    }
    for rule in (LomoRule(weight_decay=0.1), AdaLomoRule(weight_decay=0.1), AdaLomoRule()):
        for dtype, per_tensor, start in (
            (torch.bfloat16, False, 0),
            (torch.bfloat16, True, 2**33 + 5),
            (torch.float32, True, 0),
        ):
            for shape in ((6, 40), (40,)):
                name = (
                    f"{type(rule).__name__}(weight_decay={rule.weight_decay}) {dtype} {shape} "
                    f"{'tensor' if per_tensor else 'float'} factor, offset {start}"
                )
                rounding = dtype == torch.bfloat16
                checks[name] = _update_check(rule, dtype, shape, start, per_tensor, rounding)
    failed = 0
    for name, check in checks.items():
        torch._dynamo.reset()  # each variant a kernel of its own: no recompile limit
        kernels._compiled.clear()
        why = kernels.probe(torch.device("cpu"), {name: check})
        print(f"{'ok  ' if why is None else 'FAIL'} {name}{'' if why is None else ': ' + why}")
        failed += why is not None
    # NaN: the eager ops and the interpreted kernel both give a NaN, not the same bits
    kernels._forced = False
    (eager,) = rounding_at(7, 0, nan=True)(torch.device("cpu"))
    kernels._forced = True
    (interpreted,) = rounding_at(7, 0, nan=True)(torch.device("cpu"))
    kernels._forced = None
    bits = [f"{int(t.view(torch.int16)[0]) & 0xFFFF:#06x}" for t in (eager, interpreted)]
    same = torch.equal(eager.isnan(), interpreted.isnan())
    print(f"NaN where a NaN went in: {same}; a NaN's bits eager {bits[0]}, interpreted {bits[1]}")
    # the interpreted code is Triton's (what inductor writes for the GPU)
    from torch._inductor.utils import run_and_get_code

    out = torch.empty(8, dtype=torch.bfloat16)
    _, code = run_and_get_code(
        kernels.compiled(round_elementwise_into), out, torch.ones(8), as_int64(3), 0
    )
    triton_source = "@triton.jit" in "\n".join(code)
    print(f"Triton source: {triton_source}")
    return 1 if failed or not same or not triton_source else 0


if __name__ == "__main__":
    sys.exit(main())

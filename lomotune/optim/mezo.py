"""MeZO (arXiv 2305.17333): zeroth-order SGD with forward passes only, in place.

One step, as Algorithm 1 of the paper (and `zo_step` / `zo_update` of its code,
princeton-nlp/MeZO large_models/trainer.py):

    draw a seed s
    theta += eps z(s);     l+ = L(theta + eps z)
    theta -= 2 eps z(s);   l- = L(theta - eps z)
    g = (l+ - l-) / (2 eps)                               the projected gradient
    theta += eps z(s)                                     restore, and in the same pass
    theta -= lr (g z(s) + wd theta)                       no decay on biases and norms

The paper draws z four times a step; restoring and updating in one pass over the
parameters draws it three times (z is the costliest part of a MeZO step after the two
forwards).

z ~ N(0, 1) has the shape and dtype of each parameter and is never stored: it is drawn
again from the seed whenever it is needed, one parameter at a time, from a counter-based
stream keyed by (step seed, parameter index): element k is Box-Muller on the 64-bit
splitmix64 hash of k (the hash of the rounding noise, rounding.hash64_at). The integer
part is exact on every device, and the float part is one sqrt, log and cos per element
in fp32, so z is the same stream to fp32 rounding on every device, where `torch.randn`'s
values depend on the device's launch configuration (and differ between CPU and GPU).
Where torch.compile builds it (prepare_kernels; a CPU too), one kernel draws a
parameter's z; elsewhere the eager ops do, a chunk of Z_CHUNK elements at a time. So the
memory is that of inference plus one parameter-sized temporary (z, and the eager hash's
scratch), never at the same time as the activations, and everything runs under
`torch.no_grad` (no graph, no `.grad`).

Options:
- n-SPSA (`directions` = n): n seeds per step, each with its own l+, l- at the same
  theta; the update uses the mean of g_i z_i (the paper's n-SPSA estimate; the MeZO
  code's medium-model trainer divides each g_i by n and sums).
- several micro-batches per step: l+ and l- are the token-weighted mean losses over all
  of them, with the same z: exactly one step on the concatenated batch.
- only `requires_grad` parameters are perturbed and updated (LoRA adapters, say).

Step seeds are a pure function of (seed, step number), so a resume is exact with the
step count alone.

The restore is exact in real arithmetic only. Each in-place add rounds, and
x -> x + eps z is many-to-one in floating point, so no in-place scheme can undo it
bitwise without storing something: (theta + eps z) - 2 eps z + eps z ends one or two
units in the last place away from theta for about half the elements (measured on the
tiny Llama, fp32 and bf16), as in the MeZO code. In fp32 this is ~1e-7 relative, far
below any update; in bf16 it is ~4e-3 relative, a random walk larger than a typical
lr * g * z, so MeZO wants fp32 weights.
"""

from __future__ import annotations

import math
import warnings

import torch

from lomotune.optim import kernels
from lomotune.optim.engine import Batch, LossFn, StepResult, count_tokens, timed_update
from lomotune.optim.rounding import as_int64, hash64_at
from lomotune.optim.seeds import mix64

# Elements of z drawn at a time: the hash's int64 and fp32 temporaries (at most
# Z_SCRATCH_BYTES an element, counted by MemTracker under `estimate --simulate`) stay at
# 128 MB however large the parameter, in about 15 kernels per chunk on a GPU.
Z_CHUNK = 1 << 22
Z_SCRATCH_BYTES = 32
# Streams on which prepare_kernels compares the compiled z with the eager ops (the
# largest key: the hash's 64-bit wrap-around is what a backend would get wrong).
_Z_PROBE_KEYS = (2**64 - 1, 12345)


def no_weight_decay(name: str) -> bool:
    """Biases and norm weights are not decayed. The MeZO code tests for "bias",
    "layer_norm" and "layernorm", which misses Llama's final `model.norm.weight` (and
    q_norm / k_norm of newer models): any name containing "norm" is excluded here."""
    return "bias" in name or "norm" in name


class MezoEngine:
    """Steps `model` with MeZO; the same surface as `FusedEngine`."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        eps: float = 1e-3,
        directions: int = 1,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        if eps <= 0:
            raise ValueError(f"MeZO needs a positive perturbation size; got {eps=}")
        if directions < 1:
            raise ValueError(f"MeZO needs at least one direction per step; got {directions=}")
        self.model = model
        self.loss_fn = loss_fn
        self.eps = eps
        self.directions = directions
        self.weight_decay = weight_decay
        self.seed = seed
        self.step_count = 0  # steps taken, skipped ones included: no seed is used twice
        self.update_seconds: float | None = None  # see engine.Engine
        # Trainable parameters, each once (tied weights appear once in named_parameters).
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("MeZO found no trainable parameter (requires_grad) in the model")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = [not no_weight_decay(n) for n in self.names]
        # Why z is drawn by the eager ops and not one compiled kernel (prepare_kernels);
        # an engine never prepared draws it eagerly.
        self.why_eager_z: str | None = "the z kernel was not built before training"

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, batches: list[Batch], lr: float) -> StepResult:
        if not batches:
            raise ValueError("a MeZO step needs at least one micro-batch")
        self.step_count += 1
        seeds = [self.direction_seed(self.step_count, d) for d in range(self.directions)]
        was_training = self.model.training
        self.model.eval()  # no dropout: l+ and l- must see the same function
        try:
            plus, minus, n = self._evaluate(seeds, batches)
        finally:
            self.model.train(was_training)

        # The MeZO trainer logs l+, the loss at theta + eps z: so do we (mean over directions).
        result = StepResult(
            loss=sum(plus) / len(plus),
            tokens=sum(count_tokens(b) for b in batches),
            loss_tokens=n,
        )
        if len(minus) < len(seeds) or not all(map(math.isfinite, plus + minus)):
            result.skipped = "non-finite loss"
            return result
        projected = [(lp - lm) / (2 * self.eps) for lp, lm in zip(plus, minus, strict=True)]
        timed_update(self, self.params[0].device, self._update, seeds, projected, lr)
        return result

    def _evaluate(
        self, seeds: list[int], batches: list[Batch]
    ) -> tuple[list[float], list[float], int]:
        """l+ and l- for each direction. Theta is restored after each direction but the
        last, which is left at theta - eps z: the update merges its restore (one draw of
        z fewer). Stops at the first non-finite loss, theta fully restored (fewer l- than
        seeds)."""
        plus: list[float] = []
        minus: list[float] = []
        n = 0
        for i, seed in enumerate(seeds):
            self._perturb(seed, self.eps)
            lp, n = self._loss(batches)
            plus.append(lp)
            if not math.isfinite(lp):
                self._perturb(seed, -self.eps)
                break
            self._perturb(seed, -2 * self.eps)
            lm, _ = self._loss(batches)
            minus.append(lm)
            if not math.isfinite(lm) or i < len(seeds) - 1:
                self._perturb(seed, self.eps)
            if not math.isfinite(lm):
                break
        return plus, minus, n

    def _loss(self, batches: list[Batch]) -> tuple[float, int]:
        """Mean loss per label token over all micro-batches (token-weighted)."""
        total, n = 0.0, 0
        for batch in batches:
            loss_sum, k = self.loss_fn(batch)
            total += float(loss_sum)
            n += k
        return total / max(n, 1), n

    @torch.no_grad()
    def _perturb(self, seed: int, scale: float) -> None:
        # theta <- theta + scale * z, one parameter at a time.
        for index, p in enumerate(self.params):
            z = self._z(p, seed, index)
            p.add_(z.mul_(scale))
            del z

    @torch.no_grad()
    def _update(self, seeds: list[int], projected: list[float], lr: float) -> None:
        # theta <- theta - lr * (mean_i(g_i z_i) + wd * theta), in the parameter's dtype,
        # merged with the last direction's restore (theta is at theta - eps z_last), one
        # z at a time: the paper's 4 draws of z a step become 3, and n directions need
        # no sum buffer.
        n = len(seeds)
        for index, p in enumerate(self.params):
            z = self._z(p, seeds[-1], index).mul_(self.eps)
            p.add_(z)  # the restore, exactly as the paper's third perturbation
            if self.weight_decay and self.decay[index]:
                p.mul_(1.0 - lr * self.weight_decay)  # wd * theta at the restored theta
            p.add_(z, alpha=-lr * projected[-1] / (n * self.eps))
            del z
            for seed, g in zip(seeds[:-1], projected[:-1], strict=True):
                p.add_(self._z(p, seed, index), alpha=-lr * g / n)

    # -- randomness --------------------------------------------------------------------

    def direction_seed(self, step: int, direction: int) -> int:
        """The seed of one direction of one step (1-based step): a pure function of
        (engine seed, step, direction)."""
        return mix64(self.seed, step, direction)

    def _z(self, param: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        key = mix64(seed, index)
        if self.why_eager_z is None:
            out = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            try:
                kernels.compiled(normal_into)(out.view(-1), as_int64(key), 0)
                return out
            except Exception as e:  # the eager ops draw the same z
                self.why_eager_z = f"the compiled z kernel failed ({e.__class__.__name__})"
                warnings.warn(f"{self.why_eager_z}; eager ops from now on", RuntimeWarning,
                              stacklevel=2)  # fmt: skip
        return standard_normal(key, param.shape, param.dtype, param.device)

    def prepare_kernels(self) -> str | None:
        """Build z's compiled kernel for this run's device and dtypes and check it against
        the eager ops on the CPU, before training: None when the steps will call it, else
        why not (they draw z with the eager ops, some 15 passes over memory an element
        where the kernel makes one: 14.6 s against 1.0 s for 135M elements on a 2-core
        AVX2 CPU, BENCHMARKS.md). Unlike the fused updates this compiles on a CPU too
        (inductor's C++ backend; a C++ compiler needed), because z is most of a MeZO step
        there. The two agree to fp32 rounding, not bit for bit (their log and cos round
        differently in the last place, ~1e-6): a run keeps the path it started with, and
        train.py makes the processes of a run take the same one."""
        device = self.params[0].device
        try:
            for dtype in {p.dtype for p in self.params}:
                for key in _Z_PROBE_KEYS:
                    got = torch.empty(4096, dtype=dtype, device=device)
                    kernels.compiled(normal_into)(got, as_int64(key), 0)
                    want = standard_normal(key, got.shape, torch.float32, torch.device("cpu"))
                    # A wrong integer hash gives unrelated values, not last-place ones.
                    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                    if not torch.allclose(got.cpu().float(), want, rtol=tolerance, atol=1e-6):
                        self.why_eager_z = "the compiled z kernel disagreed with the eager ops"
                        return self.why_eager_z
        except Exception as e:  # no compiler, no Triton, a backend error: eager z
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.why_eager_z = f"torch.compile could not build the z kernel ({first})"
            return self.why_eager_z
        self.why_eager_z = None
        return None

    # -- state -------------------------------------------------------------------------

    def state_dict(self, gather: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """No tensors: z is drawn again from (seed, step), so the step count is all."""
        return {}, {"step_count": self.step_count}

    def state_template(
        self, saved: dict[str, tuple[torch.Size, torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.step_count = int(meta["step_count"])

    def close(self) -> None:
        pass  # no hooks to remove


def standard_normal(
    key: int, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """N(0, 1) values of stream `key`, element k a pure function of (key, k) on every
    device: the 64-bit hash of k gives two 24-bit uniforms u1 in (0, 1], u2 in [0, 1),
    and z = sqrt(-2 ln u1) cos(2 pi u2) (Box-Muller), in fp32, then cast to `dtype`.
    Eager ops, a chunk of Z_CHUNK elements at a time (see normal_into for one kernel)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    key = as_int64(key)
    for start in range(0, flat.numel(), Z_CHUNK):
        n = min(Z_CHUNK, flat.numel() - start)
        flat[start : start + n] = normal_elementwise(
            key, torch.arange(start, start + n, device=device)
        )
    return out


def normal_elementwise(key: int, index: torch.Tensor) -> torch.Tensor:
    """z at each int64 `index` of stream `key` (as_int64), in fp32: an elementwise
    function of the index, which torch.compile makes one kernel of (normal_into)."""
    bits = hash64_at(key, index)
    del index  # the caller passes it inline: freed here, the eager draw's scratch stays
    # Z_SCRATCH_BYTES an element (in place, the int64 bits freed first)
    u1 = ((bits >> 40) & 0xFFFFFF).add_(1).to(torch.float32).mul_(2.0**-24)
    u2 = ((bits >> 16) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24 * 2 * math.pi)
    del bits
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.cos_())


def normal_into(out: torch.Tensor, key: int, start: int) -> None:
    """out (flat) <- z at elements start .. of stream `key`, cast to out's dtype: compiled,
    one pass that writes out and allocates nothing."""
    index = torch.arange(start, start + out.numel(), device=out.device)
    out.copy_(normal_elementwise(key, index))

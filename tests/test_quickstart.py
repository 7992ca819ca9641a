"""The real SmolLM2-135M-Instruct (fetched once from PyPI into the user cache)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lomotune.cli import app
from lomotune.loss import causal_lm_loss
from lomotune.models import load_model
from lomotune.optim.engine import FusedEngine
from lomotune.optim.lomo import LomoRule
from lomotune.recipe import ClipConfig, ModelConfig

pytestmark = pytest.mark.slow
QUICKSTART = str(Path(__file__).parents[1] / "lomotune" / "recipes" / "quickstart.yaml")


def test_quickstart_learns_the_date_task(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(
        app,
        [
            "train",
            QUICKSTART,
            f"training.output_dir={out}",
            "training.max_steps=30",
            "training.generate_eval_examples=20",
            "--plain",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"] <= 0.1  # the base model cannot do it
    assert summary["accuracy_after"] >= 0.4  # 30 LOMO steps teach it
    assert "held-out exact match after training" in result.output


def test_bf16_lr_1e5_moves_smollm2_only_with_stochastic_rounding():
    """DESIGN.md: pure bf16 SGD at lr 1e-5 on SmolLM2 does not move. Measured as the
    share of the exact (fp32) update -lr * grad that lands in the weights, each element
    counted in units of its bf16 spacing: sum(applied * sign(exact) / spacing) over
    sum(|exact| / spacing). Stochastic rounding flips an element with probability
    |exact| / spacing, so this is 1 in expectation with a relative noise of
    1 / sqrt(expected flips) (~0.2% here); round-to-nearest gives about 0."""
    loaded = load_model(ModelConfig(name="smollm2-135m", precision="bf16"), torch.device("cpu"))
    model, tok = loaded.model, loaded.tokenizer
    enc = tok(
        ["Rewrite the date 2021-03-14 in the form DD/MM/YYYY.\nAnswer: 14/03/2021"] * 2,
        return_tensors="pt",
    )
    batch = {**enc, "labels": enc["input_ids"].clone()}
    start = {name: p.detach().float() for name, p in model.named_parameters()}

    class RecordingLomo(LomoRule):
        """LOMO that also keeps the exact fp32 update of the very gradient it applies:
        the expectation does not depend on how this CPU's bf16 backward rounds (an
        emulated bf16 backward differs from run to run)."""

        def __init__(self):
            super().__init__()
            self.exact = {}

        def apply(self, update, state, lr, step, ok):
            grad = update.grad.float() * update.factor  # the whole gradient, as applied
            self.exact[id(state)] = (-lr * grad).view(update.shape)
            super().apply(update, state, lr, step, ok)

    def share_applied(rounding: bool) -> float:
        m = copy.deepcopy(model)
        rule = RecordingLomo()
        engine = FusedEngine(
            m,
            rule,
            lambda b: causal_lm_loss(m, b, 256),
            clip=ClipConfig(),
            stochastic_rounding=rounding,
        )
        engine.step([batch], lr=1e-5)
        exact = {n: rule.exact[id(st)] for n, st in zip(engine.names, engine.states, strict=True)}
        num = den = 0.0
        with torch.no_grad():
            for name, p in m.named_parameters():
                before = start[name]
                keep = before != 0  # a zero weight has no bf16 spacing to speak of
                spacing = (before.abs().log2().floor() - 7).exp2()  # bf16: 8 significant bits
                applied = p.float() - before
                num += float((applied * exact[name].sign() / spacing)[keep].sum())
                den += float((exact[name].abs() / spacing)[keep].sum())
        return num / den

    share = {False: share_applied(False), True: share_applied(True)}
    print("share of the exact update applied:", share)
    assert abs(share[False]) < 0.2, share  # round-to-nearest: 90% of the update is lost
    # Stochastic: all of it, on average. Measured 1.01 on a CPU with AVX-512 BF16 and 0.948
    # (deterministic) with bf16 emulated (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2);
    # the 5% there is not explained yet (the noise is uniform on both), so the bound is
    # what both share: nearly all of the update, against a tenth at most without.
    assert share[True] == pytest.approx(1.0, abs=0.08), share

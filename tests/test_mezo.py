"""MeZO against the MeZO repository's trainer, written here from its code
(princeton-nlp/MeZO, large_models/trainer.py: `zo_perturb_parameters`, `zo_step`,
`zo_update`): torch.manual_seed(seed), then torch.normal per trainable parameter in
order; the loss is the model's own forward(labels=...). Both sides are fed the same z:
the engine's per-parameter generators are swapped for the repository's stream (the
engine's own draws are checked separately). Plus n-SPSA, accumulation, partial training,
skipping, resume and peak memory."""

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from lomotune.loss import causal_lm_loss
from lomotune.optim.mezo import MezoEngine
from lomotune.optim.seeds import mix64
from lomotune.testing import random_batches, tiny_llama

EPS = 1e-3
LR = 1e-2
SEED = 7


make_batches = random_batches


def make_engine(model, **kw):
    kw = {"eps": EPS, "seed": SEED, **kw}
    return MezoEngine(model, lambda b: causal_lm_loss(model, b, 7), **kw)


def run(model, batches, lr=LR, **kw):
    engine = make_engine(model, **kw)
    results = [engine.step([b], lr) for b in batches]
    engine.close()
    return results


# -- the reference: the MeZO repository's trainer ---------------------------------------


def repo_z(params, seed):
    """zo_perturb_parameters' draws: one global stream seeded once, parameters in order."""
    torch.manual_seed(seed)
    return [torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype) for p in params]


@pytest.fixture(autouse=True)
def engine_draws_the_repo_z(monkeypatch):
    """The engine draws z per parameter from its own generators; here it takes the
    repository's stream instead, so that both sides see the same z."""
    cache = {}

    def z(self, param, seed, index):
        if seed not in cache:
            cache[seed] = repo_z(self.params, seed)
        return cache[seed][index].clone()

    monkeypatch.setattr(MezoEngine, "_z", z)


def repo_step(model, batch, seed, lr, eps=EPS, weight_decay=0.0):
    """zo_step + zo_update: perturb +1, l1, perturb -2, l2, perturb +1, then
    theta <- theta - lr (g z + wd theta), biases and layer norms not decayed. Returns l1."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zs = repo_z([p for _, p in named], seed)

    def perturb(scaling_factor):
        for (_, p), z in zip(named, zs, strict=True):
            p.data = p.data + scaling_factor * z * eps

    def loss():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss  # fmt: skip

    with torch.no_grad():
        perturb(1)
        loss1 = loss()
        perturb(-2)
        loss2 = loss()
        projected_grad = ((loss1 - loss2) / (2 * eps)).item()
        perturb(1)
        for (name, p), z in zip(named, zs, strict=True):
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)
            else:
                p.data = p.data - lr * (projected_grad * z)
    return float(loss1)


def tiny_opt():
    """MeZO's own family: biases everywhere and layer norms named *layer_norm*, so the
    repository's no-decay rule and lomotune's agree."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
        dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


def seed_of(step, direction=0):
    return mix64(SEED, step, direction)


def assert_equal_models(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max diff {float((p - q).abs().max())}"


def max_diff(a, b) -> float:
    with torch.no_grad():
        return max(
            float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_mezo_equals_the_repository_trainer_step_for_step(weight_decay):
    model = tiny_opt()
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    batches = make_batches(3)
    results = run(model, batches, weight_decay=weight_decay)
    for step, (b, r) in enumerate(zip(batches, results, strict=True), start=1):
        loss1 = repo_step(ref, b, seed_of(step), LR, weight_decay=weight_decay)
        assert r.loss == pytest.approx(loss1, rel=1e-5)  # both log l+ (theta + eps z)
        assert r.skipped is None and r.loss_tokens == int((b["labels"][:, 1:] != -100).sum())
    # Equal up to fp32 rounding of the loss (the repository's projected gradient is
    # fp32, and 1 / (2 eps) = 500 amplifies its last bits): measured 4e-5 against a
    # movement of 0.095. A wrong sign, decay rule or z would be of the movement's size.
    moved = max_diff(model, start)
    assert moved > 0.05 and max_diff(model, ref) < 1e-3 * moved
    decayed = [n for n, _ in model.named_parameters() if "bias" in n or "norm" in n]
    assert decayed  # the no-decay rule is exercised


def test_the_engines_own_z_is_standard_normal_per_parameter(monkeypatch):
    monkeypatch.undo()  # the engine's own generators, not the repository's stream
    model = tiny_llama()
    engine = make_engine(model)
    p = engine.params[0]
    a, b = engine._z(p, 11, 0), engine._z(p, 11, 0)
    assert torch.equal(a, b)  # a pure function of (seed, parameter index)
    assert not torch.equal(a, engine._z(p, 11, 1)) and not torch.equal(a, engine._z(p, 12, 0))
    big = engine._z(torch.empty(200_000), 3, 0)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01


def test_weight_decay_spares_biases_and_norms():
    model = tiny_llama()
    no_decay = copy.deepcopy(model)
    run(model, make_batches(1), weight_decay=0.5)
    run(no_decay, make_batches(1), weight_decay=0.0)
    for (name, p), q in zip(model.named_parameters(), no_decay.parameters(), strict=True):
        assert torch.equal(p, q) == ("norm" in name), name  # incl. the final model.norm


def test_lr_zero_restores_the_weights_to_rounding():
    """In exact arithmetic theta + eps z - 2 eps z + eps z = theta. In fp32 each in-place
    add rounds, so a few elements end one or two units in the last place away: the
    paper's in-place algorithm (and the MeZO code) cannot restore bitwise without a copy
    of the weights. What we can check: nothing but rounding is left, and it is exactly
    the rounding of the paper's three perturbations."""
    model = tiny_llama()
    start = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    run(model, make_batches(2), lr=0.0)
    for step, b in enumerate(make_batches(2), start=1):
        repo_step(ref, b, seed_of(step), lr=0.0)
    assert_equal_models(model, ref)
    for (name, p), q in zip(model.named_parameters(), start.parameters(), strict=True):
        # ulp-sized: 2**-23 relative to the largest value the element took (|p| + 2 eps |z|)
        bound = 4 * 2.0**-23 * (q.abs() + 10 * EPS)
        assert bool(((p - q).abs() <= bound).all()), name
    assert max_diff(model, start) < 1e-6  # eps z itself is ~1e-3


def test_n_spsa_is_the_average_of_single_direction_updates():
    start = tiny_opt()
    batch = make_batches(1)[0]
    two = copy.deepcopy(start)
    run(two, [batch], directions=2, weight_decay=0.1)
    singles = []
    for direction in range(2):
        m = copy.deepcopy(start)
        repo_step(m, batch, seed_of(1, direction), LR, weight_decay=0.1)
        singles.append(m)
    diffs, moved = [], []
    params = zip(
        two.named_parameters(), start.parameters(), *(s.parameters() for s in singles), strict=True
    )
    with torch.no_grad():
        for (name, p), q, a, b in params:
            expected = q + ((a - q) + (b - q)) / 2
            diffs.append(float((p - expected).abs().max()))
            moved.append(float((p - q).abs().max()))
            assert not torch.allclose(a, b), name  # two different directions
    # fp32 projected gradients in the reference (see the step-for-step test)
    assert max(diffs) < 1e-3 * max(moved)


def fp64_loss(model):
    # The engine's semantics, free of fp32 rounding: causal_lm_loss sums in fp32, and
    # 1 / (2 eps) = 500 amplifies a batch-shape-dependent rounding of the loss to ~1e-6.
    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        return F.cross_entropy(logits[:, :-1][keep], labels[keep], reduction="sum"), int(keep.sum())

    return loss_fn


@pytest.mark.parametrize("equal_tokens", [True, False])
def test_accumulation_equals_one_step_on_the_concatenated_batch(equal_tokens):
    model = tiny_llama(dtype=torch.float64)
    whole = copy.deepcopy(model)
    a, b = make_batches(2)
    if not equal_tokens:  # more padding in b: a token-weighted mean, not a mean of means
        b["attention_mask"][1, -5:] = 0
        b["labels"][1, -5:] = -100
    assert (int((a["labels"] != -100).sum()) == int((b["labels"] != -100).sum())) == equal_tokens
    engine = MezoEngine(model, fp64_loss(model), eps=EPS, seed=SEED, weight_decay=0.1)
    r = engine.step([a, b], LR)
    concat = {k: torch.cat([a[k], b[k]]) for k in a}
    engine = MezoEngine(whole, fp64_loss(whole), eps=EPS, seed=SEED, weight_decay=0.1)
    r_whole = engine.step([concat], LR)
    assert r.loss_tokens == r_whole.loss_tokens and r.tokens == r_whole.tokens
    assert r.loss == pytest.approx(r_whole.loss, abs=1e-12)
    assert max_diff(model, whole) < 1e-10
    assert max_diff(model, tiny_llama(dtype=torch.float64)) > 1e-4


def test_no_grad_is_ever_created():
    model = tiny_llama()
    fired = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    losses = []

    def loss_fn(batch):
        total, n = causal_lm_loss(model, batch, 7)
        losses.append(total)
        return total, n

    engine = MezoEngine(model, loss_fn, eps=EPS, directions=2)
    model.train()
    for b in make_batches(2):
        engine.step([b], LR)
    assert model.training  # the engine evaluates in eval mode and puts it back
    assert len(losses) == 2 * 2 * 2 and not any(t.requires_grad for t in losses)
    assert not fired and all(p.grad is None for p in model.parameters())


def test_only_trainable_parameters_move():
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_(".layers.1." in name)
    start = copy.deepcopy(model)
    run(model, make_batches(2), weight_decay=0.1)
    for (name, p), q in zip(model.named_parameters(), start.parameters(), strict=True):
        assert torch.equal(p, q) != p.requires_grad, name


def test_lora_adapters_only():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    start = {n: p.clone() for n, p in model.named_parameters()}
    engine = MezoEngine(model, lambda b: causal_lm_loss(model, b, 7), eps=EPS, seed=SEED)
    assert engine.names and all("lora_" in n for n in engine.names)
    for b in make_batches(2):
        engine.step([b], LR)
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]) != ("lora_" in name), name


@pytest.mark.parametrize("bad_call", [1, 2])  # l+ or l- is NaN
def test_non_finite_loss_skips_and_applies_nothing(bad_call):
    batch = make_batches(1)[0]
    model = tiny_llama()
    calls = []

    def loss_fn(b):
        calls.append(1)
        total, n = causal_lm_loss(model, b, 7)
        return (total * float("nan") if len(calls) == bad_call else total), n

    engine = MezoEngine(model, loss_fn, eps=EPS, seed=SEED)
    r = engine.step([batch], LR)
    assert r.skipped == "non-finite loss"
    assert len(calls) == bad_call  # l+ NaN: no l- pass
    # Nothing applied; only the rounding of the paper's perturbations is left, bitwise.
    ref = tiny_llama()
    params = list(ref.parameters())
    scales = [EPS, -EPS] if bad_call == 1 else [EPS, -2 * EPS, EPS]
    with torch.no_grad():
        for scale in scales:
            for p, z in zip(params, repo_z(params, seed_of(1)), strict=True):
                p += z * scale
    assert_equal_models(model, ref)
    assert max_diff(model, tiny_llama()) < 1e-6
    # The next step draws new directions (a skipped step's seeds are not reused), trains.
    assert engine.step([batch], LR).skipped is None and engine.step_count == 2
    assert max_diff(model, tiny_llama()) > 1e-4


def test_resume_is_exact():
    batches = make_batches(4)
    straight = tiny_llama()
    run(straight, batches, directions=2, weight_decay=0.1)

    first = tiny_llama()
    engine = make_engine(first, directions=2, weight_decay=0.1)
    for b in batches[:2]:
        engine.step([b], LR)
    tensors, meta = engine.state_dict()
    weights = copy.deepcopy(first.state_dict())
    engine.close()
    assert tensors == {} and meta == {"step_count": 2}

    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(weights)
    engine = make_engine(resumed, directions=2, weight_decay=0.1)
    engine.load_state_dict(tensors, meta)
    for b in batches[2:]:
        engine.step([b], LR)
    assert_equal_models(straight, resumed)


class Once(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self):
        return self.fn()


def test_peak_memory_is_that_of_inference(monkeypatch):
    """Measured by torch's MemTracker (every tensor storage created through the
    dispatcher, on CPU too). A MeZO step must stay within 5% of a no-grad forward of the
    same batch; a full-model z buffer or a kept graph would not, and the same
    measurement shows both."""
    keeps_every_z = MezoEngine._z  # this file's fixture: all z of a step cached
    monkeypatch.undo()  # the engine's own per-parameter draws
    model = tiny_llama()
    ids = torch.randint(5, 105, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_fn = lambda b: causal_lm_loss(model, b, 1024)  # noqa: E731
    engine = MezoEngine(model, loss_fn, eps=EPS, directions=2, weight_decay=0.1)

    def peak(fn) -> int:
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            # MemTracker refuses a root module called twice ("multiple iterative calls"):
            # under one outer module, the four forwards of a step are sub-calls.
            Once(fn)()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    def forward():
        with torch.no_grad():
            loss_fn(batch)

    inference = peak(forward)
    mezo = peak(lambda: engine.step([batch], 1e-3))
    with_graph = peak(lambda: loss_fn(batch))
    assert mezo <= 1.05 * inference, (mezo, inference)
    # The measurement can see what MeZO must not keep:
    assert with_graph > 1.05 * inference  # activations saved for backward
    monkeypatch.setattr(MezoEngine, "_z", keeps_every_z)
    caching = MezoEngine(model, loss_fn, eps=EPS, directions=2, weight_decay=0.1)
    assert peak(lambda: caching.step([batch], 1e-3)) > 1.05 * inference  # z of every parameter


@pytest.mark.parametrize("directions, draws", [(1, 3), (3, 11)])
def test_z_is_drawn_three_times_a_direction_less_one_for_the_merged_restore(
    monkeypatch, directions, draws
):
    """The paper draws z four times a direction (+eps, -2 eps, +eps, update); restoring
    the last direction and updating in one pass saves one draw a step (n-SPSA: 4n - 1),
    and every draw is the same z (the fixture's cache: equal results checked above)."""
    calls = []
    cached = MezoEngine._z
    monkeypatch.setattr(MezoEngine, "_z", lambda self, *a: calls.append(1) or cached(self, *a))
    model = tiny_llama()
    run(model, make_batches(1), directions=directions)
    assert len(calls) == draws * len(list(model.parameters()))


def reference_z(key: int, k: int) -> float:
    """Element k of z's stream, in plain Python integers and float64: splitmix64 (Steele,
    Lea, Flood 2014) of key + k golden, whose top 24 bits (+1) and next 24 bits make u1 in
    (0, 1] and u2 in [0, 1), then Box-Muller."""
    mask = (1 << 64) - 1
    z = (key + k * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    u1 = ((z >> 40) + 1) / 2**24
    u2 = ((z >> 16) & 0xFFFFFF) / 2**24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def test_z_is_a_counter_stream_the_same_on_every_device_and_however_chunked(monkeypatch):
    """z of (seed, parameter) is element by element a pure function of its index: equal
    to a plain-Python splitmix64 + Box-Muller (to fp32's rounding of the sqrt, log and
    cos), with no generator whose values depend on the device (torch.randn's do), and
    the same bits whether drawn in one chunk or many."""
    from lomotune.optim import mezo
    from lomotune.optim.seeds import mix64

    monkeypatch.undo()  # the engine's own draws
    engine = make_engine(tiny_llama())
    p = torch.empty(3000)
    z = engine._z(p, 11, 4)
    key = mix64(11, 4)
    for k in [0, 1, 2, 3, 4, 5, 999, 1000, 2047, 2999]:
        assert float(z[k]) == pytest.approx(reference_z(key, k), abs=2e-5), k
    monkeypatch.setattr(mezo, "Z_CHUNK", 7)
    assert torch.equal(engine._z(p, 11, 4), z)
    half = engine._z(p.to(torch.bfloat16), 11, 4)
    assert torch.equal(half, z.to(torch.bfloat16))  # drawn in fp32, then cast


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_the_compiled_z_is_the_stream_and_the_steps_draw_with_it(monkeypatch):
    """prepare_kernels builds z's kernel on the CPU (inductor's C++ backend): its values
    are the plain-Python reference's to fp32 rounding and the eager draw's to the last
    place (their log and cos round differently), in fp32 and bf16, and every draw of a
    step then goes through it."""
    from lomotune.optim import kernels, mezo

    monkeypatch.undo()  # the engine's own draws
    engine = make_engine(tiny_llama())
    assert engine.why_eager_z is not None  # never prepared: eager
    assert engine.prepare_kernels() is None
    key = mix64(11, 4)
    z = engine._z(torch.empty(3000), 11, 4)
    for k in [0, 1, 2, 999, 2047, 2999]:
        assert float(z[k]) == pytest.approx(reference_z(key, k), abs=2e-5), k
    eager = mezo.standard_normal(key, (3000,), torch.float32, torch.device("cpu"))
    assert (z - eager).abs().max() <= 4e-6
    half = engine._z(torch.empty(3000, dtype=torch.bfloat16), 11, 4)
    assert (half.float() - eager).abs().max() <= 0.02  # one bf16 spacing at |z| < 4
    calls = []
    kernel = kernels.compiled(mezo.normal_into)
    monkeypatch.setattr(kernels, "compiled", lambda fn: lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(mezo, "standard_normal", lambda *a: pytest.fail("eager z drawn"))
    engine.step(make_batches(1), LR)
    assert len(calls) == 3 * len(engine.params)


def test_a_z_kernel_that_cannot_be_built_leaves_the_eager_draw_and_says_why(monkeypatch):
    from lomotune.optim import kernels

    monkeypatch.undo()

    def no_compiler(fn):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(kernels, "compiled", no_compiler)
    engine = make_engine(tiny_llama())
    assert engine.prepare_kernels() == (
        "torch.compile could not build the z kernel "
        "(InvalidCxxCompiler: No working C++ compiler found)"
    )
    before = [p.clone() for p in engine.params]
    engine.step(make_batches(1), LR)  # eager z, no error
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.params, strict=True))

"""Peak memory of one training step, from formulas: instant for any model size.

A step is a sequence of phases; the peak is the largest of them, and its parts are the
parts of that phase. Every tensor counted here was found by reading what PyTorch's
autograd saves for HF transformers' layers and lomotune's engines, and checked against
`simulate` (one real step under FakeTensorMode + MemTracker) in tests/test_estimate.py.

Notation (bytes unless said): T = batch x seq tokens, N = batch x (seq - 1) label tokens
(every token carries a label: the worst case), C = tokens of one loss chunk, a = bytes of
an element in the model's precision, H hidden, I intermediate, V vocab, L layers.

Phases of a gradient method (lomo, adalomo, sgd, adamw, adam-mini, qlora-sgd):
- loss: every kept activation, plus the backward of one chunk of the chunked loss
  (`linear_cross_entropy`: the chunk's logits in the model's precision, their fp32 copy
  turned into d(loss)/d(logits) in place and cast back: (4 + a) bytes x V per token, 4
  in fp32; a softcapped head forms tanh's slope a 1/16 row block at a time beside the
  fp32 copy: `loss_chunk_bytes`), the whole gradient of the loss input, and the one
  lm_head gradient that every chunk adds into;
- top layer: the layer recomputed (checkpointing) with all it saves, the incoming
  hidden-state gradient, and the gradients held at that moment: for fused methods one
  tensor being updated (with its fp32 copies), for the others every gradient so far;
- bottom layer / end of backward (baselines): all gradients;
- optimizer step (baselines): all gradients, the state and the step's temporaries;
- fused methods also peak in the hook of their largest tensor (embedding / lm_head).
MeZO has no backward: one layer's inference forward, or a loss chunk's forward, or the
largest parameter's regenerated perturbation z.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lomotune import methods
from lomotune.errors import LomotuneError
from lomotune.linear_cross_entropy import SLOPE_BLOCKS
from lomotune.optim.mezo import Z_CHUNK, Z_SCRATCH_BYTES
from lomotune.optim.slices import TEMP_BYTES_PER_ELEMENT, slice_bytes_for

GiB = 1024**3
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
METHODS = methods.NAMES
# CUDA context, cuBLAS workspaces and allocator slack: not tensors, not simulated; the
# usual size of a fresh PyTorch CUDA context on an H100/A100 plus the caching allocator's
# rounding of a training step (several hundred MiB each): shown apart, never hidden.
CUDA_OVERHEAD = int(0.75 * GiB)
# 4-bit NF4 with double quantization (QLoRA): 4 bits per weight, one fp8 absmax per block
# of 64 and one fp32 constant per 256 blocks: 4 + 8/64 + 32/(64*256) bits.
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8


class EstimateError(LomotuneError):
    """A configuration the formulas do not cover, or impossible sizes; says which."""


@dataclass(frozen=True)
class Shape:
    """What the formulas need of a model, read from its transformers config."""

    family: str  # "llama" (RMSNorm, SwiGLU, rotary, GQA) | "opt" | "gpt-neox"
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    max_positions: int
    softcapped: bool = False  # the head's logits go through softcap * tanh(z / softcap)
    head_size: int | None = None  # where the config sets it (Qwen3, Gemma, Mistral Nemo)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        """Width of q and of the attention output: heads x head_dim, which is not the
        hidden size where head_dim is set (Qwen3-0.6B: 16 x 128 = 2048 from 1024)."""
        return self.heads * self.head_dim

    def layer_matrices(self) -> list[int]:
        """Element counts of one layer's weight matrices (q, k, v, o, then the MLP)."""
        kv = self.kv_heads * self.head_dim
        attn = [self.hidden * self.q_width, self.hidden * kv, self.hidden * kv]
        attn.append(self.q_width * self.hidden)
        mlp_count = 3 if self.family == "llama" else 2
        return attn + [self.hidden * self.intermediate] * mlp_count

    def layer_params(self) -> int:
        small = 2 * self.hidden  # two norms (weights; LayerNorm also biases, below)
        if self.family != "llama":
            kv = self.kv_heads * self.head_dim
            # LayerNorm biases, attention and MLP biases
            small += 2 * self.hidden + 2 * self.hidden + 2 * kv + self.intermediate + self.hidden
        return sum(self.layer_matrices()) + small

    def embedding_params(self) -> int:
        # OPT learns its positions, with 2 rows more than its context (an offset kept
        # from fairseq)
        extra = (self.max_positions + 2) * self.hidden if self.family == "opt" else 0
        return self.vocab * self.hidden + extra

    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        final_norm = self.hidden if self.family == "llama" else 2 * self.hidden
        return self.embedding_params() + self.layers * self.layer_params() + final_norm + head


@dataclass(frozen=True)
class Setup:
    method: str
    batch_size: int
    seq_len: int
    precision: str = "bf16"
    checkpointing: bool = True
    gpus: int = 1  # FSDP over N GPUs: weights, gradients and state sharded, per-rank peak
    attention: str = "sdpa"  # "sdpa" (flash / memory-efficient: no s^2 scores) | "eager"
    loss_chunk_tokens: int = 256
    device: str = "cuda"  # "cpu": torch's foreach AdamW keeps a parameter-sized temporary
    # fp32 master weights + fp32 Adam states beside a low-precision model copy (the LOMO
    # paper's AdamW and SGD); methods whose entry keeps fp32 master weights (adamw) are
    # counted so below fp32 whatever this says (see `master_weights`).
    mixed_precision: bool = False
    lora_rank: int = 64


@dataclass
class Estimate:
    method: str
    phase: str  # which moment of the step is the peak
    parts: dict[str, int] = field(default_factory=dict)  # bytes at the peak, per rank

    @property
    def tensor_bytes(self) -> int:
        """Every tensor alive at the peak: what max_memory_allocated would report."""
        return sum(v for k, v in self.parts.items() if k != "cuda_overhead")

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def check_sizes(shape: Shape, setup: Setup) -> None:
    if setup.method not in METHODS:
        raise EstimateError(f"no method {setup.method!r}; known: {', '.join(METHODS)}")
    if setup.batch_size < 1:
        raise EstimateError(f"batch size must be at least 1; got {setup.batch_size}")
    if setup.seq_len < 2:
        raise EstimateError(f"sequence length must be at least 2 tokens; got {setup.seq_len}")
    if setup.seq_len > shape.max_positions:
        raise EstimateError(
            f"sequence length {setup.seq_len} is longer than the model's context "
            f"({shape.max_positions} positions); lower --seq-len / data.max_length"
        )
    if setup.gpus < 1:
        raise EstimateError(f"--gpus must be at least 1 for a GPU estimate; got {setup.gpus}")
    if setup.precision not in BYTES:
        raise EstimateError(f"precision must be bf16, fp16 or fp32; got {setup.precision!r}")
    if setup.mixed_precision and setup.method not in ("adamw", "adamw-pure", "sgd"):
        raise EstimateError("fp32 master weights are counted for the adamw and sgd baselines only")


def master_weights(setup: Setup) -> bool:
    """Whether the step keeps fp32 master weights beside a low-precision copy."""
    entry = methods.method(setup.method)
    below_fp32 = setup.precision != "fp32"
    return setup.mixed_precision or (entry.fp32_master_weights and below_fp32)


def estimate(shape: Shape, setup: Setup) -> Estimate:
    check_sizes(shape, setup)
    a = BYTES[setup.precision]
    b, s = setup.batch_size, setup.seq_len
    t, n = b * s, b * (s - 1)
    c = min(setup.loss_chunk_tokens, n)
    h, v = shape.hidden, shape.vocab
    method = setup.method
    entry = methods.method(method)
    fused, adapters = entry.fused, entry.trains_adapters_only
    shard = setup.gpus  # FSDP: persistent per-parameter bytes divide over the ranks

    weights = _weights(shape, setup, a)
    state = _optimizer_state(shape, setup, a)
    gathered = _fsdp_gathered(shape, shard, a)
    weights_part = {"weights": weights // shard + gathered}
    if adapters:
        weights_part = {"weights": weights // shard + gathered, **_qlora_adapters(shape, setup)}
        weights_part["weights"] = weights_part.pop("weights")
    base = {**weights_part, "optimizer_state": state // shard}

    inputs = 3 * t * 8 + b * s * s  # ids, mask, labels (int64) and the model's bool mask
    inputs += 2 * s * shape.head_dim * a  # rotary cos / sin
    final_norm = _norm_saved(shape, a) * t
    head_in = n * h * a  # hidden states at the label positions, input of the chunked loss
    layer_saved = _layer_saved(shape, setup, a)
    layer_in = t * h * a
    if setup.checkpointing:
        kept = shape.layers * layer_in
        recompute = layer_saved - (t * h * 4 if a == 4 else 0)  # fp32: input saved once
    else:
        kept = shape.layers * layer_saved
        recompute = 0
    kept_parts = {"activations_kept": kept + final_norm + head_in + inputs}

    if entry.engine == "zeroth-order":
        # a loss forward's chunk: no slope (a forward has none)
        return _mezo(shape, setup, a, base, inputs, t, n, loss_chunk_bytes(c, v, a, False))

    # Gradients are in the parameters' dtype: fp32 where the parameters are fp32 master
    # weights under autocast (adamw below fp32).
    g = 4 if entry.fp32_master_weights else a
    head_grad = v * h * g
    largest_layer = max(shape.layer_matrices())
    grads_all = shape.params() * g if not fused else 0
    if adapters:
        # fp32 adapters' gradients (qlora-sgd's are applied inside backward)
        grads_all = 0 if fused else _qlora_adapters(shape, setup)["lora_adapters"]
        head_grad = 0
    phases: dict[str, dict[str, int]] = {}
    phases["loss backward"] = {
        **base,
        **kept_parts,
        "logits_loss": loss_chunk_bytes(c, v, a, shape.softcapped) + n * h * a,
        "gradients": head_grad // (1 if fused else shard),
    }
    if fused and not adapters:
        if shape.tied:
            # the tied weight's hook fires last, after the embedding's backward: every
            # activation is gone by then
            phases["update of the largest tensor"] = {
                **base,
                "activations_kept": inputs,
                "gradients": _fused_update_under_fsdp(v * h, setup, a),
            }
        else:
            phases["update of the largest tensor"] = {
                **base,
                **kept_parts,
                "logits_loss": n * h * a,  # gradient of the loss input, alive until the body
                "gradients": _fused_update_under_fsdp(v * h, setup, a),
            }
    if adapters:
        top_grads = 0
    elif fused:
        top_grads = _fused_update_under_fsdp(largest_layer, setup, a)
    else:
        top_grads = (head_grad + shape.layer_params() * g) // shard
    if shape.tied and fused and not adapters:
        top_grads += head_grad  # the tied embedding's gradient waits for the embedding
    phases["top layer recompute + backward"] = {
        **base,
        "activations_kept": kept + inputs,
        "layer_transient": recompute + layer_in + _backward_extra(shape, setup, a),
        "gradients": top_grads,
    }
    if not fused:
        phases["bottom layer backward"] = {
            **base,
            "activations_kept": layer_in + inputs + (0 if setup.checkpointing else layer_saved),
            "layer_transient": recompute + layer_in + _backward_extra(shape, setup, a),
            "gradients": max(grads_all - shape.embedding_params() * g, 0) // shard,
        }
        # No phase for the embedding's backward: a tied weight's embedding rows are added
        # into the head's gradient (linear_cross_entropy.TiedGradient), so it holds every
        # gradient once, as the optimizer step does with more.
        phases["optimizer step"] = {
            **base,
            "gradients": grads_all // shard,
            "optimizer_step_temporary": _step_temporary(shape, setup, a) // shard,
        }
    phase, parts = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    parts = {k: int(v) for k, v in parts.items() if v}
    parts["cuda_overhead"] = CUDA_OVERHEAD
    return Estimate(method=method, phase=phase, parts=parts)


def loss_chunk_bytes(chunk: int, vocab: int, a: int, softcapped: bool) -> int:
    """Bytes of one chunk of the chunked loss (`linear_cross_entropy`) at its worst moment:
    the chunk's fp32 logits (the buffer that becomes d(loss)/d(logits) in backward), and
    beside them, when the model is below fp32, the matmul's logits in its dtype (before
    the fp32 copy) or the gradient cast back (after it): (4 + a) x V per token, 4 in fp32.
    `softcapped` (a backward of a softcapped head, Gemma 2/3): tanh's slope, an fp32
    block of 1/SLOPE_BLOCKS of the chunk's rows beside the fp32 logits (in bf16 / fp16 it
    stays below the model-dtype copy)."""
    fp32 = chunk * vocab * 4
    in_model_dtype = chunk * vocab * a if a != 4 else 0
    slope = -(-chunk // SLOPE_BLOCKS) * vocab * 4 if softcapped else 0
    return fp32 + max(in_model_dtype, slope)


def _weights(shape: Shape, setup: Setup, a: int) -> int:
    if methods.method(setup.method).quantized_base:
        linear = shape.layers * sum(shape.layer_matrices())
        rest = shape.params() - linear
        return int(linear * NF4_BYTES_PER_WEIGHT) + rest * a
    if methods.method(setup.method).fp32_master_weights:
        # The parameters are the fp32 master weights; autocast's low-precision casts live
        # inside the forward only (each layer's, recomputed in backward), never at the
        # optimizer step, where the peak is: weights, gradients and state all fp32.
        return shape.params() * 4
    if setup.mixed_precision:
        return shape.params() * (a + 4)  # model copy + fp32 master weights
    return shape.params() * a


def _qlora_adapters(shape: Shape, setup: Setup) -> dict[str, int]:
    r = setup.lora_rank
    kv = shape.kv_heads * shape.head_dim
    h, i = shape.hidden, shape.intermediate
    q = shape.q_width
    pairs = [(h, q), (h, kv), (h, kv), (q, h)] + [(h, i), (h, i), (i, h)][
        : 3 if shape.family == "llama" else 2
    ]
    per_layer = sum(r * (fan_in + fan_out) for fan_in, fan_out in pairs)
    return {"lora_adapters": shape.layers * per_layer * 4}  # fp32 adapters


def _optimizer_state(shape: Shape, setup: Setup, a: int) -> int:
    p = shape.params()
    if setup.method in ("adamw", "adamw-pure"):
        return p * (8 if master_weights(setup) else 2 * a)
    if setup.method == "lora-adamw":
        return 2 * _qlora_adapters(shape, setup)["lora_adapters"]  # fp32 m and v
    if setup.method == "adam-mini":
        # adam-mini 1.1: m for every weight, in the weights' dtype; v is one number per
        # block: per head for q and k, per output row (token, neuron) for the embedding,
        # lm_head, v, o and the MLP, one per norm. (The paper's Adam-for-the-embedding
        # was dropped by the package: its embedding has one v per token.)
        return p * a + _adam_mini_v_elements(shape) * a
    if setup.method == "adalomo":
        # fp32 row and column means per matrix; a full fp32 v for vectors
        per_layer = sum(_rows_cols(shape, m) for m in range(len(shape.layer_matrices())))
        vectors = shape.layer_params() - sum(shape.layer_matrices())
        emb = shape.vocab + shape.hidden
        return 4 * (
            shape.layers * (per_layer + vectors) + emb * (1 if shape.tied else 2) + shape.hidden
        )
    return 0


def _adam_mini_v_elements(shape: Shape) -> int:
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = shape.heads + shape.kv_heads + kv + h  # q, k heads; v, o rows
    per_layer += (2 * i + h if shape.family == "llama" else i + h) + 2  # MLP rows, norms
    if shape.family != "llama":  # biases: Adam, a full v each
        per_layer += 2 * h + 2 * kv + i + h
    embeddings = shape.vocab * (1 if shape.tied else 2)
    return shape.layers * per_layer + embeddings + 1


def _rows_cols(shape: Shape, index: int) -> int:
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    q = shape.q_width
    rows_cols = [q + h, kv + h, kv + h, h + q] + [i + h] * (3 if shape.family == "llama" else 2)
    return rows_cols[index]


def _fsdp_gathered(shape: Shape, ranks: int, a: int) -> int:
    """Bytes of parameters gathered in full beyond a rank's shard, under lomotune's FSDP2
    (distributed/sharding.py: one unit per decoder layer, the rest in the root unit): the layer
    running and the next one prefetched, and the root unit (embeddings, lm_head, final
    norm), which FSDP2 keeps gathered from the forward through the backward (its
    reshard_after_forward is off for the root). Read from the code and FSDP2's
    documentation: not yet checked against a simulation over a fake process group."""
    if ranks == 1:
        return 0
    root = shape.params() - shape.layers * shape.layer_params()
    return 2 * shape.layer_params() * a + root * a * (ranks - 1) // ranks


def _fused_update_under_fsdp(numel: int, setup: Setup, a: int) -> int:
    """A fused hook's bytes for one tensor: on one GPU `fused_update_bytes`; under FSDP
    the hook updates this rank's rows only, after the reduce-scatter of the whole
    gradient, counted as still alive (an upper bound: FSDP2 may have freed it)."""
    if setup.gpus == 1:
        return fused_update_bytes(numel, setup, a)
    return numel * a + fused_update_bytes(numel // setup.gpus, setup, a)


def fused_update_bytes(numel: int, setup: Setup, a: int) -> int:
    """Bytes alive while a fused method's hook updates one tensor of `numel` elements:
    its gradient in the model's dtype, and the update's temporaries, which cover one row
    slice of at most `slices.slice_bytes_for(device)` (optim/slices.py), not the tensor: per
    element of a slice, the fp32 gradient and working copies (when the weights are not
    fp32), then lomo: the rounding noise (bf16: int32 noise and its hash words, 6 bytes);
    adalomo: its statistics pass (G^2, 4 bytes, and its fp64 copy for the column sums, 8)."""
    copies = 0 if a == 4 else 8
    if setup.method == "adalomo":
        per_element = copies + 12
    else:
        per_element = copies + (6 if setup.precision == "bf16" else 0)
    in_a_slice = min(numel, slice_bytes_for(setup.device) // TEMP_BYTES_PER_ELEMENT)
    return numel * a + in_a_slice * per_element


def _norm_saved(shape: Shape, a: int) -> int:
    """Bytes per token a norm saves for backward."""
    h = shape.hidden
    if shape.family == "llama":
        # RMSNorm computes in fp32: the fp32 input (a copy unless fp32), the normalized
        # values cast back to the model dtype, one fp32 rsqrt per token
        return h * 4 + h * a + 4
    return h * a + 8  # LayerNorm: input, mean and rstd (fp32)


def _layer_saved(shape: Shape, setup: Setup, a: int) -> int:
    """Bytes one decoder layer saves for backward (the whole batch)."""
    b, s = setup.batch_size, setup.seq_len
    t = b * s
    h, i = shape.hidden, shape.intermediate
    per_token = 2 * _norm_saved(shape, a)
    # q after rotary, k and v expanded to every head (transformers repeats kv heads when
    # a padding mask is passed), attention output, its transposed copy (o_proj input)
    per_token += 5 * shape.q_width * a + 4 * shape.heads  # + fp32 log-sum-exp per head
    if shape.family == "llama":
        per_token += h * a  # the residual sum feeding the second norm
        per_token += 4 * i * a  # gate, silu(gate), up, their product (down_proj input)
    else:
        # the residual; the activation's output (fc2's input), and for GELU (GPT-NeoX)
        # also its input: ReLU's backward (OPT) needs its output only
        per_token += h * a + (1 if shape.family == "opt" else 2) * i * a
    attention = b * s * s * a  # the padding mask expanded to the model dtype
    if setup.attention == "eager":
        # scores, softmax in fp32 and its cast: the s^2 tensors flash attention never keeps
        attention += b * shape.heads * s * s * (a + 4 + a)
    return t * per_token + attention


def _backward_extra(shape: Shape, setup: Setup, a: int) -> int:
    """Gradients of one layer's activations alive at once, beyond the incoming one."""
    t = setup.batch_size * setup.seq_len
    return t * shape.hidden * a


def _step_temporary(shape: Shape, setup: Setup, a: int) -> int:
    p = shape.params()
    if setup.method in ("adamw", "adamw-pure"):
        # torch's fused CUDA AdamW keeps none; foreach (CPU) a sqrt(v) of every parameter
        return p * (4 if master_weights(setup) else a) if setup.device == "cpu" else 0
    if setup.method == "adam-mini":
        return 2 * shape.vocab * shape.hidden * a  # per-tensor loop: largest tensor's temps
    return 0


def _mezo(shape, setup, a, base, inputs, t, n, chunk_logits) -> Estimate:
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    # MLP tensors alive at once: gate, up, silu(gate) (SwiGLU) or fc1's output and its
    # activation (OPT, GPT-NeoX)
    mlp_live = 3 if shape.family == "llama" else 2
    layer_forward = t * (mlp_live * i * a + 5 * h * a) + setup.batch_size * setup.seq_len**2 * a
    if setup.attention == "eager":
        layer_forward += setup.batch_size * shape.heads * setup.seq_len**2 * (a + 4)
    loss_forward = t * h * a + n * h * a + chunk_logits  # log-sum-exp taken in place
    largest = max(v * h, max(shape.layer_matrices()))
    z = largest * a + min(largest, Z_CHUNK) * Z_SCRATCH_BYTES  # z, and the hash's scratch
    phases = {
        "inference forward of one layer": {
            **base,
            "activations_kept": inputs,
            "layer_transient": layer_forward,
        },
        "loss forward": {**base, "activations_kept": inputs, "logits_loss": loss_forward},
        "perturbation": {**base, "gradients": 0, "layer_transient": z},
    }
    phase, parts = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    parts = {k: int(x) for k, x in parts.items() if x}
    parts["cuda_overhead"] = CUDA_OVERHEAD
    return Estimate(method="mezo", phase=phase, parts=parts)

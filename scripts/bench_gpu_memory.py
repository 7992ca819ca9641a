#!/usr/bin/env python
"""GPU memory of every method without a GPU: one training step of a ~1.1B Llama, counted.

    python scripts/bench_gpu_memory.py                        # 16 layers, bf16, 4 x 512
    python scripts/bench_gpu_memory.py --fake-like llama-7b --batch 1 --methods no_grad,lomo

The model is built under `torch._subclasses.fake_tensor.FakeTensorMode` (no storage is
allocated) and one training step of each method is run under
`torch.distributed._tools.mem_tracker.MemTracker`, which counts the bytes of every
tensor storage alive at each op and keeps the peak: `lomotune.estimate.simulate`, which
also says which methods it can count. See `fake_1b` for what is counted and what is not.
"""

from __future__ import annotations

import json
import time

from bench_common import GiB, chosen_rows, gib, parse, parser, ratio, write_json

from lomotune.estimate.simulate import FORWARD_ONLY, SIMULATED_METHODS

FAKE_METHODS = [FORWARD_ONLY, *SIMULATED_METHODS]


def llama_1b_config(layers: int = 16):
    """A ~1.1B Llama shape (TinyLlama's: hidden 2048, 32 heads / 8 kv heads, vocab 32000)
    with `layers` layers (16: 0.97B parameters, 22: TinyLlama's 1.1B)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
    )


def fake_1b(
    methods: list[str], batch: int, seq: int, layers: int, like: str | None, chunk: int
) -> list[dict]:
    """One training step of each method on a ~1.1B Llama, counted, not run.

    `lomotune.estimate.simulate.simulate_step`: lomotune's own engines
    (`FusedEngine.step`, `MezoEngine.step`, `OptimizerEngine.step`) and loss
    (`causal_lm_loss`) run unchanged on a model built under FakeTensorMode, counted by
    MemTracker; see that module for how values that fake tensors lack are answered.
    Byte counts are exact element counts x sizes, without the CUDA allocator's rounding,
    the CUDA context and cuBLAS workspaces (~0.5-1 GiB on a real GPU).
    """
    config = llama_1b_config(layers)
    if like is not None:
        # The shape of a real model (e.g. smollm2-135m, to check the count against
        # MemTracker on real tensors: the `tensor peak` column of bench_memory.py), or
        # of one the estimator knows by name (llama-7b).
        from lomotune.estimate.shapes import resolve_config

        config = resolve_config(like)
        config.use_cache = False

    return count_steps(methods, batch, seq, config, chunk)


def count_steps(methods, batch, seq, config, chunk) -> list[dict]:
    from lomotune.estimate import shape_of
    from lomotune.estimate.simulate import simulate_step

    results = []
    for method in methods:
        started = time.perf_counter()
        try:
            sim = simulate_step(
                config, method, batch_size=batch, seq_len=seq, loss_chunk_tokens=chunk
            )
            row = {
                "method": method,
                "params": shape_of(config).params(),
                "peak": sim.peak_bytes,
                "breakdown_at_peak": sim.parts,
            }
        except Exception as e:  # report, go on with the next method
            import traceback

            row = {
                "method": method,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "traceback": traceback.format_exc()[-3000:],
            }
        row["seconds"] = time.perf_counter() - started
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    return results


def fake_table(rows: list[dict]) -> str:
    ok = {r["method"]: r for r in rows if "error" not in r}
    weights = None
    if ok:
        any_row = next(iter(ok.values()))
        weights = any_row["params"] * 2
    adamw, no_grad = ok.get("adamw"), ok.get("no_grad")
    lines = [
        "| method | peak (GiB) | beyond bf16 weights (GiB) | peak / no_grad | peak / adamw "
        "| at the peak: weights / grads / optimizer state / activations+temp (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:150]} | | | | |")
            continue
        bd = r["breakdown_at_peak"]
        parts = "{:.2f} / {:.2f} / {:.2f} / {:.2f}".format(
            (bd.get("Parameter", 0) + bd.get("Buffer", 0)) / GiB,
            bd.get("Gradient", 0) / GiB,
            bd.get("Optstate", 0) / GiB,
            (bd.get("Activation", 0) + bd.get("Temp", 0) + bd.get("Other", 0)) / GiB,
        )
        lines.append(
            f"| {r['method']} | {gib(r['peak'])} | {gib(r['peak'] - weights)} "
            f"| {ratio(r['peak'], no_grad and no_grad['peak'])} "
            f"| {ratio(r['peak'], adamw and adamw['peak'])} | {parts} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__, f"comma list of {FAKE_METHODS} (default: all)")
    p.add_argument("--fake-layers", type=int, default=16)
    p.add_argument(
        "--fake-like", help="count a real model's shape instead (a model name, e.g. smollm2-135m)"
    )
    args = parse(p)
    methods = chosen_rows(p, args, FAKE_METHODS, FAKE_METHODS, "this benchmark counts")
    started = time.perf_counter()
    rows = fake_1b(methods, args.batch, args.seq, args.fake_layers, args.fake_like, args.loss_chunk)
    print()
    shape = (
        f"the shape of {args.fake_like}"
        if args.fake_like
        else f"Llama hidden 2048, {args.fake_layers} layers, 32 heads / 8 kv heads, "
        "intermediate 5632, vocab 32000, untied"
    )
    print(
        f"Counted under FakeTensorMode + MemTracker: {shape}; bf16; batch {args.batch} x "
        f"{args.seq}; activation checkpointing (non-reentrant); loss chunks of {args.loss_chunk} tokens"
    )
    print(fake_table(rows))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    write_json(args.json, "fake_1b", rows)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Everything the first GPU must answer, in one run (issue 20, section 3):

    python scripts/gpu_check.py                  # one GPU, at most 8 minutes on an H100
    python scripts/gpu_check.py --cpu --tiny     # the same code on tiny shapes, in seconds

Writes `gpu_check.md` (the tables) and `gpu_check.json` (every number) into `--out`, and
prints the markdown. No network: every model is built from its config with random
weights (the numbers below do not depend on the weights' values). Each part:

1. environment: device, driver, torch, Triton, date, lomotune commit;
2. the update kernels: `FusedEngine.prepare_kernels` for lomo and adalomo in bf16
   (every kernel the run calls, built and checked against the eager bits): the answer
   and its compile time;
3. a ~1B Llama (`bench_gpu_memory.llama_1b_config`), bf16, batch 4 x 1024, activation
   checkpointing, each method: `max_memory_allocated` of a step beside `lomotune
   estimate` (analytic and --simulate, tensor bytes: what the allocator counts) and
   beside the no-grad forward; tokens/s and MFU (`lomotune.monitor.mfu`, as a training
   run's dashboard shows it: 6 x params x tokens / time over the device's dense bf16
   peak); the update's share of a step (the engine's `update_seconds`: the fused hooks'
   updates or optimizer.step, timed in one extra step with a sync around each);
4. lomo vs adamw at one memory budget (`--budget-gib`), each at the largest batch whose
   measured peak fits it: tokens/s;
5. Llama-3-8B's shape at torchtune's single-GPU setting (batch 2 x 2048, bf16,
   activation checkpointing): lomo's and adalomo's peak and tokens/s, beside torchtune's
   published 18.9 GiB and 1650 tok/s (full fine-tune, RTX 4090);
6. several GPUs: not checked here (2 processes on one GPU are not a multi-GPU test).

A part that fails (out of memory, a kernel that does not build) is a row with its error;
the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from lomotune.monitor import mfu, peak_flops_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (the benchmarks' recipe, batch and commit)
from bench_gpu_memory import llama_1b_config  # noqa: E402

GiB = 1024**3
METHODS = ["no_grad", "lomo", "adalomo", "mezo", "sgd", "adamw"]
TORCHTUNE_8B = {"peak_gib": 18.9, "tokens_per_s": 1650, "device": "RTX 4090"}


def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": bench_common.library_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ) if device.type == "cuda" else None  # fmt: skip
    env["driver"] = smi.stdout.strip().splitlines()[0] if smi and smi.returncode == 0 else None
    return env


def build_model(config, device: torch.device, checkpointing: bool = True):
    """The causal LM of `config`, random weights in bf16, on `device`; activation
    checkpointing as `lomotune train` sets it (models.load_model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        ) if hasattr(model, "activation_checkpointing_enable") else model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )  # fmt: skip
    model.train()
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_method(config, method: str, batch: int, seq: int, device, steps: int) -> dict:
    """One method on a fresh model: warm-up step, `steps` timed steps, the peak of one
    more, and the update's share in a last step with a sync around each update."""
    from lomotune.loss import causal_lm_loss
    from lomotune.optim import build_engine
    from lomotune.recipe import ModelConfig

    args = argparse.Namespace(batch=batch, seq=seq, lr=1e-3, warmup=1, steps=steps)
    row: dict = {"method": method, "batch": batch, "seq": seq}
    model = engine = None
    try:
        model = build_model(config, device)
        data = {
            k: v.to(device) for k, v in bench_common.random_batch(args, config.vocab_size).items()
        }
        if method == "no_grad":

            def step() -> None:
                with torch.no_grad():
                    causal_lm_loss(model, data, 1024)

        else:
            cfg = ModelConfig(name="random", precision="bf16", activation_checkpointing=True)
            recipe = bench_common.bench_recipe(cfg, method, args)
            engine = build_engine(recipe, model, lambda b: causal_lm_loss(model, b, 1024))
            if hasattr(engine, "prepare_kernels"):
                engine.prepare_kernels()

            def step() -> None:
                engine.step([data], args.lr)

        step()  # warm-up: optimizer state, kernels, allocator
        sync(device)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        row["peak_bytes"] = peak_bytes(device)
        median = statistics.median(times)
        row["step_s"] = median
        row["tokens_per_s"] = batch * seq / median
        if engine is not None:  # the update's share, each update between two syncs
            engine.update_seconds = 0.0
            t = time.perf_counter()
            step()
            sync(device)
            row["update_share"] = engine.update_seconds / (time.perf_counter() - t)
            engine.update_seconds = None
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # a row with the error; the run goes on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()
        model = engine = None  # freed before the next method's model is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def estimates(config, method: str, batch: int, seq: int, simulate: bool) -> dict:
    """`lomotune estimate`'s tensor bytes for the same step: analytic, and --simulate."""
    from lomotune.estimate import Setup, estimate, shape_of, simulated_estimate

    setup = Setup(method=method, batch_size=batch, seq_len=seq, precision="bf16")
    out: dict = {}
    if method != "no_grad":
        try:
            out["analytic_bytes"] = estimate(shape_of(config), setup).tensor_bytes
        except Exception as e:
            out["analytic_error"] = str(e)
    if simulate:
        try:
            out["simulated_bytes"] = simulated_estimate(config, setup).tensor_bytes
        except Exception as e:
            out["simulated_error"] = str(e)
    return out


def kernel_probe(config, device: torch.device) -> list[dict]:
    """`prepare_kernels` of lomo and adalomo on a bf16 model: its answer, its time."""
    from lomotune.loss import causal_lm_loss
    from lomotune.optim import build_engine, kernels
    from lomotune.recipe import ModelConfig

    rows = []
    args = argparse.Namespace(lr=1e-3, warmup=0, steps=1)
    for method in ("lomo", "adalomo"):
        model = build_model(config, device, checkpointing=False)
        cfg = ModelConfig(name="random", precision="bf16")
        engine = build_engine(
            bench_common.bench_recipe(cfg, method, args),
            model,
            lambda b, model=model: causal_lm_loss(model, b),
        )
        kernels._why_not.clear()  # each method's kernels built and checked afresh
        t = time.perf_counter()
        why = engine.prepare_kernels()
        seconds = time.perf_counter() - t
        if device.type == "cpu":
            why = kernels.why_not_compiled(device)
        rows.append({"method": method, "compiled": why is None, "why_not": why, "s": seconds})
        engine.close()
    return rows


def largest_batch_within(config, method, seq, budget, device, steps, limit) -> dict:
    """The largest batch (halving from `limit`) whose measured peak fits `budget`."""
    tried = []
    batch = limit
    while batch >= 1:
        row = run_method(config, method, batch, seq, device, steps)
        tried.append({k: row.get(k) for k in ("batch", "peak_bytes", "error")})
        # no budget (0): a CPU measures no peak; the largest batch tried is taken
        fits = "error" not in row and (not budget or (row["peak_bytes"] or 0) <= budget)
        if fits:
            return {**row, "budget_bytes": budget, "tried": tried}
        batch //= 2
    return {"method": method, "error": "no batch fits", "tried": tried}


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    out = [
        f"## GPU check: {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), driver {env['driver']}, Triton "
        f"{env['triton']}, lomotune {env['commit']}, {env['date']}",
        "",
        "| kernels | compiled | why not | build + check s |",
        "|---|---|---|---|",
    ]
    for r in report["kernels"]:
        out.append(f"| {r['method']} | {r['compiled']} | {r['why_not'] or ''} | {r['s']:.1f} |")
    main = report["model_1b"]
    out += [
        "",
        f"{main['shape']}, bf16, batch {main['batch']} x {main['seq']}, activation checkpointing:",
        "",
        "| method | peak GiB | analytic GiB | simulated GiB | peak / no_grad | tokens/s | MFU | update share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    forward = next((r.get("peak_bytes") for r in main["rows"] if r["method"] == "no_grad"), None)
    for r in main["rows"]:
        if "error" in r:
            out.append(f"| {r['method']} | {r['error']} |||||||")
            continue
        ratio = f"{r['peak_bytes'] / forward:.2f}" if forward and r["peak_bytes"] else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        share = f"{r['update_share']:.1%}" if r.get("update_share") is not None else "-"
        out.append(
            f"| {r['method']} | {gib(r['peak_bytes'])} | {gib(r.get('analytic_bytes'))} "
            f"| {gib(r.get('simulated_bytes'))} | {ratio} | {r['tokens_per_s']:.0f} | {mfu} "
            f"| {share} |"
        )
    budget = report["budget"]
    limit = f"{gib(budget['bytes'])} GiB" if budget["bytes"] else "none (no peak on a CPU)"
    out += ["", f"At one memory budget, {limit} (seq {budget['seq']}):", ""]
    out += ["| method | largest batch | peak GiB | tokens/s |", "|---|---|---|---|"]
    for r in budget["rows"]:
        if "error" in r:
            out.append(f"| {r['method']} | {r['error']} |||")
        else:
            out.append(
                f"| {r['method']} | {r['batch']} | {gib(r['peak_bytes'])} "
                f"| {r['tokens_per_s']:.0f} |"
            )
    big = report["llama_8b"]
    t = TORCHTUNE_8B
    out += [
        "",
        f"{big['shape']}, batch {big['batch']} x {big['seq']}, bf16, activation checkpointing "
        f"(torchtune, full fine-tune on an {t['device']}: {t['peak_gib']} GiB, "
        f"{t['tokens_per_s']} tokens/s):",
        "",
        "| method | peak GiB | tokens/s |",
        "|---|---|---|",
    ]
    for r in big["rows"]:
        if "error" in r:
            out.append(f"| {r['method']} | {r['error']} ||")
        else:
            out.append(f"| {r['method']} | {gib(r['peak_bytes'])} | {r['tokens_per_s']:.0f} |")
    out += ["", report["multi_gpu"], ""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: a test)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the same code in seconds")
    p.add_argument("--out", type=Path, default=Path("gpu_check"))
    # 16 GiB: a 1B model's AdamW state and gradients (6 GiB) then matter beside activations
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-simulate", action="store_true", help="skip `estimate --simulate`")
    args = p.parse_args()

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --cpu (with --tiny for a quick run)")
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    from lomotune.estimate import resolve_config, shape_of
    from lomotune.testing import tiny_llama_config

    if args.tiny:
        small = tiny_llama_config(vocab_size=128, tie=False, layers=2)
        one_b, eight_b = small, tiny_llama_config(vocab_size=128, tie=False, layers=3)
        batch, seq, budget_limit, big_batch, big_seq = 2, 32, 4, 2, 64
        budget = 0 if args.cpu else int(args.budget_gib * GiB)
    else:
        one_b, eight_b = llama_1b_config(), resolve_config("llama-3-8b")
        batch, seq, budget_limit, big_batch, big_seq = 4, 1024, 64, 2, 2048
        budget = int(args.budget_gib * GiB)
    eight_b.use_cache = False
    env = environment(device)
    report: dict = {"environment": env, "kernels": kernel_probe(one_b, device)}

    params = shape_of(one_b).params()
    peak_flops = peak_flops_for(device)
    rows = []
    for method in METHODS:
        row = run_method(one_b, method, batch, seq, device, args.steps)
        row.update(estimates(one_b, method, batch, seq, simulate=not args.no_simulate))
        if peak_flops and "error" not in row and method != "no_grad":
            row["mfu"] = mfu(row["tokens_per_s"], params, peak_flops)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    report["model_1b"] = {
        "shape": f"Llama {params / 1e9:.2f}B parameters",
        "params": params,
        "batch": batch,
        "seq": seq,
        "rows": rows,
    }
    report["budget"] = {
        "bytes": budget,
        "seq": seq,
        "rows": [
            largest_batch_within(one_b, m, seq, budget, device, args.steps, budget_limit)
            for m in ("lomo", "adamw")
        ],
    }
    big_rows = [run_method(eight_b, m, big_batch, big_seq, device, args.steps) for m in ("lomo", "adalomo")]  # fmt: skip
    report["llama_8b"] = {
        "shape": f"Llama-3-8B shape ({shape_of(eight_b).params() / 1e9:.2f}B parameters)",
        "batch": big_batch,
        "seq": big_seq,
        "rows": big_rows,
        "torchtune": TORCHTUNE_8B,
    }
    gpus = env["gpus"]
    report["multi_gpu"] = (
        f"Several GPUs: {gpus} visible, not checked by this script (scripts/bench_distributed.py)."
        if gpus > 1
        else f"Several GPUs: skipped ({gpus} GPU; 2 processes on one GPU are no multi-GPU test)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

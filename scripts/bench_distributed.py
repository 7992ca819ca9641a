"""Per-process peak memory and tokens/s of 1 vs N processes on CPU (gloo), measured side
by side in one run: `lomotune train` on the quickstart recipe, fp32, one thread a process.

    python scripts/bench_distributed.py --steps 8 --methods lomo,mezo --processes 1,2

Prints a markdown table (for BENCHMARKS.md) from each run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def run(method: str, processes: int, steps: int, out: Path) -> dict:
    lr = "1e-3" if method == "mezo" else "3e-3"
    command = [
        sys.executable, "-m", "lomotune", "train", "quickstart", f"training.output_dir={out}",
        f"optimizer.name={method}", f"optimizer.lr={lr}", "model.precision=fp32",
        f"training.max_steps={steps}", "training.eval_every=0", "training.save_every=0",
        "training.generate_eval_examples=0", "hardware.gpus=0", f"hardware.processes={processes}",
        "hardware.threads=1", "--plain",
    ]  # fmt: skip
    if processes > 1:  # not 29500: other runs on this machine may hold it
        command.append(f"hardware.master_port={free_port()}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--methods", default="lomo,mezo")
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    print(
        "| method | processes | tokens/s total | tokens/s per process | peak RSS per process (max) | spread over ranks |"
    )
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for n in map(int, args.processes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                s = run(method, n, args.steps, Path(tmp) / "run")
            print(
                f"| {method} | {n} | {s['tokens_per_s']:.0f} | {s['tokens_per_s_per_process']:.0f} "
                f"| {s['peak_memory'] / 2**20:.0f} MiB | {s['peak_memory_spread'] / 2**20:.1f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""How long each shipped SuperGLUE recipe trains on this machine, without training it
whole: a short run of each (`training.max_steps=14`, all cores) and the mean step time of
steps 5-14 times the recipe's step count (from `lomotune train --dry-run`). The model's
load and the eval add about a minute. Issue 21's budget: 10 minutes of a 2-core CPU
(mezo: 15). Run it on an otherwise idle machine; it writes its runs under --out.

    python scripts/superglue_budget.py --superglue-dir ../shared/superglue rte-lomo cb-mezo
    python scripts/superglue_budget.py --superglue-dir DIR rte-lomo:fp32   # another precision
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT_RUN_STEPS = 14
SKIPPED_STEPS = 4  # warm-up: allocation, first-use kernels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--superglue-dir", type=Path, required=True, help="official layout")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "superglue-budget")
    p.add_argument("cells", nargs="+", help="<task>-<method>[:precision], e.g. rte-lomo")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cell in args.cells:
        name, _, precision = cell.partition(":")
        recipe = ROOT / "lomotune" / "recipes" / f"superglue-{name}.yaml"
        out = args.out / cell.replace(":", "-")
        extra = [f"data.superglue_dir={args.superglue_dir}", f"training.output_dir={out}",
                 f"hardware.threads={os.cpu_count()}"]  # fmt: skip
        if precision:
            extra.append(f"model.precision={precision}")
        train = [sys.executable, "-m", "lomotune.cli", "train", str(recipe), *extra]
        dry = subprocess.run([*train, "--dry-run"], capture_output=True, text=True, env=env)
        found = re.search(r"steps: (\d+) of batch", dry.stdout)
        if found is None:
            print(f"{cell}: dry run failed\n{dry.stdout[-800:]}{dry.stderr[-800:]}")
            continue
        short = [f"training.max_steps={SHORT_RUN_STEPS}", "training.epochs=null"]
        done = subprocess.run([*train, *short, "--plain", "--overwrite"],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode != 0:
            print(f"{cell}: short run failed\n{done.stdout[-800:]}{done.stderr[-800:]}")
            continue
        lines = (out / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if '"kind": "train"' in line]
        step_s = statistics.mean(r["step_time"] for r in rows[SKIPPED_STEPS:])
        steps = int(found.group(1))
        print(f"{cell}: {steps} steps x {step_s:.2f} s/step = {steps * step_s / 60:.1f} min "
              f"of steps", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""scripts/gpu_check.sh, the first GPU's one command, run on the CPU with tiny shapes: the
same code, so that it cannot rot before a GPU runs it."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_the_cpu_with_tiny_shapes(tmp_path):
    run = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--tiny", "--steps", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["date"] and env["commit"]
    assert "driver" in env and "triton" in env
    assert [r["method"] for r in report["kernels"]] == ["lomo", "adalomo"]
    rows = {r["method"]: r for r in report["model_1b"]["rows"]}
    assert list(rows) == ["no_grad", "lomo", "adalomo", "mezo", "sgd", "adamw"]
    for method, r in rows.items():
        assert "error" not in r, (method, r.get("traceback"))
        assert r["tokens_per_s"] > 0 and r["simulated_bytes"] > 0
        if method != "no_grad":
            assert r["analytic_bytes"] > 0 and 0 < r["update_share"] < 1
    assert [r["method"] for r in report["budget"]["rows"]] == ["lomo", "adamw"]
    assert all(r["batch"] >= 1 and "error" not in r for r in report["budget"]["rows"])
    big = report["llama_8b"]["rows"]
    assert [r["method"] for r in big] == ["lomo", "adalomo"] and all("error" not in r for r in big)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| adamw |" in text and "18.9 GiB" in text and "Several GPUs: skipped" in text

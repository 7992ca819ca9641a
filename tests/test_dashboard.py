"""Dashboard (plain and live), the metrics log, and the run plot."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from lomotune.dashboard import (
    Dashboard,
    MetricsError,
    MetricsLog,
    format_duration,
    read_metrics,
    sparkline,
    truncate_metrics,
)
from lomotune.plot import PlotError, plot_run

GIB = 1024**3
STEP = {
    "loss": 1.23451,
    "lr": 3e-4,
    "tokens_per_s": 1234.4,
    "step_time": 0.85,
    "mem_current": int(1.2 * GIB),
    "mem_peak": int(1.5 * GIB),
    "mem_kind": "process RSS",
}


def _plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=80), buf


def test_plain_line_has_every_field():
    console, buf = _plain_console()
    with Dashboard(total_steps=200, title="t", console=console) as dash:
        assert not dash.live  # a StringIO is not a terminal
        dash.update_step(12, STEP)
    # eta from the reported step time while one step is all there is: 188 * 0.85 s
    assert buf.getvalue() == (
        "step 12/200 | loss 1.2345 | lr 3.0e-04 | 1,234 tok/s | "
        "mem 1.20 GiB (peak 1.50 GiB, process RSS) | 0.85 s/step | eta 2m40s\n"
    )


def test_several_processes_show_per_process_tokens_and_the_spread_of_peaks():
    console, buf = _plain_console()
    several = {**STEP, "tokens_per_s_per_process": 617.2, "mem_peak_spread": int(0.25 * GIB)}
    with Dashboard(total_steps=200, title="t", console=console) as dash:
        dash.update_step(12, several)
    assert buf.getvalue() == (
        "step 12/200 | loss 1.2345 | lr 3.0e-04 | 1,234 tok/s (617 per process) | mem 1.20 GiB "
        "(peak 1.50 GiB max over processes, spread 256.00 MiB, process RSS) | 0.85 s/step | "
        "eta 2m40s\n"
    )
    live = Console(file=io.StringIO(), force_terminal=True, width=120)
    with Dashboard(total_steps=20, title="t", console=live) as dash:
        dash.update_step(1, several)
        table = dict(dash._numbers_table().rows)
    assert table["tokens/s per process"] == "617"
    assert table["peak memory spread over processes"] == "256.00 MiB"


def test_mfu_shown_when_measured():
    console, buf = _plain_console()
    with Dashboard(total_steps=200, title="t", console=console) as dash:
        dash.update_step(12, {**STEP, "mfu": 0.4123})
    assert "| 0.85 s/step | MFU 41.2% | eta" in buf.getvalue()
    live = Console(file=io.StringIO(), force_terminal=True, width=120)
    with Dashboard(total_steps=20, title="t", console=live) as dash:
        dash.update_step(1, {**STEP, "mfu": 0.4123})
        assert dict(dash._numbers_table().rows)["MFU"] == "41.2%"


def test_plain_optional_fields_eval_warn_note_summary():
    console, buf = _plain_console()
    with Dashboard(total_steps=10, title="t", console=console) as dash:
        dash.update_step(
            3, {"loss": 2.0, "grad_norm": 0.5321, "skipped_steps": 2, "loss_scale": 65536.0}
        )
        dash.update_eval(3, {"eval_loss": 1.5, "accuracy": 0.8125})
        dash.warn("loss is nan")
        dash.note("checkpoint saved to runs/x/step-3")
        dash.summary({"final_loss": 1.25, "mean_tokens_per_s": 1500.0, "wall_time": 151.0})
    lines = buf.getvalue().splitlines()
    assert lines[0] == "step 3/10 | loss 2.0000 | grad norm 0.532 | loss scale 65536 | skipped 2"
    assert lines[1] == "eval step 3/10 | eval loss 1.5000 | accuracy 0.8125"
    assert lines[2] == "warning: loss is nan"
    assert lines[3] == "checkpoint saved to runs/x/step-3"
    assert lines[4:] == [
        "summary:",
        "  final loss: 1.2500",
        "  mean tokens/s: 1,500",
        "  wall time: 2m31s",
    ]


def test_plain_goes_to_stdout_when_no_console_given(capsys):
    with Dashboard(total_steps=5, title="t") as dash:
        dash.update_step(1, {"loss": 3.0})
    assert "step 1/5 | loss 3.0000" in capsys.readouterr().out


def test_disabled_dashboard_prints_nothing():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True)
    with Dashboard(total_steps=5, title="t", live=True, enabled=False, console=console) as d:
        d.update_step(1, STEP)
        d.update_eval(1, {"eval_loss": 1.0})
        d.warn("w")
        d.note("n")
        d.summary({"final_loss": 1.0})
    assert buf.getvalue() == ""


@pytest.mark.parametrize("width", [100, 12])
def test_live_view_runs(width):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=width)
    with Dashboard(total_steps=20, title="tiny-llama / lomo", console=console) as dash:
        assert dash.live  # auto: the console is a terminal
        for step in range(1, 21):
            dash.update_step(step, {**STEP, "loss": 3.0 / step, "grad_norm": 1.0})
        dash.update_eval(20, {"eval_loss": 0.2})
        dash.warn("loss scale lowered to 32768")
        dash.note("checkpoint saved")
        print("a library printing a line")  # must land above the view, not break it
        dash.summary({"final_loss": 0.15, "mem_peak": int(1.5 * GIB)})
    out = buf.getvalue()
    assert "checkpoint saved" in out
    assert "library" in out  # wrapped on the narrow terminal
    if width == 100:
        assert "warnings" in out and "32768" in out
        assert "summary" in out and "1.50 GiB" in out
        assert "20/20" in out
    assert dash.smoothed_loss is not None and 0.15 < dash.smoothed_loss < 3.0


def test_sparkline_and_duration():
    assert sparkline([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, float("nan"), 1.0], width=60) == "█▁"
    assert sparkline(range(100), width=60) == sparkline(range(40, 100), width=60)
    assert sparkline([2.0, 2.0]) == "▅▅"
    assert sparkline([]) == ""
    assert format_duration(4.24) == "4.2s"
    assert format_duration(151) == "2m31s"
    assert format_duration(3725) == "1h02m05s"


def _write_run(path, steps=10):
    with MetricsLog(path) as log:
        for step in range(1, steps + 1):
            log.train(step, {**STEP, "loss": torch.tensor(3.0 / step)})
            if step % 5 == 0:
                log.eval(step, {"eval_loss": 2.0 / step})
        log.summary(steps, {"final_loss": 3.0 / steps})


def test_metrics_log_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path)
    records = read_metrics(path)
    assert [r["kind"] for r in records].count("train") == 10
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10]
    assert records[-1]["kind"] == "summary"
    assert records[0]["loss"] == pytest.approx(3.0)  # tensor written as a number
    assert records[0]["mem_kind"] == "process RSS"
    assert all(isinstance(r["time"], float) for r in records)


def test_truncated_last_line_is_tolerated_and_appending_resumes_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path, steps=3)
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # crash mid-write
    assert len(read_metrics(path)) == 4  # 3 train + summary
    with MetricsLog(path) as log:
        log.train(4, {"loss": 0.5})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]
    assert records[-1]["loss"] == 0.5


def test_disabled_metrics_log_writes_nothing(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with MetricsLog(path, enabled=False) as log:
        log.train(1, {"loss": 1.0})
    assert not path.parent.exists()


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(MetricsError, match="line 2"):
        read_metrics(path)
    with pytest.raises(MetricsError, match="no metrics file"):
        read_metrics(tmp_path / "absent.jsonl")


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path, steps=10)
    assert truncate_metrics(path, 5) == 6  # steps 1-5 and the eval at 5; no summary
    with MetricsLog(path) as log:
        log.train(6, {"loss": 0.1})
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("train", 4),
        ("train", 5),
        ("eval", 5),
        ("train", 6),
    ]
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads(path.read_text().splitlines()[0])["loss"] == pytest.approx(3.0)


def test_plot_run_writes_a_png(tmp_path):
    _write_run(tmp_path / "metrics.jsonl", steps=12)
    out = plot_run(tmp_path)
    assert out == tmp_path / "training.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_run_errors_name_the_file(tmp_path):
    with pytest.raises(PlotError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PlotError, match="no training steps"):
        plot_run(tmp_path)

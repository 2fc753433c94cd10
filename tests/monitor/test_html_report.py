"""report.html: metric grouping, thinning, overlay, anomaly markers, samples, pipelines, CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from posttrain.errors import DataError
from posttrain.monitor.demo_run import write_demo_run
from posttrain.monitor.html_report import (
    build_charts,
    chart_of,
    pipeline_html,
    read_rows,
    run_html,
    run_labels,
    section_of,
    thin,
)


@pytest.mark.parametrize(
    "key,section",
    [
        ("loss", "loss"), ("loss/policy", "loss"), ("eval/loss", "eval"), ("reward/format_mean", "reward"),
        ("kl/token_mean", "kl"), ("pg/approx_kl", "kl"), ("pg/entropy", "entropy"),
        ("response/length_max", "length"), ("response/clipped_ratio", "clip"), ("pg/clip_frac", "clip"),
        ("grad_norm", "grad_norm"), ("lr", "lr"), ("tokens_per_s", "throughput"),
        ("time/reward_s", "throughput"), ("throughput/train_tok_s", "throughput"),
        ("eval/task_accuracy/overall", "eval"), ("advantages/std", "other"), ("epoch", "other"),
    ],
)  # fmt: skip
def test_section_of(key, section):
    assert section_of(key) == section


def test_chart_of_groups_statistics_and_levels():
    assert chart_of("response/length_mean") == chart_of("response/length_max") == "response/length"
    assert chart_of("eval/task_accuracy/arith/L3") == "eval/task_accuracy/arith"
    assert chart_of("eval/task_accuracy/overall") == "eval/task_accuracy/overall"


def test_thin_keeps_last_and_bounds_count():
    pts = [(float(i), float(i * i)) for i in range(1001)]
    out = thin(pts, most=100)
    assert len(out) <= 100 and out[0] == pts[0] and out[-1] == pts[-1]
    assert thin(pts[:50], most=100) == pts[:50]


def test_read_rows_skips_torn_last_line_but_names_a_bad_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    assert [r["step"] for r in read_rows(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DataError) as exc:
        read_rows(tmp_path)
    assert f"{tmp_path / 'metrics.jsonl'}:2" in str(exc.value)


def test_overlay_names_series_by_run_and_skips_non_finite():
    rows_a = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.0}]
    rows_b = [{"step": 1, "loss": 3.0, "flag": True}]
    charts = build_charts({"a": rows_a, "b": rows_b})
    assert list(charts) == ["loss"]  # a bool is no metric
    (loss,) = charts["loss"]
    assert loss["series"] == {"a: loss": [(1.0, 2.0), (3.0, 1.0)], "b: loss": [(1.0, 3.0)]}


def test_anomaly_event_marks_its_metric_chart_and_table(tmp_path):
    run = write_demo_run(tmp_path / "demo", steps=30)
    html = run_html([run]).read_text()
    assert html.count('class="marker"') == 1  # only the response/length chart
    assert "length_growth" in html and "72, 112, 168" in html and "<tr class='anomaly'>" in html
    series = re.findall(r'data-name="([^"]+)" data-points="(\d+)"', html)
    assert ("mean", "30") in series  # every step's point of response/length_mean
    assert len(series) == 11
    assert ("overall", "3") in series  # held-out accuracy at steps 10, 20, 30
    assert "Compute 20 + 1" in html and "Data summary: train" in html and "synthetic numbers" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_run_html_escapes_generations(tmp_path):
    run = write_demo_run(tmp_path / "r", steps=3)
    (run / "samples.jsonl").write_text(
        json.dumps({"step": 3, "prompt": "<script>x</script>", "completion": "a&b"}) + "\n"
    )
    html = run_html([run]).read_text()
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "a&amp;b" in html


def test_run_labels_disambiguate_equal_names():
    assert run_labels([Path("/x/a/run"), Path("/y/b/run"), Path("/z/c")]) == ["a/run", "b/run", "c"]


def test_not_a_run_folder(tmp_path):
    with pytest.raises(DataError, match="neither metrics.jsonl nor config.yaml"):
        run_html([tmp_path])


def test_pipeline_html_links_stage_reports(tmp_path):
    stage = write_demo_run(tmp_path / "pipe" / "grpo", steps=5)
    state = {"stages": {
        "grpo": {"status": "done", "command": "rl", "seconds": 12.5, "outputs": {"output_dir": str(stage)}},
        "search": {"status": "skipped", "command": "search", "seconds": 1.0, "outputs": {"output_dir": str(tmp_path / "none")}},
    }}  # fmt: skip
    (tmp_path / "pipe" / "pipeline_state.json").write_text(json.dumps(state))
    (tmp_path / "pipe" / "report.md").write_text("# Pipeline report\n| a | b |\n")
    html = pipeline_html(tmp_path / "pipe").read_text()
    assert (stage / "report.html").is_file()  # written for the stage that had none
    assert "href='grpo/report.html'" in html and html.count("class='stage-report'") == 1
    assert "<td>12.5</td>" in html and "skipped" in html and "# Pipeline report" in html


def test_report_command(tmp_path, monkeypatch, capsys):
    from posttrain.cli import main

    a, b = write_demo_run(tmp_path / "a", 4), write_demo_run(tmp_path / "b", 6)
    out = tmp_path / "both.html"
    monkeypatch.setattr(sys, "argv", ["posttrain", "report", str(a), str(b), "--out", str(out)])
    main()
    assert capsys.readouterr().out.strip() == str(out)
    html = out.read_text()
    assert 'data-name="a: mean"' in html and 'data-name="b: mean"' in html
    monkeypatch.setattr(sys, "argv", ["posttrain", "report", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "missing" in err and "Traceback" not in err

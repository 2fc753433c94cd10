"""report.html rendered by headless Chromium: the curves exist, were laid out and have points."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from posttrain.monitor.demo_run import write_demo_run
from posttrain.monitor.dom_check import check, curve_points, rendered_counts
from posttrain.monitor.html_report import run_html

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no chromium binary (apt-get install -y --no-install-recommends chromium)"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]


def _browse(page: Path, *args: str) -> str:
    done = subprocess.run(
        [BROWSER, *FLAGS, *args, page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dom_check_rejects_an_unrendered_page(tmp_path):
    html = run_html([write_demo_run(tmp_path / "r", 5)]).read_text()
    assert rendered_counts(html) == {}  # the counts are written by the browser, not by Python
    assert curve_points(html) and all(n == got for n, got in curve_points(html))


@needs_browser
def test_chromium_renders_curves_with_points(tmp_path):
    a, b = write_demo_run(tmp_path / "a", 30), write_demo_run(tmp_path / "b", 12)
    page = run_html([a, b], tmp_path / "report.html")
    dom = _browse(page, "--dump-dom")
    counts = check(dom)
    assert counts["series"] == 22 and counts["laid-out"] == 22  # 11 curves of each run, overlaid
    assert counts["points"] == (10 * 30 + 3) + (10 * 12 + 1)  # 10 per-step metrics + eval every 10 steps
    assert counts["points"] == sum(got for _, got in curve_points(dom))
    assert counts["markers"] == 2  # the demo anomaly, once per run
    shot = tmp_path / "screenshot.png"
    _browse(page, "--window-size=1300,2000", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_browser
def test_check_script(tmp_path):
    script = Path(__file__).parents[2] / "scripts" / "check_report_browser.sh"
    done = subprocess.run(
        ["bash", str(script), "--", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "rendered 11 curves (11 laid out), 303 points, 1 anomaly markers" in done.stdout
    assert (tmp_path / "screenshot.png").is_file()

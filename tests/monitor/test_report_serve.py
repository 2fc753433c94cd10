"""`posttrain report --serve`: the live page re-renders from metrics.jsonl while a run writes it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from posttrain.errors import DataError
from posttrain.monitor.demo_run import write_demo_run
from posttrain.monitor.serve import HOST, make_server, serve_in_thread


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode("utf-8")


def _points(page: str, name: str) -> int:
    """Point count of the curve `name` (its polyline's data-points)."""
    (n,) = re.findall(rf'<polyline class="series" data-name="{re.escape(name)}" data-points="(\d+)"', page)
    return int(n)


def test_the_live_page_shows_a_line_appended_while_serving(tmp_path):
    run = write_demo_run(tmp_path / "run", steps=30)
    server = make_server([run], port=0, refresh_s=1)
    host, port = server.server_address[:2]
    assert host == HOST == "127.0.0.1"  # never on another interface
    serve_in_thread(server)
    try:
        base = f"http://{host}:{port}"
        first, v1 = _get(base + "/"), _get(base + "/version")
        assert (
            _points(first, "grad_norm") == 30
            and "fetch('/version'" in first
            and "setInterval(poll,1000)" in first
        )
        assert _get(base + "/version") == v1  # nothing written: the page would not reload
        with open(run / "metrics.jsonl", "a") as f:  # the run logs step 31
            f.write(json.dumps({"step": 31, "time": 1.7e9 + 155, "grad_norm": 7.25}) + "\n")
        second, v2 = _get(base + "/"), _get(base + "/version")
        assert v2 != v1 and _points(second, "grad_norm") == 31 and "7.25 at 31" in second
        assert "7.25 at 31" not in first
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(base + "/nothing")
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_missing_folder_and_a_taken_port(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_server([tmp_path / "nope"], port=0)
    run = write_demo_run(tmp_path / "run", steps=3)
    server = make_server([run], port=0)
    try:
        with pytest.raises(DataError, match="cannot listen") as err:
            make_server([run], port=server.server_address[1])
        assert "--port" in err.value.fix
    finally:
        server.server_close()


def test_cli_report_serve_prints_the_url_serves_and_stops_on_ctrl_c(tmp_path):
    run = write_demo_run(tmp_path / "run", steps=5)
    exe = str(Path(sys.executable).parent / "posttrain")
    proc = subprocess.Popen(
        [exe, "report", str(run), "--serve", "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    try:
        line, deadline = "", time.time() + 60
        while "http://" not in line and time.time() < deadline:
            line = proc.stderr.readline()
        (url,) = re.findall(r"http://127\.0\.0\.1:\d+/", line)
        assert _points(_get(url), "grad_norm") == 5
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave a server behind
            raise
    assert proc.returncode == 0 and "Traceback" not in err, err

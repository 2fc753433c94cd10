"""`posttrain report --serve RUN_DIR [RUN_DIR ...]`: a live view of running jobs on 127.0.0.1.

A stdlib HTTP server (no extra dependency) that renders the report page (`html_report.render_html`)
afresh from each run's ``metrics.jsonl`` on every request, so the page always shows what the runs
have written so far. Two paths:

- ``/``: the report page, plus a small script that asks ``/version`` every ``refresh_s`` seconds
  and reloads the page when a run has written more;
- ``/version``: a fingerprint (size and modification time) of every watched ``metrics.jsonl``.

It binds 127.0.0.1 only: the page shows configs and sample generations, and nothing here is
meant to be reachable from another machine (use an SSH tunnel: ``ssh -L 8765:127.0.0.1:8765``).
Port 0 picks a free port. Nothing is written to the run folders.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from posttrain.errors import DataError

HOST = "127.0.0.1"

_POLL_SCRIPT = """<script>(function(){var v=null;function poll(){fetch('/version',{cache:'no-store'})
.then(function(r){return r.text();}).then(function(t){if(v!==null&&t!==v){location.reload();}v=t;})
.catch(function(){});}poll();setInterval(poll,%d);})();</script>"""


@dataclass
class LiveReport:
    """The runs a server shows and how often its page asks for news."""

    run_dirs: list[Path]
    refresh_s: float = 5.0
    """Seconds between two checks of the page for new metrics."""

    def version(self) -> str:
        """Size and mtime of each watched metrics.jsonl: it changes whenever a run writes a line."""
        parts = []
        for d in self.run_dirs:
            path = d / "metrics.jsonl"
            st = path.stat() if path.is_file() else None
            parts.append(f"{st.st_size}:{st.st_mtime_ns}" if st else "-")
        return json.dumps(parts)

    def page(self) -> str:
        """The report page as of now, with the polling script before ``</body>``."""
        from posttrain.monitor.html_report import render_html

        html = render_html(self.run_dirs)
        script = _POLL_SCRIPT % max(250, int(self.refresh_s * 1000))
        return html.replace("</body>", script + "</body>", 1)


def _handler(live: LiveReport) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            path = self.path.split("?", 1)[0]
            if path == "/version":
                self._send(200, "application/json", live.version())
            elif path in ("/", "/index.html"):
                try:
                    self._send(200, "text/html; charset=utf-8", live.page())
                except DataError as exc:  # a corrupt metrics.jsonl: say so in the page, keep serving
                    self._send(500, "text/plain; charset=utf-8", f"{exc}\n{exc.fix or ''}")
            else:
                self._send(404, "text/plain; charset=utf-8", "not found: try /")

        def _send(self, status: int, kind: str, text: str) -> None:
            body = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the http.server name)
            return None  # a request every few seconds is not worth a line in the terminal

    return Handler


def check_run_dirs(dirs: Sequence[str | Path]) -> list[Path]:
    """The run folders as paths; a DataError for none given or one that does not exist (a run
    about to start may not have written metrics.jsonl yet: that is fine)."""
    if not dirs:
        raise DataError(
            "no run folder given", fix="posttrain report --serve RUN_DIR [RUN_DIR ...] [--port N]"
        )
    paths = [Path(d) for d in dirs]
    for p in paths:
        if not p.is_dir():
            raise DataError(f"run folder {p} does not exist", fix="pass the output_dir of a run")
    return paths


def make_server(dirs: Sequence[str | Path], port: int = 8765, refresh_s: float = 5.0) -> ThreadingHTTPServer:
    """A server for the live report of `dirs` on 127.0.0.1:`port` (0 = a free port; read
    ``server.server_address``); not yet serving: call ``serve_forever`` (or `serve_in_thread`)."""
    live = LiveReport(check_run_dirs(dirs), refresh_s)
    try:
        server = ThreadingHTTPServer((HOST, port), _handler(live))
    except OSError as exc:
        raise DataError(f"cannot listen on {HOST}:{port} ({exc.strerror})",
                        fix="pick another port with --port N (0 = any free port)") from exc  # fmt: skip
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve from a daemon thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="posttrain-report", daemon=True)
    thread.start()
    return thread


def serve_main(dirs: Sequence[str | Path], port: int = 8765, refresh_s: float = 5.0) -> None:
    """`posttrain report --serve`: serve until Ctrl-C."""
    from posttrain.monitor.logger import console

    # Ctrl-C stops it even when the parent started it with SIGINT ignored (`cmd &` in a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = make_server(dirs, port, refresh_s)
    host, bound = server.server_address[:2]
    console.print(f"live report of {len(dirs)} run(s) at http://{host}:{bound}/ "
                  f"(refreshes when metrics.jsonl grows; Ctrl-C to stop)")  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

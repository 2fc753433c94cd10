"""A self-contained HTML report of one or several runs, rendered from the files a run writes.

`run_html([RUN_DIR, ...], out)` reads each run's `metrics.jsonl` and draws every numeric metric
as an inline SVG curve, grouped into sections (loss, reward, KL, entropy, length, clip, grad
norm, lr, throughput, held-out `eval/*`, other); several runs are overlaid on the same charts.
Below the curves: the anomaly events, the resolved `config.yaml`, the data summaries
(`data_*.json`), `run_meta.json`, and the sample generations of each eval step (`samples.jsonl`,
`eval_generations.jsonl`). No network: no external script, style or font. A short inline script
counts the drawn curves and points into `#render-check` once the browser has laid them out,
which is what `scripts/check_report_browser.sh` and tests/monitor read back from headless
Chromium.

Anomaly events are lines of `metrics.jsonl` of this form (`posttrain.train.anomaly.Anomaly.event`
builds them; `RunLogger.event` writes any event):

    {"step": 37, "time": 1700000000.0, "event": "anomaly", "kind": "kl_limit",
     "metric": "kl/token_mean", "recent": [0.12, 0.35, 0.81], "threshold": 0.5,
     "action": "pause", "message": "KL to the reference 0.81 > anomaly.kl_max 0.5"}

`step` and `event` are required; `kind` (the detector; `detector` is read too), `metric` (the
metrics.jsonl key it watched: that chart gets a red marker at `step`), `recent` (the last
values, newest last; or one `value`), `threshold`, `action` (pause | warn | rollback) and
`message` are optional. An event line holds no metric values.

`pipeline_html(PIPELINE_DIR)` renders the stage table of a pipeline (`pipeline_state.json`) with
a link to each stage's own report.html (written when missing) and the pipeline's report.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.monitor.plots import chart_grid

SECTIONS = (
    "loss",
    "reward",
    "kl",
    "entropy",
    "length",
    "clip",
    "grad_norm",
    "lr",
    "throughput",
    "eval",
    "other",
)
SECTION_TITLES = {
    "loss": "Loss", "reward": "Reward (per term)", "kl": "KL", "entropy": "Entropy",
    "length": "Response length", "clip": "Clipping", "grad_norm": "Gradient norm", "lr": "Learning rate",
    "throughput": "Throughput and timing", "eval": "Held-out metrics (eval/*)", "other": "Other metrics",
}  # fmt: skip
_STAT_SUFFIX = re.compile(r"_(mean|max|min|std)$")
_LEVEL = re.compile(r"/L\d+$")
MAX_POINTS = 400
"""Points drawn per curve; longer series are thinned to every k-th point."""
MAX_SAMPLES_PER_STEP = 8
"""Sample generations shown per eval step and file (the rest are counted, not shown)."""


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of RUN_DIR/metrics.jsonl; a torn last line (a killed run) is skipped.

    Any other unreadable line is a DataError naming file:line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                continue  # the last line of a run killed mid-write
            raise DataError(f"not a JSON line ({exc.msg})", where=f"{path}:{i}",
                            fix="remove or repair the line; metrics.jsonl holds one JSON object a line") from exc  # fmt: skip
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def metric_keys(rows: Sequence[dict]) -> list[str]:
    """Keys with a numeric (not bool) value in some non-event row, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        if "event" in row:
            continue
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool):
                seen.setdefault(k)
    return list(seen)


def section_of(key: str) -> str:
    """Which report section a metric key belongs to (one of SECTIONS)."""
    k = key.lower()
    rules = (
        ("eval", k.startswith("eval/")),
        ("clip", "clip" in k),
        ("throughput", "throughput" in k or k.endswith(("tokens_per_s", "_s")) or k.startswith("time/")),
        ("loss", "loss" in k or k.startswith("nll")),
        ("reward", k.startswith(("reward/", "returns/", "rewards/")) or "reward" in k or "margin" in k),
        ("kl", k.startswith("kl") or "/kl" in k or "_kl" in k),
        ("entropy", "entropy" in k),
        ("length", "length" in k or k.startswith("response/")),
        ("grad_norm", "grad_norm" in k),
        ("lr", k == "lr" or k.endswith("/lr")),
    )  # fmt: skip
    return next((name for name, hit in rules if hit), "other")


def chart_of(key: str) -> str:
    """The chart a key is drawn on: statistics of one quantity (`_mean/_max/_min/_std`) and the
    per-level accuracies (`.../L3`) share a chart."""
    return _LEVEL.sub("", _STAT_SUFFIX.sub("", key))


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short distinct labels: the folder names, or parent/name where two names are equal."""
    names = [p.name for p in run_dirs]
    return [
        f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs
    ]  # fmt: skip


def anomaly_events(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("event") == "anomaly"]


def build_charts(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Section -> chart specs (keyword arguments of `line_chart`) over all runs, overlaid.

    A series is named by its key's last part (prefixed by the run label when several runs)."""
    charts: dict[str, dict[str, dict]] = {s: {} for s in SECTIONS}
    several = len(runs) > 1
    for label, rows in runs.items():
        events = anomaly_events(rows)
        for key in metric_keys(rows):
            chart = charts[section_of(key)].setdefault(chart_of(key), {"series": {}, "markers": []})
            pts = thin(
                [(float(r["step"]), float(r[key])) for r in rows if _finite(r.get(key)) and "event" not in r]
            )
            short = key[len(chart_of(key)) :].lstrip("/_") or key.rsplit("/", 1)[-1]
            chart["series"][f"{label}: {short}" if several else short] = pts
            chart["markers"] += [
                (float(e["step"]), _event_label(e)) for e in events if e.get("metric") == key
            ]
    return {
        s: [{"title": title, **spec} for title, spec in charts[s].items()] for s in SECTIONS if charts[s]
    }  # fmt: skip


def thin(points: list[tuple[float, float]], most: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `most` points: every k-th one, the last always kept (a long run stays a small page)."""
    if len(points) <= most:
        return points
    stride = math.ceil(len(points) / most)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept[: most - 1], points[-1]]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _event_value(e: dict) -> Any:
    recent = e.get("recent")
    return recent[-1] if isinstance(recent, list) and recent else e.get("value", "")


def _event_label(e: dict) -> str:
    parts = [f"step {e['step']}: {e.get('kind', e.get('detector', 'anomaly'))}"]
    if _event_value(e) != "":
        parts.append(f"{e.get('metric', 'value')} = {_event_value(e)}")
    if "threshold" in e:
        parts.append(f"threshold {e['threshold']}")
    return ", ".join(parts)


def _section_svg(charts: list[dict]) -> str:
    columns = min(3, len(charts))
    rows_of_legend = max(1 + sum(len(n) * 6 + 26 for n in c["series"]) // 360 for c in charts)
    return chart_grid(charts, columns=columns, width=400, height=266 + 13 * rows_of_legend)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line of a killed run; the report shows what is readable
        if isinstance(row, dict):
            out.append(row)
    return out


def samples_html(run_dir: Path) -> str:
    """Sample generations per eval step, from samples.jsonl (SFT) and eval_generations.jsonl (RL)."""
    parts = []
    for name in ("samples.jsonl", "eval_generations.jsonl"):
        by_step: dict[Any, list[dict]] = {}
        for row in _read_jsonl(run_dir / name):
            by_step.setdefault(row.get("step"), []).append(row)
        for step, rows in by_step.items():
            shown = rows[:MAX_SAMPLES_PER_STEP]
            body = "".join(_sample_row(r) for r in shown)
            more = f"<p>{len(rows) - len(shown)} more in {escape(name)}</p>" if len(rows) > len(shown) else ""
            parts.append(f"<details><summary>{escape(name)}: step {escape(str(step))} ({len(rows)} samples)"
                         f"</summary><table class='samples'>{body}</table>{more}</details>")  # fmt: skip
    return "".join(parts) or "<p>No sample generations were logged.</p>"


def _sample_row(r: dict) -> str:
    prompt = r.get("prompt", r.get("question", ""))
    mark = {True: " ✓", False: " ✗"}.get(r.get("correct"), "")
    tag = " ".join(str(r[k]) for k in ("task", "level") if k in r)
    return (f"<tr><td class='prompt'>{escape(tag)}<pre>{escape(str(prompt))}</pre></td>"
            f"<td><pre>{escape(str(r.get('completion', '')))}</pre>{mark}</td></tr>")  # fmt: skip


def _kv_table(data: dict) -> str:
    rows = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(json.dumps(v) if isinstance(v, dict | list) else str(v))}</td></tr>"
        for k, v in data.items()
    )  # fmt: skip
    return f"<table class='kv'>{rows}</table>"


def run_details_html(label: str, run_dir: Path) -> str:
    """Config, data summaries, run metadata and sample generations of one run."""
    parts = [f"<h2>Run {escape(label)}</h2><p class='path'>{escape(str(run_dir))}</p>"]
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        text = cfg.read_text(encoding="utf-8", errors="replace")
        parts.append(
            f"<details open><summary>Resolved config (config.yaml)</summary><pre>{escape(text)}</pre></details>"
        )
    for data in sorted(run_dir.glob("data_*.json")) + [run_dir / "run_meta.json"]:
        loaded = _load_json(data)
        if isinstance(loaded, dict):
            title = (
                f"Data summary: {data.stem.removeprefix('data_')}"
                if data.name.startswith("data_")
                else "Run metadata"
            )
            parts.append(
                f"<details open><summary>{escape(title)} ({escape(data.name)})</summary>{_kv_table(loaded)}</details>"
            )
    parts.append(f"<h3>Sample generations</h3>{samples_html(run_dir)}")
    return "".join(parts)  # fmt: skip


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def anomalies_html(runs: dict[str, list[dict]]) -> str:
    rows = [(label, e) for label, rs in runs.items() for e in anomaly_events(rs)]
    if not rows:
        return "<p id='anomalies'>No anomaly events.</p>"
    head = "".join(f"<th>{c}</th>" for c in ("run", "step", "kind", "metric", "recent values", "threshold",
                                             "action", "message"))  # fmt: skip
    body = []
    for label, e in rows:
        recent = e.get("recent", [e["value"]] if "value" in e else [])
        cells = [label, e["step"], e.get("kind", e.get("detector", "")), e.get("metric", ""),
                 ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in recent[-6:]),
                 e.get("threshold", ""), e.get("action", ""), e.get("message", "")]  # fmt: skip
        body.append("<tr class='anomaly'>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table id='anomalies'><tr>{head}</tr>{''.join(body)}</table>"


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1250px}h1{font-size:1.4em}
h2{border-bottom:1px solid #ccc;margin-top:1.6em}pre{white-space:pre-wrap;margin:0;font-size:12px}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}.path{color:#666;font-size:12px}.prompt{max-width:420px}tr.anomaly td{background:#fee}
#render-check{color:#666;font-size:12px}"""
_CHECK_SCRIPT = """<script>window.addEventListener('load',function(){var s=document.querySelectorAll(
'svg polyline.series'),p=0,laid=0;s.forEach(function(l){p+=l.points.numberOfItems;var b=l.getBBox();
if(b.width>0||b.height>0||l.points.numberOfItems==1)laid++;});var c=document.getElementById('render-check');
c.dataset.series=s.length;c.dataset.points=p;c.dataset.laidOut=laid;c.dataset.markers=
document.querySelectorAll('svg line.marker').length;c.textContent='rendered '+s.length+' curves, '+p+
' points';});</script>"""


def render_html(run_dirs: Sequence[Path]) -> str:
    """The report page of `run_dirs` (overlaid when several) as one HTML string."""
    labels = run_labels(run_dirs)
    runs = {label: read_rows(d) for label, d in zip(labels, run_dirs, strict=True)}
    title = "Run report: " + ", ".join(labels)
    body = [f"<h1>{escape(title)}</h1>", "<p id='render-check'>curves not rendered (no JavaScript)</p>"]
    sections = build_charts(runs)
    if not sections:
        body.append("<p>No metrics logged yet (metrics.jsonl is missing or empty).</p>")
    body.append("<nav>" + " · ".join(f"<a href='#{s}'>{SECTION_TITLES[s]}</a>" for s in sections) + "</nav>")
    for s, charts in sections.items():
        body.append(f"<h2 id='{s}'>{SECTION_TITLES[s]}</h2>{_section_svg(charts)}")
    body.append(f"<h2>Anomalies</h2>{anomalies_html(runs)}")
    body += [run_details_html(label, d) for label, d in zip(labels, run_dirs, strict=True)]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}{_CHECK_SCRIPT}</body></html>")  # fmt: skip


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_html(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of `run_dirs` to `out` (default: the first run's report.html); return it."""
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"run folder {d} does not exist", fix="pass the output_dir of a run")
        if not (d / "metrics.jsonl").is_file() and not (d / "config.yaml").is_file():
            raise DataError(f"{d} holds neither metrics.jsonl nor config.yaml, so it is no run folder",
                            fix="pass a run's output_dir (the folder with metrics.jsonl)")  # fmt: skip
    target = Path(out) if out is not None else dirs[0] / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, render_html(dirs))


def pipeline_html(pipeline_dir: str | Path) -> Path:
    """PIPELINE_DIR/report.html: the stage table of pipeline_state.json, each stage's own
    report.html (written when missing and the stage logged metrics), and report.md."""
    root = Path(pipeline_dir)
    state = _load_json(root / "pipeline_state.json")
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise DataError(f"{root / 'pipeline_state.json'} is missing or not a pipeline state",
                        fix="pass the output_dir of `posttrain run`")  # fmt: skip
    rows = []
    for name, st in state["stages"].items():
        out_dir = Path(st.get("outputs", {}).get("output_dir", ""))
        link = ""
        if (out_dir / "metrics.jsonl").is_file():
            report = out_dir / "report.html"
            if not report.is_file():
                run_html([out_dir])
            href = os.path.relpath(report, root)
            link = f"<a class='stage-report' href='{escape(href)}'>report.html</a>"
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(str(st.get('command', '')))}</td>"
                    f"<td>{escape(str(st.get('status', '')))}</td><td>{float(st.get('seconds', 0)):.1f}</td>"
                    f"<td>{escape(str(out_dir))}</td><td>{link}</td></tr>")  # fmt: skip
    head = "".join(f"<th>{c}</th>" for c in ("stage", "command", "status", "wall s", "output", "report"))
    md = root / "report.md"
    md_html = f"<h2>report.md</h2><pre>{escape(md.read_text(encoding='utf-8'))}</pre>" if md.is_file() else ""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Pipeline report</title>"
            f"<style>{_STYLE}</style></head><body><h1>Pipeline report: {escape(str(root))}</h1>"
            f"<table id='stages'><tr>{head}</tr>{''.join(rows)}</table>{md_html}</body></html>")  # fmt: skip
    return write_atomic(root / "report.html", page)


def report_main(dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """`posttrain report`: one report of the runs in `dirs` (overlaid), or, for a pipeline's
    output_dir (it has pipeline_state.json), the pipeline's report.html."""
    if not dirs:
        raise DataError("no run folder given", fix="posttrain report RUN_DIR [RUN_DIR ...] [--out FILE]")
    paths = [Path(d) for d in dirs]
    pipelines = [p for p in paths if (p / "pipeline_state.json").is_file()]
    if pipelines and len(paths) > 1:
        raise DataError(f"{pipelines[0]} is a pipeline folder; a pipeline is reported alone",
                        fix="pass one pipeline folder, or several run folders (its stages' output dirs)")  # fmt: skip
    if pipelines:
        return [pipeline_html(pipelines[0])]
    return [run_html(paths, out)]

"""Self-contained SVG line charts of run metrics (no plotting dependency).

`metric_series` reads curves out of a run's `metrics.jsonl`; `line_chart` draws one
chart (several named series, linear axes); `chart_grid` lays several charts out in one
SVG, e.g. reward / KL / length / held-out accuracy of an RL run side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
Series = Sequence[tuple[float, float]]


def metric_series(metrics_path: str | Path, key: str) -> list[tuple[float, float]]:
    """(step, value) for every line of a metrics.jsonl that has `key` and a finite value."""
    points = []
    for line in Path(metrics_path).read_text().splitlines():
        row = json.loads(line)
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            points.append((float(row["step"]), float(value)))
    return points


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def line_chart(
    series: Mapping[str, Series],
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    *,
    width: int = 420,
    height: int = 280,
    origin: tuple[float, float] = (0.0, 0.0),
    markers: Sequence[tuple[float, str]] = (),
) -> list[str]:
    """SVG elements of one chart with its top-left corner at `origin` (wrap them with `svg_document`).

    markers: (step, label) pairs drawn as red dashed vertical lines (e.g. anomaly events).
    Each series' polyline carries `class="series"` and `data-points` (its point count), so a
    browser test can check the rendered DOM.
    """
    ox, oy = origin
    left, right, top, bottom = ox + 52, ox + width - 12, oy + 30, oy + height - 58
    points = [p for s in series.values() for p in s]
    xs = [p[0] for p in points] + [float(m[0]) for m in markers] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)

    parts = [
        f'<text x="{(left + right) / 2:.0f}" y="{oy + 18}" text-anchor="middle" font-size="13">{escape(title)}</text>'
    ]
    for y in yt:
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{right}" y2="{py(y):.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in xt:
        parts.append(f'<text x="{px(x):.1f}" y="{bottom + 15}" text-anchor="middle">{x:g}</text>')
    parts.append(
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#444"/>'
    )
    parts.append(
        f'<text x="{(left + right) / 2:.0f}" y="{bottom + 32}" text-anchor="middle">{escape(xlabel)}</text>'
    )
    if ylabel:
        mid = (top + bottom) / 2
        parts.append(
            f'<text x="{ox + 12}" y="{mid:.0f}" text-anchor="middle" transform="rotate(-90 {ox + 12} {mid:.0f})">{escape(ylabel)}</text>'
        )
    lx, ly = left + 8, bottom + 40
    for k, (name, pts) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        if pts:
            parts.append(
                f'<polyline class="series" data-name="{escape(name)}" data-points="{len(pts)}" points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>'
            )
        parts += (
            []
            if len(pts) > 60
            else [  # dots (with a hover value) only where they stay readable
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"><title>{escape(name)}: {y:.4g} at {x:g}</title></circle>'
                for x, y in pts
            ]
        )
        item = 26 + 6 * len(name)  # legend entries flow left to right and wrap (about 6 px a character)
        if lx + item > right and lx > left + 8:
            lx, ly = left + 8, ly + 13
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="{ly + 9}">{escape(name)}</text>')
        lx += item
    for x, label in markers:
        parts.append(
            f'<line class="marker" x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{bottom}" stroke="#d00" stroke-dasharray="4 3"><title>{escape(label)}</title></line>'
        )
    return parts  # fmt: skip


def svg_document(parts: Sequence[str], width: int, height: int) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">'
    )
    return "\n".join([head, '<rect width="100%" height="100%" fill="white"/>', *parts, "</svg>"])


def chart_grid(charts: Sequence[dict], columns: int = 2, width: int = 420, height: int = 280) -> str:
    """One SVG holding several `line_chart`s (each given as its keyword arguments) in a grid."""
    parts: list[str] = []
    for i, chart in enumerate(charts):
        origin = ((i % columns) * width, (i // columns) * height)
        parts += line_chart(**chart, width=width, height=height, origin=origin)
    rows = max(1, math.ceil(len(charts) / columns))
    return svg_document(parts, width * min(columns, max(len(charts), 1)), height * rows)

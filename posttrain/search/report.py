"""Reports of a strategy comparison: one row per strategy, a markdown table, the matched-compute
ratio, and a plot of accuracy against compute as a self-contained SVG (and an HTML page).

Rows that select with an oracle (the true verifier or step checker, ``StrategyRow.oracle``)
are labelled ``(oracle)``, listed after the learned rows under a reference-band note, drawn
dashed, and never mixed into a learned row's matched-compute baseline: they are upper bounds.

Compute is the number of generated tokens per problem (all samples, steps, rollouts, probes
and critiques, as the strategies' `Cost` counts them). No plotting dependency: the SVG is
written here, on a log-scaled token axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.sax.saxutils import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass
class StrategyRow:
    """One strategy's results on a problem set."""

    label: str
    strategy: str
    n: int
    correct: int
    generated_tokens: int
    prompt_tokens: int = 0
    policy_calls: int = 0
    """Policy calls summed over problems (a batched call counts once per problem in it)."""
    scorer_calls: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    by_level: dict[str, float] = field(default_factory=dict)
    """Accuracy per ``task/L<level>``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific facts (e.g. compute_optimal's bin counts and probe tokens)."""
    series: str = ""
    """Plot series (default: the strategy name): its rows are joined by a line in token order."""
    oracle: bool = False
    """It selects with the ground truth (``verifier`` / ``oracle_prm``): an upper bound."""

    @property
    def line(self) -> str:
        name = self.series or self.strategy
        return f"{name} (oracle)" if self.oracle and "oracle" not in name else name

    @property
    def display(self) -> str:
        return f"{self.label} (oracle)" if self.oracle and "oracle" not in self.label else self.label

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def tokens_per_problem(self) -> float:
        return self.generated_tokens / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "tokens_per_problem": self.tokens_per_problem}


COLUMNS = ("strategy", "acc %", "correct", "tokens/problem", "tokens", "calls/problem", "scorer calls",
           "wall s")  # fmt: skip
"""Table columns: accuracy, generated tokens per problem and in all, policy calls per problem,
scorer calls in all, wall-clock seconds."""


ORACLE_NOTE = (
    "Reference band (oracle): the rows below select with the true answer or step checker, "
    "which no deployed system has; read them as upper bounds, not as methods."
)


def ordered(rows: Sequence[StrategyRow]) -> list[StrategyRow]:
    """Learned / scorer-free rows first, then the oracle rows (each group in its given order)."""
    return [r for r in rows if not r.oracle] + [r for r in rows if r.oracle]


def row_cells(row: StrategyRow) -> list[str]:
    """The table cells of one row, in `COLUMNS` order (an oracle row's label ends "(oracle)")."""
    per = row.policy_calls / row.n if row.n else 0.0
    return [row.display, f"{100 * row.accuracy:.1f}", f"{row.correct}/{row.n}", f"{row.tokens_per_problem:.1f}",
            str(row.generated_tokens), f"{per:.1f}", str(row.scorer_calls), f"{row.seconds:.1f}"]  # fmt: skip


def format_markdown(rows: Sequence[StrategyRow], ratios: Sequence[dict[str, Any]] = ()) -> str:
    """A markdown table of ``rows`` (see `COLUMNS`): learned rows, then the oracle reference band
    (a separating row names it), then one line per matched-compute ratio."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    rows = ordered(rows)
    for i, r in enumerate(rows):
        if r.oracle and (i == 0 or not rows[i - 1].oracle):
            lines.append("| *reference band: oracle scorers, upper bounds* |" + " |" * (len(COLUMNS) - 1))
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    if any(r.oracle for r in rows):
        lines += ["", ORACLE_NOTE]
    for r in ratios:
        lines.append("")
        lines.append(describe_ratio(r))
    return "\n".join(lines)


def tokens_at_accuracy(curve: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """Tokens a baseline needs for ``accuracy``, from its ``(tokens, accuracy)`` points.

    Linear interpolation between the cheapest point reaching ``accuracy`` and the point just
    cheaper than it; None when no point reaches it or the cheapest point already exceeds it
    (no honest estimate outside the measured range).
    """
    pts = sorted(curve)
    for i, (t, a) in enumerate(pts):
        if a >= accuracy:
            if i == 0:
                return t if a == accuracy else None
            t0, a0 = pts[i - 1]
            return t0 + (accuracy - a0) * (t - t0) / (a - a0) if a > a0 else t
    return None


def compute_ratios(
    rows: Sequence[StrategyRow], baseline: str = "best_of_n", target: str = "compute_optimal"
) -> list[dict[str, Any]]:
    """For each ``target`` row: the tokens ``baseline`` rows need for the same accuracy, and their
    ratio to the target's tokens (> 1: the target is cheaper). Needs baseline rows at two or
    more budgets for interpolation; ``baseline_tokens`` is None outside their range. When the
    target beats the baseline's best measured accuracy, ``ratio_at_least`` is that point's tokens
    over the target's: a lower bound, if more baseline compute never lowers its accuracy.
    A target is compared with baseline rows of its own kind (oracle with oracle, learned with
    learned)."""
    out = []
    for r in rows:
        curve = [
            (b.tokens_per_problem, b.accuracy)
            for b in rows
            if b.strategy == baseline and b.oracle == r.oracle
        ]
        if r.strategy != target or not curve:
            continue
        need = tokens_at_accuracy(curve, r.accuracy)
        ratio = need / r.tokens_per_problem if need is not None and r.tokens_per_problem else None
        best_t, best_a = max(curve, key=lambda p: (p[1], -p[0]))
        bound = (
            best_t / r.tokens_per_problem
            if need is None and best_a < r.accuracy and r.tokens_per_problem
            else None
        )
        out.append({"label": r.display, "baseline": baseline + (" (oracle)" if r.oracle else ""), "accuracy": r.accuracy, "tokens": r.tokens_per_problem,
                    "baseline_tokens": need, "ratio": ratio, "ratio_at_least": bound,
                    "baseline_best": {"tokens": best_t, "accuracy": best_a}})  # fmt: skip
    return out


def describe_ratio(r: dict[str, Any]) -> str:
    """One sentence on a `compute_ratios` entry."""
    head = f"{r['label']}: {100 * r['accuracy']:.1f}% at {r['tokens']:.0f} tokens/problem"
    if r["ratio"] is None and r.get("ratio_at_least") is not None:
        best = r["baseline_best"]
        return (
            f"{head}; {r['baseline']}'s best measured point is lower ({100 * best['accuracy']:.1f}% at "
            f"{best['tokens']:.0f}): {r['baseline']} / {r['label']} compute >= {r['ratio_at_least']:.2f}."
        )
    if r["ratio"] is None:
        return f"{head}; {r['baseline']} was not measured around that accuracy (no matched-compute ratio)."
    return (
        f"{head}; {r['baseline']} reaches it with {r['baseline_tokens']:.0f} (interpolated): "
        f"{r['baseline']} / {r['label']} compute = {r['ratio']:.2f} (> 1: {r['label']} is cheaper)."
    )


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0**k for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
    return ticks


def svg_plot(rows: Sequence[StrategyRow], title: str = "Accuracy vs compute", width: int = 720,
             height: int = 440) -> str:  # fmt: skip
    """Accuracy (%) against generated tokens per problem (log axis): a point per row, rows of the
    same series (`StrategyRow.line`) joined by a line in token order, a legend by series."""
    left, right, top, bottom = 60, 170, 40, 50
    xs = [max(r.tokens_per_problem, 1.0) for r in rows] or [1.0]
    lo, hi = min(xs) / 1.3, max(xs) * 1.3
    span = math.log10(hi) - math.log10(lo)

    def px(t: float) -> float:
        return left + (math.log10(max(t, 1.0)) - math.log10(lo)) / span * (width - left - right)

    def py(acc: float) -> float:
        return top + (1 - acc) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']  # fmt: skip
    x1, y1 = width - right, height - bottom
    for acc in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = py(acc)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{100 * acc:.0f}</text>')
    for t in _log_ticks(lo, hi):
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y1}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="middle">{t:g}</text>')
    parts.append(
        f'<rect x="{left}" y="{top}" width="{x1 - left}" height="{y1 - top}" fill="none" stroke="#444"/>'
    )
    parts.append(f'<text x="{(left + x1) / 2:.0f}" y="{height - 12}" text-anchor="middle">'
                 "generated tokens per problem (log scale)</text>")  # fmt: skip
    parts.append(f'<text x="16" y="{(top + y1) / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {(top + y1) / 2:.0f})">accuracy %</text>')  # fmt: skip
    names = list(dict.fromkeys(r.line for r in rows))
    for k, name in enumerate(names):
        color = PALETTE[k % len(PALETTE)]
        mine = sorted((r for r in rows if r.line == name), key=lambda r: r.tokens_per_problem)
        dash = ' stroke-dasharray="5,3"' if mine and mine[0].oracle else ""
        if len(mine) > 1:
            pts = " ".join(f"{px(r.tokens_per_problem):.1f},{py(r.accuracy):.1f}" for r in mine)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        for r in mine:
            x, y = px(r.tokens_per_problem), py(r.accuracy)
            tip = f"{r.display}: {100 * r.accuracy:.1f}% at {r.tokens_per_problem:.1f} tokens/problem"
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>{escape(tip)}</title></circle>'
            )
            parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" fill="{color}">{escape(r.display)}</text>')
        ly = top + 8 + 18 * k
        parts.append(f'<rect x="{x1 + 14}" y="{ly - 8}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x1 + 30}" y="{ly + 1}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def html_page(
    title: str, svg: str, rows: Sequence[StrategyRow], ratios: Sequence[dict[str, Any]] = ()
) -> str:
    """A standalone HTML page: the plot inline, the table, the matched-compute ratios."""
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body, rows = "", ordered(rows)
    for i, r in enumerate(rows):
        if r.oracle and (i == 0 or not rows[i - 1].oracle):
            body += f"<tr><td colspan='{len(COLUMNS)}'><em>{escape(ORACLE_NOTE)}</em></td></tr>"
        body += "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row_cells(r)) + "</tr>"
    notes = "".join(f"<p>{escape(describe_ratio(r))}</p>" for r in ratios)
    style = "body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}th{border-bottom:1px solid #444}"
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{style}</style></head><body>\n<h1>{escape(title)}</h1>\n{svg}\n"
        f"<table><tr>{head}</tr>{body}</table>\n{notes}\n</body></html>\n"
    )

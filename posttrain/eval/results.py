"""An evaluation's results: per-problem samples, metrics with intervals, results.json and report.md.

``results.json`` is one JSON object: ``status`` (``complete`` | ``partial``, with ``error``
when a run stopped), ``config`` (the recipe), ``metrics`` (per decoding label, per metric:
``value``, ``ci_low``, ``ci_high``, ``n``), ``breakdown`` (per decoding: by ``source``,
``level`` and ``tag``), ``timing`` (per decoding: seconds, generated tokens, tokens/s) and,
last, ``problems``: one line per problem with its record's extra fields (``task_id``...), its
source, ``where``, level, tags, ground truth and, per decoding, every sample with its score.
It is rewritten atomically after every chunk, so a failure leaves the finished problems.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.eval.data import EvalItem
from posttrain.eval.metrics import breakdown, problem_values, summarize


@dataclass
class DecodingRun:
    """What one decoding produced for one problem: its samples, and search tokens beyond them."""

    samples: list[dict[str, Any]]
    """``{"text", "tokens", "score", "correct", "answer", "why", "finish_reason"}`` each."""
    extra_tokens: int = 0
    """Tokens the decoding generated beyond the samples (a search's other branches and probes)."""


@dataclass
class EvalState:
    """Every finished (problem, decoding) pair, and the per-decoding generation timing."""

    items: list[EvalItem]
    ks: dict[str, list[int]]
    """pass@k / maj@k values reported per decoding label."""
    done: dict[str, dict[int, DecodingRun]] = field(default_factory=dict)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, dict[str, dict]] = field(default_factory=dict)
    """Metrics computed apart from the decodings, by label (``perplexity/<set>``)."""
    precision: dict[str, str] | None = None
    """The decoding precision used and why (`posttrain.train.precision.Choice`); None: nothing decoded."""

    def record(self, label: str, index: int, run: DecodingRun) -> None:
        self.done.setdefault(label, {})[index] = run

    def add_time(self, label: str, seconds: float, tokens: int) -> None:
        t = self.timing.setdefault(label, {"seconds": 0.0, "generated_tokens": 0})
        t["seconds"] += seconds
        t["generated_tokens"] += tokens
        t["tokens_per_s"] = t["generated_tokens"] / t["seconds"] if t["seconds"] > 0 else 0.0

    def values(self, label: str, index: int) -> dict[str, float]:
        run = self.done[label][index]
        s = run.samples
        return problem_values([x["correct"] for x in s], [x["score"] for x in s], [x["tokens"] for x in s],
                              [x["answer"] for x in s], self.ks[label], run.extra_tokens)  # fmt: skip

    def metrics(self, n_boot: int, seed: int) -> tuple[dict, dict]:
        """``(metrics, breakdown)`` per decoding label over the problems it finished."""
        metrics, parts = {}, {}
        for label, runs in self.done.items():
            idx = sorted(runs)
            metrics[label] = summarize([self.values(label, i) for i in idx], n_boot, seed)
            keys = {"source": lambda i: self.items[i].source, "level": lambda i: level_key(self.items[i]),
                    "tag": lambda i: self.items[i].tags}  # fmt: skip
            parts[label] = {
                name: breakdown(idx, key, lambda i, lb=label: self.values(lb, i), n_boot, seed)
                for name, key in keys.items()
            }
        return {**metrics, **self.extra}, parts

    def problem_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, item in enumerate(self.items):
            runs = {label: done[i] for label, done in self.done.items() if i in done}
            if not runs:
                continue
            row = {**item.extra, "index": i, "source": item.source, "where": item.where,
                   "level": item.level, "tags": item.tags, "question": item.question,
                   "ground_truth": item.metadata.get("ground_truth"),
                   "decodings": {lb: {"samples": r.samples, "extra_tokens": r.extra_tokens} for lb, r in runs.items()}}  # fmt: skip
            rows.append(row)
        return rows

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Take the finished pairs of an earlier partial run (same recipe, same items)."""
        for row in rows:
            i = row.get("index")
            if not isinstance(i, int) or not 0 <= i < len(self.items):
                continue
            if (row.get("where"), row.get("question")) != (self.items[i].where, self.items[i].question):
                continue  # the data changed under this problem: decode it again
            for label, run in row.get("decodings", {}).items():
                if label in self.ks:
                    self.record(label, i, DecodingRun(run["samples"], run.get("extra_tokens", 0)))


def level_key(item: EvalItem) -> str | None:
    """``<task or source>/L<level>``, or None for a problem without a level."""
    if item.level is None:
        return None
    return f"{item.metadata.get('task') or item.source}/L{item.level}"


def _clean(x: Any) -> Any:
    """NaN -> None, recursively (results.json stays strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def results_text(header: dict[str, Any], problems: list[dict[str, Any]]) -> str:
    """The header indented, then ``problems`` one JSON line each (module docstring)."""
    head = json.dumps(_clean(header), indent=1, ensure_ascii=False)
    body = ",\n".join("  " + json.dumps(_clean(p), ensure_ascii=False) for p in problems)
    return head[:-1].rstrip() + ',\n "problems": [\n' + body + ("\n" if body else "") + " ]\n}\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(
    out: Path, state: EvalState, config: dict, status: str, n_boot: int, seed: int, error: str | None = None
) -> dict[str, Any]:
    """Write ``out/results.json`` (and ``report.md`` when complete); returns the header."""
    metrics, parts = state.metrics(n_boot, seed)
    header: dict[str, Any] = {"status": status}
    if error:
        header["error"] = error
    header.update(config=config, metrics=metrics, breakdown=parts, timing=state.timing)
    if state.precision is not None:  # bf16 and fp32 decoding can differ in a few greedy tokens
        header["precision"] = state.precision
    write_atomic(out / "results.json", results_text(header, state.problem_rows()))
    if status == "complete":
        write_atomic(out / "report.md", report_markdown(header, len(state.items)))
    return header


def _cell(m: dict[str, Any] | None, pct: bool) -> str:
    if not m or m.get("value") is None or (isinstance(m["value"], float) and math.isnan(m["value"])):
        return "-"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.1f}")
    return f"{f(m['value'])} [{f(m['ci_low'])}, {f(m['ci_high'])}]"


_PCT = ("accuracy", "pass@", "maj@")


def report_markdown(header: dict[str, Any], n_problems: int) -> str:
    """Metrics per decoding (rates in %, with 95% bootstrap intervals), per-source and per-level
    breakdowns of the headline metric, and timing."""
    lines = [f"# Evaluation ({n_problems} problems)", "",
             "Every value is a mean over problems with its 95% bootstrap interval; rates in %.", ""]  # fmt: skip
    metrics = _clean(header["metrics"])
    for label, ms in metrics.items():
        lines += [f"## {label}", "", "| metric | value [95% CI] | n |", "|---|---|---|"]
        lines += [f"| {k} | {_cell(m, k.startswith(_PCT))} | {m['n']} |" for k, m in ms.items()]
        t = header["timing"].get(label)
        if t:
            lines += ["", f"{t['generated_tokens']} tokens generated in {t['seconds']:.1f} s "
                      f"({t.get('tokens_per_s', 0):.0f} tokens/s)"]  # fmt: skip
        parts = _clean(header["breakdown"].get(label, {}))
        for name in ("source", "level", "tag"):
            groups = parts.get(name) or {}
            if len(groups) < 2:
                continue
            cols = ["accuracy", *_pass_keys(ms)]
            lines += ["", f"By {name} (%):", "", f"| {name} | " + " | ".join(cols) + " | n |",
                      "|---" * (len(cols) + 2) + "|"]  # fmt: skip
            for g, gm in groups.items():
                cells = [_cell(gm.get(k), True) for k in cols]
                lines.append(f"| {g} | " + " | ".join(cells) + f" | {gm['accuracy']['n']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _pass_keys(ms: dict[str, Any]) -> list[str]:
    return [k for k in ms if k.startswith("pass@") and k != "pass@1"]

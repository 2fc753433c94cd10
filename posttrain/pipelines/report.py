"""The pipeline's report: one held-out accuracy table with a column per stage, the comparisons
(treatment vs control, per part of each task), RL curves, search tables, and every stage's wall
time and outputs. Everything is read from the stages' own files, so a resumed pipeline reports
the same as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from posttrain.eval.accuracy import AccuracyReport, format_table
from posttrain.monitor.logger import console


def mean_step_seconds(run_dir: Path, key: str) -> float | None:
    """Mean logged ``key`` (a training step's seconds) of a run; None when it logged none.

    Step timings, not the stage's wall clock: a rerun resumes a finished stage in seconds."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    times = [row[key] for row in map(json.loads, path.read_text().splitlines()) if key in row]
    return sum(times) / len(times) if times else None


def grade_stage(out: Path, name: str, record: dict[str, Any], cfg) -> AccuracyReport:
    """Greedy held-out accuracy of a stage's model, cached in OUT/eval/NAME.json by the model's
    hash and the grading settings (a skipped stage is not graded again)."""
    from dataclasses import asdict

    from posttrain.data.tasks import task_problems
    from posttrain.eval.accuracy import task_accuracy
    from posttrain.models.load import load_model, load_tokenizer

    key = hashlib.sha256(json.dumps([record["digest"], asdict(cfg)], sort_keys=True).encode()).hexdigest()
    cache = out / "eval" / f"{name}.json"
    if cache.is_file() and (saved := json.loads(cache.read_text()))["key"] == key:
        return _report_from(saved)
    model_dir = record["outputs"]["final"]
    problems = task_problems(cfg.tasks, "test", cfg.n_per_level, seed=cfg.seed, levels=cfg.levels)
    report, rows = task_accuracy(
        load_model(model_dir), load_tokenizer(model_dir), problems, cfg.max_new_tokens, cfg.batch_size
    )
    console.print(f"held-out accuracy of {name}: {100 * report.acc():.1f}% ({len(problems)} problems)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "eval" / f"{name}_completions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cells = [[t, lv, report.correct[(t, lv)], n] for (t, lv), n in sorted(report.total.items())]
    body = {
        "key": key,
        "cells": cells,
        "generated_tokens": report.generated_tokens,
        "seconds": report.seconds,
    }
    _write_atomic(cache, json.dumps(body))
    return report


def _report_from(saved: dict) -> AccuracyReport:
    return AccuracyReport(
        correct={(t, lv): c for t, lv, c, _ in saved["cells"]},
        total={(t, lv): n for t, lv, _, n in saved["cells"]},
        generated_tokens=saved["generated_tokens"],
        seconds=saved["seconds"],
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def demonstrated_levels(recipe: Any) -> dict[str, list[int]] | None:
    """Task -> the levels an SFT recipe on the task suite had demonstrations of (None: not one)."""
    from posttrain.data.tasks import get_task

    data = getattr(recipe, "data", None)
    if getattr(data, "train", None) != "tasks":
        return None
    wanted = data.levels
    return {t: [lv for lv in get_task(t).levels if wanted is None or lv in wanted] for t in data.tasks}


def _levels(levels: list[int]) -> str:
    return f"L{levels[0]}-{levels[-1]}" if levels == list(range(levels[0], levels[-1] + 1)) else (
        ", ".join(f"L{lv}" for lv in levels)
    )  # fmt: skip


def _parts(
    rl: AccuracyReport, demos: dict[str, list[int]] | None
) -> list[tuple[str, str | None, list | None]]:
    """(label, task, levels) of each part of each task, split by whether SFT had demonstrations."""
    parts: list[tuple[str, str | None, list[int] | None]] = []
    for task in sorted({k[0] for k in rl.total}):
        levels = sorted(lv for t, lv in rl.total if t == task)
        seen = levels if demos is None else [lv for lv in levels if lv in demos.get(task, [])]
        unseen = [lv for lv in levels if lv not in seen]
        if demos is not None and seen and unseen:
            parts += [(f"{task} {_levels(seen)} (with demonstrations)", task, seen),
                      (f"{task} {_levels(unseen)} (no demonstrations)", task, unseen)]  # fmt: skip
            if len(unseen) > 1:
                parts += [(f"{task} L{lv} (no demonstrations)", task, [lv]) for lv in unseen]
        else:
            note = " (no demonstrations)" if demos is not None and not seen else ""
            parts.append((task + note, task, None))
    return [*parts, ("all tasks", None, None)]


def _arm(values: list[float], base: float) -> str:
    """One arm of a verdict line: its accuracy, or its mean +- sd and runs over seeds."""
    if len(values) == 1:
        return f"{values[0]:.1f} ({values[0] - base:+.1f})"
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return f"{mean:.1f} ± {sd:.1f} ({mean - base:+.1f}; runs {', '.join(f'{v:.1f}' for v in values)})"


def verdict(
    reports: dict[str, AccuracyReport],
    treatment: str,
    control: str,
    baseline: str,
    demos: dict[str, list[int]] | None = None,
    runs: dict[str, list[str]] | None = None,
) -> list[str]:
    """Per task, and per part of a task with / without demonstrations (``demos``: task -> levels the
    baseline saw solved): did the treatment or the control end higher? Honest, from the table.

    ``runs`` maps an arm to all its graded runs (several seeds, `StageConfig.seeds`): each arm is
    then its mean +- sample sd over them, the runs are listed, and the winner is by the means."""
    runs = runs or {}
    arms = {a: [n for n in runs.get(a, [a]) if n in reports] for a in (treatment, control)}
    if baseline not in reports or not all(arms.values()):
        return []
    base = reports[baseline]
    seeds = max(len(v) for v in arms.values())
    lines = []
    for name, task, levels in _parts(reports[treatment], demos):
        tr, ctl = ([100 * reports[n].acc(task, levels=levels) for n in arms[a]] for a in (treatment, control))
        s = 100 * base.acc(task, levels=levels)
        if any(math.isnan(v) for v in (*tr, *ctl)):
            continue
        a, b = statistics.fmean(tr), statistics.fmean(ctl)
        winner = treatment if a > b else control if b > a else None
        said = (
            f"{winner} ends higher ({a - b:+.1f} points{', means' if seeds > 1 else ''})"
            if winner
            else "a tie"
        )
        if max(a, b) <= s:
            said += f"; neither improved on {baseline}"
        lines.append(f"- {name}: {baseline} {s:.1f} -> {treatment} {_arm(tr, s)} "
                     f"vs {control} {_arm(ctl, s)}: {said}.")  # fmt: skip
    return lines


def write_rl_curves(out: Path, name: str, rl_dir: Path) -> Path | None:
    """reward / KL / response length / held-out accuracy of an RL stage as one SVG."""
    from posttrain.monitor.plots import chart_grid, metric_series

    metrics = rl_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None

    def chart(title: str, **keys: str) -> dict:
        return {"series": {k: metric_series(metrics, v) for k, v in keys.items()}, "title": title}

    svg = chart_grid([
        chart("training reward (mean)", reward="reward/total_mean"),
        chart("KL to the reference (token mean)", kl="kl/token_mean"),
        chart("response length (tokens)", mean="response/length_mean", max="response/length_max"),
        chart("held-out greedy accuracy", all="eval/task_accuracy/overall", **_level_keys(metrics)),
    ])  # fmt: skip
    path = out / f"{name}_curves.svg"
    path.write_text(svg)
    return path


def _level_keys(metrics: Path, most: int = 6) -> dict[str, str]:
    keys: set[str] = set()
    for line in metrics.read_text().splitlines():
        keys |= {k for k in json.loads(line) if k.startswith("eval/task_accuracy/") and "/L" in k}
    return {} if len(keys) > most else {k.removeprefix("eval/task_accuracy/"): k for k in sorted(keys)}


def stage_metrics(run_dir: Path, window: int = 5) -> list[tuple[str, float, float]]:
    """(key, first, last) of a run's held-out ``eval/`` metrics (per-level accuracies left out),
    and of its training reward as the mean of the first and of the last ``window`` logged values."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    series: dict[str, list[float]] = {}
    for row in map(json.loads, path.read_text().splitlines()):
        for k, v in row.items():
            per_level = k.startswith("eval/task_accuracy/") and k != "eval/task_accuracy/overall"
            if (k.startswith("eval/") and not per_level or k == "reward/total_mean") and isinstance(
                v, int | float
            ):
                series.setdefault(k, []).append(float(v))
    out = []
    for k, vs in series.items():
        w = window if k == "reward/total_mean" else 1
        first, last = vs[:w], vs[-w:]
        out.append((k, sum(first) / len(first), sum(last) / len(last)))
    return out


def filter_summary(name: str, out_dir: Path) -> list[str]:
    """A rejection-sampling stage's overall pass rate, kept fraction and pass@k."""
    path = out_dir / "filter_report.json"
    if not path.is_file():
        return []
    ov = json.loads(path.read_text())["overall"]
    ks = ", ".join(f"{k} {v:.3f}" for k, v in ov.items() if k.startswith("pass@"))
    return [f"## Rejection sampling: stage {name}", "",
            f"{ov['completions']} completions of {ov['prompts']} prompts: pass rate {ov['pass_rate']:.3f}, "
            f"{ov['kept']} kept (kept fraction {ov['kept_fraction']:.3f}, prompts kept {ov['prompts_kept']:.3f}); "
            f"{ks}. Per prompt: `{path}`.", ""]  # fmt: skip


def search_table(name: str, out_dir: Path) -> list[str]:
    """A search stage's strategy table (from its results.json) as markdown lines."""
    from posttrain.search.report import StrategyRow, format_markdown

    path = out_dir / "results.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    fields = StrategyRow.__dataclass_fields__
    rows = [StrategyRow(**{k: v for k, v in r.items() if k in fields}) for r in data["rows"]]
    return [f"## Test-time strategies: stage {name} ({data['model']}, {data['problems']} problems)", "",
            format_markdown(rows, data.get("compute_ratios", [])), "",
            f"Plot and details: [{out_dir / 'results.html'}]({out_dir / 'results.html'})", ""]  # fmt: skip


def write_report(cfg, results, grades: dict[str, AccuracyReport]) -> Path:
    """OUTPUT_DIR/report.md and accuracy.json; the accuracy table on the console."""
    out = Path(cfg.output_dir)
    recipes = {r.name: r.recipe for r in results}
    from posttrain.pipelines.runner import seed_runs

    runs = seed_runs(cfg.stages)
    lines = ["# Pipeline report", ""]
    if grades:
        table = format_table(grades, markdown=True)
        e = cfg.eval
        console.print(
            "\n[bold]held-out accuracy (%), greedy, verifier-graded[/bold]\n" + format_table(grades)
        )
        lines += [f"Held-out accuracy (%) of each stage's model on the task suite's test split ({e.n_per_level} "
                  f"problems per task and level); greedy, graded by each task's verifier.", "", table, ""]  # fmt: skip
    for c in cfg.compare:
        demos = demonstrated_levels(recipes.get(c.baseline))
        if not (v := verdict(grades, c.treatment, c.control, c.baseline, demos, runs)):
            continue
        held = [f"{t} {_levels(lv)}" for t, lv in (demos or {}).items() if lv]
        lines += [f"## {c.treatment} vs {c.control}", "",
                  f"Both start from `{c.baseline}`. "
                  + (f"`{c.baseline}` had demonstrations of {', '.join(held)}; the other levels had none. "
                     if held else "") + "Read each line as: the baseline's accuracy, then each arm's.",
                  "", *v, ""]  # fmt: skip
        if len(runs.get(c.treatment, [])) < 2 or len(runs.get(c.control, [])) < 2:
            lines += [f"One run per arm, so the spread over seeds is unknown and a gap of a few points may be "
                      f"noise: add `stages.{c.treatment}.seeds=[1,2] stages.{c.control}.seeds=[1,2]` for three.", ""]  # fmt: skip
    for r in results:
        if r.command == "rl" and (svg := write_rl_curves(out, r.name, Path(r.outputs["output_dir"]))):
            lines += [
                f"## {r.name} curves",
                "",
                f"![reward, KL, length and held-out accuracy]({svg.name})",
                "",
            ]
        if r.command == "search":
            lines += search_table(r.name, Path(r.outputs["output_dir"]))
        if r.command == "filter":
            lines += filter_summary(r.name, Path(r.outputs["output_dir"]))
    rows = [(r.name, *m) for r in results for m in stage_metrics(Path(r.outputs["output_dir"]))]
    if rows:
        lines += ["## Stage metrics", "", "Each stage's own held-out metrics (first and last evaluation) and its "
                  "training reward (mean of the first and of the last 5 steps).", "",
                  "| stage | metric | first | last |", "|---|---|---|---|",
                  *[f"| {n} | {k} | {a:.4g} | {b:.4g} |" for n, k, a, b in rows], ""]  # fmt: skip
    lines += ["## Stages", "", "| stage | command | status | wall s | output |", "|---|---|---|---|---|"]
    for r in results:
        note = " (earlier run)" if r.status == "skipped" else ""
        lines.append(
            f"| {r.name} | {r.command} | {r.status} | {r.seconds:.1f}{note} | `{r.outputs['path']}` |"
        )
    lines += ["", f"Total wall time of the stages: {sum(r.seconds for r in results):.1f} s", ""]
    _write_atomic(out / "report.md", "\n".join(lines))
    acc = {name: rep.to_dict() for name, rep in grades.items()}
    _write_atomic(out / "accuracy.json", json.dumps(acc, indent=1))
    if (out / "pipeline_state.json").is_file():  # report.html: the stage table, links to each stage's own
        from posttrain.monitor.html_report import pipeline_html

        pipeline_html(out)
    console.print(f"report: {out / 'report.md'}")
    return out / "report.md"

"""The quickstart chain end to end at toy sizes, the equal-compute control and the verdict."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from posttrain.config import load_recipe
from posttrain.eval.accuracy import AccuracyReport
from posttrain.monitor.plots import chart_grid, nice_ticks
from posttrain.pipelines.quickstart import QuickstartRecipe, control_recipe, run_quickstart, verdict

TOY = [
    "pretrain.model.hidden_size=32",
    "pretrain.model.num_layers=1",
    "pretrain.model.intermediate_size=64",
    "pretrain.model.vocab_size=300",
    "pretrain.corpus.n_docs=200",
    "pretrain.train.max_steps=3",
    "pretrain.train.batch_size=4",
    "pretrain.train.seq_len=128",
    "sft.data.n_per_level=4",
    "sft.data.eval_n_per_level=1",
    "sft.train.max_steps=3",
    "sft.train.eval_every=0",
    "rl.train.max_steps=2",
    "rl.train.eval_every=0",
    "rl.rollout.prompts_per_step=2",
    "rl.rollout.n=2",
    "rl.rollout.max_new_tokens=8",
    "rl.eval.n_per_level=1",
    "rl.eval.max_new_tokens=8",
    "search.tasks=[arith]",
    "search.levels=[1]",
    "search.n_per_level=1",
    "search.n=2",
    "eval.n_per_level=1",
    "eval.max_new_tokens=8",
]


def test_quickstart_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "qs"
    cfg = load_recipe(
        QuickstartRecipe,
        None,
        [*TOY, f"output_dir={out}", f"pretrain.output_dir={tmp_path / 'pt'}",
         f"sft.output_dir={out / 'sft'}", f"rl.output_dir={out / 'grpo'}"],
    )  # fmt: skip
    report = run_quickstart(cfg).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task"))
    assert header == "| task | level | pretrained | after SFT | after GRPO | more SFT (control) |"
    assert "## GRPO vs the equal-compute control" in report and "compute_optimal" in report
    for stage in ("pretrain", "sft", "grpo", "control (more SFT)", "search table"):
        assert f"- {stage}: " in report
    svg = ET.fromstring((out / "rl_curves.svg").read_text())
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "training reward (mean)" in titles and "KL to the SFT model (token mean)" in titles
    assert (out / "control" / "final" / "model.safetensors").is_file()
    assert (out / "grpo" / "final" / "model.safetensors").is_file()


def test_control_spends_grpo_wall_time_on_sft(tmp_path):
    cfg = load_recipe(QuickstartRecipe, None, [f"output_dir={tmp_path}", "sft.train.max_steps=500"])
    control = control_recipe(cfg, tmp_path / "sft", sft_seconds=100.0, rl_seconds=30.0)
    assert control.train.max_steps == 150  # 30 s at 0.2 s per SFT step
    assert control.optim.lr == cfg.control.lr and control.output_dir == str(tmp_path / "control")
    assert control.model.path == str(tmp_path / "sft")  # continues the SFT model, not the base
    assert control.data.tasks == cfg.rl.data.tasks == ["arith_mag"]
    assert control.data.levels == cfg.sft.data.levels == [1, 2]  # only the demonstrations there are
    assert cfg.sft.train.max_steps == 500  # the SFT recipe itself is untouched


def test_control_time_comes_from_the_runs_step_timings_not_the_stage_clock(tmp_path):
    """A re-run resumes finished stages in seconds; the control must still match GRPO's training time."""
    import json

    from posttrain.pipelines.quickstart import train_seconds

    run = tmp_path / "grpo"
    run.mkdir()
    rows = [{"step": 1, "time/step_s": 1.0}, {"step": 2, "time/step_s": 3.0}, {"step": 2, "eval/x": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_seconds(run, "time/step_s", max_steps=10) == 20.0  # mean 2 s x 10 steps
    assert train_seconds(run, "step_time_s", max_steps=10) is None  # no such timing logged
    assert train_seconds(tmp_path / "missing", "time/step_s", max_steps=10) is None


def _report(correct: dict[tuple[str, int], int], n: int = 10) -> AccuracyReport:
    return AccuracyReport(correct=dict(correct), total={k: n for k in correct})


def test_verdict_names_the_winner_per_task():
    reports = {
        "after SFT": _report({("arith", 1): 3, ("sort", 1): 5}),
        "after GRPO": _report({("arith", 1): 6, ("sort", 1): 5}),
        "more SFT (control)": _report({("arith", 1): 4, ("sort", 1): 7}),
    }
    lines = verdict(reports)
    assert (
        lines[0]
        == "- arith: SFT 30.0 -> GRPO 60.0 (+30.0) vs more SFT 40.0 (+10.0): GRPO ends higher (+20.0 points)."
    )
    assert (
        lines[1]
        == "- sort: SFT 50.0 -> GRPO 50.0 (+0.0) vs more SFT 70.0 (+20.0): more SFT ends higher (-20.0 points)."
    )
    assert lines[2] == "- all tasks: SFT 40.0 -> GRPO 55.0 (+15.0) vs more SFT 55.0 (+15.0): a tie."
    worse = {
        "after SFT": _report({("arith", 1): 3}),
        "after GRPO": _report({("arith", 1): 2}),
        "more SFT (control)": _report({("arith", 1): 1}),
    }
    assert verdict(worse)[0] == (
        "- arith: SFT 30.0 -> GRPO 20.0 (-10.0) vs more SFT 10.0 (-20.0): GRPO ends higher (+10.0 points); "
        "neither improved on the SFT model."
    )
    assert verdict({"after SFT": reports["after SFT"]}) == []


def test_verdict_splits_levels_with_and_without_demonstrations():
    reports = {
        "after SFT": _report({("m", 1): 9, ("m", 2): 7, ("m", 3): 1, ("m", 4): 0, ("s", 1): 2}),
        "after GRPO": _report({("m", 1): 9, ("m", 2): 6, ("m", 3): 4, ("m", 4): 0, ("s", 1): 2}),
        "more SFT (control)": _report({("m", 1): 10, ("m", 2): 8, ("m", 3): 1, ("m", 4): 0, ("s", 1): 2}),
    }
    lines = verdict(reports, demos={"m": [1, 2]})
    assert (
        lines[0]
        == "- m L1-2 (with demonstrations): SFT 80.0 -> GRPO 75.0 (-5.0) vs more SFT 90.0 (+10.0): more SFT ends higher (-15.0 points)."
    )
    assert (
        lines[1]
        == "- m L3-4 (no demonstrations): SFT 5.0 -> GRPO 20.0 (+15.0) vs more SFT 5.0 (+0.0): GRPO ends higher (+15.0 points)."
    )
    assert lines[2].startswith("- m L3 (no demonstrations): SFT 10.0 -> GRPO 40.0 (+30.0) vs more SFT 10.0")
    assert lines[3].startswith("- m L4 (no demonstrations): SFT 0.0 -> GRPO 0.0 (+0.0) vs more SFT 0.0")
    assert "neither improved" in lines[3]
    assert lines[4].startswith("- s (no demonstrations): SFT 20.0 -> GRPO 20.0")  # a task SFT never saw
    assert lines[5].startswith("- all tasks: SFT 38.0 -> GRPO 42.0 (+4.0) vs more SFT 42.0 (+4.0): a tie")


def test_demonstrated_levels_follow_the_sft_data():
    from posttrain.pipelines.quickstart import demonstrated_levels

    cfg = load_recipe(QuickstartRecipe, None, ["sft.data.tasks=[arith_mag, sort]", "sft.data.levels=[1, 2]"])
    assert demonstrated_levels(cfg) == {"arith_mag": [1, 2], "sort": [1, 2]}
    cfg = load_recipe(QuickstartRecipe, None, ["sft.data.tasks=[sort]", "sft.data.levels=null"])
    assert demonstrated_levels(cfg) == {"sort": [1, 2, 3, 4]}


def test_ticks_and_chart_geometry():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]  # raw step 0.25 -> the next round step, 0.5
    assert nice_ticks(3, 47) == [0.0, 20.0, 40.0, 60.0]  # raw 11 -> 20, from floor(3 / 20) * 20
    svg = ET.fromstring(
        chart_grid([{"series": {"a": [(0, 0.0), (10, 1.0)]}, "title": "t"}], width=400, height=300)
    )
    line = next(svg.iter("{http://www.w3.org/2000/svg}polyline"))
    (x0, y0), (x1, y1) = (tuple(map(float, p.split(","))) for p in line.get("points").split())
    assert (x0, x1) == (52.0, 388.0)  # left and right edges of the plot area
    assert y0 > y1  # larger values are drawn higher

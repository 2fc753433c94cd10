"""The quickstart pipeline end to end at toy sizes, the equal-compute control and the verdict."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import yaml

from posttrain.eval.accuracy import AccuracyReport
from posttrain.monitor.plots import chart_grid, nice_ticks
from posttrain.pipelines.report import demonstrated_levels, verdict
from posttrain.pipelines.runner import load_pipeline, run_pipeline

ARMS = ("grpo", "control", "sft")
TOY = [
    "stages.pretrain.model.hidden_size=32",
    "stages.pretrain.model.num_layers=1",
    "stages.pretrain.model.intermediate_size=64",
    "stages.pretrain.model.vocab_size=300",
    "stages.pretrain.corpus.n_docs=200",
    "stages.pretrain.train.max_steps=3",
    "stages.pretrain.train.batch_size=4",
    "stages.pretrain.train.seq_len=128",
    "stages.sft.data.n_per_level=4",
    "stages.sft.data.eval_n_per_level=1",
    "stages.sft.train.max_steps=3",
    "stages.grpo.train.max_steps=2",
    "stages.grpo.train.eval_every=0",
    "stages.grpo.rollout.prompts_per_step=2",
    "stages.grpo.rollout.n=2",
    "stages.grpo.rollout.max_new_tokens=8",
    "stages.grpo.eval.n_per_level=1",
    "stages.grpo.eval.max_new_tokens=8",
    "stages.control.data.n_per_level=4",
    "stages.control.data.eval_n_per_level=1",
    "stages.prm.data.n_per_level=2",
    "stages.prm.data.eval_n_per_level=1",
    "stages.prm.train.max_steps=2",
    "stages.prm.train.batch_size=4",
    "stages.orm.data.n_per_level=2",
    "stages.orm.data.eval_n_per_level=1",
    "stages.orm.train.max_steps=2",
    "stages.orm.train.batch_size=4",
    "stages.search.tasks.tasks=[arith]",
    "stages.search.tasks.levels=[1]",
    "stages.search.tasks.n_per_level=1",
    "eval.n_per_level=1",
    "eval.max_new_tokens=8",
]


def test_quickstart_pipeline_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "qs"
    seeds = ["stages.grpo.seeds=[1]", "stages.control.seeds=[1]"]
    cfg = load_pipeline(
        "recipes/quickstart.yaml",
        [*TOY, *seeds, f"output_dir={out}", f"stages.pretrain.output_dir={tmp_path / 'pt'}"],
    )
    report = run_pipeline(cfg).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task"))
    assert header == "| task | level | pretrain | sft | grpo | grpo-s1 | control | control-s1 |"
    assert "## grpo vs control" in report and "compute_optimal(PRM)" in report
    assert yaml.safe_load((out / "grpo-s1" / "config.yaml").read_text())["seed"] == 1
    line = next(ln for ln in report.splitlines() if ln.startswith("- all tasks:"))
    assert line.count(" ± ") == 2 and line.count("runs ") == 2  # each arm over its 2 seeds
    assert "One run per arm" not in report
    assert "| best_of_n(n=8) (oracle) |" in report and "Reference band (oracle)" in report
    for stage in ("pretrain", "sft", "grpo", "control", "search"):
        assert f"| {stage} | " in report
    svg = ET.fromstring((out / "grpo_curves.svg").read_text())
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "training reward (mean)" in titles and "KL to the reference (token mean)" in titles
    assert (out / "control" / "final" / "model.safetensors").is_file()
    control = yaml.safe_load((out / "control" / "config.yaml").read_text())
    assert control["model"]["path"] == str(out / "sft" / "final")  # continues the SFT model, not the base
    assert control["data"]["levels"] == [1, 2] and control["optim"]["lr"] == 1.0e-4
    assert control["train"]["max_steps"] >= 1  # GRPO's training time at SFT's step time


def _report(correct: dict[tuple[str, int], int], n: int = 10) -> AccuracyReport:
    return AccuracyReport(correct=dict(correct), total={k: n for k in correct})


def test_verdict_names_the_winner_per_task():
    reports = {
        "sft": _report({("arith", 1): 3, ("sort", 1): 5}),
        "grpo": _report({("arith", 1): 6, ("sort", 1): 5}),
        "control": _report({("arith", 1): 4, ("sort", 1): 7}),
    }
    lines = verdict(reports, *ARMS)
    assert (
        lines[0]
        == "- arith: sft 30.0 -> grpo 60.0 (+30.0) vs control 40.0 (+10.0): grpo ends higher (+20.0 points)."
    )
    assert (
        lines[1]
        == "- sort: sft 50.0 -> grpo 50.0 (+0.0) vs control 70.0 (+20.0): control ends higher (-20.0 points)."
    )
    assert lines[2] == "- all tasks: sft 40.0 -> grpo 55.0 (+15.0) vs control 55.0 (+15.0): a tie."
    worse = {
        "sft": _report({("arith", 1): 3}),
        "grpo": _report({("arith", 1): 2}),
        "control": _report({("arith", 1): 1}),
    }
    assert verdict(worse, *ARMS)[0] == (
        "- arith: sft 30.0 -> grpo 20.0 (-10.0) vs control 10.0 (-20.0): grpo ends higher (+10.0 points); "
        "neither improved on sft."
    )
    assert verdict({"sft": reports["sft"]}, *ARMS) == []


def test_verdict_over_seeds_gives_mean_sd_and_the_runs():
    reports = {
        "sft": _report({("arith", 1): 3}),
        "grpo": _report({("arith", 1): 6}),
        "grpo-s1": _report({("arith", 1): 4}),
        "grpo-s2": _report({("arith", 1): 5}),
        "control": _report({("arith", 1): 4}),
        "control-s1": _report({("arith", 1): 4}),
    }
    runs = {"grpo": ["grpo", "grpo-s1", "grpo-s2"], "control": ["control", "control-s1"]}
    assert verdict(reports, *ARMS, runs=runs)[0] == (
        "- arith: sft 30.0 -> grpo 50.0 ± 10.0 (+20.0; runs 60.0, 40.0, 50.0) vs control 40.0 ± 0.0 "
        "(+10.0; runs 40.0, 40.0): grpo ends higher (+10.0 points, means)."
    )
    # a run that was not graded (e.g. not reached yet) is left out, not counted as zero
    del reports["grpo-s2"]
    assert "grpo 50.0 ± 14.1 (+20.0; runs 60.0, 40.0)" in verdict(reports, *ARMS, runs=runs)[0]


def test_stage_seeds_expand_into_named_runs_and_are_checked(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.pipelines.runner import expand_seeds

    cfg = load_pipeline("recipes/quickstart.yaml", ["stages.grpo.seeds=[1,2]"])
    names = [st.name for st in expand_seeds(cfg.stages)]
    assert names[names.index("grpo") : names.index("grpo") + 4] == ["grpo", "grpo-s1", "grpo-s2", "control"]
    assert expand_seeds(cfg.stages)[names.index("grpo-s2")].overrides["seed"] == 2
    with pytest.raises(ConfigError, match=r"stages.grpo.seeds must be a list of integers"):
        load_pipeline("recipes/quickstart.yaml", ["stages.grpo.seeds=two"])
    clash = tmp_path / "p.yaml"
    clash.write_text(yaml.safe_dump({"stages": [
        {"name": "a", "command": "sft", "seeds": [1]}, {"name": "a-s1", "command": "sft"}]}))  # fmt: skip
    with pytest.raises(ConfigError, match="two stages are named 'a-s1'"):
        load_pipeline(clash)


def test_verdict_splits_levels_with_and_without_demonstrations():
    reports = {
        "sft": _report({("m", 1): 9, ("m", 2): 7, ("m", 3): 1, ("m", 4): 0, ("s", 1): 2}),
        "grpo": _report({("m", 1): 9, ("m", 2): 6, ("m", 3): 4, ("m", 4): 0, ("s", 1): 2}),
        "control": _report({("m", 1): 10, ("m", 2): 8, ("m", 3): 1, ("m", 4): 0, ("s", 1): 2}),
    }
    lines = verdict(reports, *ARMS, demos={"m": [1, 2]})
    assert (
        lines[0]
        == "- m L1-2 (with demonstrations): sft 80.0 -> grpo 75.0 (-5.0) vs control 90.0 (+10.0): control ends higher (-15.0 points)."
    )
    assert (
        lines[1]
        == "- m L3-4 (no demonstrations): sft 5.0 -> grpo 20.0 (+15.0) vs control 5.0 (+0.0): grpo ends higher (+15.0 points)."
    )
    assert lines[2].startswith("- m L3 (no demonstrations): sft 10.0 -> grpo 40.0 (+30.0) vs control 10.0")
    assert lines[3].startswith("- m L4 (no demonstrations): sft 0.0 -> grpo 0.0 (+0.0) vs control 0.0")
    assert "neither improved" in lines[3]
    assert lines[4].startswith("- s (no demonstrations): sft 20.0 -> grpo 20.0")  # a task SFT never saw
    assert lines[5].startswith("- all tasks: sft 38.0 -> grpo 42.0 (+4.0) vs control 42.0 (+4.0): a tie")


def test_demonstrated_levels_follow_the_sft_data():
    from posttrain.data.sft_data import DataConfig
    from posttrain.train.sft import SFTRecipe

    recipe = SFTRecipe(data=DataConfig(train="tasks", tasks=["arith_mag", "sort"], levels=[1, 2]))
    assert demonstrated_levels(recipe) == {"arith_mag": [1, 2], "sort": [1, 2]}
    recipe = SFTRecipe(data=DataConfig(train="tasks", tasks=["sort"], levels=None))
    assert demonstrated_levels(recipe) == {"sort": [1, 2, 3, 4]}
    assert demonstrated_levels(SFTRecipe(data=DataConfig(train="x.jsonl"))) is None


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


PRETRAIN_TOY = [o for o in TOY if o.startswith("stages.pretrain.")]


def test_instructgpt_pipeline_trains_ppo_on_the_learned_reward(tmp_path):
    out = tmp_path / "igpt"
    toy = ["stages.sft.train.max_steps=3", "stages.sft.data.n_per_level=8", "stages.rm.train.max_steps=3",
           "stages.rm.train.eval_every=3", "stages.rm.data.n_per_level=8", "stages.rm.data.eval_n_per_level=4",
           "stages.ppo.train.max_steps=2", "stages.ppo.train.eval_every=0", "stages.ppo.rollout.prompts_per_step=2",
           "stages.ppo.rollout.n=2", "stages.ppo.rollout.max_new_tokens=8", "stages.ppo.algorithm.mini_batches=1",
           "eval.n_per_level=1", "eval.max_new_tokens=8"]  # fmt: skip
    cfg = load_pipeline("recipes/instructgpt.yaml", [*PRETRAIN_TOY, *toy, f"output_dir={out}",
                                                     f"stages.pretrain.output_dir={tmp_path / 'pt'}"])  # fmt: skip
    report = run_pipeline(cfg).read_text()
    assert "| task | level | pretrain | sft | ppo |" in report  # the reward model is not graded as a policy
    assert "| rm | eval/pairwise_acc |" in report and "| ppo | reward/total_mean |" in report
    ppo = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert ppo["rewards"] == [{"name": "rm", "weight": 1.0, "model": str(out / "rm" / "final"),
                               "placement": "outcome", "agg": "min"}]  # fmt: skip


def _toy(stage: str, **sizes: int) -> list[str]:
    return [o.replace("stages.pretrain.", f"stages.{stage}.") for o in PRETRAIN_TOY] + [
        f"stages.{stage}.model.{k}={v}" for k, v in sizes.items()
    ]


@pytest.mark.slow
def test_r1_pipeline_runs_every_stage_at_toy_size(tmp_path):
    """cold start -> rejection sampling -> SFT -> GRPO -> DPO -> distillation, a column each."""
    out = tmp_path / "r1"
    toy = [*PRETRAIN_TOY, *_toy("student_base", hidden_size=16, intermediate_size=32),
           "stages.cold_start.train.max_steps=3", "stages.cold_start.data.n_per_level=4",
           "stages.rs.generate.data.n_per_level=3", "stages.rs.generate.sampling.n=4",
           "stages.rs.generate.sampling.max_new_tokens=16", "stages.rs.threshold=-.inf",
           "stages.rs.drop_truncated=false", "stages.rs_sft.train.max_steps=2",
           "stages.grpo.train.max_steps=2", "stages.grpo.train.eval_every=0", "stages.grpo.rollout.prompts_per_step=2",
           "stages.grpo.rollout.n=2", "stages.grpo.rollout.max_new_tokens=8", "stages.align.train.max_steps=2",
           "stages.align.data.n_per_level=4", "stages.align.data.eval_n_per_level=2",
           "stages.distill.train.max_steps=2", "stages.distill.data.n_per_level=4",
           "eval.n_per_level=1", "eval.max_new_tokens=8", f"output_dir={out}",
           f"stages.pretrain.output_dir={tmp_path / 'pt'}", f"stages.student_base.output_dir={tmp_path / 'st'}"]  # fmt: skip
    report = run_pipeline(load_pipeline("recipes/r1.yaml", toy)).read_text()
    header = "| task | level | pretrain | student_base | cold_start | rs_sft | grpo | align | distill |"
    assert header in report and "## Rejection sampling: stage rs" in report
    rs_sft = yaml.safe_load((out / "rs_sft" / "config.yaml").read_text())
    assert rs_sft["data"]["train"] == str(out / "rs" / "sft.jsonl")
    distill = yaml.safe_load((out / "distill" / "config.yaml").read_text())
    assert distill["teacher"]["path"] == str(out / "align" / "final")
    assert distill["student"]["path"] == str(tmp_path / "st" / "final")

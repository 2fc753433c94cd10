"""The pipeline runner: references and their errors, skip / rerun / resume, bit-identical resume
after SIGKILL, the equal-compute budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.errors import ConfigError, PosttrainError
from posttrain.pipelines.runner import (
    EqualComputeConfig,
    PipelineState,
    equal_compute_steps,
    load_pipeline,
    run_pipeline,
)

SFT = {
    "data": {"train": "tasks", "eval": None, "tasks": ["arith"], "n_per_level": 8, "max_len": 128},
    "optim": {"lr": 1.0e-3, "warmup_steps": 2},
    "train": {"max_steps": 2, "batch_size": 2, "seq_len": 128, "save_every": 2, "keep_last": 5,
              "tensorboard": False},
}  # fmt: skip


def _pipeline(
    tmp_path: Path, model_dir: Path, name: str = "pipe.yaml", second_steps: int = 2, **extra
) -> Path:
    second = {**SFT, "train": {**SFT["train"], "max_steps": second_steps}}
    body = {
        "output_dir": str(tmp_path / "out"),
        "stages": [
            {"name": "a", "command": "sft", "recipe": SFT, "overrides": {"model.path": str(model_dir)}},
            {"name": "b", "command": "sft", "recipe": second, "overrides": {"model.path": "${a.final}"}},
        ],
        "eval": {"enabled": False},
        **extra,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _stage(name: str, command: str = "sft", **overrides) -> dict:
    return {"name": name, "command": command, "overrides": overrides}


@pytest.mark.parametrize(
    ("stages", "message", "fix"),
    [
        ([_stage("sft"), _stage("rl", "rl", **{"model.path": "${stf.final}"})], "no stage named 'stf'", "did you mean 'sft'?"),
        ([_stage("sft", **{"model.path": "${rl.final}"}), _stage("rl", "rl")], "refers to a later stage", "listed before it"),
        ([_stage("sft", **{"model.path": "${sft.final}"})], "refers to itself", "listed before it"),
        ([_stage("sft"), _stage("rl", "rl", **{"model.path": "${sft.finale}"})], "has no output 'finale'", "did you mean ${sft.final}?"),
        ([_stage("sft", "stf")], "unknown command 'stf'", "did you mean 'sft'?"),
        ([_stage("sft"), _stage("sft")], "two stages are named 'sft'", "rename"),
        ([_stage("sft", **{"train.max_stpes": 3})], "unknown key 'train.max_stpes'", "train.max_steps"),
    ],
    ids=["unknown-stage", "forward", "self", "unknown-output", "unknown-command", "duplicate", "stage-typo"],
)  # fmt: skip
def test_reference_and_stage_errors_name_the_stage_and_key(tmp_path, stages, message, fix):
    with pytest.raises(ConfigError) as err:
        load_pipeline(_write(tmp_path, {"stages": stages}))
    assert message in err.value.message and fix in (err.value.fix or ""), err.value.render()


def test_command_line_overrides_address_stages_by_name(tmp_path, tiny_model_dir):
    path = _pipeline(tmp_path, tiny_model_dir)
    cfg = load_pipeline(path, ["stages.b.train.max_steps=7", "output_dir=elsewhere"])
    assert cfg.stages[1].overrides == {"model.path": "${a.final}", "train.max_steps": 7}
    assert cfg.output_dir == "elsewhere"
    with pytest.raises(ConfigError, match="no stage named 'c'"):
        load_pipeline(path, ["stages.c.train.max_steps=7"])
    with pytest.raises(ConfigError, match="unknown key 'train.max_stpes'"):
        load_pipeline(path, ["stages.b.train.max_stpes=7"])


def _mtime(path: Path) -> int:
    return (path / "final" / "model.safetensors").stat().st_mtime_ns


def test_done_stages_are_skipped_and_a_changed_upstream_reruns_what_follows(tmp_path, tiny_model_dir):
    path = _pipeline(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    run_pipeline(load_pipeline(path))
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert state["b"]["outputs"]["final"] == str(out / "b" / "final")
    b_config = yaml.safe_load((out / "b" / "config.yaml").read_text())
    assert b_config["model"]["path"] == str(out / "a" / "final")  # the reference was resolved
    first = {s: _mtime(out / s) for s in ("a", "b")}

    report = run_pipeline(load_pipeline(path)).read_text()  # same recipe: both skipped
    assert {s: _mtime(out / s) for s in ("a", "b")} == first
    assert "| a | sft | skipped |" in report and "| b | sft | skipped |" in report

    run_pipeline(load_pipeline(path, ["stages.b.optim.lr=2e-3"]))  # only b changed
    assert _mtime(out / "a") == first["a"] and _mtime(out / "b") != first["b"]
    assert (out / "b.stale-1" / "final" / "model.safetensors").is_file()  # moved aside, not deleted

    run_pipeline(load_pipeline(path, ["stages.a.optim.lr=2e-3", "stages.b.optim.lr=2e-3"]))
    assert (out / "a.stale-1").is_dir() and (out / "b.stale-2").is_dir()  # a changed, so b reran too
    assert not PipelineState(out).done("b", "not-its-fingerprint")


def test_a_removed_upstream_output_reruns_that_stage(tmp_path, tiny_model_dir):
    path = _pipeline(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    run_pipeline(load_pipeline(path))
    before = load_file(out / "a" / "final" / "model.safetensors")
    (out / "a" / "final" / "model.safetensors").unlink()
    run_pipeline(load_pipeline(path))
    after = load_file(out / "a" / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # deterministic rerun


def test_a_failing_stage_names_itself_and_keeps_earlier_outputs(tmp_path, tiny_model_dir):
    path = _pipeline(tmp_path, tiny_model_dir)
    cfg = load_pipeline(path, ["stages.b.data.tasks=[no_such_task]"])
    with pytest.raises(PosttrainError) as err:
        run_pipeline(cfg)
    assert "stage b (sft)" in err.value.render()
    assert (tmp_path / "out" / "a" / "final" / "model.safetensors").is_file()
    assert (
        json.loads((tmp_path / "out" / "pipeline_state.json").read_text())["stages"]["a"]["status"] == "done"
    )


def _run_cli(path: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("POSTTRAIN_FAULT", None)
    if fault:
        env["POSTTRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_mid_stage_then_rerun_is_bit_identical(tmp_path, tiny_model_dir):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), killed_dir.mkdir()
    ref = _pipeline(ref_dir, tiny_model_dir, second_steps=6)
    killed = _pipeline(killed_dir, tiny_model_dir, second_steps=6)
    assert _run_cli(ref).returncode == 0
    res = _run_cli(killed, fault="after-step:5")  # stage a has 2 steps: only stage b reaches step 5
    assert res.returncode == -9, res.stderr[-2000:]
    state = json.loads((killed_dir / "out" / "pipeline_state.json").read_text())["stages"]
    assert state["a"]["status"] == "done" and state["b"]["status"] == "running"
    res = _run_cli(killed)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done earlier with this recipe and inputs, skipped" in res.stdout + res.stderr
    assert "resuming from" in res.stdout + res.stderr
    wa = load_file(ref_dir / "out" / "b" / "final" / "model.safetensors")
    wb = load_file(killed_dir / "out" / "b" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_equal_compute_gives_the_control_the_matched_stages_training_time(tmp_path):
    from types import SimpleNamespace

    def run(name: str, key: str, times: list[float]) -> dict:
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i, key: t}) + "\n" for i, t in enumerate(times))
        )
        return {"command": "rl" if key == "time/step_s" else "sft", "outputs": {"output_dir": str(d)}}

    state = PipelineState(tmp_path)
    state.stages = {
        "grpo": run("grpo", "time/step_s", [1.0, 3.0]),
        "sft": run("sft", "step_time_s", [0.2, 0.2]),
    }
    recipes = {"grpo": SimpleNamespace(train=SimpleNamespace(max_steps=30))}
    steps = equal_compute_steps(EqualComputeConfig(match="grpo", step_time_of="sft"), state, recipes)
    assert steps == 300  # 2 s mean x 30 steps = 60 s, at 0.2 s per SFT step


def test_eval_models_are_graded_as_columns_before_the_stages(tmp_path, tiny_model_dir):
    grading = {"tasks": ["arith"], "levels": [1], "n_per_level": 3, "max_new_tokens": 8,
               "models": {"base": str(tiny_model_dir)}}  # fmt: skip
    path = _pipeline(tmp_path, tiny_model_dir, eval=grading,
                     compare=[{"treatment": "b", "control": "a", "baseline": "base"}])  # fmt: skip
    run_pipeline(load_pipeline(path))
    acc = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert list(acc) == ["base", "a", "b"]  # the named model first, then the graded stages
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## b vs a" in report and "One run per arm" in report  # says the spread is unknown
    cached = json.loads((tmp_path / "out" / "eval" / "base.json").read_text())
    assert sum(n for *_, n in cached["cells"]) == 3

    clash = _pipeline(tmp_path, tiny_model_dir, name="clash.yaml", eval={**grading, "models": {"a": "x"}})
    with pytest.raises(ConfigError, match="eval.models.a: a stage has that name"):
        load_pipeline(clash)
    missing = _pipeline(tmp_path, tiny_model_dir, name="missing.yaml",
                        eval={**grading, "models": {"base": str(tmp_path / "nowhere")}})  # fmt: skip
    with pytest.raises(ConfigError, match="is not a model folder"):
        run_pipeline(load_pipeline(missing))


def test_settings_at_their_defaults_do_not_change_a_fingerprint(tmp_path, tiny_model_dir):
    """A release that adds a setting (at its default) must not rerun finished stages: the
    fingerprint hashes the values that differ from the defaults."""
    from posttrain.pipelines.runner import non_default
    from posttrain.train.optim import OptimConfig

    assert non_default(
        {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}, {"a": 1, "b": {"c": 0, "d": 3}, "e": [1]}
    ) == {"b": {"c": 2}}
    path = _pipeline(tmp_path, tiny_model_dir)
    run_pipeline(load_pipeline(path))
    explicit = f"stages.b.optim.weight_decay={OptimConfig().weight_decay}"  # written out, same value
    report = run_pipeline(load_pipeline(path, [explicit])).read_text()
    assert "| b | sft | skipped |" in report
    report = run_pipeline(load_pipeline(path, ["stages.b.optim.weight_decay=0.5"])).read_text()
    assert "| b | sft | ran |" in report


def test_mc_step_labels_feed_a_prm_stage(tmp_path):
    """``prm-label`` is a stage: its prm.jsonl is ``${NAME.data}``, the PRM stage's training file."""
    path = tmp_path / "p.yaml"
    stages = [{"name": "label", "command": "prm-label", "recipe": {"mc": {"k": 2}}},
              {"name": "prm", "command": "prm", "overrides": {"data.train": "${label.data}"}}]  # fmt: skip
    path.write_text(yaml.safe_dump({"stages": stages, "output_dir": str(tmp_path / "out")}))
    assert [st.command for st in load_pipeline(path).stages] == ["prm-label", "prm"]
    stages.append({"name": "conf", "command": "prm-conf", "overrides": {"train": "${label.data}"}})
    path.write_text(yaml.safe_dump({"stages": stages}))
    assert load_pipeline(path).stages[2].command == "prm-conf"  # the confidence PRM trains on them too
    stages.pop()
    stages[1]["overrides"]["data.train"] = "${label.final}"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ConfigError, match=r"has no output 'final'"):
        load_pipeline(path)

"""Anomaly detectors on real RL runs (tiny random model, no mocks): a too-high learning rate blows
up the KL and the run pauses with a checkpoint, then resumes with changed settings (recorded);
rollback restores the last checkpoint at a lower lr; a task the policy never solves pauses with
the reason, instead of training on nothing."""

from __future__ import annotations

import contextlib
import json

import pytest
from test_rl_trainer import metrics, recipe

from posttrain.train.anomaly import PAUSED_EXIT, RunPaused
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.rl import run_rl

BLOW_UP = ["optim.lr=0.1", "algorithm.kl.coef=0.02", "train.max_steps=8"]
"""Measured (seed 0): per-token KL 0.0, 0.68, 0.56, 0.94, 3.2 at steps 1-5; entropy 5.7 -> 1.5."""


def _events(out, kind: str) -> list[dict]:
    return [r for r in metrics(out) if r.get("event") == kind]


def test_a_too_high_lr_blows_up_kl_pauses_with_a_checkpoint_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "kl"
    with pytest.raises(RunPaused) as err:
        run_rl(recipe(tiny_model_dir, out, *BLOW_UP, "anomaly.kl_max=1.0"))
    (event,) = _events(out, "anomaly")
    assert event["kind"] == "kl" and event["action"] == "pause" and event["recent"][-1] > 1.0
    paused = event["step"]
    assert paused <= 5  # the first step above the limit (window: that step)
    assert err.value.exit_code == PAUSED_EXIT and "anomaly.kl_max" in err.value.fix
    assert [p.name for p in list_checkpoints(out)] == [f"step-{paused}"]

    run_rl(recipe(tiny_model_dir, out, *BLOW_UP, "optim.lr=1e-3", "anomaly.kl_max=100"))  # the normal resume
    (changed,) = _events(out, "resume_changed")
    assert changed["step"] == paused and {"optim.lr", "anomaly.kl_max"} <= set(changed["keys"])
    steps = [r["step"] for r in metrics(out) if "event" not in r]
    assert steps == list(range(1, 9)) and (out / "final" / "model.safetensors").is_file()
    assert (out / "config.previous.yaml").is_file()


def test_rollback_restores_the_last_checkpoint_at_a_lower_lr(tmp_path, tiny_model_dir):
    out = tmp_path / "rb"
    extra = [
        "anomaly.on_anomaly=rollback",
        "anomaly.max_rollbacks=1",
        "train.save_every=1",  # a checkpoint before whichever step blows up
        "anomaly.kl_max=1.0",
        "train.precision=fp32",
    ]
    with contextlib.suppress(RunPaused):  # a second anomaly, after the one rollback allowed, pauses
        run_rl(recipe(tiny_model_dir, out, *BLOW_UP, *extra))
    events = _events(out, "anomaly")
    first = events[0]
    assert first["action"] == f"rollback to step {first['step'] - 1}, lr x0.5"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in lines if "event" not in json.loads(ln)]
    assert steps == sorted(set(steps))  # the rolled-back steps were dropped, not logged twice
    rows = {r["step"]: r for r in metrics(out) if "event" not in r}
    assert rows[first["step"]]["lr"] == pytest.approx(0.05)  # the replayed step ran at half the lr
    assert all(e["action"] == "pause" for e in events[1:])


def test_a_task_never_solved_pauses_with_the_cold_start_advice(tmp_path, tiny_model_dir):
    """The scorer on a random model: every group's rewards are all 0, so no step updates anything."""
    out = tmp_path / "nosignal"
    with pytest.raises(RunPaused, match="never succeeds") as err:
        run_rl(recipe(tiny_model_dir, out, "rewards=[{name: scorer}]", "train.max_steps=8"))
    assert err.value.anomaly.step == 5 and "SFT" in str(err.value)  # anomaly.no_signal_steps=5
    assert [p.name for p in list_checkpoints(out)] == ["step-5"]


@pytest.mark.slow
def test_sigint_mid_rl_run_saves_a_checkpoint_exits_130_and_resumes(tmp_path, tiny_model_dir):
    """`posttrain rl` stopped by SIGINT finishes its step, checkpoints (policy, optimiser, sampler,
    anomaly state), exits 130 without a traceback; the same command resumes from there."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "rl"
    argv = [
        str(Path(sys.executable).parent / "posttrain"), "rl", "recipes/grpo_tiny.yaml", f"model.path={tiny_model_dir}",
        f"output_dir={out}", "data.n_per_level=16", "data.levels=[1,2]", "rollout.prompts_per_step=2",
        "rollout.n=4", "rollout.max_new_tokens=8", "rollout.dynamic_sampling=false", "eval.n_per_level=0",
        "train.eval_every=0", "train.save_every=0", "train.tensorboard=false", "anomaly.on_anomaly=warn",
        "train.max_steps=100000",
    ]  # fmt: skip
    repo = Path(__file__).parents[2]
    proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows, deadline = out / "metrics.jsonl", time.time() + 120
    while not (rows.is_file() and len(rows.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    step = [r["step"] for r in metrics(out) if "event" not in r][-1]
    assert (out / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    done = subprocess.run(
        [*argv[:-1], f"train.max_steps={step + 1}"], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r["step"] for r in metrics(out) if "event" not in r]
    assert steps == list(range(1, step + 2)) and (out / "final" / "model.safetensors").is_file()

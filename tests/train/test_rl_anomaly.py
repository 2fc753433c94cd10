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
        "train.save_every=2",
        "anomaly.kl_max=1.0",
        "train.precision=fp32",  # the step of the blow-up below was measured in fp32
    ]
    with contextlib.suppress(RunPaused):  # a second anomaly, after the one rollback allowed, pauses
        run_rl(recipe(tiny_model_dir, out, *BLOW_UP, *extra))
    events = _events(out, "anomaly")
    first = events[0]
    assert first["action"].startswith("rollback to step 4, lr x0.5")
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

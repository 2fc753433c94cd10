"""Anomaly detectors in the supervised loop (SFT; preference shares `run_loop`), on real runs of the
tiny model: a far-too-high learning rate makes the loss diverge, the run pauses with a checkpoint
(exit 75) and resumes at a lower lr; rollback restores the last checkpoint at half the lr."""

from __future__ import annotations

import contextlib
import json
import statistics

import pytest

from posttrain.config import load_recipe
from posttrain.train.anomaly import PAUSED_EXIT, RunPaused
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.sft import SFTRecipe, run_sft

DIVERGE = ["optim.lr=1.0", "train.max_steps=12"]
"""Measured on tiny_model_dir (seed 0): loss 5.63, 18.3, 55.2 at steps 1-3, paused at step 3 (finite:
no NaN to stop it; another tokenizer corpus moves the numbers, the asserts follow the logged ones)."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(model_dir, out, *overrides: str) -> SFTRecipe:
    base = [
        f"model.path={model_dir}", f"output_dir={out}", "data.tasks=[sort]", "data.levels=[1]",
        "data.n_per_level=64", "data.eval_n_per_level=4", "train.batch_size=4", "train.seq_len=128",
        "train.tensorboard=false", "train.num_samples=0", "train.precision=fp32",
    ]  # fmt: skip
    return load_recipe(SFTRecipe, None, [*base, *overrides])


def _rows(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _first_divergence(losses: list[float], k: float = 3.0, window: int = 10) -> int | None:
    """The documented rule (`AnomalyConfig.loss_divergence`), from the logged losses."""
    best = float("inf")
    for i in range(len(losses)):
        h = losses[max(0, i - window) : i + 1]  # the monitor keeps window + 1 losses
        last = h[-5:]
        best = min(best, statistics.median(h[-window:]))
        high = max(losses[:1] + h[:-3])
        if i >= 2 and statistics.median(last) > k * best and statistics.median(last) > high:
            return i + 1
    return None


def test_sft_at_a_far_too_high_lr_diverges_pauses_and_resumes_at_a_lower_lr(tmp_path, tiny_model_dir):
    out = tmp_path / "sft"
    with pytest.raises(RunPaused) as err:
        run_sft(_cfg(tiny_model_dir, out, *DIVERGE))
    assert err.value.exit_code == PAUSED_EXIT and "optim.lr" in err.value.fix
    (event,) = [r for r in _rows(out) if r.get("event") == "anomaly"]
    assert event["kind"] == "loss_divergence" and event["action"] == "pause"
    losses = [r["loss"] for r in _rows(out) if "loss" in r and "event" not in r]
    paused = event["step"]
    assert max(losses) > 5 * losses[0]  # a real blow-up, not noise
    assert paused == _first_divergence(losses) == len(losses) <= 5  # within 3 steps of the blow-up
    assert [p.name for p in list_checkpoints(out)] == [f"step-{paused}"]

    run_sft(_cfg(tiny_model_dir, out, "optim.lr=3e-3", "train.max_steps=12"))  # the normal resume
    rows = _rows(out)
    (changed,) = [r for r in rows if r.get("event") == "resume_changed"]
    assert changed["step"] == paused and "optim.lr" in changed["keys"]
    steps = [r["step"] for r in rows if "loss" in r and "event" not in r]
    assert steps == list(range(1, 13)) and (out / "final" / "model.safetensors").is_file()
    after = [r["loss"] for r in rows if "loss" in r and "event" not in r][paused:]
    assert after[-1] < losses[-1]  # at the lower lr the loss comes back down
    assert len([r for r in rows if r.get("event") == "anomaly"]) == 1  # detectors afresh: no re-pause


def test_sft_rollback_restores_the_last_checkpoint_at_half_the_lr(tmp_path, tiny_model_dir):
    out = tmp_path / "rb"
    extra = [
        "anomaly.on_anomaly=rollback",
        "anomaly.max_rollbacks=1",
        "train.save_every=2",
        "optim.schedule=constant",
    ]
    with contextlib.suppress(RunPaused):  # once the one rollback is spent, the next anomaly pauses
        run_sft(_cfg(tiny_model_dir, out, *DIVERGE, *extra))
    events = [r for r in _rows(out) if r.get("event") == "anomaly"]
    first = events[0]
    assert first["kind"] == "loss_divergence" and first["action"].startswith("rollback to step 2, lr x0.5")
    rows = {r["step"]: r for r in _rows(out) if "loss" in r and "event" not in r}
    steps = [r["step"] for r in _rows(out) if "loss" in r and "event" not in r]
    assert steps == sorted(set(steps))  # the rolled-back steps were dropped, not logged twice
    assert rows[3]["lr"] == pytest.approx(0.5)  # the replayed step 3 ran at half the lr
    assert all(e["action"] == "pause" for e in events[1:])


def test_dpo_at_a_far_too_high_lr_pauses_with_a_checkpoint(tmp_path, tiny_model_dir):
    """The preference trainer runs the same detectors (`run_loop`): measured, DPO's loss goes
    0.693 -> 8.8 in one step at lr 1.0, and the run pauses as soon as a 3-step mean shows it."""
    from test_preference_trainer import _recipe

    from posttrain.train.preference import run_preference

    out = tmp_path / "dpo"
    with pytest.raises(RunPaused) as err:
        run_preference(
            _recipe(tiny_model_dir, out, "optim.lr=1.0", "train.max_steps=8", "eval.task_accuracy_n=0")
        )
    assert err.value.anomaly.kind == "loss_divergence" and err.value.exit_code == PAUSED_EXIT
    losses = [r["loss"] for r in _rows(out) if "loss" in r and "event" not in r]
    assert err.value.anomaly.step == _first_divergence(losses) == len(losses)
    assert [p.name for p in list_checkpoints(out)] == [f"step-{len(losses)}"]

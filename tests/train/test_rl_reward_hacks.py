"""Reward hacks on real RL runs, caught by the anomaly detectors (no mocks, no scripted metrics).

The policy is the tiny model after a few SFT steps on countdown level 1 (greedy held-out accuracy
about 0.6, answers of about 21 tokens ending with EOS), so it has an accuracy to lose and a length
to grow. Two rewards that pay for the wrong thing:

- ``anomaly_test_length`` pays for characters only: the length runs to the token limit and the
  length detector pauses at the first step the clipped share jumps above ``anomaly.clipped_max``;
- ``anomaly_test_format`` pays for the share of the completion that is format markers, nothing for
  correctness: completions shrink to the markers, the training reward rises while the held-out
  accuracy falls, and the reward-hacking detector pauses at the first evaluation that shows both.

Each pauses with a checkpoint (exit 75) and resumes with a changed setting, recorded.
"""

from __future__ import annotations

import json

import pytest

from posttrain.config import load_recipe
from posttrain.rewards.registry import register_reward
from posttrain.train.anomaly import PAUSED_EXIT, RunPaused
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.rl import RLRecipe, run_rl
from posttrain.train.sft import SFTRecipe, run_sft

MARKERS = ("<think>", "</think>", "Answer:")


@register_reward("anomaly_test_length", replace=True)
def length_only(prompts, completions, metadata):
    """Characters / 200, capped at 1: longer is better, whatever is written."""
    return [min(len(c) / 200, 1.0) for c in completions]


@register_reward("anomaly_test_format", replace=True)
def format_share(prompts, completions, metadata):
    """Share of the completion's characters that are format markers: no term for correctness."""
    return [sum(len(m) * c.count(m) for m in MARKERS) / max(len(c), 1) for c in completions]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sft_countdown(tmp_path_factory, tiny_model_dir):
    """The tiny model after 300 SFT steps on countdown level 1 (about 10 s)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = load_recipe(SFTRecipe, None, [
        f"model.path={tiny_model_dir}", f"output_dir={out}", "data.tasks=[countdown]", "data.levels=[1]",
        "data.n_per_level=256", "data.eval_n_per_level=4", "train.max_steps=300", "train.batch_size=16",
        "train.seq_len=128", "train.tensorboard=false", "optim.lr=3e-3", "train.sample_max_new_tokens=8",
        "train.precision=fp32",  # the same starting policy on every CPU (auto is bf16 only on some)
    ])  # fmt: skip
    return run_sft(cfg)


def _recipe(model, out, reward: str, *extra: str) -> RLRecipe:
    base = [
        f"model.path={model}", f"output_dir={out}", "data.tasks=[countdown]", "data.levels=[1]",
        "data.n_per_level=64", f"rewards=[{{name: {reward}}}]", "rollout.prompts_per_step=4", "rollout.n=4",
        "train.tensorboard=false", "train.precision=fp32",
    ]  # fmt: skip
    return load_recipe(RLRecipe, None, [*base, *extra])


def _rows(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _resume_checks(out, paused: int, max_steps: int, keys: set[str]) -> None:
    (changed,) = [r for r in _rows(out) if r.get("event") == "resume_changed"]
    assert changed["step"] == paused and keys <= set(changed["keys"])
    steps = [r["step"] for r in _rows(out) if "event" not in r and "reward/total_mean" in r]
    assert steps == list(range(1, max_steps + 1)) and (out / "final" / "model.safetensors").is_file()


def test_a_length_only_reward_explodes_the_length_and_pauses_at_the_clipped_jump(tmp_path, sft_countdown):
    out = tmp_path / "length"
    run = ["rollout.max_new_tokens=64", "optim.lr=3e-3", "eval.n_per_level=0", "train.max_steps=16"]
    with pytest.raises(RunPaused) as err:
        run_rl(_recipe(sft_countdown, out, "anomaly_test_length", *run))
    assert err.value.exit_code == PAUSED_EXIT and "rollout.max_new_tokens" in err.value.fix
    (event,) = [r for r in _rows(out) if r.get("event") == "anomaly"]
    assert event["kind"] == "length" and event["action"] == "pause"
    rows = [r for r in _rows(out) if "event" not in r]
    clipped = [r["response/clipped_ratio"] for r in rows]
    lengths = [r["response/length_mean"] for r in rows]
    # real growth: short answers at first (at most a few of the 16 rows at the limit), then the
    # length more than doubled by the detection
    assert clipped[0] < 0.25 and lengths[0] < 32 and lengths[-1] > 2 * lengths[0]
    # caught at the first step above clipped_max (0.5), well within the window of 10 steps
    first = next(i + 1 for i, c in enumerate(clipped) if c > 0.5)
    assert event["step"] == first == rows[-1]["step"] and first <= 10
    assert [p.name for p in list_checkpoints(out)] == [f"step-{first}"]

    # the normal resume, with the fixed setting: a longer limit, a lower lr, warn from now on
    fixed = ["rollout.max_new_tokens=96", "optim.lr=1e-4", "anomaly.on_anomaly=warn"]
    run_rl(
        _recipe(
            sft_countdown, out, "anomaly_test_length", *run[:-1], "train.max_steps=" + str(first + 2), *fixed
        )
    )
    _resume_checks(out, first, first + 2, {"rollout.max_new_tokens", "optim.lr", "anomaly.on_anomaly"})


def test_a_format_only_reward_rises_while_heldout_accuracy_falls_and_pauses(tmp_path, sft_countdown):
    out = tmp_path / "format"
    run = ["rollout.max_new_tokens=32", "optim.lr=5e-4", "eval.n_per_level=50", "eval.max_new_tokens=32",
           "train.eval_every=4", "train.max_steps=28"]  # fmt: skip
    with pytest.raises(RunPaused) as err:
        run_rl(_recipe(sft_countdown, out, "anomaly_test_format", *run))
    assert err.value.exit_code == PAUSED_EXIT and "anomaly.hack_drop" in err.value.fix
    (event,) = [r for r in _rows(out) if r.get("event") == "anomaly"]
    assert event["kind"] == "reward_hacking" and event["metric"] == "eval/task_accuracy/overall"
    rows = _rows(out)
    acc = {r["step"]: r["eval/task_accuracy/overall"] for r in rows if "eval/task_accuracy/overall" in r}
    reward = {r["step"]: r["reward/total_mean"] for r in rows if "reward/total_mean" in r}
    assert acc[0] >= 0.4  # a policy with an accuracy to lose

    def mean(lo: int, hi: int) -> float:  # the training reward over steps lo+1..hi
        return sum(reward[s] for s in range(lo + 1, hi + 1)) / (hi - lo)

    def hacked(a: int, b: int) -> bool:  # the documented rule (eval every 4), from the logged numbers
        if a:
            rise = mean(b - 4, b) - mean(a - 4, a)
        else:  # the step-0 evaluation: the first interval's reward (its halves, for the first pair)
            rise = mean(b - 4, b) - mean(0, 4) if b > 4 else mean(2, 4) - mean(0, 2)
        return rise > 0.05 and acc[a] - acc[b] > 0.1

    evals = sorted(acc)
    first = next(b for b in evals if any(hacked(a, b) for a in evals if a < b))
    assert event["step"] == first and acc[first] < acc[0] - 0.2  # the first evaluation showing it
    assert [p.name for p in list_checkpoints(out)] == [f"step-{first}"]

    # resume with the task's verifier as the reward (the fix), warn from now on
    fixed = ["rewards=[{name: scorer}]", "anomaly.on_anomaly=warn", "train.max_steps=" + str(first + 2)]
    run_rl(_recipe(sft_countdown, out, "anomaly_test_format", *run[:-1], *fixed))
    _resume_checks(out, first, first + 2, {"rewards", "anomaly.on_anomaly"})


def test_one_step_at_a_too_high_lr_jumps_to_the_length_limit_and_pauses_at_the_next_step(
    tmp_path, sft_countdown
):
    """Issue 16's new-user run: after one update at a far-too-high lr the completions run to the
    token limit and the reward drops to 0 (every group equal, so nothing would update again); the
    run pauses at the first step that shows it, not after ``no_signal_steps`` idle steps.
    Measured: reward 0.94 -> 0.0, clipped share 0.0 -> 0.81 at step 2 (0.69 on an Intel Xeon with AMX;
    1.0 with SDPA attention; on today's default model,
    `posttrain rl recipes/grpo_tiny.yaml model.path=default optim.lr=1e-2`: the first update comes
    at step 3, every completion is at the limit at step 4, and the run pauses there, exit 75)."""
    out = tmp_path / "lr"
    run = ["rewards=[{name: scorer}]", "rollout.max_new_tokens=64", "optim.lr=5e-2", "eval.n_per_level=0"]
    with pytest.raises(RunPaused) as err:
        run_rl(_recipe(sft_countdown, out, "scorer", *run, "train.max_steps=8"))
    rows = [r for r in _rows(out) if "event" not in r]
    assert [r["step"] for r in rows] == [1, 2] and err.value.anomaly.step == 2
    assert err.value.anomaly.kind == "length" and err.value.anomaly.metric == "response/clipped_ratio"
    assert rows[0]["reward/total_mean"] > 0.3 and rows[0]["response/clipped_ratio"] < 0.5
    assert rows[1]["reward/total_mean"] == 0.0 and rows[1]["response/clipped_ratio"] > 0.5  # the alarm level
    assert [p.name for p in list_checkpoints(out)] == ["step-2"]

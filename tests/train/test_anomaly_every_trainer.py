"""The anomaly section reaches every trainer that runs `run_loop`: the reward model and pretraining
pause on a diverging loss, with a checkpoint (SFT and preference: test_sft_anomaly.py; RL:
test_rl_anomaly.py; the PRM shares the reward model's `train_reward_model`)."""

from __future__ import annotations

import json

import pytest
from reward_env import small_recipe

from posttrain.config import load_recipe
from posttrain.train.anomaly import PAUSED_EXIT, RunPaused
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.pretrain import PretrainRecipe, run_pretrain
from posttrain.train.rm import RMRecipe, run_rm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _paused(out, exc) -> int:
    assert exc.value.exit_code == PAUSED_EXIT
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "anomaly"]
    # the blow-up pauses by its loss or its gradient norm, whichever detector sees it first (the RM
    # at lr 3.0, measured: loss 0.35 -> 762 and grad norm 0.24 -> 161 at step 6: the grad spike)
    event = next(e for e in events if e["kind"] in ("loss_divergence", "grad_spike"))
    assert all(e["action"] == "pause" and e["step"] == event["step"] for e in events)
    losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    assert max(losses) > 3 * losses[0]  # a real blow-up
    assert [p.name for p in list_checkpoints(out)] == [f"step-{event['step']}"]
    assert not (out / "final").exists()
    return event["step"]


def test_reward_model_at_a_far_too_high_lr_pauses(tmp_path, tiny_model_dir):
    """lr 10: the loss blows up within the first updates (0.70, 4.17, 240 on an Intel Xeon with AMX),
    which small numeric differences between CPUs do not change. At lr 3 and 30 one step blows the
    scores up and the later losses sit at ln 2 (0.91, 157, 0.693, ...): the loss_spike rule
    (test_anomaly.py) catches that; before it, such runs went on."""
    out = tmp_path / "rm"
    cfg = small_recipe(
        RMRecipe, tiny_model_dir, out, "optim.lr=10.0", "train.max_steps=12", "eval_before=false"
    )
    with pytest.raises(RunPaused) as exc:
        run_rm(cfg)
    assert _paused(out, exc) <= 8


def test_pretraining_at_a_far_too_high_lr_pauses_and_warn_runs_on(tmp_path):
    base = [
        "model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64", "model.vocab_size=300",
        "corpus.n_docs=300", "train.max_steps=10", "train.batch_size=4", "train.seq_len=128",
        "train.tensorboard=false", "optim.lr=3.0", "optim.warmup_steps=0",
    ]  # fmt: skip
    out = tmp_path / "pt"
    with pytest.raises(RunPaused) as exc:
        run_pretrain(load_recipe(PretrainRecipe, None, [*base, f"output_dir={out}"]))
    assert _paused(out, exc) <= 8
    warned = tmp_path / "pt_warn"
    final = run_pretrain(
        load_recipe(PretrainRecipe, None, [*base, f"output_dir={warned}", "anomaly.on_anomaly=warn"])
    )
    assert (final / "model.safetensors").is_file()

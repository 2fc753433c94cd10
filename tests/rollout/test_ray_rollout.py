"""Ray rollouts (`posttrain.distributed.ray_rollout`) on a local 2-CPU cluster: the in-process run
reproduced (one worker: same tokens and rewards; two workers: reward and KL within a stated
tolerance over 5 steps), a killed worker replaced mid-run, sync verification, bad input."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from posttrain.distributed.ray_rollout import RayConfig, import_ray, shard_bounds, worker_seed
from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.rollout.weight_sync import SyncMismatch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_rl_trainer import recipe  # noqa: E402  (the tiny RL recipe and its dense digit reward)

# Two workers sample other random streams than the in-process engine (worker i: seed + 7919 i), so
# only the statistics agree. Measured on the tiny model, seeds 0 and 1 (8 prompts x 8, 16 tokens):
# 5-step mean reward 0.0359 vs 0.0340 and 0.0424 vs 0.0399; mean KL 0.376 vs 0.332 and 0.297 vs 0.335.
REWARD_TOL = 0.01  # absolute, 5-step mean of a reward in [0, 1]
KL_REL_TOL = 0.25  # relative, 5-step mean of kl/rollout_seq_mean
LOGP_REL_TOL = 1e-4  # one worker: same tokens; log-probs differ by fp32 rounding (~1e-7) across processes


def test_shards_and_seeds():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(1, 3) == [(0, 1)]
    assert shard_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert worker_seed(11, 0) == 11 and worker_seed(11, 2) == 11 + 2 * 7919 and worker_seed(None, 1) is None


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailable) as err:
        import_ray()
    assert "posttrain[ray]" in err.value.render() and "rollout.backend=ray" in err.value.render()


def test_rl_recipe_with_ray_missing_names_the_extra(monkeypatch, tiny_model_dir, tmp_path):
    from posttrain.train.rl import setup

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailable, match=r"posttrain\[ray\]"):
        setup(recipe(tiny_model_dir, tmp_path / "r", "rollout.backend=ray"))


def test_bad_ray_config():
    with pytest.raises(ConfigError, match="rollout_workers >= 1"):
        RayConfig(rollout_workers=0).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worker_holds_the_trainers_dtype_and_answers_its_checksum(tiny_model_dir, dtype):
    """The actor class itself, in this process: built from the config, loaded, checksummed."""
    from posttrain.distributed.ray_rollout import RolloutWorker
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.rollout.weight_sync import checksum, sync_state

    policy = load_model(tiny_model_dir).to(dtype)
    worker = RolloutWorker(policy.config, load_tokenizer(tiny_model_dir), 64, "cpu", dtype)
    state = sync_state(policy)
    assert worker.load(state) == checksum(state)
    assert next(worker.engine.model.parameters()).dtype == dtype


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False
    )  # never a stale cluster
    yield ray
    ray.shutdown()


BIG = ["rollout.prompts_per_step=8", "rollout.n=8", "rollout.max_new_tokens=16", "optim.lr=3e-3"]


def run_steps(model_dir, out, steps, *extra, between=None) -> tuple[list[dict], object]:
    """``steps`` RL steps through `setup` / `train_step`; ``between(session, step)`` after each."""
    from posttrain.train.rl import setup, train_step

    s = setup(recipe(model_dir, out, "train.precision=fp32", "algorithm.kl.coef=0.05", *extra))
    rows = []
    try:
        for step in range(1, steps + 1):
            rows.append(train_step(s, step))
            s.step = step
            if between is not None:
                between(s, step)
    finally:
        if hasattr(s.engine, "shutdown"):
            s.engine.shutdown()
    return rows, s


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_one_worker_reproduces_the_in_process_run(ray_cluster, tiny_model_dir, tmp_path):
    local, _ = run_steps(tiny_model_dir, tmp_path / "local", 3)
    remote, s = run_steps(
        tiny_model_dir, tmp_path / "ray", 3, "rollout.backend=ray", "rollout.ray.rollout_workers=1"
    )
    from posttrain.rollout.engine import RolloutEngine

    assert isinstance(s.engine, RolloutEngine)  # a drop-in behind the engine protocol
    assert s.engine.syncs == 4  # at start + after each update, each verified by checksum
    for a, b in zip(local, remote, strict=True):
        for key in ("reward/total_mean", "response/length_mean", "response/clipped_ratio"):
            assert a[key] == b[key], key  # the same tokens, so the same rewards
        for key in ("kl/rollout_seq_mean", "pg/clip_frac"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=LOGP_REL_TOL, abs=1e-9), key


@pytest.mark.slow  # ~25 s: two 5-step runs
def test_two_workers_and_a_reward_pool_agree_within_tolerance(ray_cluster, tiny_model_dir, tmp_path):
    local, _ = run_steps(tiny_model_dir, tmp_path / "local", 5, *BIG)
    extra = ["rollout.backend=ray", "rollout.ray.reward_workers=1", "rollout.ray.cpus_per_worker=0.5"]
    remote, s = run_steps(tiny_model_dir, tmp_path / "ray", 5, *BIG, *extra)
    assert len(s.engine.workers) == 2 and type(s.rewards).__name__ == "RewardPool"
    assert abs(_mean(local, "reward/total_mean") - _mean(remote, "reward/total_mean")) < REWARD_TOL
    kl_local, kl_ray = _mean(local, "kl/rollout_seq_mean"), _mean(remote, "kl/rollout_seq_mean")
    assert abs(kl_local - kl_ray) / kl_local < KL_REL_TOL
    assert remote[-1]["reward/total_mean"] != local[-1]["reward/total_mean"]  # really other streams


@pytest.mark.slow  # ~30 s: two 3-step runs with 2 workers each
def test_killed_worker_is_replaced_and_the_run_continues(ray_cluster, tiny_model_dir, tmp_path):
    extra = ["rollout.backend=ray", "rollout.ray.rollout_workers=2"]
    clean, _ = run_steps(tiny_model_dir, tmp_path / "clean", 3, *extra)

    def kill_worker_0(s, step):
        if step == 1:
            os.kill(ray_cluster.get(s.engine.workers[0].pid.remote()), signal.SIGKILL)

    killed, s = run_steps(tiny_model_dir, tmp_path / "killed", 3, *extra, between=kill_worker_0)
    assert s.engine.restarts == 1
    # the new worker got the step's synced weights (checksum verified) and the shard's own seed
    assert [r["reward/total_mean"] for r in killed] == [r["reward/total_mean"] for r in clean]


def test_a_worker_holding_other_weights_stops_the_run(ray_cluster, tiny_model_dir, tmp_path):
    from posttrain.train.rl import setup

    s = setup(recipe(tiny_model_dir, tmp_path / "r", "train.precision=fp32", "rollout.backend=ray"))
    try:
        state = {k: v.double() for k, v in s.model.state_dict().items()}  # stored as fp32 by the workers
        with pytest.raises(SyncMismatch, match="2 rollout worker"):
            s.engine.update_weights(state)
        s.engine.update_weights(s.model)  # a correct sync passes again
    finally:
        s.engine.shutdown()
    assert torch.equal(state["model.norm.weight"].float(), s.model.state_dict()["model.norm.weight"])


def test_max_staleness_one_samples_the_next_step_with_the_previous_weights(
    ray_cluster, tiny_model_dir, tmp_path
):
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.train.rl_data import PromptSampler, RewardSet, load_prompts
    from posttrain.train.rl_rollout import generate_groups, rollout_metrics

    extra = ["rollout.backend=ray", "rollout.ray.rollout_workers=1", "train.max_steps=3"]
    sync, _ = run_steps(tiny_model_dir, tmp_path / "sync", 3, *extra)
    stale, s = run_steps(tiny_model_dir, tmp_path / "stale", 3, *extra, "rollout.max_staleness=1")
    assert [r["rollout/staleness"] for r in stale] == [0.0, 1.0, 1.0]  # step 1 has nothing to overlap
    assert stale[0]["reward/total_mean"] == sync[0]["reward/total_mean"]
    assert "mismatch/token_abs_diff_mean" in stale[1]  # old log-probs recomputed by the trainer
    # Step 2's samples were drawn during step 1's update, by the starting weights: the reference
    # engine with those weights, on step 2's prompts and seed, gives exactly the same rewards.
    cfg, tok = s.cfg, load_tokenizer(tiny_model_dir)
    sampler = PromptSampler(load_prompts(cfg.data), cfg.data.seed)
    sampler.take(cfg.rollout.prompts_per_step)  # step 1's prompts
    rewards = RewardSet(cfg.rewards, tok, cfg.rollout.max_new_tokens, cfg.rollout.overlong_buffer)
    engine = HFEngine(load_model(tiny_model_dir), tok)
    kept, seen, _ = generate_groups(engine, sampler, rewards, cfg.rollout, cfg.seed, 2)
    assert rollout_metrics(seen, kept)["reward/total_mean"] == stale[1]["reward/total_mean"]
    assert stale[1]["reward/total_mean"] != sync[1]["reward/total_mean"]  # sync sampled after the update


def test_max_staleness_needs_ray():
    from posttrain.train.rl_rollout import RolloutConfig

    with pytest.raises(ConfigError, match="rollout.backend=ray"):
        RolloutConfig(max_staleness=1).validate()
    with pytest.raises(ConfigError, match="max_staleness=2"):
        RolloutConfig(backend="ray", max_staleness=2).validate()

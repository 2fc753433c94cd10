"""RL screening (``rollout.screen_n``) on the tiny model: a group whose first screen_n rewards are all
equal is abandoned before its other n - screen_n samples; kept groups are whole, start with exactly
the screening call's samples and are replayed by a rerun; bad settings are ConfigErrors; a
`posttrain rl` run logs what was saved."""

from __future__ import annotations

import json
import shutil

import pytest

from posttrain.config import load_recipe
from posttrain.errors import ConfigError
from posttrain.rewards.registry import register_reward
from posttrain.train.rl import RLRecipe, collect, rl_main, run_rl, setup
from posttrain.train.rl_data import PromptSampler
from posttrain.train.rl_rollout import SCREEN_ROUND, rollout_seed, sampling_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@register_reward("screen_test_level2_length", replace=True)
def level2_length(prompts, completions, metadata):
    """0 for level-1 prompts (every group screened out), the completion's length in characters / 100
    for level 2 (two samples of a group all but never tie, so level-2 groups pass the screen)."""
    return [len(c) / 100 if m["level"] == 2 else 0.0 for c, m in zip(completions, metadata, strict=True)]


def overrides(model_dir, out, *extra) -> list[str]:
    return [
        f"model.path={model_dir}", f"output_dir={out}", "data.tasks=[arith]", "data.levels=[1,2]",
        "data.n_per_level=16", "rewards=[{name: screen_test_level2_length}]", "rollout.prompts_per_step=4",
        "rollout.n=4", "rollout.max_new_tokens=10", "rollout.dynamic_sampling=true",
        "rollout.max_refill_rounds=4", "eval.n_per_level=0", "optim.lr=1e-2", "train.max_steps=2",
        "train.tensorboard=false", *extra,
    ]  # fmt: skip


def recipe(model_dir, out, *extra) -> RLRecipe:
    return load_recipe(RLRecipe, None, overrides(model_dir, out, *extra))


def ids(group) -> list[list[int]]:
    return [c.token_ids for c in group.completions]


def level(group) -> int:
    return group.record["metadata"]["level"]


def test_screening_abandons_equal_groups_keeps_whole_ones_and_generates_less(tmp_path, tiny_model_dir):
    s = setup(recipe(tiny_model_dir, tmp_path / "screen", "rollout.screen_n=2"))
    kept, seen, m = collect(s, 1)
    s.run.logger.close()
    assert len(kept) == 4 and all(level(g) == 2 and not g.zero_variance() for g in kept)
    for g in kept:  # n completions, numbered as one group's samples
        assert [c.sample_index for c in g.completions] == [0, 1, 2, 3]
        assert len(g.outcome) == len(g.steps) == len(g.parts) == 4
    abandoned = [g for g in seen if len(g.completions) == 2]
    assert abandoned and all(level(g) == 1 and g.zero_variance() for g in abandoned)
    assert all(len(g.completions) == 4 for g in seen if g not in abandoned)
    assert m["rollout/screened_out"] == len(abandoned)
    assert m["rollout/completions_saved"] == 2 * len(abandoned)
    generated = sum(len(g.completions) for g in seen)
    assert generated == 4 * len(seen) - 2 * len(abandoned)

    # The same step without screening: the same prompts are drawn and the same ones kept (level-1
    # groups are all-zero, level-2 ones vary), at the cost of all n samples of the level-1 groups.
    u = setup(recipe(tiny_model_dir, tmp_path / "plain"))
    kept_u, seen_u, m_u = collect(u, 1)
    u.run.logger.close()
    assert "rollout/screened_out" not in m_u
    assert [g.record for g in kept_u] == [g.record for g in kept]
    assert [g.record for g in seen_u] == [g.record for g in seen]
    assert sum(len(g.completions) for g in seen_u) == 4 * len(seen) > generated


def test_kept_groups_start_with_the_screen_samples_and_a_rerun_replays_them(tmp_path, tiny_model_dir):
    cfg = recipe(tiny_model_dir, tmp_path / "a", "rollout.screen_n=2", "seed=3")
    s = setup(cfg)
    start = dict(s.sampler.state)
    kept, seen, m = collect(s, 1)
    # Replay each round by hand on the same (not yet updated) engine: the screening call of every
    # prompt, then one call for the prompts that passed, seeded as round + SCREEN_ROUND.
    sampler = PromptSampler(s.sampler.records, cfg.data.seed)
    sampler.state = start
    params = sampling_params(cfg.rollout)
    for round_ in range(int(m["rollout/rounds"])):
        records = sampler.take(4)
        groups = seen[4 * round_ : 4 * round_ + 4]
        assert [g.record for g in groups] == records
        first = s.engine.generate(records, params.replace(n=2, seed=rollout_seed(3, 1, round_)))
        for i, g in enumerate(groups):
            assert ids(g)[:2] == [c.token_ids for c in first[2 * i : 2 * i + 2]]
        alive = [g for g in groups if len(g.completions) == 4]
        if alive:
            rest = s.engine.generate(
                [g.record for g in alive], params.replace(n=2, seed=rollout_seed(3, 1, round_ + SCREEN_ROUND))
            )
            for i, g in enumerate(alive):
                assert ids(g)[2:] == [c.token_ids for c in rest[2 * i : 2 * i + 2]]
                assert ids(g)[2:] != ids(g)[:2]  # the second call is not the first one's seed again
    s.run.logger.close()

    r = setup(recipe(tiny_model_dir, tmp_path / "b", "rollout.screen_n=2", "seed=3"))
    kept_r, seen_r, m_r = collect(r, 1)
    r.run.logger.close()
    assert [ids(g) for g in seen_r] == [ids(g) for g in seen]
    assert [ids(g) for g in kept_r] == [ids(g) for g in kept]
    assert [g.outcome for g in kept_r] == [g.outcome for g in kept]
    assert m_r["rollout/screened_out"] == m["rollout/screened_out"]


def test_bad_screening_settings_are_config_errors(tmp_path, tiny_model_dir):
    cases = [
        ["rollout.screen_n=2", "rollout.dynamic_sampling=false"],  # nothing would refill the abandoned
        ["rollout.screen_n=4"],  # = n: nothing left to save
        ["rollout.screen_n=-1"],
        ["rollout.screen_n=2", "rollout.backend=ray", "rollout.max_staleness=1"],  # prefetches whole groups
    ]
    for extra in cases:
        with pytest.raises(ConfigError) as err:
            recipe(tiny_model_dir, tmp_path / "r", *extra)
        assert err.value.where == "rollout.screen_n" and err.value.fix, extra
    # Multi-turn samples conversations whole: refused before anything is sampled or logged.
    out = tmp_path / "mt"
    keys = [o for o in overrides(tiny_model_dir, out) if not o.startswith("rewards=")]  # the env scores
    mt = ["rollout.screen_n=2", "data.multi_turn={env: followup, max_turns: 2}"]
    with pytest.raises(ConfigError) as err:
        run_rl(load_recipe(RLRecipe, None, [*keys, *mt]))
    assert err.value.where == "rollout.screen_n" and "multi_turn" in err.value.fix
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_posttrain_rl_with_screening_logs_what_it_saved_and_resumes_the_same(tmp_path, tiny_model_dir):
    extra = ["rollout.screen_n=2", "train.save_every=1", "train.keep_last=3"]
    out = tmp_path / "rl"
    rl_main(None, overrides(tiny_model_dir, out, *extra))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/completions_saved"] == 2 * r["rollout/screened_out"]
        # Every generated group that passed the screen has variance: the zero-variance share is the
        # abandoned share of the rounds' groups.
        assert r["rollout/zero_variance_frac"] == r["rollout/screened_out"] / (4 * r["rollout/rounds"])
        assert r["rollout/groups_kept"] == 4 and "loss/total" in r
    assert sum(r["rollout/screened_out"] for r in rows) >= 1

    crashed = tmp_path / "crashed"  # stopped after step 1: step 2 is sampled again from the checkpoint
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-2")
    shutil.rmtree(crashed / "final")
    rl_main(None, overrides(tiny_model_dir, crashed, *extra))
    again = [json.loads(ln) for ln in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2]
    for key in ("rollout/screened_out", "reward/total_mean", "response/length_mean", "loss/total"):
        assert again[1][key] == rows[1][key], key

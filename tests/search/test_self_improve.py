"""The self-improvement loop: one full round at toy size (search -> verified traces -> SFT, MC
step labels -> PRM, held-out eval), resume of a finished round, the skip of a round without a
verified trace, and a replay buffer from another tokenizer."""

from __future__ import annotations

import json

import pytest
from test_prm_label import task_policy

from posttrain.data.tasks import task_problems
from posttrain.errors import ConfigError, DataError
from posttrain.search.compare import SearchModelConfig, StrategySpec, TaskSetConfig
from posttrain.search.mc_labels import MCLabelConfig
from posttrain.search.self_improve import SelfImproveRecipe, check_buffer_tokenizer, run_self_improve

_STEP = {"max_step_tokens": 400, "max_new_tokens": 400, "step_sep": "<step>"}


def _recipe(out, model: str, **over) -> SelfImproveRecipe:
    keys = dict(
        model=SearchModelConfig(path=model), rounds=1, output_dir=str(out),
        train_prompts=TaskSetConfig(tasks=["sort"], levels=[1], n_per_level=6, split="train", seed=0),
        eval_problems=TaskSetConfig(tasks=["sort"], levels=[1], n_per_level=4, split="test"),
        eval_strategies=[StrategySpec("best_of_n", label="prm_bon2", scorer="prm",
                                      config={"n": 2, "select": "prm_last", "step": _STEP})],
        mc=MCLabelConfig(n_chains=2, k=2, max_new_tokens=400),
        sft={"train": {"max_steps": 3, "batch_size": 4, "seq_len": 128, "tensorboard": False}},
        prm_train={"train": {"max_steps": 3, "batch_size": 4, "tensorboard": False}, "eval_before": False},
    )  # fmt: skip
    return SelfImproveRecipe(**{**keys, **over})


def test_one_full_round_at_toy_size_and_resume(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # round 1 searches a fresh draw of training prompts (seed 0 + 1); eval uses the test split
    train, test = task_problems(["sort"], "train", 6, 1, [1]), task_problems(["sort"], "test", 4, 0, [1])
    assert not {p.question for p in train} & {p.question for p in test}
    loaded: list[str] = []

    def loader(path: str):
        loaded.append(path)
        policy = task_policy(train + test)  # writes the right chain, or a corrupted one, per draw
        policy.tokenizer = tok
        return policy, None

    recipe = _recipe(tmp_path / "si", str(tiny_model_dir))
    recipe.search.config = {"n": 2, "select": "prm_last", "temperature": 1.0, "step": _STEP}
    out = run_self_improve(recipe, loader)
    data = json.loads(out.read_text())
    r0, r1 = data["rounds"]
    assert r0["greedy_accuracy"] == 1.0 and r0["best_search_accuracy"] is None  # no PRM yet
    found = r1["search"]
    assert found["scorer"] == "majority" and found["prompts"] == 6
    assert found["finished_paths"] == 12 and found["verified_paths"] == 6  # one right, one corrupted each
    assert found["trace_filter"] == "steps" and found["rejected_wrong_step"] == 0  # right chains check
    assert found["added"]["sft"] == 6 and found["added"]["prm"] == 12 and found["heldout_prm_chains"] == 8
    assert found["mc"]["rollouts"] > 0
    assert r1["policy"] == str(tmp_path / "si" / "round_1" / "sft" / "final")
    assert (tmp_path / "si" / "round_1" / "prm" / "final" / "reward_head.json").is_file()
    assert 0.0 <= r1["prm_eval"]["after"]["step_auc"] <= 1.0
    assert [row["label"] for row in r1["rows"]] == ["greedy", "prm_bon2"] and r1["rows"][1]["n"] == 4
    assert r1["best_search_accuracy"] == r1["rows"][1]["accuracy"]  # a 3-step PRM ranks 2 chains: any result
    replay = [json.loads(x) for x in (tmp_path / "si" / "replay.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in replay} == {"trace", "sft", "prm", "value"}
    sft = [e["record"] for e in replay if e["kind"] == "sft"]
    by_q = {p.question: p.answer for p in train}
    assert all(m["messages"][1]["content"] == f"Answer: {by_q[m['messages'][0]['content']]}" for m in sft)
    n_loaded = len(loaded)
    assert run_self_improve(recipe, loader) == out and len(loaded) == n_loaded  # finished: nothing reruns


def test_a_round_without_a_verified_trace_is_skipped_with_its_reason(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path / "si", str(tiny_model_dir), prm_eval_chains=0)
    recipe.train_prompts.n_per_level, recipe.eval_problems.n_per_level = 2, 2
    recipe.search.config = {"n": 2, "select": "prm_last", "step": {"max_new_tokens": 8}}
    recipe.eval_strategies = []
    data = json.loads(run_self_improve(recipe).read_text())  # the untrained tiny model: no right answer
    r1 = data["rounds"][1]
    assert "no verified trace" in r1["skipped"] and r1["policy"] == str(tiny_model_dir) and r1["prm"] is None
    assert data["final_policy"] == str(tiny_model_dir)


def test_bad_settings_and_another_tokenizer_are_named(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match="test split"):
        _recipe(tmp_path, "x", eval_problems=TaskSetConfig(split="train")).validate()
    with pytest.raises(ConfigError, match="first_scorer"):
        _recipe(tmp_path, "x", first_scorer="prm:/nope").validate()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    check_buffer_tokenizer(tmp_path, tok)
    (tmp_path / "replay.tokenizer.json").write_text(json.dumps({"vocab_sha": "0123"}))
    with pytest.raises(DataError, match="another tokenizer"):
        check_buffer_tokenizer(tmp_path, tok)


def test_degenerate_chains_are_kept_out_of_prm_data():
    from posttrain.search.mc_labels import chains_of_texts
    from posttrain.search.protocols import Query
    from posttrain.search.self_improve import well_formed

    texts = [(0, "<think>1 + 2 = 3<step>3 + 1 = 4</think>\nAnswer: 4"), (0, "<think>11 + 9 = 2<think>"),
             (0, "<think>1 + 2 = 3<step>3 + 1"), (0, "Answer: 4")]  # fmt: skip
    chains = chains_of_texts(texts, [Query("q", {})], MCLabelConfig(), lambda text, meta: False)
    assert [well_formed(c) for c in chains] == [True, False, False, False]


def test_trace_filter_steps_rejects_a_right_answer_reached_through_a_wrong_step():
    from posttrain.data.tasks.base import Problem
    from posttrain.search.base import SearchResult
    from posttrain.search.scorers import any_verifier
    from posttrain.search.self_improve import reject_wrong_steps, verify_finished
    from posttrain.search.structures import SearchGraph

    problem = Problem("arith_mag", 2, "Compute 7 + 12 + 8", (), "27")
    g = SearchGraph(prompt="p", meta={"task": "arith_mag", "ground_truth": "27"})
    texts = {
        "right": "<think>\n7 + 12 = 19<step>19 + 8 = 27\n</think>\n\nAnswer: 27",
        "lucky": "<think>\n7 + 12 = 18<step>18 + 8 = 27\n</think>\n\nAnswer: 27",  # measured: 27% of traces
        "wrong": "<think>\n7 + 12 = 19<step>19 + 8 = 26\n</think>\n\nAnswer: 26",
        "no_steps": "Answer: 27",
    }
    nodes = {k: g.add(g.root, text=t, terminal=True) for k, t in texts.items()}
    results = [SearchResult("best_of_n", g, None, None, "")]
    assert verify_finished(results, any_verifier().verify) == (3, 4)  # the outcome check passes the lucky one
    assert reject_wrong_steps(results, [problem], "<step>") == 2
    assert {k: n.reward for k, n in nodes.items()} == {
        "right": 1.0,
        "lucky": 0.0,
        "wrong": 0.0,
        "no_steps": 0.0,
    }


def test_an_unknown_trace_filter_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="trace_filter"):
        _recipe(tmp_path, "m", trace_filter="process").validate()

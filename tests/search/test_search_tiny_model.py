"""Each strategy family end to end on a tiny HF model (random weights) through the HF rollout
engine: one policy call per round for all prompts, costs that add up, exports the validator
and the PRM trainer accept."""

from __future__ import annotations

import pytest
from search_env import write_mcts_exports

from posttrain.data.records import detect_kind, validate_record
from posttrain.data.tasks import make_split
from posttrain.rollout.engine import get_engine
from posttrain.rollout.sampling import SamplingParams
from posttrain.search import Budget, StepConfig, queries_from_problems, run_search
from posttrain.search.export import export_preferences, export_prm, export_sft, export_values
from posttrain.search.scorers import JudgeScorer, TaskStepScorer, task_verifier

STEP = {"max_step_tokens": 6, "max_new_tokens": 16, "max_depth": 3}


class Counting:
    """Wraps a policy and records the number of prompts of every call."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []
        self.model = policy.model  # for FLOP estimates

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        return self.policy.generate(prompts, params)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return get_engine("hf", model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer=tok)


@pytest.fixture
def queries():
    return queries_from_problems(make_split("arith", "test", 1, levels=[1, 2]))


def _tokens_add_up(results):
    for r in results:
        made = sum(len(n.token_ids) for n in r.graph.nodes)
        assert r.cost.generated_tokens == made > 0


def test_engine_steps_and_continuation_from_ids(hf, queries):
    from posttrain.search.base import make_graphs
    from posttrain.search.operators import expand

    greedy = SamplingParams(temperature=0.0)
    by_ids, by_text = make_graphs(queries[:1]), make_graphs(queries[:1])
    for graphs, use_ids in ((by_ids, True), (by_text, False)):
        step = StepConfig(max_step_tokens=6, continue_with_ids=use_ids)
        g = graphs[0]
        [[first]] = expand(hf, [(g, g.root)], 1, greedy, step)
        assert first.text.endswith("<step>") or first.terminal
        assert g.prompt_ids and len(first.token_ids) <= 6
        if not first.terminal:
            assert g.path_ids(first) == g.prompt_ids + first.token_ids
            expand(hf, [(g, first)], 1, greedy, step)
    assert [n.text for n in by_ids[0].nodes] == [n.text for n in by_text[0].nodes]
    assert by_ids[0].cost.flops > 0  # parameter count read from the engine's model


def test_tiny_sampling_family(hf, queries):
    policy = Counting(hf)
    step = {"step": STEP}
    greedy = run_search("greedy", policy, queries, config=step)
    bon = run_search("best_of_n", policy, queries, task_verifier(), {**step, "n": 4, "select": "verifier"})
    sc = run_search("self_consistency", policy, queries, config={**step, "n": 4, "temperature": 1.0})
    assert policy.calls == [2, 2, 2]  # one call per strategy, both prompts together
    for results in (greedy, bon, sc):
        _tokens_add_up(results)
        assert len(results) == 2 and all(r.cost.policy_calls == 1 for r in results)
    assert all(r.cost.scorer_calls == 1 for r in bon)
    for rec in export_sft(bon, min_reward=None, paths="all"):
        validate_record(rec, "chat", "sft")
    judged = run_search("best_of_n", policy, queries, JudgeScorer(hf), {**step, "n": 2, "select": "orm"})
    assert len(judged) == 2 and policy.calls[-1] == 2


def test_tiny_beam_family(hf, queries):
    policy = Counting(hf)
    cfg = {"step": STEP, "beam_width": 2, "expand_k": 2, "temperature": 1.0, "seed": 0}
    results = run_search("beam", policy, queries, TaskStepScorer(), cfg)
    rounds = max(r.graph.round for r in results)
    assert len(policy.calls) == rounds <= STEP["max_depth"] and policy.calls[0] == 2
    _tokens_add_up(results)
    dvts = run_search(
        "dvts", policy, queries, TaskStepScorer(), {"step": STEP, "n_subtrees": 2, "expand_k": 2}
    )
    assert all(r.best is not None for r in dvts)
    capped = run_search(
        "beam", policy, queries, TaskStepScorer(), {**cfg, "budget": {"max_generated_tokens": 40}}
    )
    assert all(r.cost.generated_tokens <= 40 for r in capped)


def test_tiny_mcts(hf, queries):
    policy = Counting(hf)
    cfg = {"step": STEP, "n_simulations": 3, "expand_k": 2, "value": "mix", "temperature": 1.0}
    results = run_search("mcts", policy, queries, TaskStepScorer(), cfg)
    assert 1 <= len(policy.calls) <= 2 * 3 and policy.calls[0] == 2
    assert all(r.graph.root.visits >= 2 for r in results)
    _tokens_add_up(results)
    for rec in export_prm(results) + export_values(results):
        validate_record(rec, detect_kind(rec), "prm")
    for rec in export_preferences(results):
        validate_record(rec, "preference", "pref")


def test_tiny_tot_got_self_refine(hf, queries):
    policy = Counting(hf)
    scorer = TaskStepScorer()
    tot = run_search(
        "tot", policy, queries, scorer, {"step": STEP, "mode": "dfs", "threshold": None, "max_rounds": 3}
    )
    assert len(policy.calls) <= 3 and all(r.cost.policy_calls <= 3 for r in tot)
    got = run_search("got", policy, queries, scorer, {"step": STEP, "n_init": 2, "rounds": 1})
    assert any(len(n.parents) == 2 for r in got for n in r.graph.nodes)  # an aggregated node
    refine = run_search(
        "self_refine", policy, queries, scorer, {"step": STEP, "max_rounds": 1, "stop_score": 2.0}
    )
    assert all(r.outcome["revisions"] <= 1 for r in refine) and all(r.graph.kind == "chain" for r in refine)
    step = StepConfig(**STEP)
    assert step.max_depth == 3 and Budget().max_flops is None


def test_exports_load_into_the_trainers_data_paths(hf, env, tmp_path):
    """SFT, PRM and preference exports go through the loaders and renderers the trainers use."""
    from posttrain.data.loaders import load_records
    from posttrain.data.render import render_records
    from posttrain.train.preference_data import file_raw_examples
    from posttrain.train.rm_data import prm_token_ids, step_sample

    files = write_mcts_exports(env, tmp_path)
    tok = hf.tokenizer
    samples = render_records(tok, load_records(files["sft"]))
    assert len(samples) == 3 and all(any(x != -100 for x in s.labels) for s in samples)
    seps = prm_token_ids(tok, "auto", "</think>")
    for rec in load_records(files["prm"], kind="prompt"):
        d = rec.data
        sample = step_sample(tok, d["prompt"], d["completions"], d["labels"], seps, rec.where, d["final"])
        assert sum(y >= 0 for y in sample.step_labels) == len(d["completions"])
    assert file_raw_examples(str(files["pref"]), None, "all")

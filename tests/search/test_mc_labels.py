"""Monte-Carlo step labels: hand-computed values on the scripted tree, bisection vs full scan."""

from __future__ import annotations

import pytest
from search_env import A1, A2, A3, B1, B2, B3, B9, BEST, C1, C2

from posttrain.data.records import detect_kind, validate_record
from posttrain.data.tasks import split_steps
from posttrain.errors import ConfigError
from posttrain.search.mc_labels import (
    MCLabelConfig,
    binary_search_cost,
    chains_of_texts,
    label_chains,
    prm_records,
    step_cuts,
    value_records,
)


def _verify(text, meta):
    from posttrain.data.tasks import extract_answer

    return extract_answer(text) == meta["ground_truth"]


def test_step_cuts_match_split_steps_and_end_on_terminators():
    for text in (
        B1 + B2 + B3,
        "<think>x<step><step> y <step>z",  # empty piece, never closed
        "<think>only</think>\nAnswer: 1",
        "no think at all",
    ):
        steps, cuts = step_cuts(text, "<step>")
        assert steps == (split_steps(text, "<step>") if "<think>" in text else [])
        for step, cut in zip(steps, cuts, strict=True):
            before = text[:cut].removesuffix("<step>").removesuffix("</think>")
            assert before.rstrip().endswith(step)
    assert step_cuts(B1 + B2 + B3, "<step>")[1] == [len(B1), len(B1 + B2), len(B1 + B2 + "b3</think>")]


def test_full_scan_labels_on_the_scripted_tree(env):
    """Chains sampled from P enumerate a1-a2, b1-b2-b3, c1-c2, a1-a3, b1-b9, c1-c2 (answer 7 = b3).

    From prefix b1 two of four rollouts reach 7 (b2-b3, b9, b2-b3, b9): 0.5; from b1-b2: 1.0;
    from a1 and c1: 0. The last step carries the chain's own outcome."""
    policy, _, _, queries = env
    chains, stats = label_chains(policy, queries, MCLabelConfig(n_chains=6, k=4), _verify)
    first = [c for c in chains if c.query_index == 0]
    assert [c.text for c in first] == [A1 + A2, B1 + B2 + B3, C1 + C2, A1 + A3, B1 + B9, C1 + C2]
    assert [c.soft for c in first] == [[0, 0], [0.5, 1, 1], [0, 0], [0, 0], [0.5, 0], [0, 0]]
    assert [c.hard for c in first] == [[0, 0], [1, 1, 1], [0, 0], [0, 0], [1, 0], [0, 0]]
    assert [c.first_error for c in first] == [0, None, 0, 0, 1, 0]
    # distinct prefixes a1, b1, b1-b2, c1 per query, 4 rollouts each; no sharing would need 7 * 4
    assert (stats.prefixes, stats.rollouts, stats.rollouts_full_scan) == (12, 48, 84)
    rows = prm_records(chains, queries, "soft")
    assert rows[1]["completions"] == ["b1", "b2", "b3"] and rows[1]["labels"] == [0.5, 1.0, 1.0]
    assert rows[1]["final"] == "Answer: 7" and rows[1]["prompt"] == [{"role": "user", "content": "Q1"}]
    assert prm_records(chains, queries, "hard")[4]["labels"] == [1.0, 0.0]
    values = [v for v in value_records(chains, queries, k=4) if v["prompt"][0]["content"] == "Q1"]
    got = {(v["completion"][0]["content"], v["value"], v["visits"]) for v in values if not v["terminal"]}
    assert got == {("<think>a1<step>", 0.0, 4), (B1, 0.5, 4), (B1 + B2, 1.0, 4), ("<think>c1<step>", 0.0, 4)}
    assert sum(v["terminal"] for v in values) == 5  # the repeated c1-c2 chain once
    for rec in rows + values:
        validate_record(rec, detect_kind(rec), "mc")


def test_binary_search_finds_the_full_scans_first_errors_with_fewer_rollouts(env):
    policy, _, _, queries = env
    full, full_stats = label_chains(policy, queries, MCLabelConfig(n_chains=6, k=4), _verify)
    policy.calls.clear()
    cfg = MCLabelConfig(n_chains=6, k=4, search="binary")
    found, stats = label_chains(policy, queries, cfg, _verify)
    assert [c.first_error for c in found] == [c.first_error for c in full]
    assert [c.hard for c in found] == [c.hard for c in full]
    # the correct chain is not rolled out; wrong chains need prefixes a1, b1, c1 only
    assert (stats.prefixes, stats.rollouts) == (9, 36) and stats.rollouts < full_stats.rollouts
    assert len(policy.calls) == 2  # chains, then one bisection round (2-step chains)
    assert [c.soft for c in found if c.query_index == 0][4] == [0.5, 0.0]
    assert prm_records(found, queries, "soft")[1]["labels"] == [1.0, 1.0, 1.0]  # unmeasured -> hard


def _chain_tree(prompt: str, n_steps: int, first_bad: int) -> dict:
    """A linear scripted tree over steps s0..s{n-1} (answer 1); at step ``first_bad`` the policy may
    instead write a wrong step and finish that chain in one piece with answer 2."""

    def piece(i: int, step: str) -> str:
        end = "</think>\nAnswer: 1" if i == n_steps - 1 else "<step>"
        return ("<think>" if i == 0 else "") + step + end

    tree, prefix = {}, prompt
    for i in range(n_steps):
        options = [(piece(i, f"s{i}"), -0.1)]
        if i == first_bad:
            rest = "".join(piece(j, f"s{j}") for j in range(i + 1, n_steps))
            options.append(((piece(i, f"s{i}9") + rest).replace("Answer: 1", "Answer: 2"), -0.2))
        tree[prefix] = options
        prefix += options[0][0]
    return tree


@pytest.mark.parametrize("n_steps,first_bad", [(5, 0), (5, 3), (8, 6), (4, 3), (1, 0)])
def test_bisection_equals_full_scan_on_longer_chains(n_steps, first_bad):
    from posttrain.search.protocols import Query
    from posttrain.search.scripted import ScriptedPolicy

    tree = _chain_tree("P\n", n_steps, first_bad)
    query = [Query("P\n", {"ground_truth": "1"})]
    full, fs = label_chains(ScriptedPolicy(tree), query, MCLabelConfig(n_chains=2, k=2), _verify)
    fast, bs = label_chains(
        ScriptedPolicy(tree), query, MCLabelConfig(n_chains=2, k=2, search="binary"), _verify
    )
    assert [c.correct for c in full] == [True, False]
    assert [c.first_error for c in full] == [c.first_error for c in fast] == [None, first_bad]
    assert full[0].soft == [0.5] * first_bad + [1.0] * (n_steps - first_bad)
    assert full[1].hard == [1] * first_bad + [0] * (n_steps - first_bad)
    assert 0 < bs.prefixes <= binary_search_cost(n_steps) if n_steps > 1 else bs.prefixes == 0
    assert bs.prefixes <= fs.prefixes and bs.rollouts == 2 * bs.prefixes


def test_a_step_holding_a_think_marker_is_dropped_and_counted(env):
    """A sampled chain like ``0 + 10 = 1<think>116 = 0`` would render with fewer step ends than
    labels, failing `posttrain prm` on the whole file: it is dropped, the rest labelled as usual."""
    policy, _, _, queries = env
    texts = [(0, BEST), (0, "<think>b1<step>b<think>2</think>\nAnswer: 7"), (0, "Answer: 7")]
    given = chains_of_texts(texts, queries, MCLabelConfig(), _verify)
    chains, stats = label_chains(policy, queries, MCLabelConfig(k=4), _verify, given=given)
    assert [c.text for c in chains] == [BEST] and chains[0].soft == [0.5, 1.0, 1.0]
    assert (stats.chains, stats.chains_without_steps, stats.chains_malformed) == (3, 1, 1)


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match="k must be"):
        MCLabelConfig(k=0)
    with pytest.raises(ConfigError, match="unknown search"):
        MCLabelConfig(search="linear")

"""A deterministic scripted environment for search tests: a small tree whose best path is known.

From prompt P the policy can write (logprob in brackets; greedy follows the highest):

    P -- <think>a1 (-0.1) -- a2 -> Answer: 5 (-0.1)        PRM: a1 .4, a2 0
      |                   \\- a3 -> Answer: 6 (-0.3)                 a3 0
      |- <think>b1 (-0.5) -- b2 (-0.2) -- b3 -> Answer: 7   PRM: b1 .8, b2 .9, b3 1
      |                   \\- b9 -> Answer: 6 (-0.1)                 b9 .2
      \\- <think>c1 (-2.0) -- c2 -> Answer: 8               PRM: c1 .1, c2 0

The right answer is 7, reachable only through b1 -> b2 -> b3; greedy decoding answers 5.
"""

from __future__ import annotations

from posttrain.data.tasks import extract_answer
from posttrain.search.protocols import Query
from posttrain.search.scorers import VerifierScorer
from posttrain.search.scripted import ScriptedPolicy, ScriptedScorer

A1, B1, C1 = "<think>a1<step>", "<think>b1<step>", "<think>c1<step>"
A2, A3 = "a2</think>\nAnswer: 5", "a3</think>\nAnswer: 6"
B2, B3, B9 = "b2<step>", "b3</think>\nAnswer: 7", "b9</think>\nAnswer: 6"
C2 = "c2</think>\nAnswer: 8"
BEST = B1 + B2 + B3

PRM = {
    "<think>a1": 0.4,
    A2: 0.0,
    A3: 0.0,
    "<think>b1": 0.8,
    "b2": 0.9,
    B3: 1.0,
    B9: 0.2,
    "<think>c1": 0.1,
    C2: 0.0,
}


def scripted_tree(prompt: str) -> dict[str, list[tuple[str, float]]]:
    return {
        prompt: [(A1, -0.1), (B1, -0.5), (C1, -2.0)],
        prompt + A1: [(A2, -0.1), (A3, -0.3)],
        prompt + B1: [(B2, -0.2), (B9, -0.1)],
        prompt + B1 + B2: [(B3, -0.1)],
        prompt + C1: [(C2, -0.1)],
    }


PROMPTS = ["Q1\n", "Q2\n", "Q3\n"]


def make_env():
    """(policy, prm, verifier, queries) over three prompts with the same tree."""
    tree: dict[str, list[tuple[str, float]]] = {}
    for p in PROMPTS:
        tree.update(scripted_tree(p))
    policy = ScriptedPolicy(tree, num_parameters=1000)
    prm = ScriptedScorer(PRM, num_parameters=10)
    verifier = VerifierScorer(lambda text, meta: extract_answer(text) == meta["ground_truth"])
    queries = [Query(p, {"question": p.strip(), "ground_truth": "7"}) for p in PROMPTS]
    return policy, prm, verifier, queries


def write_mcts_exports(env, out_dir) -> dict:
    """Run MCTS on the scripted tree and write its SFT / PRM / preference exports as JSONL files."""
    import json

    from posttrain.search import run_search
    from posttrain.search.export import export_preferences, export_prm, export_sft
    from posttrain.search.mcts import MCTSConfig

    policy, prm, _, queries = env  # the scripted tree writes the default tokenizer's format
    results = run_search("mcts", policy, queries, prm, MCTSConfig(n_simulations=6, expand_k=3, value="mix"))
    files = {}
    for name, rows in (
        ("sft", export_sft(results)),
        ("prm", export_prm(results)),
        ("pref", export_preferences(results)),
    ):
        assert rows, name
        files[name] = out_dir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files

"""The on-disk replay buffer: dedup, crash recovery, sampling by recency and priority."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from posttrain.data.records import validate_record
from posttrain.errors import ConfigError
from posttrain.search import run_search
from posttrain.search.mcts import MCTSConfig
from posttrain.search.replay import ReplayBuffer


def rec(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def test_dedup_and_reopen(tmp_path):
    path = tmp_path / "buf" / "replay.jsonl"
    buf = ReplayBuffer(path)
    assert buf.add([rec(0), rec(1), rec(0)], "sft") == 2
    assert buf.add([rec(1)], "sft") == 0 and buf.add([rec(1)], "value") == 1  # kind is part of the key
    again = ReplayBuffer(path)
    assert len(again) == 3 and again.add([rec(0)], "sft") == 0
    assert again.records("sft") == [rec(0), rec(1)]
    with pytest.raises(ConfigError, match="unknown replay kind"):
        again.add([rec(2)], "sfr")


def test_survives_a_crash_mid_write(tmp_path):
    path = tmp_path / "replay.jsonl"
    ReplayBuffer(path).add([rec(i) for i in range(3)], "sft")
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "abc", "kind": "sft", "rec')  # a write cut short
    buf = ReplayBuffer(path)
    assert len(buf) == 3 and buf.recovered == 1
    assert path.read_bytes() == whole  # truncated back to the last complete line
    buf.add([rec(3)], "sft")
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["kind"] == "sft" for x in lines)
    path.write_text(path.read_text() + "not json\n" + lines[0] + "\n")
    assert len(ReplayBuffer(path)) == 4 and ReplayBuffer(path).skipped == 1


def test_sampling_by_recency_and_priority(tmp_path):
    buf = ReplayBuffer(tmp_path / "r.jsonl")
    buf.add([rec(i) for i in range(10)], "sft", priority=[0.0] * 9 + [5.0])
    assert buf.sample(3, seed=1) == buf.sample(3, seed=1) and len(buf.sample(20)) == 10
    assert buf.sample(1, by="priority", seed=0) == [rec(9)]  # only one positive priority
    assert len(buf.sample(5, by="priority", seed=0)) == 1
    newest = Counter()
    for seed in range(200):
        for r in buf.sample(2, by="recency", seed=seed, half_life=1.0):
            newest[r["messages"][0]["content"]] += 1
    assert newest["q9"] > newest["q5"] > newest["q0"]
    with pytest.raises(ConfigError):
        buf.sample(1, by="oldest")  # type: ignore[arg-type]


def test_add_search_results_stores_traces_and_exports(tmp_path, env):
    policy, prm, _, queries = env
    results = run_search("mcts", policy, queries, prm, MCTSConfig(n_simulations=5, expand_k=3))
    buf = ReplayBuffer(tmp_path / "r.jsonl")
    added = buf.add_results(results)
    assert added["trace"] == 3 and added["sft"] == 3 and added["prm"] > 0 and added["value"] > 0
    assert added["preference"] > 0
    assert ReplayBuffer(tmp_path / "r.jsonl").add_results(results) == dict.fromkeys(added, 0)
    for kind, rkind in (("sft", "chat"), ("prm", "prompt"), ("preference", "preference")):
        for r in buf.records(kind):
            validate_record(r, rkind, where=kind)

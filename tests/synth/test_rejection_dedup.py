"""Rejection sampling deduplicates through data.quality: its exact key and its MinHash near dedup."""

from __future__ import annotations

import pytest

from posttrain.config import from_dict
from posttrain.data.quality.dedup import DedupConfig, NearDedupIndex
from posttrain.errors import ConfigError
from posttrain.synth.rejection import FilterRecipe, choose, rejection_sample

LONG = " ".join(f"step{i} adds {i} to the total" for i in range(12))  # 72 words
EDIT = LONG.replace("step5 adds", "step5 puts")  # one-word edit: Jaccard of 3-grams about 0.92
OTHER = " ".join(f"line{i} subtracts {i} from the sum" for i in range(12))


def test_exact_key_is_data_cleans_normalisation():
    ok, scores = [True] * 4, [1.0] * 4
    texts = [
        "The answer is 5",
        "the ANSWER  is 5",
        "The answer is \uff15",
        "The answer is 6",
    ]  # NFKC: fullwidth 5
    assert choose(scores, ok, texts, "all", 1.0, set()) == ([0, 3], 2)


def test_near_duplicates_of_the_same_prompt_are_dropped():
    ok, scores = [True] * 3, [1.0] * 3
    near = NearDedupIndex(DedupConfig(threshold=0.8))
    assert choose(scores, ok, [LONG, EDIT, OTHER], "all", 1.0, set(), near) == ([0, 2], 1)
    assert len(near) == 2  # the kept texts, for the next identical prompt
    assert choose([1.0], [True], [EDIT.upper()], "all", 1.0, set(), near) == ([], 1)
    # without the near index only exact copies count
    assert choose(scores, ok, [LONG, EDIT, OTHER], "all", 1.0, set()) == ([0, 1, 2], 0)


def test_rejection_sample_with_near_dup_threshold():
    prompt = [{"role": "user", "content": "Add the numbers"}]
    comps = [{"text": t, "finish_reason": "stop"} for t in (LONG, EDIT, OTHER)]
    rows = [
        {"prompt": prompt, "completions": comps, "index": 0},
        {"prompt": prompt, "completions": comps[1:2], "index": 1},
    ]
    recipe = from_dict(FilterRecipe, {"keep": "all", "near_dup_threshold": 0.8, "pass_k": [1]})
    kept, stats = rejection_sample(rows, [[1.0] * 3, [1.0]], recipe)
    assert [r["messages"][-1]["content"] for r in kept] == [LONG, OTHER]
    assert [s["duplicates"] for s in stats] == [1, 1]
    exact = from_dict(FilterRecipe, {"keep": "all", "pass_k": [1]})
    kept, stats = rejection_sample(rows, [[1.0] * 3, [1.0]], exact)
    assert len(kept) == 3 and [s["duplicates"] for s in stats] == [0, 1]
    with pytest.raises(ConfigError, match="near_dup_threshold"):
        from_dict(FilterRecipe, {"near_dup_threshold": 1.5}).validate()

"""Perplexity filter of data clean: the threshold rule by hand, scores vs the eval path, the run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from quality_helpers import chat, make_item, read_jsonl

from posttrain.config import from_dict
from posttrain.data.quality.clean import CleanRecipe, run_clean
from posttrain.data.quality.perplexity import (
    PerplexityCleanConfig,
    model_scorer,
    perplexity_filter,
    perplexity_keep,
)
from posttrain.errors import ConfigError, DataError


def test_perplexity_keep_by_hand():
    ppl = torch.tensor([[2.0], [4.0], [6.0], [8.0], [10.0]], dtype=torch.float64)
    on = torch.ones_like(ppl, dtype=torch.bool)
    keep, thr = perplexity_keep(ppl, on, None, 50)  # median of 2,4,6,8,10 = 6: 8 and 10 go
    assert thr == 6.0 and keep.tolist() == [True, True, True, False, False]
    keep, thr = perplexity_keep(ppl, on, 5.0, 75)  # min(5, 8) = 5
    assert thr == 5.0 and keep.tolist() == [True, True, False, False, False]
    keep, thr = perplexity_keep(ppl, on, None, 90)  # 8 + 0.6 * (10 - 8) = 9.2 (linear interpolation)
    assert thr == pytest.approx(9.2) and keep.tolist() == [True, True, True, True, False]
    pairs = torch.tensor([[2.0, 50.0], [9.0, 1.0]])  # (chosen, rejected): only chosen checked
    checked = torch.tensor([[True, False], [True, False]])
    keep, _ = perplexity_keep(pairs, checked, 5.0, None)
    assert keep.tolist() == [True, False]


def _scorer(values):
    """items -> their hand-given perplexity, read from the item's metadata (a pure-logic check)."""

    def score(items):
        return [
            (values[it.data["metadata"]["i"]], 3) if values[it.data["metadata"]["i"]] else None
            for it in items
        ]

    return score


def test_percentile_drops_exactly_the_records_above_it_in_order():
    values = [3.0, 30.0, 5.0, None, 12.0, 7.0, 100.0, 4.0]
    items = [make_item(chat(f"q{i}", f"a{i}", metadata={"i": i}), f"t:{i + 1}") for i in range(len(values))]
    items[2].drop("exact_dup")  # removed earlier: passes through, not scored
    cfg = PerplexityCleanConfig(model="x", percentile=50)
    out = list(perplexity_filter(items, cfg, score=_scorer(values), batch=3))  # spooled over 3 batches
    assert [it.where for it in out] == [f"t:{i + 1}" for i in range(len(values))]
    scored = [3.0, 30.0, 12.0, 7.0, 100.0, 4.0]
    thr = float(np.percentile(scored, 50))  # sorted 3 4 7 12 30 100: 7 + 0.5 * 5
    assert thr == pytest.approx(9.5)
    dropped = [it.where for it in out if it.removed and it.removed.rule == "perplexity"]
    assert dropped == ["t:2", "t:5", "t:7"]
    ev = out[1].removed.evidence
    assert ev["perplexity"] == 30.0 and ev["threshold"] == pytest.approx(9.5) and ev["percentile"] == 50
    assert out[3].removed is None  # no scored token: kept
    fixed = list(perplexity_filter(
        [make_item(chat(f"q{i}", f"a{i}", metadata={"i": i}), f"t:{i}") for i in (0, 1, 4)],
        PerplexityCleanConfig(model="x", max_ppl=10.0), score=_scorer(values),
    ))  # fmt: skip
    assert [it.removed is not None for it in fixed] == [False, True, True]


def test_model_scores_match_the_eval_perplexity_path(tiny_model_dir, tmp_path):
    from posttrain.eval.perplexity import PerplexityConfig, evaluate_perplexity
    from posttrain.models.load import load_model, load_tokenizer

    rows = [chat("What is 2 + 3?", "2 + 3 = 5. The answer is 5."), chat("Sort 3 1 2", "1 2 3"),
            chat("Say hi", "hi hi hi hi hi hi hi hi")]  # fmt: skip
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tiny_model_dir)
    _, ref = evaluate_perplexity(
        PerplexityConfig(path=str(path)), load_model(tiny_model_dir, tokenizer=tok), tok
    )
    items = [make_item(r, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    got = model_scorer(PerplexityCleanConfig(model=str(tiny_model_dir), percentile=50, batch_size=2))(items)
    for (ppl, n), row in zip(got, ref, strict=True):
        assert n == row["tokens"] and ppl == pytest.approx(math.exp(row["nll"] / row["tokens"]), rel=1e-5)
    # a preference record is scored on prompt + chosen, like the same prompt/completion record
    pc = make_item({"prompt": "What is 2 + 3?", "completion": "The answer is 5."}, "p:1")
    pref = make_item({"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "7"}, "p:2")
    a, b = model_scorer(PerplexityCleanConfig(model=str(tiny_model_dir), max_ppl=2.0))([pc, pref])
    assert a == pytest.approx(b)
    with pytest.raises(DataError, match="no single response"):
        model_scorer(PerplexityCleanConfig(model=str(tiny_model_dir), max_ppl=2.0))(
            [make_item({"prompt": "q"})]
        )


def test_run_clean_with_a_reference_model(tiny_model_dir, tmp_path, jsonl):
    rows = [
        chat(f"Question {i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}" + " zq" * (i % 4)) for i in range(12)
    ]
    path = jsonl("in.jsonl", rows)
    raw = {"inputs": [path], "output_dir": str(tmp_path / "out"), "dedup": {"near": False},
           "perplexity": {"model": str(tiny_model_dir), "percentile": 75}}  # fmt: skip
    out = run_clean(from_dict(CleanRecipe, raw))
    report = json.loads((out / "report.json").read_text())
    removed = read_jsonl(out / "removed.jsonl")
    scores = model_scorer(PerplexityCleanConfig(model=str(tiny_model_dir), percentile=75))(
        [make_item(r, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    )
    thr = float(np.percentile([s[0] for s in scores], 75))
    above = [f"{path}:{i + 1}" for i, s in enumerate(scores) if s[0] > thr]
    assert report["removed"]["perplexity"] == len(above) == 3 and [r["where"] for r in removed] == above
    assert removed[0]["evidence"]["threshold"] == pytest.approx(thr, abs=1e-4)
    assert report["kept"] == 9


def test_config_errors():
    with pytest.raises(ConfigError, match="no threshold"):
        PerplexityCleanConfig(model="default").validate()
    with pytest.raises(ConfigError, match="percentile"):
        PerplexityCleanConfig(model="default", percentile=100).validate()
    PerplexityCleanConfig().validate()  # off: nothing to check

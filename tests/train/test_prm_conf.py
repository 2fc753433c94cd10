"""`posttrain prm-conf`: the chain pair loss by hand, a confound the pair loss must see through
and step BCE cannot, and a run on a tiny policy (outputs, rerun, bad input)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.errors import DataError
from posttrain.train.prm_conf import PRMConfRecipe, chain_pair_loss, conf_metrics, fit_conf_head, run_prm_conf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_chain_pair_loss_by_hand():
    # chains 0,1,2 of question 0 (0 right; 1, 2 wrong), chain 3 of question 1 (right, no partner)
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 3.0, 0.0], requires_grad=True)
    chain = torch.tensor([0, 0, 1, 1, 2, 3])
    question, correct = torch.tensor([0, 0, 0, 1]), torch.tensor([True, False, False, True])
    loss, m = chain_pair_loss(logits, chain, question, correct)
    # min scores: s0 = 0.5, s1 = -1, s2 = 3; pairs (0,1): d = 1.5, (0,2): d = -2.5
    want = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(2.5))) / 2
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    assert (float(m["pair_acc"]), int(m["pairs"])) == (0.5, 2)
    loss.backward()
    assert float(logits.grad[0]) == 0.0 and float(logits.grad[1]) != 0.0  # only the min step moves
    none, m = chain_pair_loss(logits, chain, question, torch.ones(4, dtype=torch.bool))
    assert float(none) == 0.0 and int(m["pairs"]) == 0


def confounded(n_questions: int, seed: int) -> dict[str, torch.Tensor]:
    """4 chains per question, 2 right; the MC step labels say only whether the question is easy
    (column 2 carries that difficulty); column 1 (min log-prob) tells right from wrong chains."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.rand(n_questions, generator=g) < 0.5
    correct = torch.tensor([True, True, False, False]).repeat(n_questions)
    question = torch.arange(n_questions).repeat_interleave(4)
    steps = 2
    chain = torch.arange(4 * n_questions).repeat_interleave(steps)
    q_of_step, ok = question[chain], correct[chain]
    x = torch.randn(len(chain), 4, generator=g)
    x[:, 1] = torch.where(ok, 1.0, -1.0) + 0.5 * x[:, 1]
    x[:, 2] = torch.where(easy[q_of_step], -1.0, 1.0) + 0.1 * x[:, 2]
    labels = easy[q_of_step].float()
    return {"x": x, "labels": labels, "chain": chain, "question": question, "correct": correct}


def test_pair_loss_ranks_within_question_where_step_bce_cannot():
    train, held = confounded(120, 0), confounded(100, 1)
    feats = ["mean_logp", "min_logp", "mean_entropy", "max_entropy"]
    bce = fit_conf_head(train, feats, bce_weight=1.0, pair_weight=0.0, l2=1e-3, steps=150, lr=0.05)
    pair = fit_conf_head(train, feats, bce_weight=0.0, pair_weight=1.0, l2=1e-3, steps=150, lr=0.05)
    both = fit_conf_head(train, feats, bce_weight=1.0, pair_weight=1.0, l2=1e-3, steps=150, lr=0.05)
    m_bce, m_pair, m_both = (conf_metrics(h.logits(held["x"]), held) for h in (bce, pair, both))
    assert m_bce["step_auc"] > 0.95  # BCE fits the labels (the difficulty) ...
    assert m_bce["pair_acc"] < 0.7  # ... and barely ranks a question's chains
    assert m_pair["pair_acc"] > 0.9 and m_both["pair_acc"] > 0.9
    assert m_both["step_auc"] > 0.9  # both terms: ranking and the pooled labels


def write_chains(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chains() -> list[dict]:
    rows = []
    for a, b in ((3, 4), (5, 2), (6, 1)):
        q = [{"role": "user", "content": f"Compute {a} + {b} + 1"}]
        for err in (0, 1):
            s1 = f"{a} + {b} = {a + b + err}"
            s2 = f"{a + b + err} + 1 = {a + b + err + 1}"
            meta = {"task": "arith_mag", "ground_truth": str(a + b + 1), "correct": not err}
            rows.append({"prompt": q, "completions": [s1, s2], "labels": [1.0 - err, 1.0 - err],
                         "final": f"Answer: {a + b + err + 1}", "metadata": meta})  # fmt: skip
    return rows


def test_run_prm_conf_writes_a_scorer_and_is_idempotent(tiny_model_dir, tmp_path):
    data = write_chains(tmp_path / "prm.jsonl", chains())
    cfg = PRMConfRecipe(policy=str(tiny_model_dir), train=data, eval=data, features=["mean_logp", "min_logp"],
                        steps=50, output_dir=str(tmp_path / "run"))  # fmt: skip
    final = run_prm_conf(cfg)
    head = json.loads((final / "conf_head.json").read_text())
    assert head["kind"] == "conf" and head["features"] == ["mean_logp", "min_logp"] and len(head["w"]) == 2
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["n_train_steps"] == 12 and report["after"]["pairs"] == 3
    stamp = (final / "conf_head.json").stat().st_mtime_ns
    assert run_prm_conf(cfg) == final and (final / "conf_head.json").stat().st_mtime_ns == stamp


def test_bad_chain_file_names_the_line(tiny_model_dir, tmp_path):
    bad = write_chains(tmp_path / "bad.jsonl", [chains()[0], {"prompt": "x", "completions": ["a"]}])
    cfg = PRMConfRecipe(policy=str(tiny_model_dir), train=bad, output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match="bad.jsonl:2.*labels"):
        run_prm_conf(cfg)

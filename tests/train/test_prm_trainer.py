"""Process reward-model trainer: labels on step-end tokens, data errors, tiny-model runs."""

from __future__ import annotations

import json

import pytest
import torch
from reward_env import small_recipe

from posttrain.data.loaders import write_jsonl
from posttrain.data.tasks.prm_data import prm_records, task_problems
from posttrain.errors import DataError, ModelError
from posttrain.models.heads import RewardModel, ScalarHead, load_reward_model
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train.loop import LoopConfig
from posttrain.train.prm import PRMRecipe, prm_step, run_prm
from posttrain.train.rm_data import PRMDataConfig, collate_steps, prm_samples, prm_token_ids, step_sample


def _cfg(model_dir, out, *overrides: str) -> PRMRecipe:
    return small_recipe(PRMRecipe, model_dir, out, *overrides)


def test_prm_labels_land_exactly_on_step_end_tokens(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    samples, stats = prm_samples(
        tok, PRMDataConfig(tasks=["arith", "sort"], n_per_level=3, n_corrupt=2), "train"
    )
    rows = prm_records(task_problems(["arith", "sort"], "train", 3), 2)
    assert len(samples) == len(rows) and stats["steps"] == sum(len(r["labels"]) for r in rows)
    step_id, end_id = tok.convert_tokens_to_ids(["<step>", "</think>"])
    for s, row in zip(samples, rows, strict=True):
        at = [t for t, y in enumerate(s.step_labels) if y >= 0]
        tokens = [s.input_ids[t] for t in at]
        assert tokens == [step_id] * (len(row["labels"]) - 1) + [end_id]  # every step, the last one too
        assert [s.step_labels[t] for t in at] == row["labels"]
        # the text before each label position ends with that step's text
        for t, step in zip(at, row["completions"], strict=True):
            assert tok.decode(s.input_ids[:t]).rstrip("\n").endswith(step)


def test_separator_must_be_one_token_and_steps_must_not_contain_it(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ModelError, match="templates add-tokens"):
        prm_token_ids(tok, "=>>", "</think>")
    seps = prm_token_ids(tok, "auto", "</think>")
    prompt = [{"role": "user", "content": "Sort 3 1"}]
    with pytest.raises(DataError, match="contains the separator"):
        step_sample(tok, prompt, ["min 3 1 = 1<step>x"], [1.0], seps, "row 1")
    no_end = step_sample(
        tok, prompt, ["min 3 1 = 1", "min 3 = 3"], [1.0, 0.5], prm_token_ids(tok, "auto", ""), "r"
    )
    assert sorted(y for y in no_end.step_labels if y >= 0) == [0.5, 1.0]


def test_soft_labels_from_a_file_and_bad_labels_are_named(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    good = {"prompt": "Sort 3 1", "completions": ["min 3 1 = 1", "min 3 = 3"], "labels": [0.75, True]}
    write_jsonl(tmp_path / "soft.jsonl", [good])
    samples, _ = prm_samples(tok, PRMDataConfig(train=str(tmp_path / "soft.jsonl")), "train")
    assert [y for y in samples[0].step_labels if y >= 0] == [0.75, 1.0]
    write_jsonl(tmp_path / "bad.jsonl", [good, {**good, "labels": [1]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*labels"):
        prm_samples(tok, PRMDataConfig(train=str(tmp_path / "bad.jsonl")), "train")


def test_accumulated_micro_batches_give_the_full_batch_gradient(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    samples, _ = prm_samples(tok, PRMDataConfig(tasks=["sort"], levels=[2], n_per_level=3), "train")
    model = RewardModel(load_model(tiny_model_dir, dtype="float32", device="cpu"), ScalarHead(64, seed=0))
    pad, dev = tok.pad_token_id, torch.device("cpu")
    for agg in ("token-mean", "seq-mean-token-mean"):
        loop = LoopConfig(loss_agg=agg, precision="fp32")  # an fp32 equivalence
        model.zero_grad()
        full = prm_step(model, [collate_steps(samples, pad)], loop, dev)
        want = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        acc = prm_step(model, [collate_steps(samples[:3], pad), collate_steps(samples[3:], pad)], loop, dev)
        got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert acc["loss"] == pytest.approx(full["loss"], abs=1e-5)
        assert acc["step_acc"] == pytest.approx(full["step_acc"], abs=1e-6)


def test_prm_run_exports_and_learns_its_training_chains(tmp_path, tiny_model_dir):
    """Metric moved: trained and evaluated on the same small file, loss falls and steps separate."""
    rows = prm_records(task_problems(["sort"], "train", 6, levels=[2, 3]), n_corrupt=1, seed=0)
    write_jsonl(tmp_path / "prm.jsonl", rows)
    data = [f"data.train={tmp_path / 'prm.jsonl'}", f"data.eval={tmp_path / 'prm.jsonl'}"]
    out = tmp_path / "run"
    # lr 1e-2: at 3e-3 the random tiny backbone's loss moved 0.55 -> 0.45 in 12 steps
    final = run_prm(
        _cfg(tiny_model_dir, out, *data, "train.max_steps=20", "train.batch_size=8", "optim.lr=1e-2")
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"] - 0.1
    assert report["after"]["step_auc"] > report["before"]["step_auc"] + 0.15
    model, _ = load_reward_model(final)
    assert model.info == {**model.info, "kind": "prm", "step_sep": "<step>", "last_step_end": "</think>"}
    assert not torch.equal(model.head.linear.weight, ScalarHead(64, seed=0).linear.weight)

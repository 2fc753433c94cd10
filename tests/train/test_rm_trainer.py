"""Outcome reward-model trainer: data, accumulation equivalence, tiny-model runs."""

from __future__ import annotations

import json

import pytest
import torch
from reward_env import small_recipe

from posttrain.data.loaders import write_jsonl
from posttrain.data.tasks.prm_data import preference_records, ranking_records, task_problems
from posttrain.errors import ConfigError, DataError
from posttrain.models.heads import RewardModel, ScalarHead, load_reward_model
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train.loop import LoopConfig
from posttrain.train.rm import RMRecipe, rm_step, run_rm
from posttrain.train.rm_data import RMDataConfig, collate_groups, rm_groups


def _cfg(model_dir, out, *overrides: str) -> RMRecipe:
    return small_recipe(RMRecipe, model_dir, out, *overrides)


def test_groups_from_preference_and_ranking_files(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    problems = task_problems(["arith"], "train", 2, levels=[2])
    pairs = preference_records(problems, seed=0)
    pairs[0]["margin"] = 2.0
    write_jsonl(tmp_path / "p.jsonl", pairs)
    groups, stats = rm_groups(tok, RMDataConfig(train=str(tmp_path / "p.jsonl")), "train", margin=0.5)
    assert [g.margin for g in groups] == [2.0, 0.5] and stats["samples"] == 4
    chain = lambda text: text.split("<think>")[1].split("</think>")[0]  # noqa: E731
    assert chain(pairs[0]["chosen"]) in tok.decode(groups[0].responses[0])
    assert chain(pairs[0]["rejected"]) in tok.decode(groups[0].responses[1])
    ranks = ranking_records(problems, seed=0)
    write_jsonl(tmp_path / "r.jsonl", ranks)
    groups, _ = rm_groups(tok, RMDataConfig(train=str(tmp_path / "r.jsonl")), "train")
    best = ranks[0]["responses"][ranks[0]["ranking"][0]]
    assert chain(best) in tok.decode(groups[0].responses[0])
    batch = collate_groups(groups, tok.pad_token_id)
    sizes = [len(r["responses"]) for r in ranks]
    assert batch["input_ids"].shape[0] == sum(sizes)
    assert batch["group_index"].tolist()[0][: sizes[0]] == list(range(sizes[0]))
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "there"}])
    with pytest.raises(DataError, match="preference or ranking"):
        rm_groups(tok, RMDataConfig(train=str(tmp_path / "sft.jsonl")), "train")


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_name", ["pl", "bt"])
def test_accumulated_micro_batches_give_the_full_batch_gradient(tiny_model_dir, loss_name):
    tok = load_tokenizer(tiny_model_dir)
    cfg = RMDataConfig(tasks=["sort"], levels=[2], n_per_level=6, task_format="pairs")
    groups, _ = rm_groups(tok, cfg, "train")
    lm = load_model(tiny_model_dir, dtype="float32", device="cpu")
    model = RewardModel(lm, ScalarHead(64, seed=0))
    pad, dev, loop = tok.pad_token_id, torch.device("cpu"), LoopConfig(precision="fp32")  # fp32 equivalence
    full = rm_step(model, [collate_groups(groups, pad)], loop, dev, loss_name=loss_name)
    want = _grads(model)
    model.zero_grad()
    micro = [collate_groups(groups[:2], pad), collate_groups(groups[2:], pad)]
    acc = rm_step(model, micro, loop, dev, loss_name=loss_name)
    torch.testing.assert_close(_grads(model), want, atol=1e-5, rtol=1e-4)
    assert acc["loss"] == pytest.approx(full["loss"], abs=1e-5)


def test_rm_run_trains_exports_and_reports_before_after(tmp_path, tiny_model_dir):
    out = tmp_path / "rm"
    final = run_rm(_cfg(tiny_model_dir, out))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"before", "after"} and 0 <= report["after"]["pairwise_acc"] <= 1
    model, _ = load_reward_model(final)
    base = load_model(tiny_model_dir)
    assert model.info["kind"] == "orm"
    assert not torch.equal(
        base.model.layers[0].mlp.up_proj.weight, model.backbone.model.layers[0].mlp.up_proj.weight
    )
    assert not torch.equal(model.head.linear.weight, ScalarHead(64, seed=0).linear.weight)


def test_rm_learns_to_rank_its_training_pairs(tmp_path, tiny_model_dir):
    """Metric moved: trained and evaluated on the same small file, pairwise accuracy rises. At lr
    1e-3 it does in fp32 and bf16 alike (loss 1.78 -> 1.04 / 1.03 in 20 steps, Intel Xeon with AMX);
    at the shared 3e-3 an fp32 run spiked and paused at step 8."""
    rows = ranking_records(task_problems(["sort"], "train", 8, levels=[1, 2]), max_responses=3, seed=0)
    write_jsonl(tmp_path / "rank.jsonl", rows)
    data = [f"data.train={tmp_path / 'rank.jsonl'}", f"data.eval={tmp_path / 'rank.jsonl'}"]
    run_rm(
        _cfg(
            tiny_model_dir,
            tmp_path / "pl",
            *data,
            "loss.name=pl",
            "train.max_steps=20",
            "train.batch_size=8",
            "optim.lr=1e-3",
        )
    )
    report = json.loads((tmp_path / "pl" / "eval.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"] - 0.3
    assert report["after"]["pairwise_acc"] > report["before"]["pairwise_acc"] + 0.1
    assert report["after"]["kendall_tau"] > report["before"]["kendall_tau"]


def test_lora_rm_trains_adapter_and_head(tmp_path, tiny_model_dir):
    final = run_rm(_cfg(tiny_model_dir, tmp_path / "lora", "peft.method=lora", "peft.r=4", "data.eval=null"))
    assert not (final / "adapter_config.json").exists() and (final / "reward_head.safetensors").is_file()
    model, _ = load_reward_model(final)
    assert not torch.equal(model.head.linear.weight, ScalarHead(64, seed=0).linear.weight)


def test_rm_rejects_prompt_learning_peft_and_margin_with_pl(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="virtual tokens"):
        run_rm(_cfg(tiny_model_dir, tmp_path / "p", "peft.method=prefix"))
    with pytest.raises(ConfigError, match="margin"):
        _cfg(tiny_model_dir, tmp_path / "m", "loss.name=pl", "loss.margin=1.0")

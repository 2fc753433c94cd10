"""Tiny-model SFT runs end to end: loss falls, parameters change, final/ is a plain HF folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_recipe
from posttrain.train.sft import SFTRecipe, run_sft


def _cfg(model_dir, out, *overrides: str) -> SFTRecipe:
    base = [
        f"model.path={model_dir}",
        f"output_dir={out}",
        "data.tasks=[sort]",
        "data.levels=[1]",
        "data.n_per_level=64",
        "data.eval_n_per_level=4",
        "train.max_steps=25",
        "train.batch_size=4",
        "train.seq_len=128",
        "train.tensorboard=false",
        "optim.lr=3e-3",
    ]
    return load_recipe(SFTRecipe, None, [*base, *overrides])


def _losses(out) -> list[float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_full_sft_loss_falls_and_exports_plain_folder(tmp_path, tiny_model_dir):
    final = run_sft(_cfg(tiny_model_dir, tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(final)
    assert not torch.equal(
        before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    )
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "data_train.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert (final / "generation_config.json").is_file() and (final / "tokenizer_config.json").is_file()


def test_lora_sft_exports_merged_model(tmp_path, tiny_model_dir):
    final = run_sft(
        _cfg(tiny_model_dir, tmp_path / "lora", "peft.method=lora", "peft.r=4", "train.max_steps=6")
    )
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = (
        merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    ).abs()
    assert diff.max() > 0  # the trained low-rank update was merged into W


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_sequence_aggregation_modes_train(tmp_path, tiny_model_dir, agg):
    run_sft(
        _cfg(tiny_model_dir, tmp_path / agg, f"train.loss_agg={agg}", "train.max_steps=3", "data.eval=null")
    )
    assert len(_losses(tmp_path / agg)) == 3


@pytest.mark.parametrize("method", ["bitfit", "prompt", "ia3"])
def test_other_peft_methods_train(tmp_path, tiny_model_dir, method):
    extra = ["data.packing=false"] if method == "prompt" else []
    out = tmp_path / method
    final = run_sft(
        _cfg(tiny_model_dir, out, f"peft.method={method}", "train.max_steps=4", "data.eval=null", *extra)
    )
    losses = _losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert final.is_dir()

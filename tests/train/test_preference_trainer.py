"""Preference trainer: shared-prompt layout == separate forwards, reference without a second model,
bad input counted or refused, a smoke run per loss, and exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from posttrain.algos.preference_losses import get_preference_loss
from posttrain.config import load_recipe
from posttrain.data.collate import pad_collate
from posttrain.errors import ConfigError, DataError
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train import preference as pref
from posttrain.train.lm_loss import sequence_logprobs
from posttrain.train.preference import PreferenceRecipe, perplexity_keep, run_preference
from posttrain.train.preference_data import (
    ExamplePlan,
    PreferenceDataConfig,
    RawExample,
    add_kl_partners,
    example_logprobs,
    file_raw_examples,
    reference_context,
    render_examples,
    task_raw_examples,
    to_unpaired,
)

LOSSES = ["sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _examples(tok, split="train", n=8, unpaired=False, tasks=("sort",), malformed=0.5):
    cfg = PreferenceDataConfig(tasks=list(tasks), levels=[1], malformed=malformed)
    raw = task_raw_examples(cfg, split, n, "<step>")
    if unpaired:
        raw = add_kl_partners(to_unpaired(raw))
    return render_examples(tok, raw, 256, "drop")[0]


# ---------------------------------------------------------------- layout equivalence


@pytest.mark.parametrize("share,packing", [(True, True), (True, False), (False, True)])
def test_shared_prompt_layout_matches_separate_forwards(tiny_model_dir, tok, share, packing):
    model = load_model(tiny_model_dir)
    examples = _examples(tok, tasks=("sort", "arith"), n=3) + _examples(tok, unpaired=True, n=2)[:3]
    plan = ExamplePlan(
        examples, list(range(len(examples))), 4, 512, packing, share, tok.pad_token_id, 0, False
    )
    samples = [s for e in examples for s in e.samples]
    sums, counts = zip(*(example_logprobs(model, b) for b in plan.epoch(0)), strict=True)
    sums, counts = torch.cat(sums), torch.cat(counts)
    ref_sums, ref_counts = sequence_logprobs(model, pad_collate(samples, tok.pad_token_id))
    assert torch.equal(counts, ref_counts)
    assert torch.allclose(sums, ref_sums, atol=1e-4, rtol=1e-5)
    # Same gradient as well: the shared prefix is one computation feeding both responses.
    w = model.model.layers[0].self_attn.q_proj.weight
    (g_fast,) = torch.autograd.grad(example_logprobs(model, plan.epoch(0)[0])[0].sum(), w)
    first = [s for e in examples[:4] for s in e.samples]
    (g_ref,) = torch.autograd.grad(sequence_logprobs(model, pad_collate(first, tok.pad_token_id))[0].sum(), w)
    assert torch.allclose(g_fast, g_ref, atol=1e-4, rtol=1e-3)


def test_shared_prompt_layout_is_shorter(tok):
    examples = _examples(tok, n=8)
    shared = ExamplePlan(examples, list(range(8)), 8, 512, False, True, tok.pad_token_id, 0, False)
    split = ExamplePlan(examples, list(range(8)), 8, 512, False, False, tok.pad_token_id, 0, False)
    n_shared = sum(len(b.input_ids) for b in shared.blocks.values())
    assert n_shared < 0.8 * sum(len(b.input_ids) for b in split.blocks.values())


def test_lora_reference_is_the_base_model(tiny_model_dir, tok):
    from posttrain.models.peft import PeftConfig, apply_peft

    base = load_model(tiny_model_dir)
    batch = ExamplePlan(_examples(tok, n=2), [0, 1], 2, 512, True, True, tok.pad_token_id, 0, False).epoch(0)[
        0
    ]
    want = example_logprobs(base, batch)[0]
    model = apply_peft(load_model(tiny_model_dir), PeftConfig(method="lora", r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = example_logprobs(model, batch)[0]
    with torch.no_grad(), reference_context(model):
        ref = example_logprobs(model, batch)[0]
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(adapted, want, atol=1e-2)


# ---------------------------------------------------------------- bad input


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_identical_and_too_long_pairs_are_counted_drops(tok):
    long_prompt = "Sort " + " ".join(["7"] * 300)
    raw = [
        RawExample(
            [{"role": "user", "content": "Sort 2 1"}], [[{"role": "assistant", "content": "1 2"}]] * 2, "a"
        ),
        RawExample(
            [{"role": "user", "content": long_prompt}], [[{"role": "assistant", "content": "x"}]] * 2, "b"
        ),
        RawExample(
            [{"role": "user", "content": "Sort 2 1"}],
            [[{"role": "assistant", "content": "1 2 " * 80}], [{"role": "assistant", "content": "2 1"}]],
            "c",
        ),
        RawExample(
            [{"role": "user", "content": "Sort 3 1"}],
            [[{"role": "assistant", "content": "1 3"}], [{"role": "assistant", "content": "3 1"}]],
            "d",
        ),
    ]
    kept, stats, dropped = render_examples(tok, raw, 64, "drop")
    assert [e.where for e in kept] == ["d"]
    assert stats["dropped"] == {"identical": 1, "prompt_too_long": 1, "too_long": 1}
    assert {d["where"]: d["reason"] for d in dropped} == {
        "a": "identical",
        "b": "prompt_too_long",
        "c": "too_long",
    }
    kept, stats, _ = render_examples(tok, raw, 64, "truncate")
    assert [e.where for e in kept] == ["c", "d"] and stats["truncated"] == 1
    assert all(len(s.input_ids) <= 64 for e in kept for s in e.samples)


def test_bad_records_are_clear_errors(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [{"prompt": "q", "chosen": "  ", "rejected": "b"}])
    with pytest.raises(DataError, match="empty response"):
        file_raw_examples(empty, None, "best_worst")
    ties = _write(
        tmp_path / "ties.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}]
    )
    with pytest.raises(DataError, match="permutation"):
        file_raw_examples(ties, None, "best_worst")
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match="label"):
        file_raw_examples(sft, None, "best_worst")


def test_rankings_become_pairs(tmp_path):
    path = _write(
        tmp_path / "rank.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}]
    )
    (best_worst,) = file_raw_examples(path, None, "best_worst")
    assert [r[0]["content"] for r in best_worst.responses] == ["c", "b"]
    assert len(file_raw_examples(path, None, "all")) == 3


def test_recipe_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="valid|one of"):
        load_recipe(PreferenceRecipe, None, ["loss.name=dpoo"])
    with pytest.raises(ConfigError, match="does not use target_margin"):
        load_recipe(PreferenceRecipe, None, ["loss.name=sigmoid", "loss.target_margin=1.0"])
    with pytest.raises(ConfigError, match="adapter"):
        load_recipe(PreferenceRecipe, None, ["reference.mode=adapter", "peft.method=full"])
    with pytest.raises(ConfigError, match="virtual tokens"):
        load_recipe(PreferenceRecipe, None, ["peft.method=prompt"])
    unpaired = _write(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    cfg = load_recipe(
        PreferenceRecipe,
        None,
        [
            f"model.path={tiny_model_dir}",
            f"output_dir={tmp_path / 'r'}",
            f"data.train={unpaired}",
            "data.eval=null",
        ],
    )
    with pytest.raises(ConfigError, match="needs chosen/rejected pairs"):
        run_preference(cfg)


def test_perplexity_keep_threshold_and_percentile():
    ppl = torch.tensor([[2.0, 50.0], [9.0, 3.0], [4.0, 4.0], [100.0, 1.5]])
    chosen = torch.tensor([[True, False]] * 4)
    keep, thr = perplexity_keep(ppl, chosen, max_ppl=5.0, percentile=None)
    assert keep.tolist() == [True, False, True, False] and thr == 5.0
    keep, _ = perplexity_keep(ppl, torch.ones_like(chosen), max_ppl=5.0, percentile=None)
    assert keep.tolist() == [False, False, True, False]
    keep, thr = perplexity_keep(ppl, chosen, max_ppl=None, percentile=50)
    assert thr == pytest.approx(6.5) and keep.tolist() == [True, False, True, False]


# ---------------------------------------------------------------- smoke per loss


@pytest.fixture(scope="module")
def smoke_data(tiny_model_dir, tok):
    train = _examples(tok, n=48)
    train_unpaired = _examples(tok, n=48, unpaired=True)
    held_out = _examples(tok, "test", n=12)
    model = load_model(tiny_model_dir)

    def score(examples):
        plan = ExamplePlan(examples, range(len(examples)), 16, 512, True, True, tok.pad_token_id, 0, False)
        return pref.score_examples(model, plan)

    ref = {"paired": score(train), "unpaired": score(train_unpaired), "eval": score(held_out)}
    return train, train_unpaired, held_out, ref


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_learns_held_out_preferences(tiny_model_dir, tok, smoke_data, name):
    from posttrain.train.loop import LoopConfig

    train, train_unpaired, held_out, ref = smoke_data
    spec = get_preference_loss(name)
    examples, cached = (train, ref["paired"]) if spec.paired else (train_unpaired, ref["unpaired"])
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ExamplePlan(examples, list(range(len(examples))), 8, 512, True, True, tok.pad_token_id, 0)
    step = pref.make_step_fn(spec, spec.params, 0.0, cached if spec.reference else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loop = LoopConfig()
    for i in range(12):
        metrics = step(model, [plan.epoch(i // len(plan))[i % len(plan)]], loop, torch.device("cpu"))
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        opt.step()
        opt.zero_grad()
    eval_plan = ExamplePlan(
        held_out, list(range(len(held_out))), 12, 512, True, True, tok.pad_token_id, 0, False
    )
    result = pref.preference_eval(model, eval_plan, spec, spec.params, ref["eval"], 1024)
    assert result["rewards/accuracy"] > 0.5, result
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- full runs


def _recipe(model_dir, out, *extra):
    base = [
        f"model.path={model_dir}",
        f"output_dir={out}",
        "data.tasks=[sort]",
        "data.levels=[1]",
        "data.n_per_level=24",
        "data.eval_n_per_level=8",
        "data.malformed=0.5",
        "eval.task_accuracy_n=4",
        "eval.max_new_tokens=24",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.tensorboard=false",
        "optim.lr=2e-3",
    ]
    return load_recipe(PreferenceRecipe, None, [*base, *extra])


def test_lora_run_uses_adapter_reference_logs_metrics_and_exports(tmp_path, tiny_model_dir):
    out = tmp_path / "lora"
    final = run_preference(
        _recipe(tiny_model_dir, out, "peft.method=lora", "peft.r=4", "loss.nll_weight=0.1")
    )
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen"):
        assert key in train[-1], key
    assert "kl/implicit" in train[-1] and "nll" in train[-1]
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4] and "eval/task_accuracy/overall" in evals[-1]
    assert evals[0]["eval/rewards/margins"] == 0.0 and "eval/logps/accuracy" in evals[0]
    assert not (out / "reference" / "train.pt").exists()  # adapter mode: nothing precomputed for training
    assert (out / "reference" / "eval.pt").is_file()
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()


def test_filter_writes_lists_and_resume_is_exact(tmp_path, tiny_model_dir, monkeypatch):
    extra = ["filter.percentile=75", "train.save_every=2", "train.keep_last=3", "eval.task_accuracy_n=0"]
    out = tmp_path / "full"
    run_preference(_recipe(tiny_model_dir, out, *extra))
    kept = (out / "filter" / "kept.jsonl").read_text().splitlines()
    dropped = [json.loads(ln) for ln in (out / "filter" / "dropped.jsonl").read_text().splitlines()]
    assert len(kept) + len(dropped) == 24 and dropped and "ppl >" in dropped[0]["reason"]
    # Simulate a crash after step 3: keep checkpoint 2 only, then run again.
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-4")
    shutil.rmtree(crashed / "final")
    monkeypatch.setattr(pref, "score_examples", lambda *a, **k: pytest.fail("reference recomputed on resume"))
    run_preference(_recipe(tiny_model_dir, crashed, *extra))
    from safetensors.torch import load_file

    a, b = load_file(out / "final" / "model.safetensors"), load_file(crashed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

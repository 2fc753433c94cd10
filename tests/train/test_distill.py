"""Distillation trainer: each mode on tiny models, the falling logit-KD loss, the tokenizer check, the top-k cache."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train.distill import DistillRecipe, run_distill
from posttrain.train.distill.config import DistillLossConfig, DistillRolloutConfig
from posttrain.train.distill.teacher import TopK, cache_meta, load_topk, save_topk, teacher_topk
from posttrain.train.loop import LoopConfig, ModelConfig
from posttrain.train.optim import OptimConfig


def _recipe(teacher, student, out, mode="logit", steps=3, **kw) -> DistillRecipe:
    cfg = DistillRecipe(
        mode=mode,
        teacher=ModelConfig(path=str(teacher)),
        student=ModelConfig(path=str(student)),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
        train=LoopConfig(max_steps=steps, batch_size=4, seq_len=128, tensorboard=False, num_samples=0),
        rollout=DistillRolloutConfig(prompts_per_step=2, n=2, max_new_tokens=12),
        output_dir=str(out),
        **kw,
    )
    cfg.data.tasks, cfg.data.levels, cfg.data.n_per_level = ["arith"], [1], 8
    cfg.data.eval, cfg.data.max_len = None, 128
    return cfg


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _changed(student_dir, final) -> bool:
    before, after = _weights(student_dir), _weights(final)
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "mode,loss",
    [("logit", DistillLossConfig()), ("on_policy", DistillLossConfig(kind="reverse_kl")), ("sequence", None)],
)
def test_each_mode_trains(tiny_model_dir, student_dir, tmp_path, mode, loss):
    cfg = _recipe(tiny_model_dir, student_dir, tmp_path / mode, mode=mode, steps=2)
    if loss is not None:
        cfg.loss = loss
    final = run_distill(cfg)
    assert final.resolve() == (tmp_path / mode / "final").resolve()
    rows = [r for r in _metrics(tmp_path / mode) if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert _changed(student_dir, final)
    if mode == "on_policy":
        assert all(r["completion_tokens"] > 0 for r in rows)
    if mode == "sequence":
        gens = (tmp_path / mode / "teacher_generations.jsonl").read_text().splitlines()
        assert gens and json.loads(gens[0])["messages"][-1]["role"] == "assistant"


def test_logit_kd_loss_falls(tiny_model_dir, student_dir, tmp_path):
    cfg = _recipe(
        tiny_model_dir, student_dir, tmp_path / "kd", steps=20, loss=DistillLossConfig(kind="jsd", beta=0.5)
    )
    run_distill(cfg)
    losses = [r["loss"] for r in _metrics(tmp_path / "kd") if "loss" in r]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_nll_weight_adds_the_data_nll_to_the_divergence(tiny_model_dir):
    """Teacher = student: the divergence is 0, so the loss is exactly nll_weight x the token-mean NLL."""
    from posttrain.data.collate import pad_collate
    from posttrain.data.render import Sample
    from posttrain.models.load import load_model
    from posttrain.train.distill.logit import make_step

    model = load_model(str(tiny_model_dir)).float()
    batch = pad_collate([Sample([5, 6, 7, 8], [-100, 6, 7, 8]), Sample([9, 10, 11], [-100, -100, 11])], 0)
    loop = LoopConfig(precision="fp32")
    vocab = model.config.vocab_size
    plain = make_step(model, DistillLossConfig(), vocab)(model, [batch], loop, torch.device("cpu"))
    mixed = make_step(model, DistillLossConfig(nll_weight=0.5), vocab)(
        model, [batch], loop, torch.device("cpu")
    )
    assert abs(plain["loss"]) < 1e-6 and abs(mixed["distill/forward_kl"]) < 1e-6
    assert mixed["loss"] == pytest.approx(0.5 * mixed["nll_token_mean"], rel=1e-5)
    assert mixed["nll_token_mean"] > 1.0  # a random tiny model: the NLL term is far from 0
    with pytest.raises(ConfigError, match="nll_weight"):
        _recipe(
            tiny_model_dir, tiny_model_dir, "x", mode="on_policy", loss=DistillLossConfig(nll_weight=0.1)
        ).validate()


def test_different_tokenizers_is_a_config_error(tiny_model_dir, tmp_path):
    from posttrain.models.load import save_hf_folder
    from posttrain.models.tokenizer import train_default_tokenizer
    from posttrain.train.pretrain import CorpusConfig, TinyModelConfig, build_corpus, build_model

    # a corpus of one task: its merges differ from the fixture's (words like "Compute" never form)
    tok = train_default_tokenizer(
        build_corpus(CorpusConfig(tasks=["sort"], mix={}, n_docs=200), seed=1), vocab_size=300
    )
    other = tmp_path / "other"
    save_hf_folder(
        build_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1), tok),
        tok,
        other,
    )
    with pytest.raises(ConfigError) as info:
        run_distill(_recipe(tiny_model_dir, other, tmp_path / "bad"))
    text = str(info.value)
    assert str(tiny_model_dir) in text and str(other) in text and "mode=sequence" in text
    assert not (tmp_path / "bad" / "config.yaml").exists()  # stopped before the run dir was written


def test_topk_cache_round_trip_and_training(tiny_model_dir, student_dir, tmp_path):
    from posttrain.data.sft_data import build_samples
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = _recipe(tiny_model_dir, student_dir, tmp_path / "topk", teacher_topk=8)
    samples, _ = build_samples(tok, cfg.data, "train")
    teacher = load_model(tiny_model_dir, tokenizer=tok)
    mem = teacher_topk(teacher, samples, 8, 3, tok.pad_token_id, len(tok))
    meta = cache_meta(str(tiny_model_dir), 8, samples)
    save_topk(mem, tmp_path / "cache", meta)
    back = load_topk(tmp_path / "cache", meta)
    assert isinstance(back, TopK)
    assert torch.equal(back.indices, mem.indices) and torch.equal(back.logprobs, mem.logprobs)
    assert torch.equal(back.offsets, mem.offsets) and int(back.offsets[-1]) == back.indices.shape[0]
    assert load_topk(tmp_path / "cache", {**meta, "k": 4}) is None  # another k: not reused
    # the teacher's top-1 at a sample's first trained position is the argmax of a direct forward
    ids = torch.tensor([samples[0].input_ids])
    first = next(i for i, lab in enumerate(samples[0].labels) if lab != -100) - 1
    with torch.no_grad():
        assert int(teacher(input_ids=ids).logits[0, first].argmax()) == int(mem.indices[0, 0])
    # training from the cache: the run writes the same cache and reads it back on a rerun
    cfg.cache_dir = str(tmp_path / "run_cache")
    final = run_distill(cfg)
    assert torch.equal(load_topk(tmp_path / "run_cache", meta).indices, mem.indices)
    assert _changed(student_dir, final)


def test_on_policy_resume_equals_uninterrupted(tiny_model_dir, student_dir, tmp_path):
    """Batches are sampled when read, seeded by (seed, epoch, index): stopping after step 2 and
    resuming to step 3 gives the same student as 3 steps in one go."""
    loss = DistillLossConfig(kind="jsd", beta=0.5)
    whole = run_distill(
        _recipe(tiny_model_dir, student_dir, tmp_path / "whole", "on_policy", steps=3, loss=loss)
    )
    run_distill(_recipe(tiny_model_dir, student_dir, tmp_path / "split", "on_policy", steps=2, loss=loss))
    resumed = run_distill(
        _recipe(tiny_model_dir, student_dir, tmp_path / "split", "on_policy", steps=3, loss=loss)
    )
    assert [r["step"] for r in _metrics(tmp_path / "split") if "loss" in r] == [
        1,
        2,
        3,
    ]  # resumed, not redone
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _changed(student_dir, whole)


def test_teacher_generations_are_keyed_by_the_sampling_precision(tiny_model_dir, student_dir, tmp_path):
    """The teacher samples in train.precision (bf16 and fp32 draw different completions), so the
    cached generations are reused only for the precision it resolves to."""
    from posttrain.train.distill.sequence import teacher_generations

    cfg = _recipe(tiny_model_dir, student_dir, tmp_path, mode="sequence", steps=1)
    cfg.train.precision = "fp32"
    out = teacher_generations(cfg, str(tiny_model_dir))
    meta_file = out.with_suffix(".meta.json")
    assert json.loads(meta_file.read_text())["precision"] == "fp32"
    out.write_text(out.read_text() + "\n")  # a marker: survives only a reuse
    assert teacher_generations(cfg, str(tiny_model_dir)).read_text().endswith("\n\n")
    cfg.train.precision = "bf16"
    assert not teacher_generations(cfg, str(tiny_model_dir)).read_text().endswith("\n\n")
    assert json.loads(meta_file.read_text())["precision"] == "bf16"

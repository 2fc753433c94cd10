"""The shared loop: accumulation equals the full batch; NaN stops with a checkpoint and no update."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.collate import pad_collate
from posttrain.data.render import Sample
from posttrain.errors import TrainingAnomaly
from posttrain.train.lm_loss import causal_lm_loss, sequence_ids
from posttrain.train.loop import LoopConfig, train_step


def _model(tiny_model_dir):
    from posttrain.models.load import load_model

    return load_model(tiny_model_dir)


def _samples(n: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 100, (10 + 3 * i,), generator=g).tolist()
        labels = [-100] * 4 + ids[4:]
        out.append(Sample(input_ids=ids, labels=labels, where=f"s{i}"))
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_accumulated_micro_batches_equal_full_batch(tiny_model_dir, agg):
    model = _model(tiny_model_dir)
    samples = _samples(4)
    loop = LoopConfig(loss_agg=agg, precision="fp32")  # an fp32 equivalence
    full = train_step(model, [pad_collate(samples, 0)], loop, torch.device("cpu"))
    g_full = _grads(model)
    acc = train_step(
        model, [pad_collate(samples[:1], 0), pad_collate(samples[1:], 0)], loop, torch.device("cpu")
    )
    g_acc = _grads(model)
    assert acc["loss"] == pytest.approx(full["loss"], rel=1e-5)
    for n in g_full:
        torch.testing.assert_close(g_acc[n], g_full[n], atol=1e-6, rtol=1e-4)


def test_fused_head_equals_full_logits_path(tiny_model_dir):
    model = _model(tiny_model_dir)
    batch = pad_collate(_samples(3), 0)
    loss, _ = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_sequence_ids_from_packed_positions():
    labels = torch.zeros(2, 6, dtype=torch.long)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert sequence_ids(labels, pos).tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 4]]
    assert sequence_ids(labels, None).tolist() == [[0] * 6, [1] * 6]


def test_nan_loss_stops_with_checkpoint_and_unchanged_weights(tmp_path, tiny_model_dir, monkeypatch):
    import posttrain.train.loop as loop_mod
    from posttrain.data.sft_data import BatchPlan
    from posttrain.monitor.logger import RunLogger
    from posttrain.train.checkpoint import latest_checkpoint, load_checkpoint
    from posttrain.train.optim import OptimConfig

    model = _model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = loop_mod.Run(
        tmp_path, model, None, RunLogger(tmp_path, tensorboard=False), None, torch.device("cpu")
    )
    plan = BatchPlan(_samples(8), 2, 64, False, 0, seed=0)
    real = loop_mod.train_step

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": float("nan")}

    monkeypatch.setattr(loop_mod, "train_step", poisoned)
    with pytest.raises(TrainingAnomaly) as exc:
        loop_mod.run_loop(run, model, plan, OptimConfig(lr=1e-2), LoopConfig(max_steps=3, tensorboard=False))
    assert "step-0" in exc.value.message
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert load_checkpoint(latest_checkpoint(tmp_path), model)["step"] == 0


def test_token_logprobs_match_full_logits_and_sum_per_sample(tiny_model_dir):
    from posttrain.train.lm_loss import sequence_logprobs, token_logprobs

    model = _model(tiny_model_dir)
    samples = _samples(3)
    batch = pad_collate(samples, 0)
    logp, ent, seq = token_logprobs(model, batch, with_entropy=True, temperature=0.7, chunk_size=5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 0.7
    full = torch.log_softmax(logits, -1)
    mask = batch["labels"][:, 1:] != -100
    ref = full.gather(2, batch["labels"][:, 1:].clamp(min=0)[..., None]).squeeze(-1)[mask]
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1)[mask], atol=1e-5, rtol=1e-5)
    sums, counts = sequence_logprobs(model, batch, temperature=0.7)
    for i, s in enumerate(samples):
        assert counts[i] == sum(1 for lab in s.labels[1:] if lab != -100)
        assert sums[i].item() == pytest.approx(ref[seq == i].sum().item(), rel=1e-5)

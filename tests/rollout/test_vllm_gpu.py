"""The vLLM engine on a real GPU: log-probs against the trainer's, merged and adapter LoRA sync,
and a stale sync caught by the probe. Skips without CUDA or vllm (the `[gpu]` extra).

Run on a GPU machine:  pytest -q tests/rollout/test_vllm_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm backend needs the [gpu] extra")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from posttrain.models.load import load_model  # noqa: E402
from posttrain.models.peft import PeftConfig, apply_peft  # noqa: E402
from posttrain.rollout.sampling import rollout_defaults  # noqa: E402
from posttrain.rollout.vllm_engine import VLLMEngine  # noqa: E402
from posttrain.rollout.weight_sync import SyncMismatch  # noqa: E402

LOGP_TOL = 0.05  # mean |vLLM - trainer| per token: bf16 sampling vs the trainer's bf16 forward


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory, build_model_dir):
    """A 2-layer Qwen2 with head_dim 64 (vLLM's attention kernels need >= 32) and the default tokenizer."""
    sizes = dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)
    return build_model_dir(tmp_path_factory.mktemp("gpu") / "model", 300, **sizes)


def _engine(path, **kw) -> VLLMEngine:
    return VLLMEngine(
        path, dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=512, enforce_eager=True, **kw
    )


def _lora_policy(path):
    model = apply_peft(
        load_model(path, dtype="bfloat16", device="cuda"), PeftConfig(method="lora", r=8, alpha=16)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p))
    return model


def test_logprobs_match_the_trainer(gpu_model_dir):
    from posttrain.train.lm_loss import token_logprobs

    engine = _engine(gpu_model_dir, probe_tol=None)
    done = engine.generate(["1 + 2 =", "3 * 4 ="], rollout_defaults(n=2, max_new_tokens=16).replace(seed=0))
    trainer = load_model(gpu_model_dir, dtype="bfloat16", device="cuda")
    for c in done:
        ids = torch.tensor([c.prompt_ids + c.token_ids], device="cuda")
        labels = ids.clone()
        labels[0, : len(c.prompt_ids)] = -100
        logp, _, _ = token_logprobs(trainer, {"input_ids": ids, "labels": labels})
        gap = (logp.float().cpu() - torch.tensor(c.logprobs)).abs().mean().item()
        assert gap < LOGP_TOL, gap


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_lora_sync_is_verified_by_the_probe(gpu_model_dir, lora_sync):
    engine = _engine(gpu_model_dir, lora_sync=lora_sync)
    before = engine.probe_logprob()
    policy = _lora_policy(gpu_model_dir)
    engine.update_weights(policy)  # raises SyncMismatch if vLLM's probe differs from the trainer's
    assert abs(engine.probe_logprob() - before) > 0.01  # the adapter really arrived
    with torch.no_grad():  # the trainer moves on without a sync: the next verification must fail
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    with pytest.raises(SyncMismatch):
        engine._verify(policy)

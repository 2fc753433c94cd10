"""Sampling presets: rollout temperature 1.0, evaluation with the model's settings or greedy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from posttrain.errors import ConfigError, ModelError
from posttrain.rollout.sampling import SamplingParams, eval_defaults, rollout_defaults


def test_rollout_defaults_explore():
    p = rollout_defaults()
    assert (p.temperature, p.top_p, p.top_k, p.greedy) == (1.0, 1.0, 0, False)
    q = rollout_defaults(n=8, temperature=0.7, stop=["</answer>"])
    assert (q.n, q.temperature, q.stop) == (8, 0.7, ["</answer>"])
    assert q.source == "rollout default (temperature 1.0); overridden: n, stop, temperature"
    assert p.stop == [] and p.n == 1  # the override made a copy


def test_eval_defaults_use_the_models_recommended_values(tmp_path):
    cfg = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [3, 7]}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    p = eval_defaults(tmp_path)
    assert (p.temperature, p.top_p, p.top_k, p.stop_token_ids) == (0.6, 0.95, 20, [3, 7])
    assert "temperature=0.6" in p.source and str(tmp_path) in p.source
    assert eval_defaults(tmp_path, temperature=0.0).greedy


@pytest.mark.parametrize(
    "source",
    [None, {"temperature": 0.7, "eos_token_id": 2}, {"do_sample": False, "temperature": 0.7}, "NO_FILE"],
)
def test_eval_defaults_fall_back_to_greedy(tmp_path, source):
    p = eval_defaults(tmp_path if source == "NO_FILE" else source)
    assert p.temperature == 0.0 and p.greedy and p.source.startswith("greedy")


def test_eval_defaults_from_generation_config_object():
    p = eval_defaults(GenerationConfig(do_sample=True, temperature=0.3, max_new_tokens=64, eos_token_id=5))
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.stop_token_ids) == (0.3, 1.0, 0, 64, [5])


def test_bad_values_and_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature") as info:
        rollout_defaults(temprature=0.5)
    assert "did you mean 'temperature'" in info.value.fix
    with pytest.raises(ModelError):
        eval_defaults(tmp_path / "missing")
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ModelError, match="invalid JSON"):
        eval_defaults(tmp_path)


def test_metadata_records_everything():
    meta = eval_defaults(None, max_new_tokens=32, seed=1).to_metadata()
    assert json.loads(json.dumps(meta)) == {
        "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 32, "stop": [],
        "stop_token_ids": [], "seed": 1, "greedy": True,
        "source": "greedy (no generation config given); overridden: max_new_tokens, seed",
    }  # fmt: skip


def test_generate_kwargs_drive_hf_generate():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = eval_defaults(None, max_new_tokens=5).to_generate_kwargs()
    assert greedy == {"max_new_tokens": 5, "num_return_sequences": 1, "do_sample": False}
    a, b = (model.generate(prompt, pad_token_id=0, **greedy) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (1, 8)
    sampled = rollout_defaults(n=3, max_new_tokens=4).to_generate_kwargs()
    assert sampled["do_sample"] and sampled["temperature"] == 1.0
    assert model.generate(prompt, pad_token_id=0, **sampled).shape == (3, 7)

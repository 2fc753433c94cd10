"""The rollout backend registry, prompt encoding and the vLLM backend's unavailable errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from posttrain.errors import BackendUnavailable, ConfigError, DataError, ModelError
from posttrain.models.load import load_model, load_tokenizer
from posttrain.rollout.engine import (
    ENGINES,
    Completion,
    RolloutEngine,
    encode_prompt,
    get_engine,
    register_engine,
)
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.sampling import SamplingParams


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        get_engine("vlm")
    assert "hf" in err.value.fix and "vllm" in err.value.fix


def test_hf_backend_from_folder_and_from_module(tiny_model_dir):
    engine = get_engine("hf", model=str(tiny_model_dir), dtype="float32", device="cpu")
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    tok = load_tokenizer(tiny_model_dir)
    shared = get_engine("hf", model=load_model(tiny_model_dir, device="cpu", tokenizer=tok), tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    assert engine.generate(["Hi"], params)[0].token_ids == shared.generate(["Hi"], params)[0].token_ids


def test_hf_backend_needs_a_tokenizer_with_a_module(tiny_model_dir):
    with pytest.raises(ModelError, match="tokenizer"):
        HFEngine(load_model(tiny_model_dir, device="cpu"))


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(), reason="vLLM is usable here"
)
def test_vllm_backend_unavailable_names_the_gpu_extra():
    with pytest.raises(BackendUnavailable) as err:
        get_engine("vllm", model="some/model")
    assert "posttrain[gpu]" in err.value.fix


def test_register_custom_backend():
    class Echo:
        def generate(self, prompts, params):
            return [Completion(i, 0, [], [], str(p)) for i, p in enumerate(prompts)]

        def update_weights(self, weights):
            pass

    register_engine("echo", lambda **kw: Echo())
    try:
        engine = get_engine("echo")
        assert isinstance(engine, RolloutEngine)
        assert engine.generate(["a"], SamplingParams())[0].text == "a"
    finally:
        ENGINES.pop("echo")


def test_encode_prompt_forms(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert encode_prompt(tok, [5, 6, 7]) == [5, 6, 7]
    assert encode_prompt(tok, "Hi") == tok("Hi")["input_ids"]
    msgs = [{"role": "user", "content": "Hi"}]
    assert encode_prompt(tok, {"prompt": msgs, "metadata": {}}) == encode_prompt(tok, msgs)
    with pytest.raises(DataError):
        encode_prompt(tok, {"question": "Hi"})
    with pytest.raises(DataError):
        encode_prompt(tok, [1.5, 2.5])
    with pytest.raises(DataError, match="no tokens"):
        encode_prompt(tok, "")

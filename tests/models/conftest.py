"""Fixtures for the models tests: the default tokenizer and a tiny Qwen2 built from a config."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models.tokenizer import train_default_tokenizer

CORPUS = [
    "Compute 11 + 16 + 0 + 14. <think>11 + 16 = 27\n27 + 0 = 27\n27 + 14 = 41</think>\nAnswer: 41",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_default_tokenizer(CORPUS, vocab_size=400)


def make_tiny_qwen2(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer, hidden-64 Qwen2 (q/k/v carry biases) with random weights, fp32, eval mode."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_qwen2(len(tokenizer))

"""Fixtures of the search tests: the scripted environment of `search_env`."""

from __future__ import annotations

import pytest
from search_env import make_env


@pytest.fixture
def env():
    """(policy, prm, verifier, queries) over three prompts with the same tree (fresh call logs)."""
    return make_env()


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The HF rollout engine over the session's tiny random model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout.engine import get_engine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return get_engine("hf", model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer=tok)

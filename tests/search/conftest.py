"""Fixtures of the search tests: the scripted environment of `search_env`."""

from __future__ import annotations

import pytest
from search_env import make_env


@pytest.fixture
def env():
    """(policy, prm, verifier, queries) over three prompts with the same tree (fresh call logs)."""
    return make_env()

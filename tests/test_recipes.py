"""Every shipped recipe parses into the typed config of the command named in its header comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posttrain.cli import RECIPE_TYPES, recipe_type
from posttrain.config import load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"pretrain_tiny", "sft_tiny", "sft_smollm2_lora", "quickstart"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(path):
    m = re.search(rf"posttrain ([\w-]+) recipes/{re.escape(path.name)}", path.read_text())
    assert m, f"{path.name}: header comment must show the command that runs it"
    assert m.group(1) in RECIPE_TYPES, f"{path.name}: unknown command {m.group(1)}"
    load_recipe(recipe_type(m.group(1)), path)

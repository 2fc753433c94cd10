from dataclasses import dataclass, field
from typing import Literal

import pytest

from posttrain.config import apply_override, from_dict, load_recipe
from posttrain.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    path: str | None = None
    flag: bool = False


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("steps: 5\ninner:\n  lr: 0.5\n")
    cfg = load_recipe(Outer, p, ["inner.mode=b", "inner.lr=1e-4", "flag=true", "inner.names=[x, y]"])
    assert cfg.steps == 5 and cfg.inner.lr == 1e-4 and cfg.inner.mode == "b" and cfg.flag is True
    assert cfg.inner.names == ["x", "y"]


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"inner": {"lrr": 1}}, source="r.yaml")
    assert "inner.lrr" in e.value.message and "inner.lr" in e.value.render() and e.value.where == "r.yaml"


def test_type_and_choice_errors():
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Outer, {"steps": "ten"})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match="true/false"):
        from_dict(Outer, {"flag": "yes please"})


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 1\ninner: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(Outer, p)
    assert e.value.where.startswith(str(p) + ":")


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "steps")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(Outer, tmp_path / "nope.yaml")


def test_union_keeps_a_value_of_a_plain_member_type():
    from posttrain.models.peft import PeftConfig

    assert from_dict(PeftConfig, {"target_modules": "all-linear"}).target_modules == "all-linear"
    assert from_dict(PeftConfig, {"target_modules": ["q_proj", "v_proj"]}).target_modules == [
        "q_proj",
        "v_proj",
    ]


def test_a_partial_section_keeps_the_recipes_own_defaults():
    from posttrain.train.pretrain import PretrainRecipe

    cfg = load_recipe(PretrainRecipe, None, ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4
    # the rest of `optim` is the pretrain recipe's default section, not the bare OptimConfig's
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.warmup_steps == 30


def test_a_nested_section_error_names_the_full_key(tmp_path):
    """An optional section (X | None) reports X's own error, and a validate() that names a key
    relative to its section (``dedup.threshold``) is qualified with where the section sits."""
    from posttrain.config import load_recipe
    from posttrain.train.rl import RLRecipe
    from posttrain.train.sft import SFTRecipe

    with pytest.raises(ConfigError) as err:
        load_recipe(SFTRecipe, None, ["clean={dedup: {threshold: 2.0}}"])
    assert err.value.where == "clean.dedup.threshold" and "must be in (0, 1]" in err.value.message
    assert "allowed types" not in str(err.value)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("clean:\n  dedup:\n    threshold: 2.0\n")
    with pytest.raises(ConfigError) as err:  # from a file: the file, then the key
        load_recipe(SFTRecipe, recipe, [])
    assert err.value.where == f"{recipe}: clean.dedup.threshold"
    with pytest.raises(ConfigError) as err:  # a section naming its keys from the recipe root stays as is
        load_recipe(RLRecipe, None, ["rollout.temperature=0"])
    assert err.value.where == "rollout.temperature"


def test_a_data_section_rejects_a_length_limit_below_one_token(tmp_path):
    from posttrain.config import load_recipe
    from posttrain.train.distill import DistillRecipe
    from posttrain.train.sft import SFTRecipe

    recipe = tmp_path / "sft.yaml"
    recipe.write_text("data:\n  max_len: -3\n")
    with pytest.raises(ConfigError) as err:  # when the recipe loads, not after the data is rendered
        load_recipe(SFTRecipe, recipe, [])
    assert err.value.where == f"{recipe}: data.max_len" and "got -3" in err.value.message
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        load_recipe(DistillRecipe, None, ["data.limit=0"])
    assert load_recipe(SFTRecipe, None, ["data.max_len=1"]).data.max_len == 1

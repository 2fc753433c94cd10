"""A training recipe's ``clean:`` section: cleaned once, cached by data + settings, used by SFT."""

from __future__ import annotations

import json
import os

import pytest
from quality_helpers import chat, read_jsonl

from posttrain.config import from_dict, load_recipe
from posttrain.data.quality.section import CleanSection, cache_key, clean_data
from posttrain.data.sft_data import DataConfig
from posttrain.errors import ConfigError

EVAL_Q = "What is the boiling point of water at sea level in degrees Celsius on a normal day"
ROWS = [
    chat("Sort: 3 1 2", "1 2 3"),
    chat("sort:  3 1 2", "1 2 3"),  # exact duplicate of row 1
    chat("Sort: 9 7 8", "7 8 9"),
    chat(f"Quick one: {EVAL_Q}?", "100"),  # contains the eval question
    chat("Sort: 5 4 6", "4 5 6"),
]


@pytest.fixture
def files(jsonl):
    return jsonl("train.jsonl", ROWS), jsonl("eval.jsonl", [{"prompt": EVAL_Q, "completion": "100"}])


def _section(evals, **raw) -> CleanSection:
    return from_dict(CleanSection, {"decontam": {"evals": [evals]}, "dedup": {"near": False}, **raw})


def test_clean_data_points_the_config_at_the_cleaned_file_and_caches_it(tmp_path, files):
    train, evals = files
    data = DataConfig(train=train, eval=None)
    assert clean_data(None, data, "train", str(tmp_path)) is data
    section = _section(evals)
    cleaned = clean_data(section, data, "train", str(tmp_path / "run"))
    key = cache_key(train, section)
    assert cleaned.train == str(tmp_path / "run" / "clean" / key / "kept.jsonl") and data.train == train
    assert read_jsonl(cleaned.train) == [ROWS[0], ROWS[2], ROWS[4]]
    report = json.loads((tmp_path / "run" / "clean" / key / "report.json").read_text())
    assert report["removed"]["exact_dup"] == 1 and report["removed"]["contaminated"] == 1
    before = os.stat(cleaned.train).st_mtime_ns
    assert clean_data(section, data, "train", str(tmp_path / "run")).train == cleaned.train  # cached
    assert os.stat(cleaned.train).st_mtime_ns == before
    # another setting, another file content, another eval set: another key
    assert cache_key(train, _section(evals, dedup={"exact": False, "near": False})) != key
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "another question entirely here"}) + "\n")
    assert cache_key(train, section) != key
    with open(train, "a") as f:
        f.write(json.dumps(chat("Sort: 2 1", "1 2")) + "\n")
    assert cache_key(train, _section(evals)) != cache_key(str(tmp_path / "eval.jsonl"), _section(evals))
    shared = _section(evals, cache_dir=str(tmp_path / "shared"))
    assert clean_data(shared, data, "train", str(tmp_path / "run")).train.startswith(str(tmp_path / "shared"))


def test_clean_section_errors(tmp_path, files):
    train, evals = files
    with pytest.raises(ConfigError, match="needs a data file") as exc:
        clean_data(_section(evals), DataConfig(train="tasks"), "train", str(tmp_path))
    assert exc.value.where == "data.train"
    with pytest.raises(ConfigError) as exc:  # a step setting is checked when the section is made
        _section(evals, dedup={"threshold": 2.0})
    assert exc.value.where == "dedup.threshold"
    with pytest.raises(ConfigError) as exc:
        clean_data(
            _section(evals, filters={"max_tokens": 10}), DataConfig(train=train), "train", str(tmp_path)
        )
    assert exc.value.where == "clean.tokenizer"


def test_sft_trains_on_the_cleaned_file(tmp_path, files, tiny_model_dir):
    from posttrain.train.sft import SFTRecipe, run_sft

    train, evals = files
    cfg = load_recipe(SFTRecipe, None, [
        f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'sft'}", f"data.train={train}", "data.eval=null",
        "train.max_steps=1", "train.batch_size=2", "train.seq_len=64", "train.tensorboard=false",
        f"clean.decontam.evals=[{evals}]",
    ])  # fmt: skip
    run_sft(cfg)
    stats = json.loads((tmp_path / "sft" / "data_train.json").read_text())
    assert stats["samples"] == 3, stats  # 5 rows less one duplicate and one contaminated
    assert len(list((tmp_path / "sft" / "clean").iterdir())) == 1

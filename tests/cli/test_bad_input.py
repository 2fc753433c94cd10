"""Each bad input gives a one-paragraph error naming the place and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from posttrain.cli import main


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["posttrain", *argv])
    monkeypatch.delenv("POSTTRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    return exc.value.code, err


def _recipe(tmp_path: Path, model: Path | str, train: Path | str, extra: str = "") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        f"model: {{path: {model}}}\ndata: {{train: {train}, eval: null}}\n"
        f"train: {{max_steps: 1, tensorboard: false}}\noutput_dir: {tmp_path / 'run'}\n{extra}"
    )
    return p


def _chat(content: str = "hi") -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
    )


def test_malformed_jsonl_names_file_and_line(tmp_path, monkeypatch, capsys, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(_chat() + "\n" + _chat() + "\n{not json\n")
    code, err = _run(monkeypatch, capsys, "sft", str(_recipe(tmp_path, tiny_model_dir, data)))
    assert code != 0 and f"{data}:3" in err and "Traceback" not in err


def test_missing_field_and_empty_assistant_turn(tmp_path, monkeypatch, capsys, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(
        _chat()
        + "\n"
        + json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]})
        + "\n"
    )
    code, err = _run(monkeypatch, capsys, "sft", str(_recipe(tmp_path, tiny_model_dir, data)))
    assert code != 0 and f"{data}:2" in err and "content" in err
    data.write_text(_chat("") + "\n")
    code, err = _run(monkeypatch, capsys, "sft", str(_recipe(tmp_path, tiny_model_dir, data)))
    assert code != 0 and f"{data}:1" in err and "empty" in err.lower()


def test_recipe_typo_suggests_key(tmp_path, monkeypatch, capsys, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "tasks", extra="optim: {lrr: 0.1}\n")
    code, err = _run(monkeypatch, capsys, "sft", str(recipe))
    assert code != 0 and "optim.lrr" in err and "optim.lr" in err and "Traceback" not in err
    code, err = _run(monkeypatch, capsys, "sft", str(recipe), "train.max_stepz=3")
    assert code != 0 and "train.max_steps" in err


def test_missing_model_path(tmp_path, monkeypatch, capsys):
    code, err = _run(monkeypatch, capsys, "sft", str(_recipe(tmp_path, tmp_path / "no_such_model", "tasks")))
    assert code != 0 and "no_such_model" in err and "Traceback" not in err


def test_tokenizer_without_chat_template(tmp_path, monkeypatch, capsys, tiny_model_dir):
    import shutil

    model = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, model)
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, err = _run(monkeypatch, capsys, "sft", str(_recipe(tmp_path, model, "tasks")))
    assert code != 0 and "chat template" in err.lower() and "Traceback" not in err


def test_debug_flag_shows_traceback(tmp_path, monkeypatch, capsys):
    from posttrain.errors import ConfigError

    monkeypatch.setattr(sys, "argv", ["posttrain", "--debug", "sft", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError):
        main()


def test_qlora_without_cuda_fails_before_loading(tmp_path, monkeypatch, capsys, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "tasks", extra="peft: {method: qlora}\n")
    code, err = _run(monkeypatch, capsys, "sft", str(recipe))
    assert code != 0 and "qlora" in err and "[gpu]" in err and "Traceback" not in err


def test_prompt_tuning_with_packing_is_a_config_error(tmp_path, monkeypatch, capsys, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "tasks", extra="peft: {method: prompt}\n")
    code, err = _run(monkeypatch, capsys, "sft", str(recipe))
    assert code != 0 and "data.packing" in err

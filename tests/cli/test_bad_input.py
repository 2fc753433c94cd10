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

    # recorded, so the "1" that --debug sets is undone after the test
    monkeypatch.setenv("POSTTRAIN_DEBUG", "")
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


# --- The corpus: each class of bad input against each command family -------------------------
# Every case: non-zero exit, no traceback, the message names the file (and line or key).

BAD_DATA = {  # class -> (file name, bytes, what the message must say)
    "not-utf8": ("latin1.jsonl", b'\n{"prompt": "caf\xe9"}\n', ":2: bytes that are not UTF-8"),
    "binary": ("binary.jsonl", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), ":1: binary data"),
    "empty": ("empty.jsonl", b"", "is empty"),
    "truncated-gz": ("cut.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip"),
}  # fmt: skip


def _data_commands(tmp_path: Path, model: Path, data: Path) -> dict[str, list[str]]:
    """Command family -> argv that reads `data` (recipes written next to it)."""
    run = tmp_path / "out"
    common = [f"model.path={model}", f"output_dir={run}", "train.max_steps=1"]
    return {
        "data validate": ["data", "validate", str(data)],
        "data preview": ["data", "preview", str(data), "--model", str(model)],
        "data clean": ["data", "clean", str(data), str(tmp_path / "clean_out")],
        "sft": ["sft", "recipes/sft_tiny.yaml", f"data.train={data}", "data.eval=null", *common],
        "rm": ["rm", "recipes/rm_tiny.yaml", f"data.train={data}", "data.eval=null", *common],
        "preference": ["preference", "recipes/dpo_tiny.yaml", f"data.train={data}", "data.eval=null", *common],
        "rl": ["rl", "recipes/grpo_tiny.yaml", f"data.prompts={data}", *common],
        "generate": ["generate", "recipes/generate_tiny.yaml", f"data.prompts={data}", f"model.path={model}",
                     f"output_dir={run}"],
        "eval": ["eval", str(model), "--data", str(data), "--output-dir", str(run)],
    }  # fmt: skip


@pytest.mark.parametrize("klass", list(BAD_DATA))
def test_bad_data_file_in_every_family(klass, tmp_path, monkeypatch, capsys, tiny_model_dir):
    name, content, said = BAD_DATA[klass]
    data = tmp_path / name
    data.write_bytes(content)
    monkeypatch.chdir(Path(__file__).parents[2])  # the recipes/ paths
    for family, argv in _data_commands(tmp_path, tiny_model_dir, data).items():
        if family == "data clean" and klass == "not-utf8":  # clean drops a bad line, with its reason
            assert _run_ok(monkeypatch, *argv)
            (removed,) = map(json.loads, (tmp_path / "clean_out" / "removed.jsonl").read_text().splitlines())
            assert removed["where"] == f"{data}:2" and "not UTF-8" in removed["evidence"]["error"]
            continue
        code, err = _run(monkeypatch, capsys, *argv)
        assert code != 0 and "Traceback" not in err, (family, err)
        assert str(data) in err and said in err, (family, err)


def _run_ok(monkeypatch, *argv: str) -> bool:
    monkeypatch.setattr(sys, "argv", ["posttrain", *argv])
    main()
    return True


def _recipe_commands() -> list[str]:
    from posttrain.cli import RECIPE_TYPES

    return sorted(RECIPE_TYPES)


@pytest.mark.parametrize(
    "content,said",
    [
        (b"model: {path: default\ntrain: [\n", ":2: invalid YAML"),
        (b"model:\n  path: caf\xe9\n", ":2: not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", ":1: not UTF-8 text"),
    ],
)
def test_bad_recipe_file_in_every_recipe_command(content, said, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    for command in _recipe_commands():
        code, err = _run(monkeypatch, capsys, command, str(recipe))
        assert code != 0 and "Traceback" not in err, (command, err)
        assert f"{recipe}{said}" in err and "Fix:" in err, (command, err)


def _broken_models(tmp_path: Path, model: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    trunc, notok = tmp_path / "truncated", tmp_path / "no_tokenizer"
    shutil.copytree(model, trunc)
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(model, notok)
    (notok / "tokenizer.json").unlink()
    return {"truncated": (trunc, "truncated or corrupt"), "no tokenizer": (notok, "no tokenizer files")}


def test_broken_model_folder_in_every_family(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(Path(__file__).parents[2])
    for klass, (model, said) in _broken_models(tmp_path, tiny_model_dir).items():
        out = tmp_path / f"out_{model.name}"
        for family, argv in {
            "models inspect": ["models", "inspect", str(model)],
            "sft": ["sft", "recipes/sft_tiny.yaml", f"model.path={model}", f"output_dir={out}"],
            "rl": ["rl", "recipes/grpo_tiny.yaml", f"model.path={model}", f"output_dir={out}"],
            "eval": ["eval", str(model), "--data", "tasks", "--output-dir", str(out), "--limit", "1"],
            "export": ["export", str(model), str(out / "export")],
            "data preview": ["data", "preview", "recipes/sft_tiny.yaml", "--model", str(model)],
        }.items():
            if klass == "truncated" and family == "data preview":
                continue  # preview loads only the tokenizer
            code, err = _run(monkeypatch, capsys, *argv)
            assert code != 0 and "Traceback" not in err, (klass, family, err)
            assert str(model) in err and said in err, (klass, family, err)


def _sft_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "recipes/sft_tiny.yaml", f"model.path={model}", f"output_dir={out}", "data.eval=null",
            "data.n_per_level=8", "data.tasks=[arith]", "train.batch_size=4", "train.seq_len=128",
            "train.tensorboard=false", *extra]  # fmt: skip


def test_truncated_checkpoint_names_the_file(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(Path(__file__).parents[2])
    out = tmp_path / "run"
    assert _run_ok(monkeypatch, *_sft_argv(tiny_model_dir, out, "train.max_steps=2", "train.save_every=1"))
    ckpt = out / "checkpoints" / "step-2"
    for name in ("trainable.safetensors", "optimizer.pt"):
        good = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(good[: len(good) // 3])
        code, err = _run(monkeypatch, capsys, *_sft_argv(tiny_model_dir, out, "train.max_steps=3"))
        assert code != 0 and "Traceback" not in err and str(ckpt / name) in err, err
        assert "truncated or corrupt" in err and "step-2" in err
        (ckpt / name).write_bytes(good)


def _no_dac_override() -> list[str]:
    """A prefix that makes root obey file permissions (drops CAP_DAC_OVERRIDE), or [] for others."""
    import os
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores file permissions and setpriv (util-linux) is missing")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_permission_denied_names_the_path(tmp_path, tiny_model_dir):
    import subprocess

    posttrain = str(Path(sys.executable).parent / "posttrain")
    locked, data = tmp_path / "locked", tmp_path / "data.jsonl"
    locked.mkdir()
    locked.chmod(0o555)
    data.write_text(_chat() + "\n")
    data.chmod(0o000)
    repo = Path(__file__).parents[2]
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for argv, path, said in [
        (["data", "validate", str(data)], data, "not readable"),
        (
            ["eval", "default", "--data", str(data), "--output-dir", str(tmp_path / "ev")],
            data,
            "Permission denied",
        ),
        (_sft_argv(tiny_model_dir, locked / "run", "train.max_steps=1"), locked / "run", "Permission denied"),
        (["report", str(demo), "--out", str(locked / "r.html")], locked, "Permission denied"),
    ]:
        done = subprocess.run(
            [*_no_dac_override(), posttrain, *argv], capture_output=True, text=True, cwd=repo
        )
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert str(path) in done.stderr and said in done.stderr, done.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 1.8 MB tmpfs: room for one checkpoint of the tiny model (~1.1 MB), not two."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1800k", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def test_disk_full_during_checkpoint_keeps_the_last_one(small_disk, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(Path(__file__).parents[2])
    out = small_disk / "run"
    argv = _sft_argv(tiny_model_dir, out, "train.max_steps=3", "train.save_every=1", "train.keep_last=2")
    code, err = _run(monkeypatch, capsys, *argv)
    assert code != 0 and "Traceback" not in err, err
    assert "could not write checkpoint step-2" in err and "MiB free on that disk" in err and str(out) in err
    assert f"{out / 'checkpoints' / 'step-1'}) is intact" in err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-1"]  # the partial step-2 folder was removed
    from posttrain.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(out).name == "step-1"
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_a_checkpoint_and_exits_with_the_documented_status(
    sig, status, tmp_path, tiny_model_dir
):
    import signal
    import subprocess
    import time

    repo = Path(__file__).parents[2]
    out = tmp_path / "run"
    argv = [
        str(Path(sys.executable).parent / "posttrain"),
        *_sft_argv(tiny_model_dir, out, "train.max_steps=100000"),
    ]
    proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status and "Traceback" not in err, err
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (
        f"interrupted by {sig} after step {step}; checkpoint saved to {out / 'checkpoints' / f'step-{step}'}"
        in err
    )
    assert (out / "checkpoints" / f"step-{step}" / "COMPLETE").is_file() and (out / "report.html").is_file()
    done = subprocess.run(
        [*argv[:-1], f"train.max_steps={step + 1}"], cwd=repo, capture_output=True, text=True
    )
    assert (
        done.returncode == 0
        and f"resuming from {out / 'checkpoints' / f'step-{step}'}" in done.stderr.replace("\n", "")
    )
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step + 1

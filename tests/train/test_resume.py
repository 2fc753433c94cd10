"""Crash safety: SIGKILL mid-run and mid-checkpoint, then resume, must give bit-identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    p = tmp_path / "sft.yaml"
    p.write_text(
        f"""
model: {{path: {model_dir}}}
data: {{train: tasks, eval: null, tasks: [arith], n_per_level: 8, max_len: 128}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{max_steps: 6, batch_size: 2, seq_len: 128, save_every: 2, keep_last: 5, tensorboard: false}}
"""
    )
    return p


def _sft(recipe: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("POSTTRAIN_FAULT", None)
    if fault:
        env["POSTTRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", str(recipe), f"output_dir={out}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("resume")
    recipe = _recipe(tmp, tiny_model_dir)
    out = tmp / "uninterrupted"
    res = _sft(recipe, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, out


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"


def test_sigkill_after_step_then_resume_is_bit_identical(reference_run):
    recipe, ref = reference_run
    out = ref.parent / "killed"
    res = _sft(recipe, out, fault="after-step:3")
    assert res.returncode == -9
    assert latest_checkpoint(out).name == "step-2"
    res = _sft(recipe, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    _assert_identical(ref, out)
    steps = [
        int(ln.split('"step": ')[1].split(",")[0]) for ln in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)), "metrics.jsonl holds a step twice after resume"


def test_sigkill_during_checkpoint_write_keeps_previous_loadable(reference_run, tiny_model_dir):
    recipe, ref = reference_run
    out = ref.parent / "killed_mid_save"
    res = _sft(recipe, out, fault="mid-save:4")
    assert res.returncode == -9
    assert any(p.name.startswith("step-4.tmp-") for p in (out / "checkpoints").iterdir())
    assert [p.name for p in list_checkpoints(out)] == ["step-2"]
    from posttrain.models.load import load_model

    state = load_checkpoint(latest_checkpoint(out), load_model(tiny_model_dir), restore_rng=False)
    assert state["step"] == 2
    res = _sft(recipe, out)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_identical(ref, out)
    assert not any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())

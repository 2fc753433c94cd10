"""Atomic checkpoints with exact resume.

Layout of `RUN_DIR/checkpoints/step-N/`:
    trainable.safetensors   parameters that require grad (all of them for full
                            fine-tuning, the adapter for LoRA, biases for BitFit)
    optimizer.pt            optimizer state_dict
    scheduler.pt            LR scheduler state_dict
    rng.pt                  python, numpy and torch (CPU and CUDA) RNG states
    trainer_state.json      step, data position, anything the trainer needs
    COMPLETE                written last

A checkpoint is written into `step-N.tmp-<pid>` (files fsynced) and renamed to
`step-N` in one `os.rename`, so a process killed mid-write leaves the previous
checkpoint untouched and loadable; stale `*.tmp-*` folders are ignored and
removed on the next save. Older checkpoints beyond `keep_last` are deleted only
after the new one is in place.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posttrain.errors import PosttrainError
from posttrain.train.faults import maybe_kill

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, detached and contiguous (tied weights appear once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep_last`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp-{os.getpid()}"
    try:
        _write_files(tmp, step, model, optimizer, scheduler, trainer_state)
    except (OSError, RuntimeError) as exc:  # disk full, quota, permissions (torch.save raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        free = shutil.disk_usage(root).free
        raise PosttrainError(
            f"could not write checkpoint step-{step}: {reason} ({free / 2**20:.1f} MiB free on that disk)",
            where=str(getattr(exc, "filename", None) or tmp),
            fix=f"free disk space (or fix permissions) and rerun to resume; the last complete checkpoint "
            f"({previous or 'none yet'}) is intact",
        ) from exc
    maybe_kill("mid-save", step)
    return publish(tmp, final, run_dir, keep_last)


def publish(tmp: Path, final: Path, run_dir: str | Path, keep_last: int) -> Path:
    """Rename a fully written checkpoint folder into place (swapping out one of the same step, e.g.
    re-saved after an anomaly), fsync the folder, prune to the newest ``keep_last``."""
    root = final.parent
    if final.exists():
        old = root / f"{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, step: int, model, optimizer, scheduler, trainer_state: dict[str, Any]) -> None:
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(
        json.dumps({"step": step, **trainer_state}, indent=1, default=str)
    )
    (tmp / "COMPLETE").write_text("ok\n")
    _fsync_tree(tmp)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model (trainable params), optimizer, scheduler and RNG; return trainer_state."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise PosttrainError(
            f"checkpoint {path} is incomplete or missing",
            fix="resume from another checkpoint or start a new run",
        )
    try:
        saved = load_file(path / "trainable.safetensors")
    except (SafetensorError, OSError) as exc:
        raise _corrupt(path / "trainable.safetensors", exc) from exc
    params = dict(model.named_parameters())
    missing = [n for n in saved if n not in params]
    if missing:
        raise PosttrainError(
            f"checkpoint {path} holds parameters this model lacks (e.g. {missing[0]})",
            fix="resume with the same model and PEFT settings the run was started with",
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    if restore_rng:
        set_rng_state(_torch_load(path / "rng.pt"))
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        raise _corrupt(path / "trainer_state.json", exc) from exc


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise _corrupt(file, exc) from exc


def _corrupt(file: Path, exc: BaseException) -> PosttrainError:
    return PosttrainError(
        f"checkpoint file is truncated or corrupt ({exc})",
        where=str(file),
        fix=f"delete {file.parent} to resume from the checkpoint before it, or set resume=false to start over",
    )

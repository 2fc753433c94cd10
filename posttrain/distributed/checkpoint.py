"""Checkpoints of distributed runs, in the atomic layout of `posttrain.train.checkpoint`.

- one process and DDP: rank 0 writes the ordinary checkpoint (`trainable.safetensors`,
  `optimizer.pt`, ...); the weights are replicated, so nothing else is needed.
- FSDP: every rank writes its shards with `torch.distributed.checkpoint` (DCP) into the
  shared `step-N.tmp-dcp` folder; rank 0 then adds scheduler, RNG, trainer_state.json and
  COMPLETE, fsyncs, and renames it to `step-N`. A rank killed mid-save leaves only the tmp
  folder, which the next save removes.

Either layout loads at any world size and strategy: DCP reshards on load (FSDP 2 -> 1 or
-> 4 ranks, or into a plain model), and an ordinary checkpoint loads into FSDP as a full
state dict (1 -> 2 ranks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from posttrain.distributed.parallel import barrier, is_main, strategy_of
from posttrain.errors import PosttrainError
from posttrain.train.checkpoint import (
    _fsync_tree,
    _torch_load,
    load_checkpoint,
    publish,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from posttrain.train.faults import maybe_kill

DCP_METADATA = ".metadata"


def save(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` (a collective under FSDP; rank 0 writes under DDP)."""
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    if strategy_of(model) == "fsdp":
        return _save_sharded(Path(run_dir), step, model, optimizer, scheduler, state, keep_last)
    if is_main():
        final = save_checkpoint(run_dir, step, model, optimizer, scheduler, state, keep_last)
    barrier()
    return final


def load(path: str | Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore a checkpoint of either layout into `model` (wrapped or not); returns trainer_state."""
    path = Path(path)
    if (path / DCP_METADATA).is_file():
        return _load_sharded(path, model, optimizer, scheduler)
    _check_shapes(path, model)
    if strategy_of(model) == "fsdp":
        return _load_full_into_fsdp(path, model, optimizer, scheduler)
    return load_checkpoint(path, model, optimizer, scheduler)


def _check_shapes(path: Path, model) -> None:
    """A checkpoint of another model (other sizes, same names) is refused before any copy."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "trainable.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError):
        return  # missing or corrupt: load_checkpoint says so with its own fix
    params = dict(model.named_parameters())
    for name, shape in shapes.items():
        if name in params and tuple(params[name].shape) != shape:
            raise _different_model(
                path, f"{name} has shape {list(shape)} there, {list(params[name].shape)} here"
            )


def _save_sharded(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp-dcp"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    except (OSError, RuntimeError) as exc:
        raise PosttrainError(
            f"could not write sharded checkpoint step-{step}: {str(exc).splitlines()[0]}",
            where=str(tmp),
            fix="free disk space (or fix permissions) and rerun to resume from the last complete checkpoint",
        ) from exc
    barrier()
    if is_main():
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1, default=str))
        (tmp / "COMPLETE").write_text("ok\n")
        _fsync_tree(tmp)
        maybe_kill("mid-save", step)
        publish(tmp, final, run_dir, keep_last)
    barrier()
    return final


def _load_sharded(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _require_complete(path)
    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (model.state_dict(), None)
    saved = {"model": msd, **({"optim": osd} if osd is not None else {})}
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sizes = {
        k.removeprefix("model."): tuple(getattr(v, "size", ()))
        for k, v in meta.items()
        if k.startswith("model.")
    }
    _check_same_model(path, set(sizes), msd)
    for name, size in sizes.items():
        if tuple(msd[name].shape) != size:
            raise _different_model(path, f"{name} has shape {list(size)} there, {list(msd[name].shape)} here")
    try:
        dcp.load(saved, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise _different_model(path, str(exc).splitlines()[0]) from exc
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    else:
        model.load_state_dict(saved["model"])
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    set_rng_state(_torch_load(path / "rng.pt"))
    return json.loads((path / "trainer_state.json").read_text())


def _load_full_into_fsdp(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """An ordinary (one-process / DDP) checkpoint into an FSDP model: full state dicts, each rank
    keeping its shards. optimizer.pt is keyed by parameter index in `build_optimizer`'s order."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _require_complete(path)
    weights = load_file(path / "trainable.safetensors")
    _check_same_model(path, set(weights), model.state_dict())
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None and (path / "optimizer.pt").is_file():
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        saved = _torch_load(path / "optimizer.pt")
        full = {
            "state": {order[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, full, options=opts)
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    set_rng_state(_torch_load(path / "rng.pt"))
    return json.loads((path / "trainer_state.json").read_text())


def _require_complete(path: Path) -> None:
    if not (path / "COMPLETE").is_file():
        raise PosttrainError(
            f"checkpoint {path} is incomplete or missing", fix="resume from another checkpoint"
        )


def _check_same_model(path: Path, saved: set[str], current: dict[str, Any]) -> None:
    extra = sorted(saved - set(current))
    if extra:
        raise _different_model(path, f"it holds parameters this model lacks (e.g. {extra[0]})")


def _different_model(path: Path, detail: str) -> PosttrainError:
    return PosttrainError(
        f"checkpoint {path} is from a different model: {detail}",
        where=str(path),
        fix="resume with the model and PEFT settings the run was started with, or use a new output_dir",
    )

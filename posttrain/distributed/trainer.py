"""The pieces `posttrain.train.loop` calls to run a trainer on several processes.

Rank 0 writes (config.yaml, metrics, checkpoints under DDP, `final/`); every rank trains.
A trainer opts in by marking its step function `distributed=True` (it shards each global
micro-batch with `local_micro`, sums its token counts with `all_reduce_sum` and runs its
forwards through `call`); the others refuse more than one process with a clear error.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.launch import check_config, init, launched
from posttrain.distributed.parallel import all_reduce_sum, call, is_main, strategy_of, world, wrap
from posttrain.distributed.parallel import check_in as check_in_ranks
from posttrain.errors import ConfigError


class NullLogger:
    """The metrics logger of ranks other than 0: writes nothing."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        return None

    def event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def rewind(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self, *args: Any, **kwargs: Any) -> None:
        return None


def config_of(recipe: Any) -> DistributedConfig:
    return getattr(recipe, "distributed", None) or DistributedConfig()


_JOINED: dict[str, Any] = {"cfg": DistributedConfig(), "peft": "full", "alone": False}


@contextmanager
def one_process():
    """Inside, `join` does nothing: a nested run (the default model's build, needed by every rank
    before training) trains in this process alone, even under torchrun."""
    before = _JOINED["alone"]
    _JOINED["alone"] = True
    try:
        yield
    finally:
        _JOINED["alone"] = before


def in_one_process() -> bool:
    return bool(_JOINED["alone"])


def join(recipe: Any, device_type: str) -> None:
    """Join torchrun's process group when this process was launched by it (prepare_run); the
    recipe's settings stay with the process (like the process group itself) for `setup`."""
    if _JOINED["alone"] or not hasattr(recipe, "distributed"):
        return  # a nested one-process run, or a trainer without a distributed section
    cfg = config_of(recipe)
    if cfg.nproc > 1 and not launched():  # e.g. a pipeline stage calling run_sft() directly
        raise ConfigError(
            f"distributed.nproc={cfg.nproc} but this process was not started by torchrun",
            where="distributed.nproc",
            fix="run the command line (`posttrain <command> RECIPE distributed.nproc=N` launches torchrun), "
            "or torchrun --nproc_per_node N -m posttrain <command> RECIPE",
        )
    check_config(cfg, device_type, nproc=1)
    init(cfg, device_type)
    _JOINED.update(cfg=cfg, peft=getattr(getattr(recipe, "peft", None), "method", "full"))


def check_in(step: int) -> None:
    check_in_ranks(step, _JOINED["cfg"].timeout_minutes)


def setup(model: torch.nn.Module, step_fn, device: torch.device) -> torch.nn.Module:
    """Wrap `model` for the configured strategy before the optimiser is built (run_loop)."""
    if world() == 1:
        return model
    cfg, peft_method = _JOINED["cfg"], _JOINED["peft"]
    fn = getattr(step_fn, "func", step_fn)  # through functools.partial
    if not getattr(fn, "distributed", False):
        name = getattr(fn, "__qualname__", "its step")
        raise ConfigError(
            f"this trainer ({name}) does not support more than one process yet",
            where="distributed.nproc",
            fix="run it in one process (distributed.nproc=1, no torchrun)",
        )
    if cfg.strategy == "fsdp":
        from posttrain.distributed.fsdp import check_fsdp

        check_fsdp(model, cfg, peft_method, device)
    return wrap(model, cfg, device)


def evaluate_ranks(evaluate, model: torch.nn.Module, step: int) -> None:
    """DDP: rank 0 evaluates the replicated model alone. FSDP: every rank runs the evaluation
    inside the root forward (the weights are sharded); only rank 0 writes."""
    if strategy_of(model) == "fsdp":
        with torch.no_grad():
            call(model, evaluate, step)
    elif is_main():
        evaluate(model, step)


def stop_agreed(signum: int | None) -> bool:
    """True on every rank when any rank got SIGINT/SIGTERM, so all stop after the same step."""
    if world() == 1:
        return signum is not None
    return all_reduce_sum([1.0 if signum is not None else 0.0])[0] > 0


def export_final(model: torch.nn.Module, export, out: Path) -> Path:
    """`export(plain_model) -> Path` on rank 0 (FSDP weights consolidated first); every rank
    returns `out` once it is written."""
    from posttrain.distributed.parallel import barrier

    if strategy_of(model) == "fsdp":
        from posttrain.distributed.fsdp import consolidate

        model = consolidate(model)
    final = export(model) if is_main() else out
    barrier()
    return final

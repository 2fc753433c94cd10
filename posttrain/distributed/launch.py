"""Start-up of a distributed run: the torchrun environment, the process group, and the
convenience launcher behind `posttrain <command> RECIPE distributed.nproc=N`.

    torchrun --nproc_per_node 2 -m posttrain sft recipes/sft_tiny.yaml
    posttrain sft recipes/sft_tiny.yaml distributed.nproc=2     # runs the line above itself
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

from posttrain.distributed.config import STRATEGIES, DistributedConfig
from posttrain.errors import ConfigError, PosttrainError

DISTRIBUTED_COMMANDS = ("pretrain", "sft", "rm", "prm", "preference", "distill", "rl")
"""The commands that train on several processes (torchrun or distributed.nproc > 1)."""


def check_command(command: str | None) -> None:
    """Under torchrun with several ranks, refuse a command that would run as N independent copies
    writing the same output_dir."""
    if launched() and env_world() > 1 and command not in DISTRIBUTED_COMMANDS:
        raise ConfigError(
            f"posttrain {command} does not run on several processes yet "
            f"(torchrun started {env_world()}); distributed commands: {', '.join(DISTRIBUTED_COMMANDS)}",
            fix=f"run `posttrain {command} ...` without torchrun",
        )


def requested_world(cfg: DistributedConfig) -> int:
    """The number of processes a run asks for: ``distributed.nproc`` or torchrun's WORLD_SIZE."""
    return max(cfg.nproc, env_world())


def refuse_fsdp_eval_recipe(cfg: DistributedConfig, eval_recipe: str | None) -> None:
    """A trainer's ``eval.recipe`` cannot run under FSDP (every rank would run it on its shard)."""
    if requested_world(cfg) > 1 and cfg.strategy == "fsdp" and eval_recipe:
        raise ConfigError(
            "eval.recipe cannot run under FSDP yet (every rank would run it on its shard of the weights)",
            where="eval.recipe",
            fix="use distributed.strategy=ddp, or evaluate final/ afterwards with `posttrain eval`",
        )


def launched() -> bool:
    """True inside a process started by torchrun (or anything that sets its variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def max_procs(device_type: str) -> int:
    """The most processes one machine may run: one per CUDA device; on CPU one per core
    (gloo ranks beyond the cores only time-slice and slow every collective)."""
    return torch.cuda.device_count() if device_type == "cuda" else (os.cpu_count() or 1)


def check_config(cfg: DistributedConfig, device_type: str, nproc: int | None = None) -> None:
    """Refuse settings that cannot run here, before any process is started."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(
            f"distributed.strategy={cfg.strategy!r} is not one of {', '.join(STRATEGIES)}",
            where="distributed.strategy",
        )
    n = cfg.nproc if nproc is None else nproc
    if n < 1:
        raise ConfigError(f"distributed.nproc must be >= 1, got {n}", where="distributed.nproc")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    limit = max_procs(device_type)
    if local > limit:
        what = "CUDA devices" if device_type == "cuda" else "CPU cores (os.cpu_count())"
        raise ConfigError(
            f"{local} processes on this machine but it has {limit} {what}",
            where="distributed.nproc",
            fix=f"set distributed.nproc <= {limit} (or torchrun --nproc_per_node <= {limit})",
        )
    if n > 1 and cfg.strategy == "none":
        raise ConfigError(
            f"{n} processes were started but distributed.strategy=none",
            where="distributed.strategy",
            fix="set distributed.strategy=ddp or fsdp, or run one process",
        )
    if cfg.timeout_minutes <= 0:
        raise ConfigError("distributed.timeout_minutes must be > 0", where="distributed.timeout_minutes")


def init(cfg: DistributedConfig, device_type: str) -> None:
    """Join the process group torchrun described (no-op in a one-process run or when joined)."""
    import torch.distributed as dist

    if not launched() or env_world() == 1 or dist.is_initialized():
        return
    check_config(cfg, device_type, env_world())
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    from posttrain.distributed.parallel import make_monitor_group

    make_monitor_group()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(command: str, recipe_path: str | None, overrides: list[str], cfg: DistributedConfig) -> None:
    """Run `torchrun --standalone --nproc_per_node cfg.nproc -m posttrain COMMAND RECIPE OVERRIDES`
    and wait; a failed rank becomes a PosttrainError naming it and its exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = ["--standalone", "--nproc_per_node", str(cfg.nproc), "--max_restarts", "0"]
    args += ["--monitor_interval", "0.5", "-m", "posttrain", command]
    args += ([recipe_path] if recipe_path else []) + list(overrides)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        run(get_args_parser().parse_args(args))
    except SignalException:  # Ctrl-C / SIGTERM: forwarded to the ranks, which saved a checkpoint
        raise KeyboardInterrupt from None
    except ChildFailedError as exc:
        failed = sorted(exc.failures.items())
        what = "; ".join(f"rank {r} exited with {_status(f)}" for r, f in failed)
        raise PosttrainError(
            f"{command} on {cfg.nproc} processes failed: {what}",
            fix="read that rank's error above; rerun the same command to resume from the last checkpoint",
        ) from None


def _status(failure) -> str:
    if failure.exitcode < 0:
        return f"signal {failure.signal_name()}"
    return f"status {failure.exitcode}"


def needs_launch(cfg: DistributedConfig) -> bool:
    return cfg.nproc > 1 and not launched()


def launch_or_none(
    command: str, recipe_path: str | None, overrides: list[str], cfg, output_dir: str
) -> Path | None:
    """The convenience form: with distributed.nproc > 1 outside torchrun, launch and return
    OUTPUT_DIR/final; else None (the caller trains in this process)."""
    if not needs_launch(cfg):
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_config(cfg, device)
    launch(command, recipe_path, overrides, cfg)
    return Path(output_dir) / "final"


def run_command(command: str, recipe_path: str | None, overrides: list[str], cfg, run_fn) -> Path:
    """A trainer's `<command>_main`: launch torchrun for distributed.nproc > 1, else `run_fn(cfg)`
    in this process (one of torchrun's ranks, or a plain run), with lost ranks named."""
    from posttrain.distributed.parallel import named_failures

    launched_final = launch_or_none(command, recipe_path, overrides, cfg.distributed, cfg.output_dir)
    if launched_final is not None:
        return launched_final
    try:
        with named_failures(min(10.0, 60 * cfg.distributed.timeout_minutes)):
            return run_fn(cfg)
    finally:
        shutdown()

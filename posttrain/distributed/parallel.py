"""DDP / FSDP2 applied to a model from outside (habit 8), rank helpers, and each rank's data shard.

The model keeps its architecture; `wrap` puts a small root module around it (`_Root`, whose
forward runs any function of the model) and hands that root to DDP or `fully_shard`, so a
trainer's loss code (fused LM head, reward heads, ...) runs inside the DDP/FSDP forward through
`call(model, fn, ...)` without knowing about distribution. Without a process group every helper
is the identity (rank 0 of 1).

Global-step contract: every rank builds the same global micro-batches (same plan, same resume
position); rank r trains on rows `tensor_split(rows, world)[r]` of each, so a recipe means the
same optimisation at any world size. A rank whose slice is empty gets one row with every label
ignored (zero loss, zero gradient) so that all ranks run the same forwards and collectives.
Loss weights use the token / sequence totals all-reduced over the ranks, and the loss is scaled
by the world size, so DDP's gradient average (and FSDP's reduce-scatter average) equals the
one-process gradient of the whole step.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from posttrain.distributed.config import DistributedConfig
from posttrain.errors import PosttrainError

_ROOT = "_posttrain_root"
IGNORE_INDEX = -100
IGNORED_LABELS = {"labels", "step_labels"}
"""Per-position targets of the batches we shard (LM labels, PRM step labels): -100 = not trained."""


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a one-process run): the rank that writes logs, metrics and `final/`."""
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled over the process group; the identity in one process)."""
    if world() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(write: Callable[[], Any]) -> Any:
    """``write()`` on rank 0 (checkpoints, files), then every rank waits for it; returns its result
    on rank 0 and None elsewhere."""
    out = write() if is_main() else None
    barrier()
    return out


def main_first(work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0 first, then on the other ranks: rank 0 computes and writes a cache,
    the others read it. Rank 0 releases them even when it fails, so they find no cache and say so
    instead of waiting for ever. Every rank returns its own result."""
    if not is_main():
        barrier()
        return work()
    try:
        return work()
    finally:
        barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum `values` over the ranks (float64, so token counts stay exact)."""
    if world() == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def check_in(step: int, timeout_minutes: float) -> None:
    """Every rank reports at the start of each step; a rank that died or hangs ends the job
    after `timeout_minutes` with an error naming it (gloo's monitored barrier names the ranks)."""
    if world() == 1:
        return
    silent = unanswered(datetime.timedelta(minutes=timeout_minutes))
    if silent:
        raise rank_failure(silent, f"at the start of step {step + 1}")


_MONITOR: list[Any] = []


def make_monitor_group() -> None:
    """A separate gloo group for the monitored barrier (NCCL has none, and a timed-out group
    may be unusable); a collective itself: every rank calls it once, right after init."""
    import torch.distributed as dist

    _MONITOR[:] = [dist.new_group(backend="gloo")]


def unanswered(timeout: datetime.timedelta) -> list[int]:
    """Ranks that did not reach this monitored barrier within `timeout` (rank 0 finds out; the
    other ranks report 0 when rank 0 is the one missing)."""
    import torch.distributed as dist

    try:
        dist.monitored_barrier(group=_MONITOR[0] if _MONITOR else None, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as exc:
        named = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
        if named:
            return [int(r) for r in named.group(1).replace(",", " ").split()]
        return [0] if rank() != 0 else [r for r in range(1, world())]  # a peer lost mid-barrier
    return []


def rank_failure(ranks: list[int], when: str) -> PosttrainError:
    names = ", ".join(str(r) for r in ranks)
    return PosttrainError(
        f"rank {names} stopped answering {when} (crashed, hung or far behind); rank {rank()} ends the job",
        where="distributed.timeout_minutes",
        fix=f"look at rank {names}'s own error above (crash, out of memory, a stuck data loader); "
        "rerun the same command to resume from the last checkpoint",
    )


_COLLECTIVE_FAILURES = ("timed out", "connection closed", "connection reset", "nccl", "broken pipe")


@contextmanager
def named_failures(diagnose_s: float = 10.0):
    """Turn a collective that failed (timeout, lost peer) anywhere in a distributed run into an
    error naming the rank(s) that stopped answering within `diagnose_s` more seconds."""
    try:
        yield
    except RuntimeError as exc:
        if world() == 1 or not any(k in str(exc).lower() for k in _COLLECTIVE_FAILURES):
            raise
        silent = unanswered(datetime.timedelta(seconds=diagnose_s))
        if not silent:
            raise
        raise rank_failure(silent, "in a collective") from exc


class _Root(torch.nn.Module):
    """The module DDP / FSDP wrap: its forward runs `fn(model, *args, **kwargs)`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def root_of(model: torch.nn.Module) -> torch.nn.Module | None:
    return model.__dict__.get(_ROOT)


def call(model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(model, *args, **kwargs)`, run inside the DDP/FSDP forward when `model` is wrapped."""
    root = root_of(model)
    return fn(model, *args, **kwargs) if root is None else root(fn, *args, **kwargs)


def strategy_of(model: torch.nn.Module) -> str:
    root = root_of(model)
    if root is None:
        return "none"
    return "ddp" if isinstance(root, torch.nn.parallel.DistributedDataParallel) else "fsdp"


@contextmanager
def grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter for all but the last micro-batch of a step."""
    root, kind = root_of(model), strategy_of(model)
    if kind == "ddp" and not sync:
        with root.no_sync():
            yield
        return
    if kind == "fsdp":
        root.set_requires_gradient_sync(sync)
    yield


def wrap(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    """Apply cfg.strategy to `model` in place (world > 1); returns the same model object.

    ddp: `DistributedDataParallel` around the root (rank 0's weights are broadcast).
    fsdp: `fully_shard` on every decoder layer, then on the root (embeddings, final norm and
    the tied or untied LM head stay in the root's group).
    """
    if world() == 1 or root_of(model) is not None:
        return model
    root = _Root(model)
    if cfg.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(root, device_ids=ids)
    else:
        from posttrain.distributed.fsdp import shard

        wrapped = shard(root, model, cfg)
    model.__dict__[_ROOT] = wrapped  # not a submodule: the root already holds the model
    return model


def shard_micro(batch: dict[str, torch.Tensor], r: int, w: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Rank r's rows of one global micro-batch: (rows, real). Every (B, ...) tensor is split the same
    way (`torch.tensor_split`, first ranks get the extra row). An empty slice comes back as row 0
    with all its `IGNORED_LABELS` set to -100 and `real=False`."""
    rows = batch["input_ids"].shape[0]
    idx = torch.tensor_split(torch.arange(rows), w)[r]
    if idx.numel() > 0:
        return {k: v[idx] for k, v in batch.items()}, True
    dummy = {k: v[:1].clone() for k, v in batch.items()}
    for key in IGNORED_LABELS.intersection(dummy):
        dummy[key].fill_(IGNORE_INDEX)
    return dummy, False


def shard_groups(batch: dict[str, torch.Tensor], r: int, w: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Rank r's groups of a grouped batch (reward-model rankings): `group_index` (B, K) holds each
    group's response rows (-1 = padding) of the (M, ...) row tensors; (B,) tensors are per group.
    Groups are split like `shard_micro` splits rows, each keeping all its responses. An empty
    slice comes back as group 0 with `real=False` (the caller gives it zero weight)."""
    index = batch["group_index"]
    groups = torch.tensor_split(torch.arange(index.shape[0]), w)[r]
    real = groups.numel() > 0
    groups = groups if real else torch.arange(1)
    mine = index[groups]
    rows = mine[mine >= 0].unique()  # sorted response rows of these groups
    remap = torch.full((batch["input_ids"].shape[0],), -1, dtype=torch.long)
    remap[rows] = torch.arange(rows.numel())
    out = {"group_index": torch.where(mine >= 0, remap[mine.clamp(min=0)], -1)}
    for key, value in batch.items():
        if key != "group_index":
            out[key] = value[groups] if value.shape[0] == index.shape[0] and value.ndim == 1 else value[rows]
    return out, real


def local_micro(micro: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """This rank's share of one global step's micro-batches (the identity in one process)."""
    if world() == 1:
        return micro
    r, w = rank(), world()
    return [shard_micro(b, r, w)[0] for b in micro]

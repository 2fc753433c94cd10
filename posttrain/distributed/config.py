"""Typed settings of torch.distributed training (the `distributed:` section of a trainer recipe).

A recipe means the same optimisation at any world size: `train.batch_size` and
`train.grad_accum` describe the GLOBAL step, and each rank trains on its slice
of every micro-batch (`posttrain.distributed.shard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["none", "ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("none", "ddp", "fsdp")


@dataclass
class DistributedConfig:
    """How many processes train, how they share the model, and how long a collective may wait."""

    strategy: Strategy = "ddp"
    """none (one process only) | ddp (replicated weights, all-reduced gradients) | fsdp (FSDP2
    `fully_shard`: parameters, gradients and optimizer state sharded over the ranks). Used only when
    more than one process runs."""
    nproc: int = 1
    """Processes on this machine. >1 with a plain `posttrain <command>` launches torchrun itself;
    under `torchrun` the launcher's WORLD_SIZE wins. At most the CUDA device count on GPUs, at most
    os.cpu_count() on CPU."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: auto = nccl when CUDA is used, else gloo."""
    timeout_minutes: float = 10.0
    """Every collective (all-reduce, barrier, FSDP gather) fails after this long instead of hanging,
    ending the job with the rank that stopped answering."""
    fsdp_param_dtype: Literal["none", "float32", "bfloat16", "float16"] = "none"
    """FSDP mixed precision: dtype of the gathered parameters in forward/backward (none = keep)."""
    fsdp_reduce_dtype: Literal["none", "float32", "bfloat16", "float16"] = "none"
    """FSDP mixed precision: dtype of the gradient reduce-scatter (none = the parameter dtype)."""
    fsdp_cpu_offload: bool = False
    """FSDP: keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (less memory, one more all-gather in backward)."""

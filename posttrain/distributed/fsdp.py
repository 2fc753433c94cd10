"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the decoder-only models we train.

Units: every decoder layer is its own FSDP group (all-gathered just before it runs, freed
after); the root group holds the rest (embeddings, final norm, LM head, tied or not), so a
loss that uses the LM-head weight directly (the fused cross-entropy) finds it gathered for
the whole root forward. `consolidate` gathers the full weights into a plain model on rank 0
for the one-folder HF export of `final/`.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.distributed.config import DistributedConfig
from posttrain.errors import ConfigError, ModelError

_DTYPES = {"none": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one; a ModelError when the model has none."""
    from posttrain.train.lm_loss import _unwrap

    lm = _unwrap(model)
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ModelError(
            f"FSDP cannot shard {type(lm).__name__}: it has no list of decoder layers "
            "(get_decoder().layers), which are the units FSDP gathers one at a time",
            where="distributed.strategy",
            fix="use distributed.strategy=ddp for this model",
        )
    return list(layers)


def check_fsdp(
    model: torch.nn.Module, cfg: DistributedConfig, peft_method: str, device: torch.device
) -> None:
    """Refuse what this FSDP path does not support, before any process group work."""
    if peft_method not in ("full", "none"):
        raise ConfigError(
            f"distributed.strategy=fsdp with peft.method={peft_method} is not supported "
            "(adapters are small: every rank can hold them)",
            where="distributed.strategy",
            fix="use distributed.strategy=ddp with PEFT",
        )
    if cfg.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError(
            "distributed.fsdp_cpu_offload needs CUDA (the model is already in CPU memory)",
            where="distributed.fsdp_cpu_offload",
            fix="set distributed.fsdp_cpu_offload=false",
        )
    decoder_layers(model)


def shard(root: torch.nn.Module, model: torch.nn.Module, cfg: DistributedConfig) -> torch.nn.Module:
    """`fully_shard` every decoder layer of `model`, then `root` (which holds `model`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=_DTYPES[cfg.fsdp_param_dtype], reduce_dtype=_DTYPES[cfg.fsdp_reduce_dtype]
    )
    offload = CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy()
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=cfg.fsdp_reshard_after_forward, **kw)
    return fully_shard(root, reshard_after_forward=False, **kw)


def plain_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named FSDP<Class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def consolidate(model: torch.nn.Module) -> torch.nn.Module | None:
    """Gather the full weights (a collective: every rank calls it); rank 0 gets a plain model
    of the same class and config holding them, the other ranks None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = plain_class(model)(model.config)
    dtype = next(iter(full.values())).dtype
    plain.to(dtype)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise ModelError(f"consolidated FSDP weights do not fit {type(plain).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")  # fmt: skip
    plain.tie_weights()
    return plain.eval()

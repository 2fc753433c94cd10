"""Trainer -> rollout-engine weight sync: plain HF names, buckets, and a checksum to verify it.

A PEFT-wrapped policy's ``state_dict`` names its tensors ``base_model.model.<hf name>`` with
``.base_layer`` inserted in every adapted module and the adapters beside them
(``lora_A.default.weight``...). An engine that loads a plain HF checkpoint (vLLM, a Ray worker
holding the un-wrapped model) needs the plain names; sending the wrapped ones either fails or,
worse, silently loads nothing (the stale-weights failure of TRL #5312). `sync_state` gives:

- ``merged``: every base tensor under its HF name, adapted weights merged,
  W + scaling B A (PEFT's own ``get_delta_weight``), the model itself untouched;
- ``adapter``: the base tensors under their HF names (unchanged by training: an engine loads
  them once) and, separately, the adapter's tensors in PEFT's saved-adapter naming
  (`adapter_state`), for engines that serve LoRA adapters (vLLM's ``LoRARequest``).

`buckets` groups tensors into chunks of at most ``bucket_bytes`` (one engine call per chunk,
not per tensor) and `checksum` is a SHA-256 over names, dtypes, shapes and bytes: every worker
reports it after a sync and a mismatch stops the run (`SyncMismatch`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import torch

from posttrain.errors import ModelError, PosttrainError

LoraSync = Literal["merged", "adapter"]
PEFT_PREFIX = "base_model.model."
ADAPTER_MARKERS = (".lora_", ".ia3_", ".original_module.")


class SyncMismatch(PosttrainError):
    """A rollout worker's weights differ from the trainer's after a sync."""

    exit_code = 3


def hf_name(name: str) -> str | None:
    """The plain HF name of a (possibly PEFT-wrapped) state-dict key; None for adapter tensors
    (``lora_A/B``, magnitude vectors, IA3 vectors) and the frozen originals of ``modules_to_save``."""
    if any(marker in name for marker in ADAPTER_MARKERS):
        return None
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def _delta_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module name without the PEFT prefix: scaling B A} of every active LoRA layer (merged mode)."""
    deltas = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "get_delta_weight"):
            continue
        for adapter in getattr(module, "active_adapters", []):
            if adapter in module.lora_A:
                d = module.get_delta_weight(adapter)
                key = name.removeprefix(PEFT_PREFIX)
                deltas[key] = deltas[key] + d if key in deltas else d
    return deltas


def sync_state(model: torch.nn.Module, lora_sync: LoraSync = "merged") -> dict[str, torch.Tensor]:
    """The policy's weights under plain HF names (module docstring), detached; merged LoRA deltas
    added in ``merged`` mode, base weights only in ``adapter`` mode."""
    if any(".ia3_" in n for n, _ in model.named_parameters()) and lora_sync == "merged":
        raise ModelError(
            "merged weight sync supports LoRA adapters, not IA3",
            where="rollout.lora_sync",
            fix="use peft.method=lora, or rollout.lora_sync=adapter",
        )
    deltas = _delta_weights(model) if lora_sync == "merged" else {}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            plain = hf_name(name)
            if plain is None:
                continue
            module = plain.rsplit(".", 1)[0]
            if plain.endswith(".weight") and module in deltas:
                tensor = tensor + deltas[module].to(tensor.dtype)
            out[plain] = tensor.detach()
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's tensors as PEFT saves them (``adapter_model.safetensors`` naming)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def buckets(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of (name, tensor) of at most ``bucket_bytes`` each (a larger tensor
    travels alone), in the state's order."""
    items = state.items() if isinstance(state, Mapping) else state
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def checksum(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes in name order (16 hex digits): equal iff the
    tensors are bitwise equal."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def verify(expected: str, reported: Mapping[str, str], step: int) -> None:
    """SyncMismatch naming the workers whose checksum differs from the trainer's."""
    bad = {w: c for w, c in reported.items() if c != expected}
    if bad:
        raise SyncMismatch(
            f"after the weight sync of step {step}, {len(bad)} rollout worker(s) hold other weights "
            f"than the trainer (trainer {expected}, {', '.join(f'{w}: {c}' for w, c in sorted(bad.items()))})",
            where="rollout.backend=ray weight sync",
            fix="a worker kept stale weights; rerun (the run resumes from its last checkpoint) and report "
            "the versions of ray and torch if it recurs",
        )

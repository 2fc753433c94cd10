"""Prompt KV reuse across `generate` calls (automatic prefix caching, as vLLM does it).

Tree search asks for the next step of a path whose prompt is the parent's prompt plus the
parent's step: without reuse each call re-encodes the whole path. `PrefixStore` keeps the
keys/values of recently encoded prompts (least recently used out first, bounded in tokens).
A new prompt takes the longest common token prefix with any stored prompt (keys/values of the
first m tokens depend only on those m tokens: attention is causal, positions absolute) and
only its suffix is run through the model.

`prefill_with_prefixes` lays a batch out as [left pad | cached prefix | pad | suffix]: row i's
p_i cached columns are right-aligned in the first P = max p_i columns and its s_i new tokens
right-aligned in the next S = max s_i; the attention mask zeroes both pads and position ids
count each row's own tokens, so the model computes what a plain left-padded prefill would
(up to fp32 summation order). Keys/values are stored as the model's attention layers produced
them (RoPE applied, the engine's autocast dtype).

The store must be cleared whenever the weights change (`HFEngine.update_weights` does), so
it is off by default and on for engines over fixed weights (search, eval).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer: keys and values (H, L, D) of one prompt."""


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixStore:
    """Keys/values of recent prompts, at most ``max_tokens`` tokens in all (LRU eviction)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self.tokens = 0
        self.hits = self.reused_tokens = self.lookups = 0

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def lookup(self, ids: tuple[int, ...]) -> tuple[int, KV | None]:
        """(m, kv): the longest stored prefix of ``ids``, capped at len(ids) - 1 so the model still
        runs at least one token (its logits start the decode); (0, None) when nothing matches."""
        self.lookups += 1
        best, best_key = 0, None
        for key in self.entries:
            m = common_prefix(key, ids)
            if m > best:
                best, best_key = m, key
        best = min(best, len(ids) - 1)
        if best <= 0 or best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [(k[:, :best], v[:, :best]) for k, v in self.entries[best_key]]

    def accepts(self, ids: tuple[int, ...]) -> bool:
        """Whether `add` would store ``ids`` (not held yet, and not longer than the whole store)."""
        return ids not in self.entries and len(ids) <= self.max_tokens

    def add(self, ids: tuple[int, ...], kv: KV) -> None:
        if not self.accepts(ids):
            return
        self.entries[ids] = kv
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)


def fill_layers(cache: Any, prefixes: list[KV | None], lengths: list[int], width: int) -> None:
    """Write each row's cached prefix right-aligned into the first ``width`` columns of the
    reserved layers of ``cache`` (rows without one stay zero: masked out)."""
    ref = next(kv for kv in prefixes if kv is not None)
    rows = len(prefixes)
    for j, layer in enumerate(cache.layers):
        k0, v0 = ref[j]
        h, d, dv = k0.shape[0], k0.shape[-1], v0.shape[-1]
        layer.lazy_initialization(k0, v0)
        layer._k = k0.new_zeros((rows, h, layer.capacity, d))
        layer._v = v0.new_zeros((rows, h, layer.capacity, dv))
        for i, (kv, m) in enumerate(zip(prefixes, lengths, strict=True)):
            if kv is not None:
                layer._k[i, :, width - m : width] = kv[j][0]
                layer._v[i, :, width - m : width] = kv[j][1]
        layer.length = width
        layer.keys, layer.values = layer._k[:, :, :width], layer._v[:, :, :width]


def row_kv(cache: Any, row: int, columns: torch.Tensor) -> KV:
    """Row ``row``'s keys/values at ``columns`` (its own tokens, pads skipped), copied out."""
    return [
        (layer.keys[row][:, columns].clone(), layer.values[row][:, columns].clone()) for layer in cache.layers
    ]

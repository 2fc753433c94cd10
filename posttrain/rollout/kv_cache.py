"""The rollout engine's KV caches on CPU and GPU: reserved buffers written in place
(`ReservedLayer`), rows dropped by moving at most as many rows as finished (`compact_order`), the
decode mask built once (`decode_mask`), and the switch to and from attention over shared prompts
(`shared_cache`, `unshare`; `posttrain.rollout.shared_prefix`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from posttrain.models.attention import takes_bool_mask
from posttrain.rollout.fused import FusedLM
from posttrain.rollout.shared_prefix import GroupCache, move_rows


class ReservedLayer(DynamicLayer):
    """A KV-cache layer whose buffers hold the whole generation: each decode step writes its
    column in place instead of re-concatenating the cache (what ``DynamicLayer`` does)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def next_column(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Claim the next column for a decode step that writes its keys/values into the buffers
        itself (`posttrain.models.cpu_kernels`): (column, key buffer, value buffer), each buffer
        (R, KV, capacity, D); ``keys``/``values`` then cover the column."""
        if self.length >= self.capacity:
            raise RuntimeError(f"KV cache full: {self.capacity} positions reserved")
        self.length += 1
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.length - 1, self._k, self._v

    def _gather(self, buf: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        new = buf.new_empty((indices.numel(), *buf.shape[1:]))
        torch.index_select(buf[:, :, : self.length], 0, indices, out=new[:, :, : self.length])
        return new

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if indices.numel() <= self._k.shape[0]:  # in place: only rows i with indices[i] != i move
            self._k, self._v = (move_rows(buf, indices, self.length) for buf in (self._k, self._v))
        else:  # more rows than reserved (prefix sharing's expansion): new buffers
            self._k, self._v = (self._gather(buf, indices) for buf in (self._k, self._v))
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def shared_cache(
    net: FusedLM, cache: DynamicCache, padding: torch.Tensor, expand: torch.Tensor, steps: int
) -> GroupCache:
    """The prefill's reserved cache of U distinct prompts as a `GroupCache` for the rows
    ``expand`` (R,): the prompts' keys/values are kept once, each row reserves ``steps``."""
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    pad = None if bool(padding.all()) else padding.bool()
    return GroupCache(layers, pad, expand, steps, net.heads // net.kv_heads)


def unshare(model: Any, group: GroupCache, capacity: int) -> DynamicCache:
    """``group``'s rows in an expanded reserved cache of ``capacity`` positions."""
    cache = new_cache(model, capacity)
    for layer, shared in zip(cache.layers, group.layers, strict=True):
        layer.update(*group.rows_kv(shared))
    return cache


def compact_order(live: torch.Tensor) -> torch.Tensor:
    """The rows to keep, as indices for ``batch_select_indices``: the live rows of ``live`` (R,)
    that sit in the first R' = live.sum() places stay there, the live rows behind them fill the
    holes; dropping d rows then moves at most d rows of the cache, not R'."""
    keep = live.nonzero().squeeze(1)
    order = torch.arange(keep.numel(), device=live.device)
    order[(~live[: keep.numel()]).nonzero().squeeze(1)] = keep[keep >= keep.numel()]
    return order


def new_cache(model: Any, capacity: int) -> DynamicCache:
    """A cache for ``capacity`` positions: reserved buffers when every layer is a plain
    full-attention ``DynamicLayer``, else the model's default dynamic cache (sliding windows...)."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [ReservedLayer(capacity) for _ in cache.layers]
    return cache


def decode_mask(model: Any, cache: DynamicCache, attn: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of every decode step (sliced to the seen length), built once: None when
    no row is padded; with reserved (full-attention) layers and sdpa attention, the (R, 1, 1, P +
    steps) boolean mask that the model uses as is, instead of rebuilding one from the padding mask
    each step; for a `FusedLM`, the (R, P + steps) boolean padding mask (it slices what it needs);
    else the (R, P + steps) padding mask ``attn`` itself."""
    if bool(attn.all()):
        return None
    if isinstance(model, FusedLM):
        return attn.bool()
    if takes_bool_mask(model) and all(isinstance(layer, ReservedLayer) for layer in cache.layers):
        return attn.bool()[:, None, None]
    return attn

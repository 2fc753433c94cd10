"""The attention models run with on CPU: SDPA, except where plain matmul attention is faster.

Measured on 2 cores (AMD EPYC, avx512_bf16; bf16, one layer's forward + backward): PyTorch's CPU
flash kernel is 1.4-2.6x slower than two matmuls and a softmax on the short rows of RL and
preference batches (64 x 4 heads x 104 tokens: 71.5 vs 27.9 ms; 32 x 9 x 110: 60.6 vs 28.8;
8 x 9 x 256: 33.2 vs 23.8), and faster from ~512 tokens on (4 x 9 x 512: 57.3 vs 88.5), where the
materialised (L x L) scores also cost memory. fp32 and other devices stay on SDPA; forward-only
passes take the same path as training ones, so scoring and training give the same numbers.

The matmul path reads each key/value head once for its group of query heads (no ``repeat_kv``
copies), folds the scale into the queries, adds the mask as a bias built once per mask
(`mask_bias`), and takes the softmax of the bf16 scores in bf16 (the kernel computes in fp32 and
rounds its output to bf16, as a cast after an fp32 softmax would). Grouping and the bf16 softmax
took one layer's forward + backward on an Intel Xeon with AMX from 10.4 to 4.9 ms (8 x 4 heads x
256, tiny default) and from 29.1 to 12.1 ms (8 x 9 x 256, SmolLM2); the bias, measured separately,
from 7.4 to 2.8 and 22.3 to 7.4 ms. Outputs equal the fp32-softmax version's to bf16 rounding; the
query/key gradients differ by up to ~1e-2 of their largest entry (the softmax backward in bf16).

`ATTENTION` is registered with transformers' attention and mask interfaces (its masks are SDPA's:
boolean, or None for plain causal), and `load_model` selects it on CPU.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "posttrain_sdpa"
"""The registered name (``config._attn_implementation``)."""
MATMUL_MAX_KEYS = 384
"""Longest key length for the matmul path (the crossover above lies between 256 and 512)."""
BOOL_MASK_IMPLEMENTATIONS = ("sdpa", ATTENTION)
"""Implementations that take a boolean 4D mask as is (custom masks: packing, preference pairs)."""


def use_matmul(query: torch.Tensor, key: torch.Tensor, position_bias: Any = None) -> bool:
    """The matmul path: bf16 on CPU over at most `MATMUL_MAX_KEYS` keys (bf16 tensors, or bf16
    autocast: RoPE hands fp32 queries to the attention there). With or without grad alike: a
    no-grad scoring pass (old or reference log-probs) must give the training forward's numbers."""
    bf16 = query.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return query.device.type == "cpu" and bf16 and key.shape[2] <= MATMUL_MAX_KEYS and position_bias is None


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, Q, D) queries over (B, KV, K, D) keys and
    values; returns ((B, Q, H, D), None). SDPA's semantics (``is_causal`` when no mask and Q > 1)."""
    if not use_matmul(query, key, kwargs.get("position_bias")) or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    rows, heads, q_len, dim = query.shape
    kv, k_len = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else dim**-0.5
    # query head h reads key/value head h // (heads / kv): the heads of a group as one block of rows
    grouped = (query * scale).reshape(rows, kv, heads // kv * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).view(rows, heads, q_len, k_len)
    if attention_mask is not None:
        scores = scores + mask_bias(attention_mask, k_len, scores.dtype)
    elif causal and q_len > 1:  # SDPA's is_causal: top-left aligned (HF passes no mask only for Q == K)
        scores = scores + causal_bias(q_len, k_len, scores.dtype, query.device)
    probs = torch.softmax(scores, dim=-1)  # bf16 in and out, fp32 inside (see the module docstring)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.view(rows, kv, heads // kv * q_len, k_len), value)
    return out.view(rows, heads, q_len, dim).transpose(1, 2).contiguous(), None


_last_bias: list = [None]  # (weak reference to the mask, its version, dtype, keys, bias)


def mask_bias(mask: torch.Tensor, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` (boolean, True = attend, or transformers' float mask, 0 = attend) over its first
    ``k_len`` keys as an additive bias: 0 where attended, the lowest finite ``dtype`` value
    elsewhere (a fully masked left-pad query gets finite garbage, never NaN). Built once per mask:
    every layer of a forward gets the same tensor. Adding it gives ``masked_fill``'s scores and
    gradients exactly, and forward + backward of one layer ran 2.7x faster (8 x 4 heads x 256:
    7.4 -> 2.8 ms; 8 x 9 x 256: 22.3 -> 7.4 ms; Intel Xeon with AMX): CPU ``masked_fill`` with a
    mask broadcast over the heads is slow, and so is its backward."""
    last = _last_bias[0]
    tracked = not mask.is_inference()  # inference tensors have no version counter
    if tracked and last is not None and last[0]() is mask and last[1:4] == (mask._version, dtype, k_len):
        return last[4]
    bias = additive((mask if mask.dtype == torch.bool else mask == 0)[..., :k_len], dtype)
    if tracked:
        _last_bias[0] = (weakref.ref(mask), mask._version, dtype, k_len, bias)
    return bias


@functools.lru_cache(maxsize=8)
def causal_bias(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(Q, K) additive bias of SDPA's ``is_causal`` (top-left aligned): the lowest finite ``dtype``
    value above the diagonal, 0 elsewhere."""
    return additive(torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(), dtype)


def additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``keep`` (True = attend) as an additive mask of ``dtype``: 0 where kept, the lowest
    finite value elsewhere (transformers' float-mask convention)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
        ~keep, torch.finfo(dtype).min
    )


def register() -> str:
    """Register `ATTENTION` (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION


def takes_bool_mask(model: Any) -> bool:
    """Whether ``model``'s attention takes a boolean 4D mask as is (SDPA and `ATTENTION`)."""
    return getattr(model.config, "_attn_implementation", None) in BOOL_MASK_IMPLEMENTATIONS


register()  # on import: processes that rebuild a model from its config (Ray workers) know the name

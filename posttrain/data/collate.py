"""Batching for training: right padding, length bucketing, and sequence packing.

Packing concatenates samples into rows of at most ``seq_len`` tokens. Attention
stays inside each sample because ``position_ids`` restart at 0 at every sample
start and the batch carries NO ``attention_mask``: transformers 5.x
(``masking_utils.find_packed_sequence_indices``) then builds a block-diagonal
causal mask for sdpa / eager attention (verified in tests for Qwen2 and Llama).
flash-attention reads the boundaries from ``position_ids`` only when the batch
holds ONE row (``_is_packed_sequence`` requires batch size 1); with more rows it
silently attends across samples. `verify_packed_attention` checks the model.

IMPORTANT: the model must be called with ``use_cache=False``
(`PACKED_FORWARD_KWARGS`). With the config default ``use_cache=True`` the model
creates a cache even in training mode, and transformers skips packed-sequence
detection whenever a cache exists, silently letting samples attend to each other.

Labels: the causal-LM loss predicts ``labels[i]`` from position ``i - 1``. In a
packed row that would train sample k+1's first token from sample k's last, so the
label at every sample start is set to -100. Unpacked, a sample's first token is
never a target either, so packed and unpacked losses are identical.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from posttrain.errors import DataError, ModelError

IGNORE_INDEX = -100
PACKED_FORWARD_KWARGS = {"use_cache": False}
"""Pass to every forward over a `packed_collate` batch: ``model(**batch, **PACKED_FORWARD_KWARGS)``."""


class _HasIds(Protocol):
    input_ids: list[int]
    labels: list[int]


@dataclass
class PackedRow:
    """Several samples concatenated; ``position_ids`` restart at 0 for each."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)  # index of each sample in `pack`'s input

    def add(self, sample: _HasIds, index: int) -> None:
        n = len(sample.input_ids)
        self.input_ids += sample.input_ids
        # No target at a sample start: it would be predicted from the previous sample.
        self.labels += [IGNORE_INDEX, *sample.labels[1:]]
        self.position_ids += range(n)
        self.seq_lens.append(n)
        self.sample_ids.append(index)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad_collate(
    samples: Sequence[_HasIds], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: ``input_ids``, ``attention_mask``, ``labels``, each (B, T).

    Padding has ``input_ids = pad_id``, ``attention_mask = 0``, ``labels = -100``.
    """
    if not samples:
        raise ValueError("pad_collate needs at least one sample")
    width = _round_up(max(len(s.input_ids) for s in samples), pad_to_multiple_of)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucket_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    bucket_size_multiplier: int = 50,
) -> list[list[int]]:
    """Length-bucketed batches of indices, covering every index exactly once.

    Indices are shuffled (seeded), cut into chunks of ``batch_size *
    bucket_size_multiplier``, each chunk sorted by length (longest first) and split
    into batches of ``batch_size``; the batch order is then shuffled. Batches hold
    similar lengths (little padding) while the epoch order stays random. The last
    batch of a chunk may be smaller. ``shuffle=False`` keeps the input order of
    chunks and batches (sorting within chunks still happens).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * max(1, bucket_size_multiplier)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def pack(samples: Sequence[_HasIds], seq_len: int, *, seed: int = 0) -> list[PackedRow]:
    """Best-fit-decreasing packing of samples into rows of at most ``seq_len`` tokens.

    Samples are placed longest first (ties by index), each into the open row with
    the least space that still fits it, else a new row. Rows are returned in a
    seeded random order so training does not see them sorted by length. A sample
    longer than ``seq_len`` is an error: truncate before packing.
    """
    for i, s in enumerate(samples):
        if len(s.input_ids) > seq_len:
            raise DataError(
                f"sample {i} has {len(s.input_ids)} tokens, more than seq_len={seq_len}",
                where=getattr(s, "where", None) or None,
                fix="truncate or drop long samples (max_len <= seq_len) before packing",
            )
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(samples[i].input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = seq_len, len(rows)
            rows.append(PackedRow())
        rows[r].add(samples[i], i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    random.Random(seed).shuffle(rows)
    return rows


def packed_collate(
    rows: Sequence[PackedRow], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed rows: ``input_ids``, ``labels``, ``position_ids``, each (B, T); NO attention_mask.

    Rows are right-padded to the longest row (or ``pad_to``) with ``pad_id``,
    labels -100, and positions 0, 1, 2, ... so the padding forms its own sequence
    that no real token attends to. Call the model with `PACKED_FORWARD_KWARGS`.
    """
    if not rows:
        raise ValueError("packed_collate needs at least one row")
    width = max(pad_to or 0, max(len(r.input_ids) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(r.labels, dtype=torch.long)
        positions[i, :n] = torch.tensor(r.position_ids, dtype=torch.long)
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@torch.no_grad()
def verify_packed_attention(model: Any, atol: float = 1e-4) -> None:
    """Check once that ``model`` keeps packed samples apart; raise `ModelError` if not.

    Packs two 4-token sequences into each of two rows (a|b and b|a, batch size 2
    because flash-attention only unpacks batch-size-1 inputs) and compares each
    second half with the sequence run alone. Catches attention implementations
    that ignore ``position_ids`` boundaries, and a forgotten ``use_cache=False``.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    a = torch.arange(1, 5, device=device) % vocab
    b = torch.arange(5, 9, device=device) % vocab
    rows = torch.stack([torch.cat([a, b]), torch.cat([b, a])])
    positions = torch.arange(4, device=device).repeat(2).expand(2, -1)
    was_training = model.training
    model.eval()  # dropout would make the forwards differ
    try:
        packed = model(rows, position_ids=positions, **PACKED_FORWARD_KWARGS).logits[:, 4:]
        alone = model(torch.stack([b, a]), **PACKED_FORWARD_KWARGS).logits
    finally:
        model.train(was_training)
    if not torch.allclose(
        packed.float(), alone.float(), atol=max(atol, 1e-3 * alone.abs().max().item()), rtol=1e-3
    ):
        impl = getattr(model.config, "_attn_implementation", "?")
        raise ModelError(
            f"packed samples attend to each other with attn_implementation={impl!r}",
            fix="use attn_implementation 'sdpa' or 'eager' (flash-attention: one packed row per batch), "
            "or set packing: false",
        )

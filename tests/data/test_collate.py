"""Padding, length bucketing and packing on hand-built samples."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.collate import IGNORE_INDEX, bucket_batches, pack, packed_collate, pad_collate
from posttrain.data.render import Sample
from posttrain.errors import DataError


def _s(ids, n_prompt=1):
    return Sample(list(ids), [IGNORE_INDEX] * n_prompt + list(ids)[n_prompt:], "s")


def test_pad_collate_right_pads():
    batch = pad_collate([_s([5, 6, 7]), _s([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert pad_collate([_s([5, 6, 7])], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_bucket_batches_cover_every_index_once_and_are_deterministic():
    rng = random.Random(1)
    lengths = [rng.randint(1, 500) for _ in range(1037)]
    batches = bucket_batches(lengths, 8, seed=3, bucket_size_multiplier=10)
    assert sorted(i for b in batches for i in b) == list(range(1037))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert batches == bucket_batches(lengths, 8, seed=3, bucket_size_multiplier=10)
    assert batches != bucket_batches(lengths, 8, seed=4, bucket_size_multiplier=10)
    # Within a batch lengths are sorted (longest first) because each chunk was sorted.
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches)

    # Bucketing pads far less than a random split would.
    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    order = list(range(1037))
    random.Random(0).shuffle(order)
    assert padding(batches) < 0.2 * padding([order[i : i + 8] for i in range(0, 1037, 8)])


def test_bucket_batches_without_shuffle():
    batches = bucket_batches([1, 5, 3, 4, 2], 2, seed=0, shuffle=False, bucket_size_multiplier=1)
    assert batches == [[1, 0], [3, 2], [4]]


def test_pack_best_fit_decreasing():
    samples = [_s(range(100 * (k + 1), 100 * (k + 1) + n)) for k, n in enumerate([6, 5, 4, 3, 2])]
    rows = pack(samples, 10, seed=0)
    # 6+4 and 5+3+2 fill two rows exactly.
    assert sorted(sorted(r.seq_lens) for r in rows) == [[2, 3, 5], [4, 6]]
    for r in rows:
        assert len(r.input_ids) == len(r.labels) == len(r.position_ids) == sum(r.seq_lens) <= 10
        start = 0
        for n, i in zip(r.seq_lens, r.sample_ids, strict=True):
            assert r.input_ids[start : start + n] == samples[i].input_ids
            assert r.position_ids[start : start + n] == list(range(n))
            # The first token of each sample is never a target; the rest keep their labels.
            assert r.labels[start : start + n] == [IGNORE_INDEX] + samples[i].labels[1:]
            start += n
    assert sorted(i for r in rows for i in r.sample_ids) == list(range(5))


def test_pack_many_samples():
    rng = random.Random(0)
    samples = [_s(range(rng.randint(1, 64)), n_prompt=0) for _ in range(500)]
    rows = pack(samples, 64, seed=1)
    assert sorted(i for r in rows for i in r.sample_ids) == list(range(500))
    assert all(len(r.input_ids) <= 64 for r in rows)
    total = sum(len(s.input_ids) for s in samples)
    assert len(rows) <= total / 64 * 1.05 + 1  # best-fit wastes little space
    assert [r.sample_ids for r in rows] == [r.sample_ids for r in pack(samples, 64, seed=1)]


def test_pack_rejects_long_sample():
    with pytest.raises(DataError, match="sample 1 has 11 tokens, more than seq_len=10"):
        pack([_s(range(3)), _s(range(11))], 10)


def test_packed_collate_pads_as_own_sequence():
    rows = pack([_s([1, 2, 3]), _s([4, 5]), _s([6, 7, 8, 9])], 5, seed=0)
    batch = packed_collate(sorted(rows, key=lambda r: -len(r.input_ids)), pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask, on purpose
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert packed_collate(rows, 0, pad_to=8)["position_ids"].shape == (2, 8)
    assert batch["input_ids"].dtype == torch.long

"""Exact dedup under NFKC / case / whitespace variants; MinHash near dedup precision and recall."""

from __future__ import annotations

import random

import pytest
from quality_helpers import chat, make_item

from posttrain.data.quality.dedup import (
    DedupConfig,
    NearDedupIndex,
    exact_dedup,
    near_dedup,
    normalize_text,
    shingles,
)
from posttrain.errors import ConfigError


def test_normalize_text_folds_unicode_case_and_whitespace():
    assert (
        normalize_text("  Ｈｅｌｌｏ\u00a0 WORLD\n\t ﬁne ") == "hello world fine"
    )  # full-width, nbsp, ligature
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower


def test_exact_dedup_variants_are_one_record():
    rows = [
        chat("What is 2+2?", "Four."),
        chat("WHAT is 2+2?", "four."),  # case
        chat("What  is\n2+2?", "Four.  "),  # whitespace
        chat("Ｗｈａｔ is 2+2?", "Four."),  # NFKC full-width
        chat("What is 2+3?", "Five."),  # different
    ]
    items = [make_item(r, where=f"t.jsonl:{i + 1}") for i, r in enumerate(rows)]
    out = list(exact_dedup(items))
    assert [it.removed.evidence if it.removed else None for it in out] == [
        None,
        {"duplicate_of": "t.jsonl:1"},
        {"duplicate_of": "t.jsonl:1"},
        {"duplicate_of": "t.jsonl:1"},
        None,
    ]


def test_shingles():
    assert sorted(shingles("A b  c d", 3)) == [b"a b c", b"b c d"]
    assert shingles("Too short", 3) == [b"too short"]


def _clusters(rng, n_clusters, size, words, vocab):
    """n_clusters base texts of ``words`` random words, each followed (later in the stream, clusters
    interleaved) by size-1 one-word edits of it."""
    clusters = []
    for _ in range(n_clusters):
        base = [rng.choice(vocab) for _ in range(words)]
        members = [" ".join(base)]
        for _ in range(size - 1):
            edit = list(base)
            edit[rng.randrange(words)] = rng.choice(vocab)
            members.append(" ".join(edit))
        clusters.append(members)
    texts, labels = [], []
    while any(clusters):  # draw the next member of a random cluster: bases come first, clusters mix
        c = rng.choice([i for i, m in enumerate(clusters) if m])
        texts.append(clusters[c].pop(0))
        labels.append(c)
    return texts, labels


def test_near_dedup_precision_and_recall_on_known_clusters():
    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(5000)]
    texts, labels = _clusters(rng, n_clusters=150, size=4, words=60, vocab=vocab)
    texts += [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(300)]  # distinct singletons
    labels += list(range(1000, 1300))
    items = [make_item({"prompt": t}, where=f"r{i}") for i, t in enumerate(texts)]
    out = list(near_dedup(items, DedupConfig()))
    label_of = {f"r{i}": lab for i, lab in enumerate(labels)}
    removed = [it for it in out if it.removed]
    # Expected: each cluster keeps one representative, so 150 * 3 true duplicates.
    true_pos = sum(label_of[it.where] == label_of[it.removed.evidence["representative"]] for it in removed)
    precision = true_pos / len(removed)
    recall = true_pos / (150 * 3)
    assert precision == 1.0 and recall >= 0.95, (precision, recall)
    assert all(it.removed.evidence["jaccard"] >= 0.8 for it in removed)
    assert not any(it.removed for it in out if label_of[it.where] >= 1000)  # distinct texts kept


def test_near_dedup_keeps_texts_below_the_threshold():
    base = " ".join(f"w{i}" for i in range(40))
    half = " ".join(f"w{i}" for i in range(20)) + " " + " ".join(f"x{i}" for i in range(20))
    items = [make_item({"prompt": base}, where="a"), make_item({"prompt": half}, where="b")]
    assert [it.removed for it in near_dedup(items, DedupConfig())] == [None, None]


def test_index_uses_datasketch_and_rejects_bad_settings():
    index = NearDedupIndex(DedupConfig(num_perm=64))
    assert type(index.lsh).__module__.startswith("datasketch") and index.lsh.h == 64
    with pytest.raises(ConfigError, match="threshold"):
        DedupConfig(threshold=0.0).validate()

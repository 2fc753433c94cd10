"""Exact dedup on normalised text, and near dedup with datasketch's MinHash LSH.

Exact: the record text (`Item.text`) is normalised (`normalize_text`: Unicode NFKC, casefold,
whitespace runs folded to one space, ends stripped) and hashed (BLAKE2b, 64 bits); a record
whose hash was seen before is an ``exact_dup`` of the first one, named in the evidence.
Memory: one dict entry per distinct record (hash -> where).

Near: each record's word n-grams (``ngram`` words of the normalised text; a shorter text is
one n-gram) go into a `datasketch.MinHash` (``num_perm`` permutations drawn by datasketch
from ``seed``; n-grams hashed by xxh32 rather than its default SHA-1, twice as fast), queried
against a `datasketch.MinHashLSH` at the Jaccard ``threshold``.
Streaming and greedy: the first record of a cluster is its representative and enters the
index; a later record whose estimated Jaccard similarity (share of equal MinHash values) to
a candidate the LSH returns is >= ``threshold`` is a ``near_dup`` of the most similar one.
The LSH bands are chosen for recall (datasketch's weights: 0.1 on false positives, 0.9 on
false negatives; at t=0.8, 128 permutations: 14 bands of 9 rows, a pair at J=0.85 becomes a
candidate with p=0.975), and candidates below the threshold are not counted. The index holds the
LSH band tables plus each representative's ``num_perm`` 32-bit values (``4 * num_perm``
bytes a record). A one-word edit of a W-word text changes at most ``ngram`` of its W-ngram+1
n-grams, so it is found at threshold t when W is at least about ``ngram * (1 + t) / (1 - t)``
(27 words for n=3, t=0.8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from posttrain.data.quality.items import Item, normalize_text
from posttrain.errors import BackendUnavailable, ConfigError

_CHUNK = 1 << 16
LSH_WEIGHTS = (0.1, 0.9)  # datasketch's band/row choice weighted to recall: candidates are checked anyway


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal (both on by default)."""

    exact: bool = True
    """Drop records whose normalised text (NFKC, casefold, whitespace folded) was seen before."""
    near: bool = True
    """Drop records similar to an earlier one (MinHash LSH over word n-grams)."""
    threshold: float = 0.8
    """Jaccard similarity at or above which two records are near duplicates."""
    num_perm: int = 128
    """MinHash permutations (more: a sharper LSH threshold, more memory and time)."""
    ngram: int = 3
    """Words per n-gram (shingle) of the near-dedup sets."""
    seed: int = 1
    """Seed of datasketch's MinHash permutations."""

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(
                f"dedup.threshold must be in (0, 1], got {self.threshold}", where="dedup.threshold"
            )
        if self.num_perm < 2 or self.ngram < 1:
            raise ConfigError("dedup.num_perm must be >= 2 and dedup.ngram >= 1", where="dedup.num_perm")


__all__ = [
    "DedupConfig",
    "NearDedupIndex",
    "exact_dedup",
    "near_dedup",
    "normalize_text",
    "shingles",
    "similarity",
    "text_hash",
]


def _digest(norm: str) -> int:
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "big")


def text_hash(text: str) -> int:
    """A 64-bit BLAKE2b hash of the normalised text (`normalize_text`)."""
    return _digest(normalize_text(text))


def exact_dedup(items: Iterable[Item], seen: dict[int, str] | None = None) -> Iterator[Item]:
    """Drop items whose normalised text was seen before (in ``seen``, shared across calls if given)."""
    seen = {} if seen is None else seen
    for item in items:
        if item.removed is None:
            key = _digest(item.norm)
            if key in seen:
                item.drop("exact_dup", duplicate_of=seen[key])
            else:
                seen[key] = item.where
        yield item


def shingles(text: str, n: int) -> list[bytes]:
    """The distinct word n-grams of the normalised text, UTF-8 encoded (one n-gram for shorter texts)."""
    return _ngrams(normalize_text(text), n)


def _ngrams(norm: str, n: int) -> list[bytes]:
    w = norm.split(" ")
    if len(w) <= n:
        return [" ".join(w).encode()]
    return list({" ".join(w[i : i + n]).encode() for i in range(len(w) - n + 1)})


def _fast_hash() -> dict:
    """``hashfunc=xxh32`` for datasketch's MinHash (about twice as fast as its default SHA-1)."""
    try:
        import xxhash
    except ImportError:
        return {}
    return {"hashfunc": xxhash.xxh32_intdigest}


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two MinHash value arrays: the share of equal values."""
    return float(np.mean(a == b))


class NearDedupIndex:
    """datasketch MinHashLSH plus each representative's MinHash values, for the similarity check."""

    def __init__(self, cfg: DedupConfig):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise BackendUnavailable(
                "near dedup needs datasketch, which is not installed",
                where="dedup.near",
                fix="pip install 'posttrain[quality]' (or pip install datasketch), or set dedup.near=false",
            ) from None
        self.cfg = cfg
        self._minhash = MinHash
        self._hashfunc = _fast_hash()
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
        self._values: list[np.ndarray] = []  # chunks of (_CHUNK, num_perm) uint32 rows
        self._where: list[str] = []

    def __len__(self) -> int:
        return len(self._where)

    def signature(self, norm: str):
        """The datasketch MinHash of the word n-grams of ``norm`` (normalised text); permutations
        drawn once, n-grams hashed with xxh32 when xxhash is there (datasets needs it), else SHA-1."""
        t = self._template
        m = self._minhash(
            num_perm=self.cfg.num_perm, permutations=t.permutations, scheme=t.scheme, **self._hashfunc
        )
        m.update_batch(_ngrams(norm, self.cfg.ngram))
        return m

    def lean(self, hashvalues: np.ndarray):
        """A MinHash with these values (computed elsewhere with this index's settings)."""
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self.cfg.seed, hashvalues=hashvalues, scheme=self._template.scheme)

    def _row(self, key: int) -> np.ndarray:
        return self._values[key // _CHUNK][key % _CHUNK]

    def match(self, minhash) -> tuple[str, float] | None:
        """The most similar representative at or above the threshold: ``(where, estimated Jaccard)``."""
        best = None
        for key in self.lsh.query(minhash):
            jaccard = similarity(self._row(key), minhash.hashvalues)
            if jaccard >= self.cfg.threshold and (best is None or jaccard > best[1]):
                best = (self._where[key], jaccard)
        return best

    def add(self, minhash, where: str) -> None:
        key = len(self._where)
        if key % _CHUNK == 0:
            self._values.append(np.empty((_CHUNK, self.cfg.num_perm), dtype=np.uint32))
        self._values[-1][key % _CHUNK] = minhash.hashvalues
        self._where.append(where)
        self.lsh.insert(key, minhash, check_duplication=False)


def near_dedup(
    items: Iterable[Item], cfg: DedupConfig, index: NearDedupIndex | None = None
) -> Iterator[Item]:
    """Drop items whose estimated Jaccard similarity to an earlier kept item is >= ``cfg.threshold``."""
    index = NearDedupIndex(cfg) if index is None else index
    for item in items:
        if item.removed is None:
            pre = item.pre or {}
            minhash = index.lean(pre["minhash"]) if "minhash" in pre else index.signature(item.norm)
            found = index.match(minhash)
            if found is None:
                index.add(minhash, item.where)
            else:
                item.drop("near_dup", representative=found[0], jaccard=round(found[1], 4))
        yield item

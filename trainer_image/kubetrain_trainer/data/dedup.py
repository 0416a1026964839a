"""Exact and near-duplicate detection.

Near duplicates use MinHash over word n-gram shingles with LSH banding, as datasketch does,
but vectorized over the whole corpus with numpy instead of one Python object per
document. Two choices differ from a plain `MinHashLSH`, both for recall at equal settings:
bands are chosen to favour recall (weight 0.9 on false negatives instead of 0.5), and each
LSH candidate is verified by its estimated Jaccard similarity (the share of equal MinHash
values), which takes back the precision that the looser banding gives away.

Both detectors keep the first document of each group and flag the later ones, so results
are deterministic for a given order.
"""

from __future__ import annotations

import hashlib
import string
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import cache

import numpy as np

# Bytes that belong to words: all but ASCII whitespace and punctuation (so "fox." is "fox").
_WORD_BYTE = np.ones(256, dtype=bool)
_WORD_BYTE[list((string.whitespace + string.punctuation).encode())] = False
# Byte value in word hashes: ASCII lowercased, and never 0 so that no byte hashes to nothing.
_BYTE_VALUE = np.arange(1, 257, dtype=np.uint64)
_BYTE_VALUE[65:91] += np.uint64(32)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_INVERSE = np.uint64(pow(int(_MULTIPLIER), -1, 2**64))
# Which 32-bit half of a uint64 is the high one, for reading it without a shift.
_HIGH_HALF = 1 if sys.byteorder == "little" else 0
_MASK32 = np.uint64(0xFFFFFFFF)
# (permutations x shingles) values computed at once: 8 MiB, friendly to the CPU caches.
_CHUNK_VALUES = 1_000_000
_BATCH_CHARS = 16_000_000
_FALSE_NEGATIVE_WEIGHT = 0.9


def exact_duplicates(keys: Iterable[str]) -> np.ndarray:
    """Boolean mask: True where a key equals an earlier key (compared by a 128-bit hash, so
    memory stays small on large corpora)."""
    seen: set[bytes] = set()
    flags = []
    for key in keys:
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        flags.append(digest in seen)
        seen.add(digest)
    return np.array(flags, dtype=bool)


def near_duplicates(
    texts: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
) -> np.ndarray:
    """Boolean mask: True where a text's estimated word-`ngram` Jaccard similarity to an
    earlier kept text is at least `threshold`."""
    flags = np.zeros(len(texts), dtype=bool)
    if not texts:
        return flags
    signatures = minhash_signatures(texts, num_perm, ngram, seed)
    bands, rows = lsh_bands(threshold, num_perm)
    keys = _band_keys(signatures, bands, rows, seed).tolist()
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    needed = threshold * num_perm
    for i, doc_keys in enumerate(keys):
        candidates = {j for band, key in enumerate(doc_keys) for j in buckets[band].get(key, ())}
        if candidates:
            others = signatures[list(candidates)]
            if np.any(np.count_nonzero(others == signatures[i], axis=1) >= needed):
                flags[i] = True
                continue
        for band, key in enumerate(doc_keys):
            buckets[band].setdefault(key, []).append(i)
    return flags


def minhash_signatures(
    texts: Sequence[str], num_perm: int = 128, ngram: int = 5, seed: int = 1
) -> np.ndarray:
    """MinHash signatures, shape [len(texts), num_perm], uint32, of each text's set of
    lowercased word `ngram`s (the whole text when shorter). A text without words gets the
    all-maximum signature."""
    rng = np.random.default_rng(seed)
    # Multiply-shift hashing: the high 32 bits of a*x + b (mod 2^64) for random a, b.
    a = rng.integers(1, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
    signatures = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    # Word hashing needs ~40 bytes per character: bound it by taking texts in batches.
    ends = np.cumsum([len(t) for t in texts])
    lo = 0
    while lo < len(texts):
        hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] + _BATCH_CHARS, side="right")))
        shingles, counts = _shingle_hashes(texts[lo:hi], ngram, seed)
        _min_hash(shingles, counts, a, b, signatures[lo:hi])
        lo = hi
    return signatures


def _min_hash(
    shingles: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray
) -> None:
    """Write into `out` each document's minimum over its shingles, per (a, b) hash."""
    x = (shingles >> np.uint64(32)) ^ (shingles & _MASK32)
    has_words = np.flatnonzero(counts)
    ends = np.cumsum(counts[has_words])
    starts = ends - counts[has_words]
    step = max(1, _CHUNK_VALUES // len(a))
    first = 0
    while first < len(has_words):
        # Whole documents per chunk, at least one, about `step` shingles.
        last = max(first + 1, int(np.searchsorted(ends, starts[first] + step, side="right")))
        lo, hi = starts[first], ends[last - 1]
        # [permutations, shingles]: reduceat along the contiguous axis is far faster.
        values = np.multiply.outer(a, x[lo:hi])
        values += b[:, None]
        values = values.view(np.uint32)[:, _HIGH_HALF::2]
        out[has_words[first:last]] = np.minimum.reduceat(values, starts[first:last] - lo, axis=1).T
        first = last


@cache
def lsh_bands(
    threshold: float, num_perm: int, false_negative_weight: float = _FALSE_NEGATIVE_WEIGHT
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted integral of false
    positive and false negative probability around `threshold` (datasketch's objective,
    integrated on a grid; weight 0.5 reproduces `MinHashLSH`'s choice)."""
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s <= threshold, s >= threshold
    best, best_error = (1, 1), np.inf
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        p = 1.0 - (1.0 - s**rows) ** bands  # P(candidate | similarity s), per row count
        fp = np.trapezoid(np.where(below, p, 0.0), s, axis=1)
        fn = np.trapezoid(np.where(above, 1.0 - p, 0.0), s, axis=1)
        error = (1 - false_negative_weight) * fp + false_negative_weight * fn
        i = int(np.argmin(error))
        if error[i] < best_error:
            best, best_error = (bands, i + 1), error[i]
    return best


def _shingle_hashes(texts: Sequence[str], ngram: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every document's word n-grams, concatenated, and the count per
    document (n-grams are not deduplicated within a document: MinHash takes minima)."""
    word_hash, lengths = _word_hashes(texts, seed)
    # The shingle starting at each word: positions past the document's end count as 0, so
    # a document shorter than `ngram` still gets one shingle (at its first word).
    ends = np.cumsum(lengths)
    left = np.repeat(ends, lengths) - np.arange(len(word_hash))  # words left in the document
    padded = np.concatenate([word_hash, np.zeros(ngram, dtype=np.uint64)])
    shingles = np.zeros(len(word_hash), dtype=np.uint64)
    for j in range(ngram):
        shingles = shingles * _MULTIPLIER + np.where(left > j, padded[j : j + len(word_hash)], 0)
    whole = left >= ngram
    short = (lengths > 0) & (lengths < ngram)
    whole[(ends - lengths)[short]] = True
    counts = np.where(lengths > 0, np.maximum(lengths - ngram + 1, 1), 0)
    return _mix64(shingles[whole]), counts


def _word_hashes(texts: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of every word of every text, concatenated, and the word count per text.

    Words are runs of bytes other than ASCII whitespace and punctuation, ASCII-lowercased.
    Everything runs on one byte array: a word's polynomial hash is a difference of prefix
    sums (scaled back by the inverse power, which exists mod 2^64 for an odd multiplier),
    so no Python code runs per word."""
    encoded = [t.encode() for t in texts]
    data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)  # newline never joins words
    doc_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    edges = np.flatnonzero(np.diff(_WORD_BYTE[data].astype(np.int8), prepend=0, append=0))
    starts, ends = edges[::2], edges[1::2]

    powers = np.cumprod(np.full(len(data), _MULTIPLIER, dtype=np.uint64)) * _INVERSE
    inverse = np.cumprod(np.full(len(data), _INVERSE, dtype=np.uint64)) * _MULTIPLIER
    prefix = np.concatenate(
        [np.zeros(1, np.uint64), np.cumsum(_BYTE_VALUE[data] * powers, dtype=np.uint64)]
    )
    words = (prefix[ends] - prefix[starts]) * inverse[starts]
    lengths = np.bincount(
        np.searchsorted(doc_starts, starts, side="right") - 1, minlength=len(texts)
    )
    return _mix64(words ^ np.uint64(seed)), lengths


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads every input bit over the whole word."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _band_keys(signatures: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """One 64-bit key per (document, band), shape [docs, bands]."""
    banded = signatures[:, : bands * rows].reshape(len(signatures), bands, rows)
    weights = np.random.default_rng(seed + 1).integers(
        1, 2**64, size=rows, dtype=np.uint64, endpoint=False
    )
    return _mix64((banded.astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64))


# --------------------------------------------------------------------------------------
# The same two detectors over per-document state gathered from many workers: the 128-bit
# key hash of each document (16 bytes) and its LSH band keys (8 bytes per band), with the
# MinHash signatures themselves left on disk and read back only for candidate pairs.
# They flag exactly what `exact_duplicates` and `near_duplicates` flag on the same order.
# --------------------------------------------------------------------------------------


def key_hash(key: str) -> bytes:
    """The 128-bit hash `exact_duplicates` compares."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def exact_duplicates_of_hashes(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask over uint8 [n, 16] hashes: True where a hash equals an earlier one."""
    flags = np.ones(len(hashes), dtype=bool)
    if len(hashes):
        rows = np.ascontiguousarray(hashes, dtype=np.uint8).view("V16").reshape(-1)
        _, first = np.unique(rows, return_index=True)
        flags[first] = False
    return flags


def band_keys(signatures: np.ndarray, threshold: float, num_perm: int, seed: int = 1) -> np.ndarray:
    """LSH band keys [docs, bands] uint64 of MinHash signatures (as `near_duplicates`)."""
    bands, rows = lsh_bands(threshold, num_perm)
    return _band_keys(signatures, bands, rows, seed)


def near_duplicates_of_keys(
    keys: np.ndarray,
    signatures: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    num_perm: int,
    chunk: int = 65_536,
) -> np.ndarray:
    """Boolean mask over documents in order, given their band keys [n, bands] and a function
    returning the signatures of sorted document indices: True where a document is similar
    (estimated Jaccard >= threshold) to an earlier document that is itself kept.

    Candidate pairs (j < i sharing a band key) come from sorting each band's keys; each is
    verified on the signatures, read `chunk` pairs at a time; the first-kept rule then runs
    over the verified pairs in document order."""
    n = len(keys)
    flags = np.zeros(n, dtype=bool)
    pairs = _candidate_pairs(keys)
    if not len(pairs):
        return flags
    needed = threshold * num_perm
    similar = []
    for lo in range(0, len(pairs), chunk):
        part = pairs[lo : lo + chunk]
        docs, where = np.unique(part, return_inverse=True)
        sigs = signatures(docs)
        where = where.reshape(part.shape)
        equal = np.count_nonzero(sigs[where[:, 0]] == sigs[where[:, 1]], axis=1)
        similar.append(part[equal >= needed])
    verified = np.concatenate(similar)
    # By later document, then earlier: every earlier document's fate is known when needed.
    verified = verified[np.lexsort((verified[:, 0], verified[:, 1]))]
    for j, i in verified.tolist():
        if not flags[i] and not flags[j]:
            flags[i] = True
    return flags


def _candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Unique (earlier, later) document pairs [pairs, 2] int64 sharing a key in any band."""
    n = len(keys)
    codes = []
    for band in range(keys.shape[1] if keys.ndim == 2 else 0):
        order = np.argsort(keys[:, band], kind="stable")
        ordered = keys[order, band]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        sizes = np.diff(np.append(starts, n))
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
            members = order[start : start + size]  # ascending: the sort is stable
            a, b = np.triu_indices(size, k=1)
            codes.append(members[a] * n + members[b])
    if not codes:
        return np.empty((0, 2), dtype=np.int64)
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // n, unique % n], axis=1)

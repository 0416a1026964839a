"""Exact and near-duplicate detection."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHashLSH

from kubetrain_trainer.data import builtin, dedup


def test_exact_duplicates_keep_the_first_copy() -> None:
    flags = dedup.exact_duplicates(["a", "b", "a", "c", "b", "a"])
    assert flags.tolist() == [False, False, True, False, True, True]


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def planted() -> tuple[list[str], np.ndarray]:
    texts, source = builtin.near_duplicate_corpus(600, 120, changed=2, seed=3)
    return texts, np.array(source)


def test_planted_copies_are_near_duplicates_and_originals_are_not(planted) -> None:
    texts, source = planted
    copies = np.flatnonzero(source >= 0)
    assert min(jaccard(texts[i], texts[source[i]]) for i in copies) >= 0.85
    assert max(jaccard(texts[0], texts[i]) for i in range(1, 50)) < 0.1


def test_near_duplicates_recall_and_precision(planted) -> None:
    texts, source = planted
    flags = dedup.near_duplicates(texts, threshold=0.8, num_perm=128, ngram=5)
    truth = source >= 0
    true_positives = np.count_nonzero(flags & truth)
    assert true_positives / np.count_nonzero(truth) >= 0.9  # recall
    assert true_positives / max(1, np.count_nonzero(flags)) >= 0.9  # precision


def test_near_duplicates_keep_the_first_and_ignore_case_and_punctuation() -> None:
    base = " ".join(f"word{i}" for i in range(40))
    texts = [base, "totally different text " * 5, base.upper().replace("word3 ", "word3, ")]
    assert dedup.near_duplicates(texts, threshold=0.9).tolist() == [False, False, True]


def test_signatures_estimate_jaccard_similarity() -> None:
    rng = np.random.default_rng(0)
    base = [f"w{i}" for i in rng.integers(0, 10_000, 300)]
    variant = list(base)
    for i in range(0, 300, 20):  # 15 changed words: many 5-grams differ
        variant[i] = "changed"
    a, b = " ".join(base), " ".join(variant)
    sig = dedup.minhash_signatures([a, b], num_perm=256, ngram=5)
    estimate = np.mean(sig[0] == sig[1])
    assert abs(estimate - jaccard(a, b)) < 0.08


def test_short_and_empty_texts() -> None:
    sig = dedup.minhash_signatures(["a b", "A b!", "", "a b c d e f"], num_perm=16, ngram=5)
    assert (sig[0] == sig[1]).all()  # shorter than the n-gram: one shingle of all words
    assert (sig[2] == np.iinfo(np.uint32).max).all()
    assert not (sig[0] == sig[3]).all()
    assert dedup.near_duplicates([]).shape == (0,)


@pytest.mark.parametrize(("threshold", "num_perm"), [(0.8, 128), (0.85, 128), (0.5, 64)])
def test_banding_matches_datasketch_at_equal_weights(threshold: float, num_perm: int) -> None:
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert dedup.lsh_bands(threshold, num_perm, false_negative_weight=0.5) == (lsh.b, lsh.r)
    bands, rows = dedup.lsh_bands(threshold, num_perm)
    assert bands * rows <= num_perm


def test_signatures_do_not_depend_on_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    texts, _ = builtin.near_duplicate_corpus(60, 6, seed=1)
    whole = dedup.minhash_signatures(texts, num_perm=32)
    monkeypatch.setattr(dedup, "_BATCH_CHARS", 3000)  # many small batches
    assert (dedup.minhash_signatures(texts, num_perm=32) == whole).all()

"""Validation split and weighted mixing."""

from __future__ import annotations

import numpy as np
import pytest

from kubetrain_trainer.data import mix


def test_split_is_disjoint_complete_and_deterministic() -> None:
    train, val = mix.split_validation(1000, 0.1, np.random.default_rng(7))
    assert len(val) == 100
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted([*train.tolist(), *val.tolist()]) == list(range(1000))
    again, _ = mix.split_validation(1000, 0.1, np.random.default_rng(7))
    assert (again == train).all()


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(5, 0.01, 1), (1, 0.5, 0), (10, 0.0, 0)])
def test_split_edges(n: int, fraction: float, n_val: int) -> None:
    train, val = mix.split_validation(n, fraction, np.random.default_rng(0))
    assert len(val) == n_val
    assert len(train) == n - n_val


@pytest.mark.parametrize(
    ("sizes", "weights"),
    [([1000, 1000], [3, 1]), ([900, 50, 50], [1, 1, 2]), ([100, 4000], [0.5, 0.5])],
)
def test_mixture_shares_follow_weights(sizes: list[int], weights: list[float]) -> None:
    sources, docs = mix.mix(sizes, weights, np.random.default_rng(1))
    assert len(sources) == sum(sizes)
    shares = np.bincount(sources, minlength=len(sizes)) / len(sources)
    np.testing.assert_allclose(shares, np.array(weights) / sum(weights), atol=0.002)
    for i, size in enumerate(sizes):
        assert docs[sources == i].max() < size


def test_small_sources_repeat_evenly_and_large_ones_are_sampled() -> None:
    sources, docs = mix.mix([10, 990], [1, 1], np.random.default_rng(2))
    repeats = np.bincount(docs[sources == 0], minlength=10)
    assert repeats.min() == 50
    assert repeats.max() == 50
    sampled = docs[sources == 1]
    assert len(np.unique(sampled)) == len(sampled) == 500  # no repeats when downsampling


def test_mixture_is_shuffled_and_deterministic() -> None:
    a = mix.mix([100, 100], [1, 1], np.random.default_rng(3))
    b = mix.mix([100, 100], [1, 1], np.random.default_rng(3))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert 0 < a[0][:100].sum() < 100  # sources interleaved, not one block after another


def test_empty_source_with_weight_is_an_error() -> None:
    with pytest.raises(ValueError, match="source 1 has no documents"):
        mix.mix([10, 0], [1, 1], np.random.default_rng(0))

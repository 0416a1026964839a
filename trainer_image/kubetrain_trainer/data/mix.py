"""Train/validation split by document, and weighted mixing of sources."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_validation(
    n_docs: int, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the training and the validation documents. With a non-zero
    fraction and at least two documents, each side gets at least one document."""
    n_val = round(n_docs * fraction)
    if fraction > 0 and n_docs > 1:
        n_val = min(max(n_val, 1), n_docs - 1)
    order = rng.permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def mix_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Documents to draw from each source: shares proportional to the weights, over as many
    documents as the sources hold together (largest-remainder rounding keeps the total)."""
    w = np.asarray(weights, dtype=float)
    exact = w / w.sum() * sum(sizes)
    counts = np.floor(exact).astype(int)
    short = sum(sizes) - counts.sum()
    counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
    return counts.tolist()


def mix(
    sizes: Sequence[int], weights: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled mixture as (source index, document index) arrays. A source with fewer
    documents than its count is repeated whole as often as fits, then topped up by a sample
    without replacement, so repeats are as even as possible; a larger one is sampled."""
    sources, docs = [], []
    for i, (size, count) in enumerate(zip(sizes, mix_counts(sizes, weights), strict=True)):
        if count and not size:
            raise ValueError(f"source {i} has no documents to draw {count} from")
        repeats, rest = divmod(count, size) if size else (0, 0)
        picks = np.concatenate(
            [np.tile(np.arange(size), repeats), rng.choice(size, rest, replace=False)]
        )
        sources.append(np.full(count, i))
        docs.append(picks)
    order = rng.permutation(sum(sizes))
    return np.concatenate(sources)[order], np.concatenate(docs)[order].astype(np.int64)

"""Drift of live prompts against the training data's summary: samples from the training
distribution score low, a new topic or new lengths score clearly higher."""

from __future__ import annotations

import json
import math
import random

import pytest

from kubetrain_trainer.feedback.drift import (
    JSD_THRESHOLD,
    PSI_THRESHOLD,
    DriftError,
    TrainingSummary,
    compare,
    jensen_shannon,
    population_stability,
    summarize,
    words,
)

COOKING = [f"cook{i}" for i in range(300)]  # a topic's vocabulary, Zipf-distributed
COMPUTING = [f"node{i}" for i in range(300)]
COMMON = ["the", "a", "how", "do", "i", "to", "with", "what", "is", "my"]


def sample(n: int, seed: int, topic: list[str], lengths: tuple[int, int] = (6, 20)) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(topic))]
    texts = []
    for _ in range(n):
        size = rng.randint(*lengths)
        picked = [
            rng.choice(COMMON) if rng.random() < 0.4 else rng.choices(topic, weights)[0]
            for _ in range(size)
        ]
        texts.append(" ".join(picked).capitalize() + "?")
    return texts


@pytest.fixture(scope="module")
def summary() -> TrainingSummary:
    return summarize(sample(3000, seed=1, topic=COOKING))


def test_a_sample_of_the_training_distribution_is_not_drift(summary: TrainingSummary) -> None:
    for seed in (2, 3, 4):
        report = compare(summary, sample(200, seed=seed, topic=COOKING))
        assert not report.drifted, report
        assert report.unigram_jsd < JSD_THRESHOLD / 2
        assert report.length_psi < PSI_THRESHOLD / 3


def test_a_new_topic_scores_clearly_higher(summary: TrainingSummary) -> None:
    same = compare(summary, sample(200, seed=5, topic=COOKING))
    # Half the traffic is about something the model never saw.
    mixed = sample(100, seed=6, topic=COOKING) + sample(100, seed=7, topic=COMPUTING)
    shifted = compare(summary, mixed)
    assert shifted.drifted
    assert shifted.unigram_jsd > JSD_THRESHOLD
    assert shifted.unigram_jsd > 5 * same.unigram_jsd
    assert shifted.oov_rate_live > 0.25 > shifted.oov_rate_training
    assert set(shifted.new_words) <= set(COMPUTING)
    assert shifted.length_psi < PSI_THRESHOLD  # the same lengths


def test_longer_prompts_are_a_length_shift(summary: TrainingSummary) -> None:
    longer = compare(summary, sample(200, seed=8, topic=COOKING, lengths=(30, 60)))
    assert longer.drifted
    assert longer.length_psi > PSI_THRESHOLD
    assert longer.unigram_jsd < JSD_THRESHOLD  # the same words


def test_the_summary_round_trips_through_json(summary: TrainingSummary) -> None:
    again = TrainingSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again == summary
    assert summary.texts == 3000
    assert len(summary.vocabulary) <= 2000
    assert summary.words == sum(summary.vocabulary.values()) + summary.oov
    assert sum(summary.length_shares) == pytest.approx(1.0)
    assert len(summary.length_shares) == len(summary.length_edges) + 1
    with pytest.raises(DriftError, match=r"summary\.vocabulary: missing"):
        TrainingSummary.from_dict({k: v for k, v in summary.to_dict().items() if k != "vocabulary"})
    with pytest.raises(DriftError, match=r"summary\.version"):
        TrainingSummary.from_dict({**summary.to_dict(), "version": 99})


def test_edge_cases(summary: TrainingSummary) -> None:
    with pytest.raises(DriftError, match="fewer than 50"):
        compare(summary, ["how do i cook"] * 49)
    with pytest.raises(DriftError, match="no training texts"):
        summarize([])
    # Prompts without a single word: all lengths 0, no words to compare (maximal JSD).
    empty = compare(summary, [""] * 60)
    assert empty.unigram_jsd == 1.0
    assert empty.drifted
    # All training texts of one length: one open bucket, still comparable.
    flat = summarize(["a b c"] * 100)
    assert flat.length_edges == []
    assert flat.length_shares == [1.0]
    assert compare(flat, ["a b c"] * 60).length_psi == pytest.approx(0.0)
    assert words("Héllo, WORLD! it's 42") == ["héllo", "world", "it", "s", "42"]


def test_the_divergences_on_known_values() -> None:
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)
    assert jensen_shannon([2, 2], [5, 5]) == pytest.approx(0.0)
    assert jensen_shannon([1, 1], [1, 0]) == pytest.approx(1.5 - 0.75 * math.log2(3))
    assert population_stability([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5), up to the smoothing.
    expected = 0.3 * math.log(1.6) + 0.3 * math.log(2.5)
    assert population_stability([0.5, 0.5], [0.8, 0.2]) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(DriftError, match="empty"):
        jensen_shannon([0, 0], [1, 1])

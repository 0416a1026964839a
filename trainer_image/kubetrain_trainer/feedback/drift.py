"""Drift: how far the prompts a model is served now are from the text it was trained on.

Two pure comparisons of a live sample (prompts from the router's log) with a summary of
the training data (`summarize`, small enough to write next to the data set as JSON):

- words: the Jensen-Shannon divergence (base 2, so in [0, 1]) between the unigram
  distributions over the training data's top-K words plus one bucket for every other
  word (out of vocabulary). A new topic brings new words (the OOV bucket grows) or shifts
  the known words' shares; JSD is symmetric and finite even when one side lacks a word.
- lengths: the population stability index over length buckets (words per text) whose
  edges are the training lengths' deciles, so each bucket holds about a tenth of the
  training texts. Usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a real shift.

Small samples look drifted by chance (a rare word, an empty bucket): `compare` refuses
fewer than MIN_LIVE_TEXTS texts rather than report noise. The default thresholds were set
on tests/feedback/test_drift.py: 200 prompts (about 2,600 words) drawn from the training
distribution score JSD about 0.03 and PSI about 0.03; half of them on a new topic, JSD
0.22; twice as long, PSI 9. The chance JSD grows with the vocabulary in use and shrinks
with the sample: compare samples of a few thousand words.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SUMMARY_VERSION = 1
TOP_K = 2_000
LENGTH_BUCKETS = 10
MIN_LIVE_TEXTS = 50
JSD_THRESHOLD = 0.1
PSI_THRESHOLD = 0.25
# Added to every bucket's share so that an empty bucket on one side stays finite.
_EPSILON = 1e-4
_WORD = re.compile(r"\w+", re.UNICODE)


class DriftError(ValueError):
    """A summary or sample that cannot be compared (too small, malformed)."""


def words(text: str) -> list[str]:
    """The words as drift counts them: runs of letters/digits, lowercased."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class TrainingSummary:
    """What drift needs to know of the training texts: the top-K words' counts, how many
    words fell outside them, and the length bucket edges with the share of texts in each
    bucket (bucket i holds lengths in (edges[i-1], edges[i]]; the last is open-ended)."""

    texts: int
    words: int
    vocabulary: dict[str, int]
    oov: int
    length_edges: list[int]
    length_shares: list[float]
    version: int = SUMMARY_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingSummary:
        """The summary back from its JSON; DriftError naming what is wrong."""
        if not isinstance(data, Mapping):
            raise DriftError("summary: must be a JSON object")
        if data.get("version") != SUMMARY_VERSION:
            raise DriftError(
                f"summary.version: {data.get('version')!r}, this code reads {SUMMARY_VERSION}"
            )
        try:
            summary = cls(
                texts=int(data["texts"]),
                words=int(data["words"]),
                vocabulary={str(k): int(v) for k, v in data["vocabulary"].items()},
                oov=int(data["oov"]),
                length_edges=[int(x) for x in data["length_edges"]],
                length_shares=[float(x) for x in data["length_shares"]],
            )
        except KeyError as exc:
            raise DriftError(f"summary.{exc.args[0]}: missing") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise DriftError(f"summary: malformed ({exc})") from None
        if len(summary.length_shares) != len(summary.length_edges) + 1:
            raise DriftError("summary.length_shares: must have one more entry than length_edges")
        return summary


@dataclass(frozen=True)
class DriftReport:
    """A live sample against the training summary. `drifted`: either score is above its
    threshold. `new_words`: the live sample's most frequent out-of-vocabulary words, to
    show what changed."""

    live_texts: int
    unigram_jsd: float
    length_psi: float
    oov_rate_training: float
    oov_rate_live: float
    jsd_threshold: float
    psi_threshold: float
    drifted: bool
    new_words: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    texts: Iterable[str], *, top_k: int = TOP_K, buckets: int = LENGTH_BUCKETS
) -> TrainingSummary:
    """The training data's summary, in one pass over its texts."""
    if top_k < 1 or buckets < 1:
        raise DriftError("top_k and buckets must be >= 1")
    counts: Counter[str] = Counter()
    lengths: list[int] = []
    for text in texts:
        tokens = words(text)
        counts.update(tokens)
        lengths.append(len(tokens))
    if not lengths:
        raise DriftError("summary: no training texts")
    top = dict(counts.most_common(top_k))
    total = sum(counts.values())
    edges = _decile_edges(lengths, buckets)
    shares = _shares(_bucket_counts(lengths, edges))
    return TrainingSummary(
        texts=len(lengths),
        words=total,
        vocabulary=top,
        oov=total - sum(top.values()),
        length_edges=edges,
        length_shares=shares,
    )


def compare(
    summary: TrainingSummary,
    live: Sequence[str],
    *,
    jsd_threshold: float = JSD_THRESHOLD,
    psi_threshold: float = PSI_THRESHOLD,
    min_texts: int = MIN_LIVE_TEXTS,
) -> DriftReport:
    """How far the `live` texts are from the training data `summary`."""
    if len(live) < min_texts:
        raise DriftError(f"live sample: {len(live)} texts, fewer than {min_texts}")
    vocab = summary.vocabulary
    live_counts: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    lengths = []
    for text in live:
        tokens = words(text)
        lengths.append(len(tokens))
        for token in tokens:
            if token in vocab:
                live_counts[token] += 1
            else:
                unknown[token] += 1
    train_dist = [*vocab.values(), summary.oov]
    live_dist = [live_counts.get(w, 0) for w in vocab] + [sum(unknown.values())]
    live_words = sum(live_dist)
    live_lengths = _bucket_counts(lengths, summary.length_edges)
    jsd = jensen_shannon(train_dist, live_dist) if live_words else 1.0
    psi = population_stability(summary.length_shares, _shares(live_lengths))
    return DriftReport(
        live_texts=len(live),
        unigram_jsd=jsd,
        length_psi=psi,
        oov_rate_training=summary.oov / summary.words if summary.words else 0.0,
        oov_rate_live=live_dist[-1] / live_words if live_words else 0.0,
        jsd_threshold=jsd_threshold,
        psi_threshold=psi_threshold,
        drifted=jsd > jsd_threshold or psi > psi_threshold,
        new_words=[w for w, _ in unknown.most_common(10)],
    )


def jensen_shannon(p: Sequence[float], q: Sequence[float]) -> float:
    """JSD in bits (0: the same distribution, 1: disjoint) of two count or probability
    vectors over the same buckets."""
    if len(p) != len(q):
        raise DriftError("jensen_shannon: the distributions have different lengths")
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0:
        raise DriftError("jensen_shannon: an empty distribution")
    total = 0.0
    for a, b in zip(p, q, strict=True):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m) / 2
        if b > 0:
            total += b * math.log2(b / m) / 2
    return min(1.0, max(0.0, total))


def population_stability(expected: Sequence[float], actual: Sequence[float]) -> float:
    """PSI = sum (a - e) ln(a / e) over buckets of shares (each smoothed by a small
    epsilon so an empty bucket stays finite)."""
    if len(expected) != len(actual):
        raise DriftError("population_stability: different numbers of buckets")
    psi = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = e + _EPSILON, a + _EPSILON
        psi += (a - e) * math.log(a / e)
    return psi


def _decile_edges(lengths: list[int], buckets: int) -> list[int]:
    """Upper bounds of the first buckets-1 buckets: the length quantiles, deduplicated
    (many equal lengths give fewer buckets, never empty training buckets by construction)."""
    ordered = sorted(lengths)
    edges: list[int] = []
    for i in range(1, buckets):
        edge = ordered[min(len(ordered) - 1, (i * len(ordered)) // buckets)]
        if not edges or edge > edges[-1]:
            edges.append(edge)
    if edges and edges[-1] >= ordered[-1]:
        edges.pop()  # the open last bucket must hold the longest texts
    return edges


def _bucket_counts(lengths: Iterable[int], edges: Sequence[int]) -> list[int]:
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        i = 0
        while i < len(edges) and n > edges[i]:
            i += 1
        counts[i] += 1
    return counts


def _shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * len(counts)

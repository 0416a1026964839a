"""Active learning: which logged prompts a person should label next.

The most informative unlabelled responses are those the model was least sure of (the
router logs an `uncertainty` per response, route/store.py `uncertainty_of`), but the top
N by uncertainty alone are often N paraphrases of one hard question: one label teaches
about as much as N. So the pick is greedy with a diversity penalty:

    gain(x) = uncertainty(x) * (1 - max similarity of x's prompt to the prompts picked)

picking the best gain each time. Similarity is the Jaccard similarity of the prompts'
sets of lowercased words, estimated with MinHash (data/dedup.py, the pipeline's own
near-duplicate detector): a paraphrase shares most words (gain cut to a fraction), an
exact repeat shares all (gain 0, never picked: the selection may then return fewer than
the budget rather than duplicates).

Candidates: responses served successfully (status 200) that have an uncertainty and no
feedback at all yet, optionally since a time and of one variant; the `pool` most uncertain
of them are read (an indexed query), so a large log costs one bounded read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from ..data.dedup import minhash_signatures
from ..route.store import Store, feedback, responses
from .prompts import prompt_words

DEFAULT_POOL = 5_000
MAX_POOL = 100_000
NUM_PERM = 128


class SelectError(ValueError):
    """A selection that cannot be made as asked (the message names the option)."""


@dataclass(frozen=True)
class Candidate:
    response_id: str
    prompt: str
    response: str
    uncertainty: float
    variant: str
    model_version: str
    created_at: float


@dataclass(frozen=True)
class Selected:
    """One prompt to label: `score` is its gain when picked (its uncertainty, discounted
    by `similarity`, its largest similarity to a prompt picked before it)."""

    candidate: Candidate
    score: float
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        """The JSONL line: what a labeller needs, and the fields `kubetrain feedback import`
        reads back once `rating`, `label` or `correction` are filled in."""
        c = self.candidate
        return {
            "response_id": c.response_id,
            "prompt": c.prompt,
            "response": c.response,
            "score": round(self.score, 6),
            "uncertainty": round(c.uncertainty, 6),
            "similarity": round(self.similarity, 6),
            "variant": c.variant,
            "model_version": c.model_version,
            "created_at": c.created_at,
        }


def unlabelled_candidates(
    store: Store,
    *,
    since: datetime | float | None = None,
    variant: str | None = None,
    pool: int = DEFAULT_POOL,
) -> list[Candidate]:
    """The `pool` most uncertain successful responses without any feedback."""
    if not (1 <= pool <= MAX_POOL):
        raise SelectError(f"pool: must be in 1..{MAX_POOL}, got {pool}")
    rated = sa.select(feedback.c.response_id).where(feedback.c.response_id == responses.c.id)
    query = (
        sa.select(
            responses.c.id,
            responses.c.prompt,
            responses.c.response,
            responses.c.uncertainty,
            responses.c.variant,
            responses.c.model_version,
            responses.c.created_at,
        )
        .where(
            responses.c.status == 200,
            responses.c.uncertainty.is_not(None),
            ~sa.exists(rated),
        )
        .order_by(responses.c.uncertainty.desc(), responses.c.id)
        .limit(pool)
    )
    if since is not None:
        stamp = since.timestamp() if isinstance(since, datetime) else float(since)
        query = query.where(responses.c.created_at >= stamp)
    if variant is not None:
        query = query.where(responses.c.variant == variant)
    with store.snapshot() as conn:
        rows = conn.execute(query).all()
    return [
        Candidate(
            response_id=r.id,
            prompt=r.prompt,
            response=r.response,
            uncertainty=float(r.uncertainty),
            variant=r.variant,
            model_version=r.model_version,
            created_at=float(r.created_at),
        )
        for r in rows
    ]


def select_diverse(candidates: Sequence[Candidate], budget: int) -> list[Selected]:
    """At most `budget` candidates, greedily by uncertainty discounted by similarity to
    those already picked (see the module's docstring). Deterministic for a given input."""
    if budget < 1:
        raise SelectError(f"budget: must be >= 1, got {budget}")
    if not candidates:
        return []
    signatures = minhash_signatures(
        [prompt_words(c.prompt) for c in candidates], num_perm=NUM_PERM, ngram=1
    )
    uncertainty = np.array([c.uncertainty for c in candidates], dtype=np.float64)
    nearest = np.zeros(len(candidates), dtype=np.float64)  # max similarity to the picked
    available = np.ones(len(candidates), dtype=bool)
    picked: list[Selected] = []
    while len(picked) < budget:
        gain = np.where(available, uncertainty * (1.0 - nearest), -1.0)
        best = int(np.argmax(gain))  # the first of equal gains: the input order decides
        if gain[best] <= 0.0:
            break  # only repeats of picked prompts (or certain answers) are left
        picked.append(Selected(candidates[best], float(gain[best]), float(nearest[best])))
        available[best] = False
        similarity = (signatures == signatures[best]).mean(axis=1)
        np.maximum(nearest, similarity, out=nearest)
    return picked


def select_for_labelling(
    store: Store,
    budget: int,
    *,
    since: datetime | float | None = None,
    variant: str | None = None,
    pool: int | None = None,
) -> list[Selected]:
    """The prompts to send for labelling next, most informative first."""
    if budget < 1:
        raise SelectError(f"budget: must be >= 1, got {budget}")
    size = pool if pool is not None else min(MAX_POOL, max(DEFAULT_POOL, 50 * budget))
    found = unlabelled_candidates(store, since=since, variant=variant, pool=size)
    return select_diverse(found, budget)


__all__ = [
    "Candidate",
    "SelectError",
    "Selected",
    "prompt_words",
    "select_diverse",
    "select_for_labelling",
    "unlabelled_candidates",
]

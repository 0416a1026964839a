"""Built-in datasets: deterministic, with the planted noise the quickstart shows off."""

from __future__ import annotations

from collections import Counter

import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import builtin


@pytest.mark.parametrize("name", api.BUILTIN_DATASETS)
def test_every_builtin_is_deterministic(name: str) -> None:
    first = list(builtin.rows(name))
    assert first
    assert first == list(builtin.rows(name))


def test_corpus_plants_noise() -> None:
    texts = [row["text"] for row in builtin.quickstart_corpus()]
    assert 3000 < len(texts) < 4000
    assert sum("<html>" in t for t in texts) >= 100
    assert sum("&amp;" in t for t in texts) >= 100
    assert any("\x00" in t or "\x07" in t for t in texts)
    assert any("\ufb01" in t for t in texts)
    assert max(Counter(texts).values()) > 1  # exact duplicates
    assert sum(len(t.split()) < 3 for t in texts) >= 50  # too short


def test_instructions_are_unique_and_consistent() -> None:
    rows = list(builtin.rows("quickstart-instructions"))
    assert len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        if row["prompt"].endswith("what color is the fox?"):
            assert row["response"] == "the fox is red."
        if row["prompt"].startswith("what is ") and " plus " in row["prompt"]:
            a, b = row["prompt"].removeprefix("what is ").rstrip("?").split(" plus ")
            assert row["response"] == f"{a} plus {b} is {int(a) + int(b)}."
    test = list(builtin.rows("quickstart-instructions", "test"))
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in rows}


def test_sentiment_is_balanced() -> None:
    rows = list(builtin.rows("quickstart-sentiment"))
    assert Counter(r["label"] for r in rows) == {"positive": 500, "negative": 500}
    assert all(r["prompt"].startswith("review: ") for r in rows)


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="has splits"):
        builtin.rows("quickstart-corpus", "test")

"""Labels back into the router's store: `kubetrain feedback import` on a real store (SQLite
and PostgreSQL), all lines checked before any is written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain_trainer.feedback.labels import LabelError, import_labels, parse_labels
from kubetrain_trainer.feedback.select import select_for_labelling
from kubetrain_trainer.route.store import MAX_LABEL_CHARS, Store, open_store

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "log.db")
    return str(request.getfixturevalue("postgres").create_database())


@pytest.fixture
def store(target: str) -> Iterator[Store]:
    with open_store(target) as s:
        for i in range(3):
            s.record_response(
                f"r-{i}", variant="a", model_version="v1", prompt=f"question {i} about x{i}",
                response=f"answer {i}", latency_s=0.1, prompt_tokens=1, completion_tokens=1,
                mean_logprob=-1.0 - i, created_at=T0,
            )  # fmt: skip
        yield s


def lines(*records: dict[str, object]) -> list[str]:
    return [json.dumps(r) for r in records]


def feedback_of(store: Store) -> list[dict[str, object]]:
    return store.export_feedback(limit=100).rows


def test_a_filled_in_selection_comes_back_as_feedback(store: Store) -> None:
    picked = select_for_labelling(store, 3)
    filled = [s.to_dict() for s in picked]
    filled[0].update(rating="down", label="wrong", correction="the right answer")
    filled[1].update(rating=1)
    filled[2].update(correction="a better answer")  # no verdict: neutral
    result = import_labels(store, parse_labels(lines(*filled), default_caller="labeller-1"))
    assert (result.created, result.replaced) == (3, 0)
    rows = {r["response_id"]: r for r in feedback_of(store)}
    first = rows[filled[0]["response_id"]]
    assert (first["rating"], first["label"], first["correction"]) == (
        -1,
        "wrong",
        "the right answer",
    )
    assert first["caller"] == "labeller-1"
    assert rows[filled[1]["response_id"]]["rating"] == 1
    assert rows[filled[2]["response_id"]]["rating"] == 0
    assert select_for_labelling(store, 3) == []  # labelled: no longer candidates

    # The same file again replaces (one label per response and caller).
    again = import_labels(store, parse_labels(lines(*filled), default_caller="labeller-1"))
    assert (again.created, again.replaced) == (0, 3)
    assert len(feedback_of(store)) == 3


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: must be a JSON object"),
        ('{"rating": 1, "caller": "c"}', r"line 2: response_id: required"),
        ('{"response_id": "r-1", "rating": 1}', r"line 2: caller: required"),
        ('{"response_id": "r-1", "caller": "c"}', r"line 2: rating: required"),
        ('{"response_id": "r-1", "caller": "c", "rating": 5}', r"line 2: rating: must be -1"),
        (
            json.dumps({"response_id": "r-1", "caller": "c", "rating": 1, "label": "x" * 65}),
            rf"line 2: label: longer than {MAX_LABEL_CHARS}",
        ),
        ('{"response_id": "r-1", "caller": "c", "corection": "typo"}', r"line 2: corection"),
        ('{"response_id": "r-0", "caller": "a", "rating": 1}', r"line 2: response_id: .*line 1"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_imported(store: Store, bad: str, message: str) -> None:
    good = '{"response_id": "r-0", "caller": "a", "rating": -1}'
    with pytest.raises(LabelError, match=message):
        import_labels(store, parse_labels([good, bad]))
    assert feedback_of(store) == []


def test_an_unknown_response_is_refused_before_anything_is_written(store: Store) -> None:
    file = lines(
        {"response_id": "r-0", "caller": "a", "rating": 1},
        {"response_id": "never-logged", "caller": "a", "rating": 1},
    )
    with pytest.raises(LabelError, match=r"line 3: response_id: no logged response"):
        import_labels(store, parse_labels(["", *file]))  # blank lines count, are skipped
    assert feedback_of(store) == []


def test_the_command(store: Store, target: str, tmp_path: Path) -> None:
    good = tmp_path / "labels.jsonl"
    good.write_text("\n".join(lines({"response_id": "r-1", "rating": "up"})) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(lines({"response_id": "r-2", "rating": 1}, {"response_id": "r-0", "rating": 9}))
    )

    def kubetrain(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kubetrain_cli.main", "feedback", "import", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = kubetrain("--store", target, str(bad), "--caller", "ops")
    assert done.returncode == 1
    assert "line 2: rating: must be -1, 0 or 1" in done.stderr
    assert "nothing was imported" in done.stderr
    assert "Traceback" not in done.stderr
    done = kubetrain("--store", target, str(good), "--caller", "ops")
    assert done.returncode == 0, done.stderr
    assert "imported 1 labels" in done.stdout
    assert [(r["response_id"], r["caller"], r["rating"]) for r in feedback_of(store)] == [
        ("r-1", "ops", 1)
    ]

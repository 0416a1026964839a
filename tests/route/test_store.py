"""The router's request log and feedback store, on both backends: SQLite (a file) and a
real PostgreSQL server (tests/support/postgres.py). Each test gets a fresh database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from kubetrain_operator.experiments.stats import VariantStats
from kubetrain_trainer.route import store as store_module
from kubetrain_trainer.route.store import (
    MAX_CORRECTION_CHARS,
    MAX_EXPORT_PAGE,
    MAX_LABEL_CHARS,
    MAX_LOGGED_TEXT_CHARS,
    DuplicateResponse,
    FeedbackRefused,
    Store,
    StoreError,
    UnknownResponse,
    open_store,
)
from tests.support.postgres import PostgresServer

T0 = 1_800_000_000.0  # a fixed clock: Unix seconds


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where a fresh store lives: a SQLite file, or a new database on the session's
    PostgreSQL (started only when a PostgreSQL case runs)."""
    if request.param == "sqlite":
        return str(tmp_path_factory.mktemp("router") / "state" / "log.db")
    return str(request.getfixturevalue("postgres").create_database())


@pytest.fixture
def store(target: str) -> Iterator[Store]:
    with open_store(target) as s:
        yield s


def record(store: Store, id: str, variant: str = "a", **overrides: object) -> None:
    fields: dict[str, object] = {
        "variant": variant,
        "model_version": f"{variant}-v1",
        "prompt": f"prompt of {id}",
        "response": f"answer to {id}",
        "latency_s": 0.25,
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "created_at": T0,
    }
    fields.update(overrides)
    store.record_response(id, **fields)  # type: ignore[arg-type]


def all_feedback(store: Store) -> list[dict[str, object]]:
    return store.export_feedback(limit=MAX_EXPORT_PAGE).rows


# ------------------------------------------------------------------------------ round trip


def test_record_and_feedback_round_trip(store: Store) -> None:
    when = datetime(2027, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    store.record_response(
        "chatcmpl-1",
        variant="a",
        model_version="run-a@sha256:abc",
        prompt='[{"role": "user", "content": "hi"}]',
        response="hello",
        latency_s=0.5,
        prompt_tokens=3,
        completion_tokens=1,
        mean_logprob=-0.7,
        user_key="user-42",
        created_at=when,
    )
    logged = store.get_response("chatcmpl-1")
    assert logged is not None
    assert logged["variant"] == "a"
    assert logged["model_version"] == "run-a@sha256:abc"
    assert logged["mean_logprob"] == pytest.approx(-0.7)
    assert logged["user_key"] == "user-42"
    assert logged["created_at"] == when.timestamp()
    assert logged["status"] == 200
    assert not logged["truncated"]
    assert store.get_response("chatcmpl-unknown") is None

    receipt = store.add_feedback(
        "chatcmpl-1", caller="key-1", rating="up", label="helpful", correction="Hello!", now=T0
    )
    assert receipt.created
    assert receipt.rating == 1
    assert (receipt.variant, receipt.model_version) == ("a", "run-a@sha256:abc")
    assert receipt.id.startswith("fb-")

    [row] = all_feedback(store)
    assert row["id"] == receipt.id
    assert row["response_id"] == "chatcmpl-1"
    assert row["prompt"] == '[{"role": "user", "content": "hi"}]'
    assert row["response"] == "hello"
    assert (row["rating"], row["label"], row["correction"]) == (1, "helpful", "Hello!")
    assert row["caller"] == "key-1"
    assert row["response_created_at"] == "2027-01-02T03:04:05+00:00"
    assert row["truncated"] is False


def test_feedback_through_one_replica_is_found_through_another(target: str) -> None:
    """Two router replicas: two stores (two engines, two connection pools) on one database."""
    with open_store(target) as first, open_store(target) as second:
        record(first, "r-1", variant="b")
        receipt = second.add_feedback("r-1", caller="alice", rating=1)
        assert receipt.variant == "b"
        assert [r["id"] for r in all_feedback(first)] == [receipt.id]
        assert first.variant_counts()["b"].successes == 1
        if first.backend == "sqlite":
            with first.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


# ---------------------------------------------------------------------- the rules of feedback


def test_one_rating_per_response_per_caller_the_second_replaces_the_first(store: Store) -> None:
    record(store, "r-1")
    first = store.add_feedback("r-1", caller="alice", rating=1, label="helpful", now=T0)
    second = store.add_feedback("r-1", caller="alice", rating=-1, now=T0 + 5)
    assert (first.created, second.created) == (True, False)
    assert second.revision == 2
    assert second.id == first.id  # the same record, replaced
    other = store.add_feedback("r-1", caller="bob", rating=-1)
    assert other.created

    rows = {r["caller"]: r for r in all_feedback(store)}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"]["rating"] == -1
    assert rows["alice"]["label"] is None  # replaced as a whole, not merged
    assert rows["alice"]["revision"] == 2
    assert rows["alice"]["created_at"] < rows["alice"]["updated_at"]
    counts = store.variant_counts()["a"]
    assert (counts.n, counts.successes) == (1, 0)


def test_feedback_on_an_unknown_response_is_refused(store: Store) -> None:
    record(store, "r-1")
    with pytest.raises(UnknownResponse, match="r-404"):
        store.add_feedback("r-404", caller="alice", rating=1)
    assert all_feedback(store) == []


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("rating", {"rating": 2}),
        ("rating", {"rating": 5}),
        ("rating", {"rating": True}),
        ("rating", {"rating": "meh"}),
        ("rating", {"rating": 1.0}),
        ("caller", {"caller": ""}),
        ("caller", {"caller": "x" * 129}),
        ("label", {"label": "x" * (MAX_LABEL_CHARS + 1)}),
        ("label", {"label": ""}),
        ("label", {"label": "two\nlines"}),
        ("correction", {"correction": "x" * (MAX_CORRECTION_CHARS + 1)}),
        ("correction", {"correction": "nul \x00 inside"}),
        ("response_id", {"response_id": "r" * 129}),
        ("response_id", {"response_id": ""}),
    ],
)
def test_feedback_outside_the_bounds_is_refused_naming_the_field(
    store: Store, field: str, changes: dict[str, object]
) -> None:
    record(store, "r-1")
    args: dict[str, object] = {"response_id": "r-1", "caller": "alice", "rating": 1, **changes}
    with pytest.raises(FeedbackRefused, match=f"^{field}: ") as caught:
        store.add_feedback(**args)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert all_feedback(store) == []


def test_feedback_at_the_bounds_is_kept(store: Store) -> None:
    record(store, "r-1")
    correction = "é\n" * (MAX_CORRECTION_CHARS // 2)  # multi-line, non-ASCII, at the limit
    store.add_feedback(
        "r-1", caller="c" * 128, rating=0, label="l" * MAX_LABEL_CHARS, correction=correction
    )
    [row] = all_feedback(store)
    assert row["correction"] == correction
    counts = store.variant_counts()["a"]
    assert (counts.n, counts.successes) == (0, 0)  # neutral: feedback, not a verdict


# ------------------------------------------------------------------------------------ the log


def test_the_log_cuts_long_text_and_keeps_nul_characters_out(store: Store) -> None:
    long = "y" * (MAX_LOGGED_TEXT_CHARS + 10)
    record(store, "r-1", prompt="before\x00after", response=long)
    logged = store.get_response("r-1")
    assert logged is not None
    assert logged["prompt"] == "before\ufffdafter"  # PostgreSQL text cannot hold NUL
    assert logged["response"] == long[:MAX_LOGGED_TEXT_CHARS]
    assert logged["truncated"]


def test_a_response_id_is_logged_once(store: Store) -> None:
    record(store, "r-1")
    with pytest.raises(DuplicateResponse, match="r-1"):
        record(store, "r-1", response="another")
    logged = store.get_response("r-1")
    assert logged is not None
    assert logged["response"] == "answer to r-1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latency_s": -1.0}, "latency_s"),
        ({"latency_s": float("nan")}, "latency_s"),
        ({"prompt_tokens": -1}, "prompt_tokens"),
        ({"completion_tokens": 1.5}, "completion_tokens"),
        ({"mean_logprob": 0.5}, "mean_logprob"),
        ({"status": 42}, "status"),
        ({"variant": ""}, "variant"),
        ({"variant": "v" * 64}, "variant"),
        ({"created_at": datetime(2027, 1, 1)}, "timezone-aware"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_a_malformed_log_record_is_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with open_store(f"{tmp_path}/log.db") as store:
        with pytest.raises(ValueError, match=message):
            record(store, "r-1", **changes)
        assert store.get_response("r-1") is None


# ------------------------------------------------------------------------ the experiment's counts


def test_counts_for_the_experiment(store: Store) -> None:
    # a: 10 served responses with latencies 0.1 .. 1.0 s and 2 fast 503s; b: 4 served.
    for i in range(10):
        record(store, f"a-{i}", latency_s=(i + 1) / 10)
    for i in range(2):
        record(store, f"a-err-{i}", latency_s=0.001, status=503, response="engine down")
    for i in range(4):
        record(store, f"b-{i}", variant="b", latency_s=2.0)
    record(store, "a-old", latency_s=50.0, created_at=T0 - 3600)  # outside the window

    store.add_feedback("a-0", caller="u1", rating=1)
    store.add_feedback("a-1", caller="u1", rating=1)
    store.add_feedback("a-2", caller="u1", rating=1)
    store.add_feedback("a-2", caller="u2", rating=-1)  # net 0: rated, not positive
    store.add_feedback("a-3", caller="u1", rating=-1)
    store.add_feedback("a-4", caller="u1", rating=0, label="unclear")  # no verdict
    store.add_feedback("a-5", caller="u1", rating=1)
    store.add_feedback("a-5", caller="u2", rating=1)  # one response, counted once
    store.add_feedback("b-0", caller="u1", rating=-1)
    store.add_feedback("a-old", caller="u1", rating=1)

    counts = store.variant_counts(since=T0 - 60)
    assert set(counts) == {"a", "b"}
    a, b = counts["a"], counts["b"]
    assert (a.requests, a.errors, a.n, a.successes) == (12, 2, 5, 3)
    # Nearest rank over the 10 served latencies (the fast 503s are not counted).
    assert a.latency_p50_s == pytest.approx(0.5)
    assert a.latency_p95_s == pytest.approx(1.0)
    assert (b.requests, b.errors, b.n, b.successes) == (4, 0, 1, 0)
    assert b.latency_p95_s == pytest.approx(2.0)

    # The shape the operator's statistics take, field for field.
    stats = VariantStats(name="a", **a.stats_fields())
    assert (stats.n, stats.successes, stats.requests, stats.errors) == (5, 3, 12, 2)
    assert stats.rate == pytest.approx(0.6)

    everything = store.variant_counts()
    assert everything["a"].requests == 13
    assert everything["a"].successes == 4
    assert store.variant_counts(since=datetime.fromtimestamp(T0 + 1, timezone.utc)) == {}


def test_slow_responses_are_counted_against_a_threshold(store: Store) -> None:
    """The `latency` primary metric: how many responses (of any status) took longer."""
    for i, latency in enumerate((0.1, 0.4, 0.6, 2.0)):
        record(store, f"r-{i}", latency_s=latency)
    record(store, "r-err", status=504, latency_s=30.0)
    assert store.variant_counts(slower_than=0.5)["a"].slow == 3
    assert store.variant_counts(slower_than=5)["a"].slow == 1
    assert store.variant_counts()["a"].slow == 0  # not asked: nothing counted


def test_counts_of_a_variant_that_only_failed(store: Store) -> None:
    record(store, "r-1", status=502, latency_s=0.01)
    counts = store.variant_counts()["a"]
    assert (counts.requests, counts.errors, counts.latency_p95_s) == (1, 1, None)


# ------------------------------------------------------------------------------------- export


def test_export_pages_through_feedback_in_order(store: Store) -> None:
    for i in range(7):
        variant = "a" if i % 2 == 0 else "b"
        record(store, f"r-{i}", variant=variant)
        store.add_feedback(f"r-{i}", caller="u", rating=1)
    pages, after = [], 0
    while True:
        page = store.export_feedback(after=after, limit=3)
        pages.append([row["response_id"] for row in page.rows])
        if page.next_after is None:
            break
        after = page.next_after
    assert pages == [["r-0", "r-1", "r-2"], ["r-3", "r-4", "r-5"], ["r-6"]]
    only_b = store.export_feedback(variant="b").rows
    assert [row["response_id"] for row in only_b] == ["r-1", "r-3", "r-5"]
    for bad in ({"limit": 0}, {"limit": MAX_EXPORT_PAGE + 1}, {"after": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            store.export_feedback(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- concurrency


def test_concurrent_writers_on_two_replicas_lose_nothing(target: str) -> None:
    threads, per_thread = 8, 15
    errors: list[BaseException] = []
    with open_store(target) as first, open_store(target) as second:
        record(first, "shared")
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            mine = first if t % 2 == 0 else second
            other = second if t % 2 == 0 else first
            try:
                start.wait()
                for i in range(per_thread):
                    record(mine, f"t{t}-{i}", variant=f"v{t % 2}")
                    other.add_feedback(f"t{t}-{i}", caller=f"user-{t}", rating=1 if i % 3 else -1)
                    # Every thread rates the shared response as one caller: one row stays.
                    other.add_feedback("shared", caller="same-caller", rating=1)
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []

        counts = first.variant_counts()
        per_variant = threads // 2 * per_thread
        positive = threads // 2 * sum(1 for i in range(per_thread) if i % 3)
        for variant in ("v0", "v1"):
            assert counts[variant].requests == per_variant
            assert counts[variant].n == per_variant
            assert counts[variant].successes == positive
        shared = [r for r in all_feedback(second) if r["response_id"] == "shared"]
        assert len(shared) == 1
        assert shared[0]["revision"] == threads * per_thread


# ------------------------------------------------------------------------------------- schema


def test_the_schema_is_created_once_and_a_newer_one_is_refused(target: str) -> None:
    # Replicas starting together: every one opens (and migrates) the same fresh database.
    opened, failures = open_together(target, 4)
    assert failures == []
    store = opened[0]
    record(store, "r-1")
    for other in opened:
        other.close()

    with open_store(target) as again:  # reopening keeps the data
        assert again.get_response("r-1") is not None
        with again.engine.begin() as conn:
            versions = conn.execute(sa.select(store_module.schema_versions.c.version)).scalars()
            assert list(versions) == list(range(1, store_module.SCHEMA_VERSION + 1))
            conn.execute(store_module.schema_versions.insert().values(version=99, applied_at=T0))
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(target)


def test_replicas_opening_a_fresh_sqlite_file_together_all_succeed(tmp_path: Path) -> None:
    # Switching a fresh file to WAL needs an exclusive lock, and SQLite refuses it at once
    # (no busy wait) while another opener migrates: the race fails about one round in
    # eight with eight openers, so many rounds make a missing retry show.
    for round_ in range(40):
        opened, failures = open_together(tmp_path / f"r{round_}" / "log.db", 8)
        for store in opened:
            store.close()
        assert failures == [], f"round {round_}"


def open_together(target: str | Path, openers: int) -> tuple[list[Store], list[BaseException]]:
    """`openers` threads opening `target` at once: the stores opened, and what was raised."""
    opened: list[Store] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(open_store(target))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return opened, failures


def test_an_unreachable_database_is_a_clear_error(postgres: PostgresServer) -> None:
    wrong = postgres.dsn().replace(postgres.password, "not-the-password")
    with pytest.raises(StoreError, match="password authentication failed") as caught:
        open_store(wrong)
    assert "not-the-password" not in str(caught.value)  # the DSN is shown without it
    assert f"127.0.0.1:{postgres.port}" in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("mysql://u:p@host/db", "unsupported scheme 'mysql'"),
        ("sqlite://", "SQLite needs a file"),
        ("sqlite:///:memory:", "SQLite needs a file"),
        ("  ", "empty target"),
    ],
)
def test_an_unusable_target_is_refused(dsn: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(dsn)

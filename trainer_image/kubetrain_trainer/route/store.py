"""The router's durable log of requests and responses, and the feedback tied to them.

One interface, two backends, both through SQLAlchemy Core:

- SQLite (a file on the router's volume) for a single router replica: WAL journal (readers
  never wait for the writer), `synchronous=FULL` (a commit is on disk before the client
  hears about it), every transaction `BEGIN IMMEDIATE` (writers queue on the busy timeout
  instead of failing when a read turns into a write). SQLite's locking needs a local file
  system: never put the file on a network volume shared by several replicas.
- PostgreSQL (a DSN from a Secret) for several replicas: every replica writes to the same
  database, so feedback posted to one replica is tied to a response logged by another.

`open_store(target)` takes `postgresql://user:password@host:port/db` or a SQLite file
(`sqlite:///path` or a plain path), creates or upgrades the schema and returns a `Store`.
The calls block: an async router runs them in worker threads (the engine's pool is
thread-safe).

Decisions (each enforced and tested in tests/route/test_store.py):

- Ratings are -1 (down), 0 (neutral: a label or correction without a verdict) and +1 (up);
  the built-in server's `"down"`/`"up"` are accepted as -1/+1. The experiment's primary
  metric is per response: a response is *rated* when it has at least one -1 or +1 and
  *positive* when the sum of its ratings is > 0 (more callers up than down).
- One rating per response per caller: a second one from the same caller replaces the first
  (a user may change their mind) and bumps its `revision`; the receipt says which happened.
  The upsert is one atomic statement, so concurrent ratings by one caller leave one row.
- Feedback is bounded and refused (`FeedbackRefused`, naming the field) when it exceeds the
  bounds below; a response id that was never logged is `UnknownResponse`.
- The log keeps at most MAX_LOGGED_TEXT_CHARS of a prompt and of a response; longer ones
  are cut and flagged `truncated` (the router must log what it served, so it does not
  refuse), and NUL characters, which PostgreSQL text cannot hold, become U+FFFD.
- Counts for the experiment (`variant_counts`) cover the responses created since a time;
  a response's feedback counts with the response whenever it arrives. Latency percentiles
  are over the non-5xx responses: a variant that fails fast must not look fast.
- Each logged response with token log-probabilities gets an `uncertainty` in [0, 1]:
  1 - exp(mean_logprob), one minus the geometric mean of the chosen tokens'
  probabilities (1 - 1/perplexity). Derived here, in one place, for new rows and for the
  rows of a version-1 database; the active-learning selection (feedback/select.py) reads it.
- The schema carries its version (table `kubetrain_schema`); opening applies the missing
  steps under a lock (a PostgreSQL advisory lock, SQLite's write lock), so replicas that
  start together do not race, and a database from a newer router is refused.
"""

from __future__ import annotations

import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

SCHEMA_VERSION = 2

# Bounds. Ids are issued by the router; callers, labels and corrections come from clients.
MAX_ID_CHARS = 128
MAX_CALLER_CHARS = 128
MAX_LABEL_CHARS = 64
MAX_CORRECTION_CHARS = 16_384
MAX_VARIANT_CHARS = 63  # a Kubernetes DNS label, as ModelService variant names are
MAX_MODEL_VERSION_CHARS = 256
MAX_USER_KEY_CHARS = 256
MAX_LOGGED_TEXT_CHARS = 262_144
MAX_EXPORT_PAGE = 1_000

RATING_NAMES = {"down": -1, "neutral": 0, "up": 1}
RATINGS = frozenset(RATING_NAMES.values())

# Seconds a SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
# The execution option that marks a read-only transaction (see _sqlite_engine).
_READ_ONLY = "kubetrain_read_only"
# Any constant: the key of the advisory lock that serialises schema upgrades on PostgreSQL.
_MIGRATION_LOCK_KEY = 0x6B75_6265_7472_6E31  # "kubetrn1"
# Rows updated per statement when a migration fills in a new column.
_BACKFILL_BATCH = 1_000

# ------------------------------------------------------------------------------- errors


class StoreError(RuntimeError):
    """The store cannot do what was asked (configuration, schema, duplicate id)."""


class UnknownResponse(StoreError, LookupError):
    """Feedback names a response id that was never logged (HTTP 404)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(f"no logged response has id {response_id!r}")
        self.response_id = response_id


class DuplicateResponse(StoreError):
    """A response id logged twice: ids are the router's and must be unique."""


class FeedbackRefused(StoreError, ValueError):
    """Feedback outside the bounds (HTTP 400); `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# ------------------------------------------------------------------------------- schema

metadata = sa.MetaData()

schema_versions = sa.Table(
    "kubetrain_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

# Times are Unix seconds (a double): one representation on both backends, cheap to compare.
responses = sa.Table(
    "kubetrain_responses",
    metadata,
    sa.Column("id", sa.String(MAX_ID_CHARS), primary_key=True),
    sa.Column("variant", sa.String(MAX_VARIANT_CHARS), nullable=False),
    sa.Column("model_version", sa.String(MAX_MODEL_VERSION_CHARS), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),  # the HTTP status the client got
    sa.Column("latency_s", sa.Double, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("mean_logprob", sa.Double, nullable=True),
    sa.Column("uncertainty", sa.Double, nullable=True),  # schema version 2
    sa.Column("user_key", sa.String(MAX_USER_KEY_CHARS), nullable=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("truncated", sa.Boolean, nullable=False),
    # The experiment's windows: per variant (percentiles) and across variants (totals).
    sa.Index("kubetrain_responses_variant_time", "variant", "created_at"),
    sa.Index("kubetrain_responses_time", "created_at"),
    # Version 2: the selection for labelling reads the most uncertain responses first.
    sa.Index("kubetrain_responses_uncertainty", "uncertainty"),
)

feedback = sa.Table(
    "kubetrain_feedback",
    metadata,
    # The export's cursor: increasing in insertion order on both backends.
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),  # SQLite's rowid alias
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("id", sa.String(MAX_ID_CHARS), nullable=False, unique=True),
    sa.Column(
        "response_id",
        sa.String(MAX_ID_CHARS),
        sa.ForeignKey(responses.c.id),
        nullable=False,
    ),
    sa.Column("caller", sa.String(MAX_CALLER_CHARS), nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("label", sa.String(MAX_LABEL_CHARS), nullable=True),
    sa.Column("correction", sa.Text, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.UniqueConstraint("response_id", "caller", name="kubetrain_feedback_one_per_caller"),
    sa.CheckConstraint("rating IN (-1, 0, 1)", name="kubetrain_feedback_rating"),
)


def _create_v1(conn: Connection) -> None:
    # The version-1 shape, spelled out (later versions alter it in their own steps).
    v1 = sa.MetaData()
    v1_responses = sa.Table(
        "kubetrain_responses",
        v1,
        sa.Column("id", sa.String(MAX_ID_CHARS), primary_key=True),
        sa.Column("variant", sa.String(MAX_VARIANT_CHARS), nullable=False),
        sa.Column("model_version", sa.String(MAX_MODEL_VERSION_CHARS), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("latency_s", sa.Double, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("mean_logprob", sa.Double, nullable=True),
        sa.Column("user_key", sa.String(MAX_USER_KEY_CHARS), nullable=True),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False),
        sa.Index("kubetrain_responses_variant_time", "variant", "created_at"),
        sa.Index("kubetrain_responses_time", "created_at"),
    )
    sa.Table(
        "kubetrain_feedback",
        v1,
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("id", sa.String(MAX_ID_CHARS), nullable=False, unique=True),
        sa.Column(
            "response_id",
            sa.String(MAX_ID_CHARS),
            sa.ForeignKey(v1_responses.c.id),
            nullable=False,
        ),
        sa.Column("caller", sa.String(MAX_CALLER_CHARS), nullable=False),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("label", sa.String(MAX_LABEL_CHARS), nullable=True),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.UniqueConstraint("response_id", "caller", name="kubetrain_feedback_one_per_caller"),
        sa.CheckConstraint("rating IN (-1, 0, 1)", name="kubetrain_feedback_rating"),
    )
    v1.create_all(conn)


def _add_uncertainty_v2(conn: Connection) -> None:
    """Version 2: the `uncertainty` column and its index, filled in for the logged rows
    that have a mean log-probability (in Python, so both backends compute it alike)."""
    column = responses.c.uncertainty
    kind = column.type.compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {responses.name} ADD COLUMN {column.name} {kind}")
    for index in responses.indexes:
        if index.name == "kubetrain_responses_uncertainty":
            index.create(conn)
    scored = sa.select(responses.c.id, responses.c.mean_logprob).where(
        responses.c.mean_logprob.is_not(None)
    )
    update = (
        responses.update()
        .where(responses.c.id == sa.bindparam("row_id"))
        .values(uncertainty=sa.bindparam("value"))
    )
    rows = conn.execute(scored).all()
    for start in range(0, len(rows), _BACKFILL_BATCH):
        batch = rows[start : start + _BACKFILL_BATCH]
        values = [{"row_id": r.id, "value": uncertainty_of(r.mean_logprob)} for r in batch]
        conn.execute(update, values)


def uncertainty_of(mean_logprob: float | None) -> float | None:
    """A response's uncertainty in [0, 1] from its mean token log-probability (None
    without one): 1 - exp(mean_logprob) = 1 - the geometric mean of the chosen tokens'
    probabilities. 0 for a model sure of every token; near 1 when it guessed."""
    if mean_logprob is None:
        return None
    return -math.expm1(min(0.0, mean_logprob))


# version -> the step that brings the schema from version - 1 to it
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _create_v1, 2: _add_uncertainty_v2}


def _migrate(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Held until the commit: replicas that start together upgrade one at a time.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
        # (SQLite: the transaction began with BEGIN IMMEDIATE and holds the write lock.)
        schema_versions.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar()
        current = current or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {current}, newer than this router's "
                f"{SCHEMA_VERSION}: run the newer router (or a fresh database)"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](conn)
            conn.execute(schema_versions.insert().values(version=version, applied_at=time.time()))


# ------------------------------------------------------------------------------ engines


def _sqlite_engine(path: Path) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        sa.URL.create("sqlite", database=str(path)),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling off: `_on_begin` says BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            mode = _enable_wal(cursor)
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"SQLite store {path}: the file system does not support WAL "
                    f"(journal_mode is {mode!r}); put the file on a local volume"
                )
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (a deferred one turning into a writer can
        # fail at once with SQLITE_BUSY); readers read a WAL snapshot and block no one.
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _enable_wal(cursor: sqlite3.Cursor) -> str:
    """Switch to WAL and return the journal mode. The switch needs an exclusive lock, and
    SQLite answers SQLITE_BUSY at once, without its busy handler (waiting could deadlock),
    while another connection writes, e.g. a replica migrating the same fresh file: retry
    within the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            return str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _postgresql_engine(url: sa.URL) -> Engine:
    return sa.create_engine(
        url.set(drivername="postgresql+psycopg"),
        pool_pre_ping=True,  # a database restart must not fail the next request
        pool_size=5,
        max_overflow=10,
    )


def open_store(target: str | Path) -> Store:
    """The store at `target`: a PostgreSQL URI (`postgresql://user:password@host:port/db`,
    `postgres://` too) or a SQLite file (`sqlite:///path/to/file.db` or the path itself).
    Creates or upgrades the schema."""
    text = str(target).strip()
    if not text:
        raise StoreError("store: empty target; give a postgresql:// DSN or a SQLite file path")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        try:
            url = sa.make_url(text)
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"store: not a valid PostgreSQL URI: {exc}") from None
        engine = _postgresql_engine(url)
    elif scheme == "sqlite":
        database = sa.make_url(text).database
        if not database or database == ":memory:":
            raise StoreError("store: SQLite needs a file (sqlite:///path/to/file.db)")
        engine = _sqlite_engine(Path(database))
    elif scheme:
        raise StoreError(
            f"store: unsupported scheme {scheme!r}; use postgresql://... or a SQLite file"
        )
    else:
        engine = _sqlite_engine(Path(text))
    try:
        _migrate(engine)
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        raise StoreError(f"store: cannot open {where}: {exc.orig}") from None
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class FeedbackReceipt:
    """What `add_feedback` stored. `revision` counts this caller's ratings of the response
    (1: the first; more: it replaced an earlier one, `created` is then False)."""

    id: str
    response_id: str
    variant: str
    model_version: str
    caller: str
    rating: int
    revision: int
    created_at: float
    updated_at: float

    @property
    def created(self) -> bool:
        return self.revision == 1


@dataclass(frozen=True)
class VariantCounts:
    """One variant's numbers over a window, named as the operator's `VariantStats`
    (kubetrain_operator/experiments/stats.py) names them.

    requests: responses logged (every status); errors: those with a 5xx status;
    n: responses rated (at least one up or down rating); successes: rated responses whose
    ratings sum to more than zero; latency_p50_s / latency_p95_s: nearest-rank percentiles
    of the non-5xx responses' latency (None without any); slow: responses (any status)
    slower than the `slower_than` asked for (0 when not asked), the `latency` metric."""

    requests: int
    errors: int
    n: int
    successes: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    slow: int = 0

    def stats_fields(self) -> dict[str, Any]:
        """The keyword arguments of `VariantStats(name=..., **fields)`."""
        return {
            "n": self.n,
            "successes": self.successes,
            "requests": self.requests,
            "errors": self.errors,
            "latency_p95_s": self.latency_p95_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportPage:
    """One page of `export_feedback`: rows in feedback order; `next_after` is the cursor
    for the next page, None when this page was the last."""

    rows: list[dict[str, Any]]
    next_after: int | None


# ----------------------------------------------------------------------------- the store


class Store:
    """The log and the feedback on one database. Thread-safe; every method is one
    transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def snapshot(self) -> AbstractContextManager[Connection]:
        """A read-only transaction for readers of the tables outside this module (the
        feedback tools): on SQLite it takes no write lock, so the router never waits."""
        return self._snapshot()

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction that sees one state of the database for all its queries."""
        with self.engine.connect() as conn:
            if self.backend == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            else:
                conn = conn.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield conn

    # --------------------------------------------------------------------------- writes

    def record_response(
        self,
        id: str,
        *,
        variant: str,
        model_version: str,
        prompt: str,
        response: str,
        latency_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        mean_logprob: float | None = None,
        user_key: str | None = None,
        created_at: datetime | float | None = None,
        status: int = 200,
    ) -> None:
        """Log one request and what was answered. `prompt`: the completion prompt, or the
        chat messages as JSON text; `response`: the text served (the error body for a
        failure); `status`: the HTTP status the client got (5xx counts as an error);
        `mean_logprob`: the engine's mean token log-probability, if it gave one (the
        logged `uncertainty` is derived from it: `uncertainty_of`);
        `created_at`: when the request arrived (an aware datetime or Unix seconds; now by
        default). Raises ValueError for a malformed value (these come from the router, not
        the client) and DuplicateResponse for an id already logged."""
        _check_text("id", id, MAX_ID_CHARS, error=ValueError)
        _check_text("variant", variant, MAX_VARIANT_CHARS, error=ValueError)
        _check_text("model_version", model_version, MAX_MODEL_VERSION_CHARS, error=ValueError)
        if user_key is not None:
            _check_text("user_key", user_key, MAX_USER_KEY_CHARS, error=ValueError)
        if not (_is_number(latency_s) and latency_s >= 0):
            raise ValueError(f"latency_s must be a finite number >= 0, got {latency_s!r}")
        for name, count in (
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
        ):
            if not (_is_int(count) and count >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {count!r}")
        if mean_logprob is not None and not (_is_number(mean_logprob) and mean_logprob <= 0):
            raise ValueError(f"mean_logprob must be a finite number <= 0, got {mean_logprob!r}")
        if not (_is_int(status) and 100 <= status <= 599):
            raise ValueError(f"status must be an HTTP status code, got {status!r}")
        prompt_text, prompt_cut = _loggable("prompt", prompt)
        response_text, response_cut = _loggable("response", response)
        row = {
            "id": id,
            "variant": variant,
            "model_version": model_version,
            "created_at": _seconds("created_at", created_at),
            "status": status,
            "latency_s": float(latency_s),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "mean_logprob": None if mean_logprob is None else float(mean_logprob),
            "uncertainty": uncertainty_of(mean_logprob),
            "user_key": user_key,
            "prompt": prompt_text,
            "response": response_text,
            "truncated": prompt_cut or response_cut,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(responses.insert().values(row))
        except sa.exc.IntegrityError:
            raise DuplicateResponse(f"response id {id!r} is already logged") from None

    def add_feedback(
        self,
        response_id: str,
        *,
        caller: str,
        rating: int | str,
        label: str | None = None,
        correction: str | None = None,
        now: datetime | float | None = None,
    ) -> FeedbackReceipt:
        """Rate a logged response: `rating` -1/0/+1 (or "down"/"neutral"/"up"); `caller`
        identifies who rates (an API key's or user's id: one rating per response per
        caller, a second one replaces the first); `label`: a short category such as
        "wrong"; `correction`: what the answer should have been. Raises FeedbackRefused
        (naming the field) outside the bounds and UnknownResponse for an id never logged."""
        value = check_feedback(
            response_id, caller=caller, rating=rating, label=label, correction=correction
        )
        stamp = _seconds("now", now)
        insert = (
            postgresql_dialect.insert(feedback)
            if self.backend == "postgresql"
            else sqlite_dialect.insert(feedback)
        )
        new = insert.values(
            id=f"fb-{uuid.uuid4().hex}",
            response_id=response_id,
            caller=caller,
            rating=value,
            label=label,
            correction=correction,
            created_at=stamp,
            updated_at=stamp,
            revision=1,
        )
        # One atomic statement: concurrent ratings by one caller leave one row.
        upsert = new.on_conflict_do_update(
            index_elements=[feedback.c.response_id, feedback.c.caller],
            set_={
                "rating": new.excluded.rating,
                "label": new.excluded.label,
                "correction": new.excluded.correction,
                "updated_at": new.excluded.updated_at,
                "revision": feedback.c.revision + 1,
            },
        ).returning(
            feedback.c.id, feedback.c.revision, feedback.c.created_at, feedback.c.updated_at
        )
        try:
            with self.engine.begin() as conn:
                logged = conn.execute(
                    sa.select(responses.c.variant, responses.c.model_version).where(
                        responses.c.id == response_id
                    )
                ).first()
                if logged is None:
                    raise UnknownResponse(response_id)
                stored = conn.execute(upsert).one()
        except sa.exc.IntegrityError:
            # Only the foreign key can fail here (the response cannot vanish: the log is
            # never pruned), kept as the database's own guarantee.
            raise UnknownResponse(response_id) from None
        return FeedbackReceipt(
            id=stored.id,
            response_id=response_id,
            variant=logged.variant,
            model_version=logged.model_version,
            caller=caller,
            rating=value,
            revision=stored.revision,
            created_at=stored.created_at,
            updated_at=stored.updated_at,
        )

    # ---------------------------------------------------------------------------- reads

    def get_response(self, response_id: str) -> dict[str, Any] | None:
        """The logged record of one response, or None."""
        with self._snapshot() as conn:
            row = conn.execute(sa.select(responses).where(responses.c.id == response_id)).first()
        return None if row is None else dict(row._mapping)

    def variant_counts(
        self, since: datetime | float | None = None, slower_than: float | None = None
    ) -> dict[str, VariantCounts]:
        """Per variant, the numbers of the responses logged at or after `since` (all of
        them by default) and of the feedback on them; with `slower_than` (seconds), also how
        many took longer than that. Variants without a response in the
        window are absent. Cost: a few indexed aggregate queries per call plus two
        single-row percentile queries per variant; nothing is loaded into memory."""
        window = [] if since is None else [responses.c.created_at >= _seconds("since", since)]
        is_error = responses.c.status >= 500
        slow_at = None if slower_than is None else _seconds("slower_than", slower_than)
        is_slow = sa.false() if slow_at is None else responses.c.latency_s > slow_at
        totals_q = (
            sa.select(
                responses.c.variant,
                sa.func.count().label("requests"),
                sa.func.coalesce(sa.func.sum(sa.case((is_error, 1), else_=0)), 0).label("errors"),
                sa.func.coalesce(sa.func.sum(sa.case((is_slow, 1), else_=0)), 0).label("slow"),
            )
            .where(*window)
            .group_by(responses.c.variant)
        )
        per_response = (
            sa.select(
                responses.c.variant,
                sa.func.sum(feedback.c.rating).label("net"),
                sa.func.max(sa.func.abs(feedback.c.rating)).label("judged"),
            )
            .join(feedback, feedback.c.response_id == responses.c.id)
            .where(*window)
            .group_by(responses.c.id, responses.c.variant)
            .subquery()
        )
        rated_q = sa.select(
            per_response.c.variant,
            sa.func.sum(sa.case((per_response.c.judged > 0, 1), else_=0)).label("n"),
            sa.func.sum(sa.case((per_response.c.net > 0, 1), else_=0)).label("successes"),
        ).group_by(per_response.c.variant)
        with self._snapshot() as conn:
            totals = {row.variant: row for row in conn.execute(totals_q)}
            rated = {row.variant: row for row in conn.execute(rated_q)}
            counts: dict[str, VariantCounts] = {}
            for variant, row in sorted(totals.items()):
                served = [responses.c.variant == variant, ~is_error, *window]
                ok = int(row.requests) - int(row.errors)
                p50, p95 = (_percentile(conn, served, ok, q) for q in (0.50, 0.95))
                judged = rated.get(variant)
                counts[variant] = VariantCounts(
                    requests=int(row.requests),
                    errors=int(row.errors),
                    n=int(judged.n) if judged else 0,
                    successes=int(judged.successes) if judged else 0,
                    latency_p50_s=p50,
                    latency_p95_s=p95,
                    slow=int(row.slow),
                )
        return counts

    def recent_prompts(
        self, variant: str, since: datetime | float | None = None, limit: int = 500
    ) -> list[str]:
        """The logged prompts of the `limit` latest requests to `variant` at or after
        `since` (all time by default), newest first: the live sample prompt drift compares
        with the training data. One query on the (variant, created_at) index."""
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be in 1..10000, got {limit}")
        query = (
            sa.select(responses.c.prompt)
            .where(responses.c.variant == variant)
            .order_by(responses.c.created_at.desc())
            .limit(limit)
        )
        if since is not None:
            query = query.where(responses.c.created_at >= _seconds("since", since))
        with self._snapshot() as conn:
            return [row.prompt for row in conn.execute(query)]

    def export_feedback(
        self, *, after: int = 0, limit: int = 500, variant: str | None = None
    ) -> ExportPage:
        """Feedback joined with the responses it rates, for building data sets: at most
        `limit` (<= MAX_EXPORT_PAGE) rows with a feedback sequence number greater than
        `after`, in that order; pass the page's `next_after` to get the next one. A rating
        replaced after its page was read keeps its place (and is not exported again): read
        from `after=0` for a complete snapshot."""
        if not (_is_int(after) and after >= 0):
            raise ValueError(f"after must be an integer >= 0, got {after!r}")
        if not (_is_int(limit) and 1 <= limit <= MAX_EXPORT_PAGE):
            raise ValueError(f"limit must be an integer in 1..{MAX_EXPORT_PAGE}, got {limit!r}")
        query = (
            sa.select(
                feedback.c.seq,
                feedback.c.id,
                feedback.c.response_id,
                responses.c.variant,
                responses.c.model_version,
                responses.c.prompt,
                responses.c.response,
                responses.c.truncated,
                responses.c.status,  # a failure's response is its error body, not an answer
                responses.c.mean_logprob,
                responses.c.created_at.label("response_created_at"),
                feedback.c.caller,
                feedback.c.rating,
                feedback.c.label,
                feedback.c.correction,
                feedback.c.revision,
                feedback.c.created_at,
                feedback.c.updated_at,
            )
            .join(responses, responses.c.id == feedback.c.response_id)
            .where(feedback.c.seq > after)
            .order_by(feedback.c.seq)
            .limit(limit + 1)  # one more tells whether there is a next page
        )
        if variant is not None:
            query = query.where(responses.c.variant == variant)
        with self._snapshot() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        for row in rows:
            row["truncated"] = bool(row["truncated"])
            for key in ("response_created_at", "created_at", "updated_at"):
                row[key] = _iso(row[key])
        return ExportPage(rows=rows, next_after=rows[-1]["seq"] if more else None)


# ------------------------------------------------------------------------------ helpers


def check_feedback(
    response_id: object,
    *,
    caller: object,
    rating: object,
    label: object = None,
    correction: object = None,
) -> int:
    """The bounds `Store.add_feedback` enforces, without a database: the rating's value
    (-1/0/1), or FeedbackRefused naming the field. Lets a bulk import check every record
    before it writes any."""
    if not isinstance(response_id, str) or not response_id:
        raise FeedbackRefused("response_id", "must be a non-empty string")
    if len(response_id) > MAX_ID_CHARS:
        raise FeedbackRefused("response_id", f"longer than {MAX_ID_CHARS} characters")
    _check_text("caller", caller, MAX_CALLER_CHARS, error=FeedbackRefused)
    value = _rating(rating)
    if label is not None:
        _check_text("label", label, MAX_LABEL_CHARS, error=FeedbackRefused)
    if correction is not None:
        if not isinstance(correction, str):
            raise FeedbackRefused("correction", "must be a string")
        if len(correction) > MAX_CORRECTION_CHARS:
            raise FeedbackRefused(
                "correction",
                f"{len(correction)} characters, more than {MAX_CORRECTION_CHARS}",
            )
        if "\x00" in correction:
            raise FeedbackRefused("correction", "contains a NUL character")
    return value


def _percentile(conn: Connection, where: list[Any], count: int, q: float) -> float | None:
    """The nearest-rank q-quantile of latency_s among `count` rows matching `where`,
    computed by the database (ORDER BY ... OFFSET k: no rows come to Python)."""
    if count <= 0:
        return None
    rank = max(1, math.ceil(q * count))
    value = conn.execute(
        sa.select(responses.c.latency_s)
        .where(*where)
        .order_by(responses.c.latency_s)
        .limit(1)
        .offset(rank - 1)
    ).scalar()
    return None if value is None else float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _check_text(field: str, value: object, limit: int, *, error: type[Exception]) -> None:
    """A non-empty single-line string of at most `limit` characters."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "must be a non-empty string"
    elif len(value) > limit:
        problem = f"longer than {limit} characters"
    elif any(ch < " " or ch == "\x7f" for ch in value):
        problem = "must not contain control characters"
    if problem is None:
        return
    if error is FeedbackRefused:
        raise FeedbackRefused(field, problem)
    raise error(f"{field} {problem}, got {value!r:.80}")


def _loggable(field: str, value: object) -> tuple[str, bool]:
    """The text as the log keeps it, and whether it was cut."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    text = value.replace("\x00", "\ufffd")
    if len(text) > MAX_LOGGED_TEXT_CHARS:
        return text[:MAX_LOGGED_TEXT_CHARS], True
    return text, False


def _rating(value: object) -> int:
    if isinstance(value, str) and value in RATING_NAMES:
        return RATING_NAMES[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in RATINGS:
        return value
    names = "/".join(RATING_NAMES)
    raise FeedbackRefused("rating", f"must be -1, 0 or 1 ({names}), got {value!r:.40}")


def _seconds(field: str, value: datetime | float | None) -> float:
    """Unix seconds of an aware datetime or a number; now for None."""
    if value is None:
        return time.time()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{field} must be timezone-aware, got {value!r}")
        return value.timestamp()
    if not _is_number(value):
        raise ValueError(f"{field} must be a datetime or Unix seconds, got {value!r}")
    return float(value)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()

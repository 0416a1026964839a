"""Labels coming back from people: a JSONL file, one object per line, into the router's
feedback table (`kubetrain feedback import`).

A line: `response_id` (required), `rating` (-1/0/1 or "down"/"neutral"/"up"; 0 when only
a label or a correction is given), `label`, `correction`, `caller` (who labelled; the
command's `--caller` for lines without one). The fields that `kubetrain feedback select`
writes (prompt, response, score, ...) may stay on the line: the selection's file, filled
in, is an import file. Any other field is refused (a misspelt `corection` must not be
dropped silently). Blank lines are skipped.

Policy: all or nothing for bad input. Every line is parsed and checked against the same
bounds as the feedback API (route/store.py `check_feedback`), and every response id is
looked up, before anything is written; the first problem is a LabelError naming the line
and the field, and nothing is imported. Then each line is one `Store.add_feedback` (an
upsert per response and caller): if the database fails part way, running the same import
again gives the same end state (the lines already in are replaced by themselves).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..route.store import FeedbackRefused, Store, check_feedback, responses

FIELDS = frozenset({"response_id", "rating", "label", "correction", "caller"})
# Written by `kubetrain feedback select` (Selected.to_dict); ignored on import.
SELECTION_FIELDS = frozenset(
    {"prompt", "response", "score", "uncertainty", "similarity", "variant", "model_version"}
    | {"created_at"}
)
_LOOKUP_CHUNK = 500


class LabelError(ValueError):
    """A line that cannot be imported: `line` (1-based) and `field` say where."""

    def __init__(self, line: int, field: str | None, message: str) -> None:
        where = f"line {line}" + (f": {field}" if field else "")
        super().__init__(f"{where}: {message}")
        self.line = line
        self.field = field


@dataclass(frozen=True)
class Label:
    line: int
    response_id: str
    caller: str
    rating: int
    label: str | None
    correction: str | None


@dataclass(frozen=True)
class ImportResult:
    created: int
    replaced: int

    @property
    def total(self) -> int:
        return self.created + self.replaced


def parse_labels(lines: Iterable[str], *, default_caller: str | None = None) -> list[Label]:
    """Every line checked (LabelError at the first bad one); one label per response and
    caller in a file, since a second would silently replace the first."""
    labels: list[Label] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise LabelError(number, None, f"not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise LabelError(number, None, "must be a JSON object")
        label = _label(number, record, default_caller)
        key = (label.response_id, label.caller)
        if key in seen:
            raise LabelError(
                number,
                "response_id",
                f"{label.response_id!r} is already labelled by {label.caller!r} on line "
                f"{seen[key]}",
            )
        seen[key] = number
        labels.append(label)
    return labels


def import_labels(store: Store, labels: list[Label]) -> ImportResult:
    """Write checked labels: every response id must be logged (LabelError naming the first
    line whose id is not, before anything is written)."""
    missing = _missing(store, {label.response_id for label in labels})
    for label in labels:
        if label.response_id in missing:
            raise LabelError(
                label.line, "response_id", f"no logged response has id {label.response_id!r}"
            )
    created = replaced = 0
    for label in labels:
        receipt = store.add_feedback(
            label.response_id,
            caller=label.caller,
            rating=label.rating,
            label=label.label,
            correction=label.correction,
        )
        if receipt.created:
            created += 1
        else:
            replaced += 1
    return ImportResult(created=created, replaced=replaced)


def _label(number: int, record: dict[str, Any], default_caller: str | None) -> Label:
    unknown = sorted(set(record) - FIELDS - SELECTION_FIELDS)
    if unknown:
        known = ", ".join(sorted(FIELDS))
        raise LabelError(number, unknown[0], f"unknown field (an import line has {known})")
    if "response_id" not in record:
        raise LabelError(number, "response_id", "required")
    caller = record.get("caller", default_caller)
    if caller is None:
        raise LabelError(number, "caller", "required (or give --caller for every line)")
    label, correction = record.get("label"), record.get("correction")
    rating = record.get("rating")
    if rating is None:
        if label is None and correction is None:
            raise LabelError(number, "rating", "required (or a label or a correction)")
        rating = 0  # a label or a correction without a verdict
    try:
        value = check_feedback(
            record["response_id"],
            caller=caller,
            rating=rating,
            label=label,
            correction=correction,
        )
    except FeedbackRefused as exc:
        raise LabelError(number, exc.field, str(exc).split(": ", 1)[-1]) from None
    return Label(number, record["response_id"], caller, value, label, correction)


def _missing(store: Store, ids: set[str]) -> set[str]:
    found: set[str] = set()
    ordered = sorted(ids)
    with store.snapshot() as conn:
        for start in range(0, len(ordered), _LOOKUP_CHUNK):
            chunk = ordered[start : start + _LOOKUP_CHUNK]
            query = sa.select(responses.c.id).where(responses.c.id.in_(chunk))
            found.update(conn.execute(query).scalars())
    return ids - found

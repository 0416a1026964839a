"""ownership.py: which objects are a run's own, and the ChildConflict condition (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetrain_api.contract import ANNOTATION_RUN_UID
from kubetrain_operator import builders, ownership
from kubetrain_operator.ownership import ChildConflict

UID = "0b6a0e1c-1111-4222-8333-444455556666"
EARLIER = "99999999-1111-4222-8333-444455556666"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def obj(kind: str = "ConfigMap", refs: list[Any] | None = None, **annotations: str) -> Any:
    meta: dict[str, Any] = {"name": "llama-config", "namespace": "ns"}
    if refs is not None:
        meta["ownerReferences"] = refs
    if annotations:
        meta["annotations"] = {k.replace("_", "/"): v for k, v in annotations.items()}
    return {"apiVersion": "v1", "kind": kind, "metadata": meta}


MINE = obj(refs=[builders.owner_reference("llama", UID)])


def test_owner_uid_is_the_controllers_else_the_run_uid_annotation() -> None:
    assert ownership.owner_uid(MINE) == UID
    retained = {**obj(), "metadata": {"annotations": {ANNOTATION_RUN_UID: UID}}}
    assert ownership.owner_uid(retained) == UID
    # A second, non-controller owner (a retained Deployment on the claim) changes nothing.
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x", "uid": "d"}
    both = obj(refs=[deployment, builders.owner_reference("llama", UID)])
    assert ownership.owner_uid(both) == UID
    assert ownership.owner_uid(obj(refs=[deployment])) is None
    assert ownership.owner_uid(obj()) is None


def test_the_runs_own_object_passes() -> None:
    ownership.check(MINE, MINE)
    retained = {**obj(), "metadata": {"name": "x", "annotations": {ANNOTATION_RUN_UID: UID}}}
    ownership.check(retained, MINE)  # serve.retain turned on: the same run's object


@pytest.mark.parametrize(
    ("live", "reason", "owner"),
    [
        (obj(), "NotOwned", "no controller owner reference"),
        (
            obj(refs=[{"kind": "Deployment", "name": "team", "uid": "t", "controller": True}]),
            "NotOwned",
            "Deployment team",
        ),
        (obj(refs=[builders.owner_reference("llama", EARLIER)]), "PreviousRun", EARLIER),
        (obj(refs=[builders.owner_reference("other", EARLIER)]), "NotOwned", "TrainingRun other"),
    ],
)
def test_a_clash_names_the_object_and_its_owner(live: Any, reason: str, owner: str) -> None:
    with pytest.raises(ChildConflict) as caught:
        ownership.check(MINE, live)
    assert caught.value.reason == reason
    assert (caught.value.kind, caught.value.name) == ("ConfigMap", "llama-config")
    assert owner in caught.value.message
    assert "ConfigMap llama-config" in caught.value.message


def test_a_built_object_must_name_its_run() -> None:
    with pytest.raises(ValueError, match="names no owning run"):
        ownership.check(obj(), MINE)


def test_the_condition_is_set_once_and_cleared() -> None:
    clash = ChildConflict("ConfigMap", "llama-config", "no controller owner reference")
    status: dict[str, Any] = {"phase": "Provisioning", "conditions": []}

    # Nothing to clear on a run that never had a conflict: no condition, no change.
    assert ownership.record_conflict(status, None, 1, NOW) == (status, [])

    first, events = ownership.record_conflict(status, clash, 1, NOW)
    cond = first["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("ChildConflict", "True", "NotOwned")
    assert [(e.type, e.reason) for e in events] == [("Warning", "ChildConflict")]
    assert "ConfigMap llama-config" in events[0].message

    later = NOW + timedelta(minutes=5)
    again, events = ownership.record_conflict(first, clash, 1, later)
    assert (again, events) == (first, [])  # converged: no patch, no event

    cleared, events = ownership.record_conflict(first, None, 1, later)
    cond = cleared["conditions"][0]
    assert (cond["status"], cond["reason"]) == ("False", "Resolved")
    assert events == []

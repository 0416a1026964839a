"""Which objects are a run's own, and what a clash with someone else's becomes.

The operator creates, updates, adopts or deletes only what the run being reconciled owns:
an object whose controller owner reference names the run's uid or, for a retained server
(no owner reference: it outlives its run), whose `kubetrain.dev/run-uid` annotation does.
Child names are deterministic, so another object may hold one: a team's own ConfigMap
`llama-config`, or the children of an earlier run of the same name that garbage
collection has not removed yet (a finished run keeps its head pod; a retained server keeps
the claim). Such an object is left exactly as it is. The run gets the condition
`ChildConflict` and a Warning event, and does not go on with that child (nor with what
comes after it) until the name is free.

Pure: `k8s.Kube.ensure` raises `ChildConflict`, the reconciler records it with
`record_conflict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import ANNOTATION_RUN_UID
from kubetrain_operator.conditions import clip, find_condition, set_condition
from kubetrain_operator.status import EVENT_MESSAGE_LIMIT, Event

CONDITION = "ChildConflict"
REASON_NOT_OWNED = "NotOwned"
"""The object belongs to someone else (or to no one): it stays, the run waits."""
REASON_PREVIOUS_RUN = "PreviousRun"
"""The object belongs to an earlier run of the same name: it goes with garbage collection."""
REASON_RESOLVED = "Resolved"


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference with `controller: true`, if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def owner_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the run that manages `obj`: its controller's, else (a retained server)
    its run-uid annotation's; None when neither says."""
    controller = controller_of(obj)
    if controller is not None:
        return str(controller.get("uid") or "") or None
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_RUN_UID) or None


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return owner_uid(obj) == uid


class ChildConflict(Exception):
    """A child's name is held by an object this run does not own."""

    def __init__(self, kind: str, name: str, owner: str, previous_run: bool = False):
        self.kind, self.name, self.owner, self.previous_run = kind, name, owner, previous_run
        super().__init__(self.message)

    @property
    def reason(self) -> str:
        return REASON_PREVIOUS_RUN if self.previous_run else REASON_NOT_OWNED

    @property
    def message(self) -> str:
        what = f"{self.kind} {self.name}"
        if self.previous_run:
            return (
                f"{what} belongs to an earlier TrainingRun of the same name ({self.owner}) "
                "and is left as it is; this run goes on once garbage collection has removed it"
            )
        return (
            f"{what} exists and is not this run's ({self.owner}); the operator leaves it as "
            "it is: delete or rename it, or give the run another name"
        )


def _describe(ref: Mapping[str, Any] | None, annotated: str | None) -> str:
    if ref is not None:
        return f"controlled by {ref.get('kind')} {ref.get('name')}, uid {ref.get('uid')}"
    if annotated:
        return f"made by the run with uid {annotated}"
    return "no controller owner reference"


def check(desired: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Raise ChildConflict unless `live` (the object holding the name of `desired`, as
    built for this run) is owned by the same run as `desired`."""
    want = owner_uid(desired)
    if not want:
        raise ValueError(f"{desired['kind']} {desired['metadata']['name']} names no owning run")
    if owner_uid(live) == want:
        return
    ref = controller_of(live)
    mine = controller_of(desired)
    previous = (
        ref is not None
        and mine is not None
        and (ref.get("kind"), ref.get("name")) == (mine.get("kind"), mine.get("name"))
    )
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    raise ChildConflict(
        desired["kind"],
        desired["metadata"]["name"],
        _describe(ref, annotations.get(ANNOTATION_RUN_UID)),
        previous_run=previous,
    )


def record_conflict(
    status: Mapping[str, Any],
    conflict: ChildConflict | None,
    generation: int,
    now: datetime,
) -> tuple[dict[str, Any], list[Event]]:
    """The status with the ChildConflict condition set (a conflict) or cleared (None: the
    run's children were all applied; absent stays absent), and a Warning event when the
    conflict is new or names another object."""
    conditions = list(status.get("conditions") or [])
    before = find_condition(conditions, CONDITION)
    if conflict is None:
        if before.get("status") != "True":
            return dict(status), []
        message = "every child is the run's own"
        new = set_condition(
            conditions, CONDITION, "False", REASON_RESOLVED, message, generation, now
        )
        return {**status, "conditions": new}, []
    message = clip(conflict.message, api.MAX_MESSAGE)
    new = set_condition(conditions, CONDITION, "True", conflict.reason, message, generation, now)
    after = find_condition(new, CONDITION)
    changed = (before.get("status"), before.get("message")) != ("True", after.get("message"))
    events = [Event("Warning", CONDITION, clip(message, EVENT_MESSAGE_LIMIT))] if changed else []
    return {**status, "conditions": new}, events

"""The validating admission webhook's decision: pure (handlers.py calls it from kopf).

The API server asks before it stores a new TrainingRun (CREATE) or a change to one
(UPDATE); never for the status subresource, which the chart's webhook rules leave out and
kopf routes to no handler, so the operator's status writes are never refused. A request is
refused with every error `kubetrain validate` and the operator find (the same
`validation.validate_document`), plus, on a run that is active, every edit of a field that
cannot change while it runs (`validation.immutable_changes`; placement may change while
the run is suspended, by the operator's own rule `stored_spec.placement_open`): refused at
`kubectl apply`, such an edit never reaches the operator, which would keep the run on its
stored spec and report the edit as `SpecChangeRefused`.

Ratcheting: an UPDATE that leaves the spec as it was (labels, annotations, finalizers) is
admitted even when the stored spec is invalid, so a run stored before the webhook existed,
or before a rule became stricter, can still be labelled, or lose a finalizer and go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.validation import FieldError, Limits
from kubetrain_operator import stored_spec
from kubetrain_operator.status import is_terminal


def run_document(body: Mapping[str, Any]) -> dict[str, Any]:
    """What validation judges of a stored object: its header, name and spec (the rest of
    the metadata and the status are the API server's and the operator's)."""
    metadata = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": metadata.get("name"), "namespace": metadata.get("namespace")},
        "spec": body.get("spec"),
    }


def is_active(status: Mapping[str, Any]) -> bool:
    """The operator has started the run (an attempt was requested) and it has not
    finished: its children were built from the spec as it is now."""
    return int(status.get("attempts") or 0) > 0 and not is_terminal(status)


def _spec(body: Mapping[str, Any]) -> api.TrainingRunSpec | None:
    """The spec read as the operator reads a stored one (lax: defaults filled in), or
    None when it cannot be read."""
    try:
        return api.TrainingRunSpec.model_validate(body.get("spec"))
    except pydantic.ValidationError:
        return None


def review(
    old: Mapping[str, Any] | None, new: Mapping[str, Any], limits: Limits
) -> list[FieldError]:
    """Why the API server must not store `new` (empty: admit it). `old` is the stored
    object on an UPDATE, None on a CREATE."""
    if old is not None and old.get("spec") == new.get("spec"):
        return []
    errors = validation.validate_document(run_document(new), limits)
    if old is not None and is_active(old.get("status") or {}):
        before, after = _spec(old), _spec(new)
        # An unreadable stored spec cannot be compared; the operator's own check of the
        # spec it built the cluster from still applies.
        if before is not None and after is not None:
            suspended = stored_spec.placement_open(after, old.get("status") or {})
            errors += validation.immutable_changes(before, after, suspended=suspended)
    return errors


def refusal(errors: list[FieldError]) -> str:
    """The message `kubectl` prints after `admission webhook ... denied the request: `."""
    return "; ".join(str(error) for error in errors)

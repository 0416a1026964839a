"""Kubernetes conditions (metav1.Condition) and the small text rules they follow."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from kubetrain_api import v1alpha1 as api
from kubetrain_api.reports import clip, wire

__all__ = ["as_reason", "clip", "find_condition", "rfc3339", "set_condition"]


def rfc3339(moment: datetime) -> str:
    """metav1.Time: UTC, whole seconds, `Z` suffix (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_reason(text: Any, fallback: str) -> str:
    """A Kubernetes condition reason (CamelCase, no spaces) from free text."""
    cleaned = re.sub(r"[^A-Za-z0-9_,:]", "", text if isinstance(text, str) else "")
    cleaned = cleaned.lstrip("0123456789_,:")[:1024].rstrip(",:")
    return cleaned or fallback


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with condition `type` set; lastTransitionTime moves only when status flips."""
    condition = api.Condition.model_validate(
        {
            "type": type,
            "status": status,
            "reason": reason,
            "message": clip(message, api.MAX_MESSAGE),
            "lastTransitionTime": rfc3339(now),
            "observedGeneration": generation,
        }
    )
    new = wire(condition)
    if not new["message"]:
        # Left out rather than "": kube-apiserver 1.20 reads an empty string in a merge
        # patch of this list as null and refuses it (message is optional in the schema).
        del new["message"]
    result: list[dict[str, Any]] = []
    found = False
    for old in conditions:
        if old.get("type") != type:
            result.append(dict(old))
            continue
        found = True
        if old.get("status") == status and old.get("lastTransitionTime"):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        result.append(new)
    if not found:
        result.append(new)
    return result


def find_condition(conditions: Iterable[Mapping[str, Any]], type: str) -> Mapping[str, Any]:
    return next((c for c in conditions if c.get("type") == type), {})

"""The spec an active run's cluster was built from, read across operator versions, and how
the user's edits of an active run are judged against it.

The operator stores the resolved run (defaults filled in) in the run's ConfigMap
(builders.build_config_map) when it creates an attempt. An active run keeps running on it:

1. Compatible reading (upgrade safety). A ConfigMap written by another operator version
   may hold keys this version no longer knows (ignored), lack keys it added (defaulted),
   or hold a value this version's models refuse (the user's current value is taken).
   Only this reader is lenient: what users write is parsed strictly (validation.parse).
2. An edit is what the user's spec says differently. The user's spec is re-resolved with
   the stored defaults: a field it leaves out keeps its stored value, which is the default
   of the operator that started the run, so a default changed by an upgrade is no edit.
   Maps (nodeSelector) and lists are the user's as written: an entry removed is an edit.
   (A field removed from the spec is not an edit here, since its stored value may equally
   be an older default; the admission webhook compares the old and new objects and
   refuses such a change.)
3. The run keeps its stored spec. What may change (validation.mutable_paths: runPolicy and
   serve; placement too while the run is suspended) comes from the user's spec, the rest
   from the stored one, so neither a refused edit nor a new default reaches a running run
   or its next attempt. A spec edited into an invalid one is refused as a whole. A refused
   edit is reported (the SpecChangeRefused condition) and clears once the user reverts it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import pydantic
import yaml

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.validation import FieldError
from kubetrain_operator.conditions import find_condition

log = logging.getLogger("kubetrain.stored_spec")

# Each pass repairs every error pydantic reports; a repaired parent may reveal a child's.
_MAX_PASSES = 8


def read(
    text: str, current: api.TrainingRunSpec | None
) -> tuple[api.TrainingRunSpec | None, list[str]]:
    """The spec stored as `text` (a run document, builders.run_document) as this version's
    model, and a note per key ignored or value replaced (by the user's `current` spec's,
    if valid). None when it is no run document."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return None, [f"the stored run is no YAML: {exc}"]
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if not isinstance(spec, dict):
        return None, ["the stored run has no spec"]
    spec = copy.deepcopy(spec)
    fallback = {} if current is None else current.model_dump(by_alias=True, mode="json")
    notes: list[str] = []
    for _ in range(_MAX_PASSES):
        try:
            return api.TrainingRunSpec.model_validate(spec), notes
        except pydantic.ValidationError as exc:
            errors = exc.errors()
        for err in errors:
            keys = _keys(spec, err["loc"])
            where = _where(keys)
            if not keys:
                return None, [*notes, f"spec: {err['msg']}"]
            if err["type"] == "extra_forbidden":
                _delete(spec, keys)
                notes.append(f"{where}: ignored (unknown to this operator version)")
                continue
            found, value = _get(fallback, keys)
            if found:
                _set(spec, keys, value)
                notes.append(f"{where}: {err['msg']}; the run's current value is used")
            elif isinstance(keys[-1], str):
                _delete(spec, keys)
                notes.append(f"{where}: {err['msg']}; left out")
            else:
                return None, [*notes, f"{where}: {err['msg']}"]
    return None, [*notes, "spec: could not be read with this operator version's models"]


def user_edits(
    stored: api.TrainingRunSpec,
    current: api.TrainingRunSpec,
    written: Mapping[str, Any],
    *,
    suspended: bool,
) -> list[FieldError]:
    """The fields the user's spec (`written`, as stored in the API server; `current`, as
    this version resolves it) changes against the stored spec that may not change now."""
    rebased = _rebase(
        stored.model_dump(by_alias=True, mode="json"),
        current.model_dump(by_alias=True, mode="json"),
        written,
    )
    try:
        candidate = api.TrainingRunSpec.model_validate(rebased)
    except pydantic.ValidationError:
        candidate = current  # a mix no single spec holds: judge the user's spec as it is
    return validation.immutable_changes(stored, candidate, suspended=suspended)


def effective(
    stored: api.TrainingRunSpec, current: api.TrainingRunSpec, *, suspended: bool
) -> api.TrainingRunSpec:
    """The spec the run goes on with: the stored one, with what may change from `current`."""
    out = stored.model_dump(by_alias=True, mode="json")
    now = current.model_dump(by_alias=True, mode="json")
    for path in validation.mutable_paths(suspended):
        keys = path.split(".")[1:]  # past "spec"
        found, value = _get(now, keys)
        if found:
            _set(out, keys, value)
    try:
        return api.TrainingRunSpec.model_validate(out)
    except pydantic.ValidationError as exc:  # not expected: both halves are valid
        log.warning("the stored spec with the run's mutable fields is invalid: %s", exc)
        return stored


def _rebase(stored: Any, resolved: Any, written: Any) -> Any:
    """The user's spec resolved with the stored defaults: `stored`, with what the user
    wrote (`written`) as this version resolves it (`resolved`)."""
    if isinstance(written, dict) and isinstance(stored, dict) and isinstance(resolved, dict):
        # Models: both dumps hold every field, so a key the user left out keeps its stored
        # value. Maps: `resolved` holds just the user's keys, so an entry removed goes.
        out = {k: v for k, v in stored.items() if k in resolved and k not in written}
        for key in resolved:
            if key in written:
                out[key] = (
                    _rebase(stored[key], resolved[key], written[key])
                    if key in stored
                    else resolved[key]
                )
        return out
    if (
        isinstance(written, list)
        and isinstance(stored, list)
        and isinstance(resolved, list)
        and len(written) == len(stored) == len(resolved)
    ):
        return [_rebase(s, r, w) for s, r, w in zip(stored, resolved, written, strict=True)]
    return resolved


def _keys(doc: Any, loc: tuple[int | str, ...]) -> list[int | str]:
    """The part of a pydantic error location that addresses `doc`: union tags (`int`,
    `str` under a quantity) are no keys. A missing key ends the location."""
    keys: list[int | str] = []
    node = doc
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            keys.append(part)
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            keys.append(part)
            node = node[part]
        else:
            break
    return keys


def _where(keys: list[int | str]) -> str:
    return "spec" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)


def _node(doc: Any, keys: list[Any]) -> tuple[bool, Any]:
    """The node at `keys` (itself, to change in place), and whether it is there."""
    node = doc
    for key in keys:
        if not _has(node, key):
            return False, None
        node = node[key]
    return True, node


def _get(doc: Any, keys: list[Any]) -> tuple[bool, Any]:
    found, node = _node(doc, keys)
    return found, copy.deepcopy(node)


def _set(doc: Any, keys: list[Any], value: Any) -> None:
    found, parent = _node(doc, keys[:-1])
    if found and (isinstance(parent, dict) or _has(parent, keys[-1])):
        parent[keys[-1]] = value


def _delete(doc: Any, keys: list[Any]) -> None:
    """Remove a map key (list items are never removed: later errors' indexes would move)."""
    found, parent = _node(doc, keys[:-1])
    if found and isinstance(parent, dict):
        parent.pop(keys[-1], None)


def placement_open(spec: api.TrainingRunSpec, status: Mapping[str, Any]) -> bool:
    """Whether the run has no pods to keep where they are: suspended (asked now, or done),
    or resuming; Kueue changes placement in the same update that resumes a run. One rule
    for the operator and the admission webhook, so the webhook refuses no edit the
    operator would take."""
    ready = find_condition(status.get("conditions") or [], "ClusterReady")
    return bool(
        spec.run_policy.suspend
        or status.get("phase") == "Suspended"
        or ready.get("reason") == "Resuming"
    )

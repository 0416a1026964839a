"""Placement and pod template overrides merged over the Ray pods the builders make. Pure.

What wins: the operator's own parts (the Ray container's command, image and restricted
security context, kubetrain's env names, labels, annotations, volumes and mount paths) are
never replaced; validation (kubetrain_api.placement) refuses overrides that try, with the
field path, and `apply_override` raises ValueError should one get here anyway. Everything
else is added: labels, annotations, volumes, mounts, init containers, sidecars, and
capabilities on top of `drop: [ALL]`. Env is merged by the builders (`builders._env`).
"""

from __future__ import annotations

import copy
from typing import Any

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import (
    ANNOTATION_POD_GROUP_TOTAL_COUNT,
    ANNOTATION_RETRIABLE_IN_GROUP,
    LABEL_ATTEMPT,
    LABEL_POD_GROUP,
    LABEL_ROLE,
    LABEL_RUN,
    ROLE_WORKER,
)
from kubetrain_operator import pods
from kubetrain_operator.names import ChildNames

Obj = dict[str, Any]


def gang_metadata(run: api.TrainingRun, uid: str, attempt: int) -> tuple[dict[str, str], Obj]:
    """(labels, annotations) that make Kueue admit an attempt's pods as one unit; empty
    when the run names no queue (Kueue manages only queued pods)."""
    if not run.spec.resources.queue_name or not run.metadata.name:
        return {}, {}
    total = run.spec.resources.workers + 1  # the head and every worker
    return (
        {LABEL_POD_GROUP: ChildNames(run.metadata.name, attempt).pod_group(uid)},
        {ANNOTATION_POD_GROUP_TOTAL_COUNT: str(total), ANNOTATION_RETRIABLE_IN_GROUP: "false"},
    )


def _attempt_workers(run_name: str, attempt: int) -> Obj:
    return {
        "matchLabels": {
            LABEL_RUN: run_name,
            LABEL_ROLE: ROLE_WORKER,
            LABEL_ATTEMPT: str(attempt),
        }
    }


def _with_selector(term: Obj, selector: Obj) -> Obj:
    out = copy.deepcopy(term)
    out.setdefault("labelSelector", copy.deepcopy(selector))
    return out


def worker_scheduling(run: api.TrainingRun, attempt: int) -> Obj:
    """affinity and topologySpreadConstraints of the worker pods. Pod (anti-)affinity terms
    and spread constraints without a labelSelector select this attempt's workers."""
    res = run.spec.resources
    selector = _attempt_workers(run.metadata.name or "", attempt)
    out: Obj = {}
    if res.worker_affinity is not None:
        affinity = res.worker_affinity.model_dump(by_alias=True, exclude_none=True)
        for kind in ("podAffinity", "podAntiAffinity"):
            part = affinity.get(kind)
            if not part:
                continue
            required = "requiredDuringSchedulingIgnoredDuringExecution"
            preferred = "preferredDuringSchedulingIgnoredDuringExecution"
            if isinstance(part.get(required), list):
                part[required] = [_with_selector(t, selector) for t in part[required]]
            if isinstance(part.get(preferred), list):
                part[preferred] = [
                    {**p, "podAffinityTerm": _with_selector(p["podAffinityTerm"], selector)}
                    if isinstance(p, dict) and isinstance(p.get("podAffinityTerm"), dict)
                    else p
                    for p in part[preferred]
                ]
        if affinity:
            out["affinity"] = affinity
    if res.worker_topology_spread_constraints:
        out["topologySpreadConstraints"] = [
            _with_selector(c, selector) for c in res.worker_topology_spread_constraints
        ]
    return out


def _user_container(spec: Obj, image: str, pull_policy: str) -> Obj:
    """A user's init container or sidecar: the run's image unless it names one, and the
    restricted security context under its allowed additions (capabilities, ids)."""
    out = copy.deepcopy(spec)
    out.setdefault("image", image)
    out.setdefault("imagePullPolicy", pull_policy)
    ctx = pods.container_security_context()
    user = out.get("securityContext") or {}
    for key in ("runAsUser", "runAsGroup"):
        if key in user:
            ctx[key] = user[key]
    added = (user.get("capabilities") or {}).get("add")
    if added:
        ctx["capabilities"] = {"drop": ["ALL"], "add": list(added)}
    out["securityContext"] = ctx
    return out


def _add_unique(target: dict[str, Any], extra: dict[str, Any], what: str) -> None:
    for key, value in extra.items():
        if key in target and target[key] != value:
            raise ValueError(f"{what} {key} is kubetrain's; it cannot be overridden")
        target[key] = value


def apply_override(pod: Obj, override: api.PodOverride, ray_container: str) -> Obj:
    """`pod` with `override` merged in (a new dict; `pod` is untouched). Raises ValueError
    when the override would replace one of the operator's parts."""
    out = copy.deepcopy(pod)
    meta, spec = out["metadata"], out["spec"]
    _add_unique(meta.setdefault("labels", {}), override.labels, "label")
    if override.annotations:
        _add_unique(meta.setdefault("annotations", {}), override.annotations, "annotation")

    (ray,) = [c for c in spec["containers"] if c["name"] == ray_container]
    image, pull_policy = ray["image"], ray["imagePullPolicy"]

    volumes = spec.setdefault("volumes", [])
    taken = {v["name"] for v in volumes}
    for volume in override.volumes:
        if volume["name"] in taken:
            raise ValueError(f"volume {volume['name']} is kubetrain's; it cannot be replaced")
        volumes.append(copy.deepcopy(volume))
        taken.add(volume["name"])

    mounts = ray.setdefault("volumeMounts", [])
    paths = {m["mountPath"].rstrip("/") for m in mounts}
    for mount in override.volume_mounts:
        if mount.mount_path.rstrip("/") in paths:
            raise ValueError(f"mount path {mount.mount_path} is kubetrain's")
        mounts.append(mount.model_dump(by_alias=True, exclude_none=True))

    if override.capabilities:
        caps = ray["securityContext"].setdefault("capabilities", {"drop": ["ALL"]})
        caps["add"] = sorted(set(caps.get("add", [])) | set(override.capabilities))

    names = {c["name"] for c in spec["containers"]}
    extras = (("initContainers", override.init_containers), ("containers", override.sidecars))
    for field, extra in extras:
        for container in extra:
            if container["name"] in names:
                raise ValueError(f"container {container['name']} is kubetrain's")
            names.add(container["name"])
            spec.setdefault(field, []).append(_user_container(container, image, pull_policy))
    return out

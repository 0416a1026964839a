"""One reconcile of one TrainingRun: observe, decide (pure), act, record.

1. Observe: parse and validate the spec; an active run goes on with the spec stored when
   its cluster was built (stored_spec.py: read across operator versions, edits it may not
   take refused); list the run's pods; read the head's progress, and, once the run has
   Succeeded, its serving Deployment.
2. Decide: `status.compute_status` turns the observation into the new status, one
   action (none, create_cluster, retry, delete_pods, finish) and what to do about serving
   (none, apply, remove).
3. Record: patch the status only when it changed, and post the decision's events.
4. Act: create (or adopt, on 409: deterministic names) the attempt's children, delete pods
   of other attempts, clean up finished runs, expire them after ttlSecondsAfterFinished.
   compute_status asks for an attempt's pods until it has seen them, so dying between 3
   and 4 is repaired by the next reconcile, and there is never a second set.
5. Serve: create-or-update the serving objects (serving.py) by input hash, or delete them.

Only the run's own objects count and are touched (ownership.py): pods of an earlier run of
the same name are not this run's, and a child's name held by another object stops the
run at that child with the ChildConflict condition until the name is free.

Level-based: watch events on the run and its children, and a resync of runs not yet
finished (controller.py), call this, so a missed watch event only delays.
A converged run costs reads only (pods, the ConfigMap while active, the serving objects
while served), no writes.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.contract import LABEL_ATTEMPT, LABEL_ROLE, LABEL_RUN, ROLE_HEAD
from kubetrain_operator import (
    builders,
    create_errors,
    metrics,
    ownership,
    serving,
    stored_spec,
    timing,
)
from kubetrain_operator.k8s import Kube
from kubetrain_operator.names import ChildNames
from kubetrain_operator.ownership import ChildConflict
from kubetrain_operator.progress import read_progress
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import Observed, compute_status, is_terminal

log = logging.getLogger("kubetrain.reconcile")


def _parse(
    body: dict[str, Any], settings: OperatorSettings
) -> tuple[api.TrainingRun | None, list[validation.FieldError]]:
    doc = {k: body.get(k) for k in ("apiVersion", "kind", "spec")}
    doc["metadata"] = {k: body["metadata"].get(k) for k in ("name", "namespace")}
    try:
        return validation.parse(doc, settings.limits), []
    except validation.InvalidSpec as exc:
        return None, exc.errors


def _stored_spec(
    kube: Kube, ns: str, name: str, uid: str, current: api.TrainingRunSpec | None
) -> api.TrainingRunSpec | None:
    """The spec the running cluster was built from (its ConfigMap), if any, read
    compatibly: another operator version may have written it (stored_spec.py)."""
    cm = kube.read_config_map(ns, ChildNames(name).config)
    if cm is None or not ownership.owned_by(cm, uid):
        return None  # someone else's (a ChildConflict), or an earlier run's
    text = (cm.get("data") or {}).get(builders.CONFIG_KEY)
    if not text:
        return None
    spec, notes = stored_spec.read(text, current)
    if spec is None:  # the run is judged on its current spec alone
        log.warning("%s/%s: the stored spec is unreadable: %s", ns, name, "; ".join(notes))
    for note in notes if spec is not None else []:
        # Debug: an older operator's spec is read like this on every pass until the next
        # attempt stores it anew.
        log.debug("%s/%s: stored spec: %s", ns, name, note)
    return spec


def _keep_stored_spec(
    kube: Kube,
    body: dict[str, Any],
    run: api.TrainingRun | None,
    invalid: list[validation.FieldError],
    previous: dict[str, Any],
) -> tuple[api.TrainingRun | None, list[validation.FieldError], list[validation.FieldError]]:
    """(run, invalid, refused) for an active run: it goes on with the spec its cluster was
    built from, and an edit it may not take (an immutable field, or a spec made invalid)
    is refused, never the end of the run. What may change is taken from the edit."""
    meta = body["metadata"]
    name, ns = meta["name"], meta["namespace"]
    stored = _stored_spec(kube, ns, name, meta["uid"], run.spec if run else None)
    if stored is None:
        return run, invalid, []
    if run is None:
        kept = api.TrainingRun(metadata=api.ObjectMeta(name=name, namespace=ns), spec=stored)
        return kept, [], invalid
    placement = stored_spec.placement_open(run.spec, previous)
    written = body.get("spec") or {}
    refused = stored_spec.user_edits(stored, run.spec, written, suspended=placement)
    kept = run.model_copy(
        update={"spec": stored_spec.effective(stored, run.spec, suspended=placement)}
    )
    return kept, invalid, refused


def _attempt(pod: dict[str, Any]) -> int:
    return int(pod["metadata"].get("labels", {}).get(LABEL_ATTEMPT, 0))


def _token(kube: Kube, ns: str, name: str, uid: str) -> str:
    """The run's Ray token: generated once, then read back from its (own) Secret."""
    secret = kube.read_secret(ns, ChildNames(name).ray_token)
    if secret and ownership.owned_by(secret, uid) and (secret.get("data") or {}).get("token"):
        return base64.b64decode(secret["data"]["token"]).decode()
    return secrets.token_urlsafe(32)


def _create_cluster(
    kube: Kube, run: api.TrainingRun, uid: str, ns: str, attempt: int, settings: OperatorSettings
) -> create_errors.CreateError | None:
    """Create-or-adopt the attempt's children. When the API server refuses one (quota,
    admission, an invalid field), the attempt cannot start: the pods of this attempt are
    released, so none holds quota or sits Pending, and the refusal is returned."""
    token = _token(kube, ns, run.metadata.name or "", uid)
    pods: list[str] = []  # created or adopted: pods follow one order, so no other exists
    for obj in builders.build_cluster(run, uid, ns, attempt, settings, token):
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            kube.ensure(obj)
        except ApiException as exc:
            if not create_errors.is_refusal(exc.status):
                raise
            refused = create_errors.from_api_error(exc.status, exc.body, exc.reason, kind, name)
            log.warning("%s/%s: %s", ns, run.metadata.name, refused.describe(attempt))
            for pod in pods:
                kube.delete("Pod", ns, pod)
            return refused
        if kind == "Pod":
            pods.append(name)
    return None


def _record_refusal(
    kube: Kube,
    body: dict[str, Any],
    run: api.TrainingRun,
    status: dict[str, Any],
    refused: create_errors.CreateError | None,
    now: datetime,
) -> dict[str, Any]:
    """The status after a refused create, recorded at once: a second pass of the pure
    computation on the status just written, with the refusal observed (its condition,
    event and backoff). That status asked for the attempt, so nothing else applies."""
    if refused is None:
        return status
    again = compute_status(
        Observed(
            run=run,
            generation=int(status.get("observedGeneration") or 0),
            attempt=int(status.get("attempts") or 0),
            now=now,
            previous=status,
            create_error=refused,
        )
    )
    meta = body["metadata"]
    if again.status != status:
        kube.patch_status(meta["namespace"], meta["name"], again.status, status)
    for event in again.events:
        kube.event(body, event.type, event.reason, event.message)
    return again.status


def reconcile(
    body: dict[str, Any],
    kube: Kube,
    settings: OperatorSettings,
    now: datetime | None = None,
) -> float | None:
    """Reconcile one run; returns seconds until it wants to be looked at again (a retry's
    backoff, the TTL)."""
    started = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    meta = body["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    previous = dict(body.get("status") or {})
    run, invalid = _parse(body, settings)
    attempt = int(previous.get("attempts") or 0)

    # Ray pods only (they have a role): the run's serving pods are never this loop's. The
    # label is the name: pods of an earlier run of that name (a kept head) are not ours.
    listed = kube.list_pods(ns, f"{LABEL_RUN}={name},{LABEL_ROLE}")
    all_pods = [p for p in listed if ownership.owned_by(p, uid)]
    current = [p for p in all_pods if _attempt(p) == attempt]
    active = attempt > 0 and not is_terminal(previous)
    edits_refused: list[validation.FieldError] = []
    if active:
        run, invalid, edits_refused = _keep_stored_spec(kube, body, run, invalid, previous)
    served = None
    if run is not None and previous.get("phase") == "Succeeded":
        served = kube.read("Deployment", ns, ChildNames(name).serve)
        served = served if served is not None and ownership.owned_by(served, uid) else None

    decision = compute_status(
        Observed(
            run=run,
            generation=int(meta.get("generation") or 0),
            invalid=invalid,
            attempt=attempt,
            pods=current,
            progress=read_progress(current, settings) if run is not None else None,
            now=now,
            previous=previous,
            suspended=bool(run is not None and run.spec.run_policy.suspend),
            deadline_exceeded=timing.deadline_exceeded(run, previous, now),
            serving=served,
            refused_changes=edits_refused,
        )
    )
    status, action = decision.status, decision.action
    new_attempt = int(status.get("attempts") or attempt)

    # Record first: the status carries the attempt number the pods below belong to, and
    # compute_status keeps asking for them until it has seen them, so a crash between the
    # two steps is repaired by the next reconcile.
    if status != previous:
        kube.patch_status(ns, name, status, previous)
    for event in decision.events:
        kube.event(body, event.type, event.reason, event.message)

    # Act. Pods already terminating are left alone, so a converged run makes no calls.
    live = [p for p in all_pods if not p["metadata"].get("deletionTimestamp")]
    for pod in live:
        if _attempt(pod) != new_attempt or action == "delete_pods":
            kube.delete("Pod", ns, pod["metadata"]["name"])
    if action == "retry":
        metrics.RETRIES.labels(cause="failure").inc()
    # A new attempt waits until the old attempt's pods are gone: the head Service selects
    # every attempt's head, so new workers could otherwise join a dying cluster. The status
    # says Retrying/Resuming until then, and a later reconcile creates the pods.
    leftovers = any(
        _attempt(p) != new_attempt or p["metadata"].get("deletionTimestamp") for p in all_pods
    )
    # ... and until its retry backoff (status.nextAttemptTime) has passed.
    create = action in ("create_cluster", "retry") and not leftovers and not decision.wait
    # Acknowledge first: a run seen for the first time gets its status in this pass and
    # its children in the next (at the back of the queue), so in a burst every new run
    # shows a status before any of them builds a cluster.
    acknowledge = create and not previous.get("phase")
    create = create and not acknowledge
    applied, conflict = False, None
    try:
        if create and run is not None:
            applied = True
            refused = _create_cluster(kube, run, uid, ns, new_attempt, settings)
            status = _record_refusal(kube, body, run, status, refused, now)
        if action == "finish":
            _clean_up_finished(kube, ns, [p for p in live if _attempt(p) == new_attempt])
        if decision.serve == "apply" and run is not None:
            applied = True
            model = status.get("model") or {}
            _apply_serving(kube, run, uid, ns, settings, served, model)
        elif decision.serve == "remove":
            _remove_serving(kube, ns, name, uid, settings)
    except ChildConflict as exc:
        conflict = exc
    if applied:
        record_conflict(kube, body, status, conflict, now)
    gpus = 0 if run is None else validation.total_gpus(run.spec)
    metrics.RUNS.set(uid, status.get("phase") or "Pending", gpus)
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    ttl = _ttl(kube, run, status, ns, name, now)
    if acknowledge:
        return 0.0  # straight back into the queue, behind the runs already waiting
    return decision.wait or ttl  # a backoff (active runs) or the TTL (finished ones)


def _apply_serving(
    kube: Kube,
    run: api.TrainingRun,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    deployment: dict[str, Any] | None,
    model: dict[str, Any],
) -> None:
    """Create-or-update every serving object; reads only once they are as built."""
    name = ChildNames(run.metadata.name or "").serve
    objs = serving.build_serving(run, uid, ns, settings, model.get("version"), model.get("uri"))
    # Autoscaling turned off: a left-over HPA would keep resizing the Deployment.
    hpa = ("HorizontalPodAutoscaler", ns, name, serving.HPA_API_VERSION)
    if run.spec.serve.autoscaling is None:
        delete_own(kube, uid, *hpa)
    for obj in objs:
        kind, version = obj["kind"], obj["apiVersion"]
        live = deployment if kind == "Deployment" else kube.read(kind, ns, name, version)
        applied = kube.ensure(obj, live)
        if kind == "Deployment" and run.spec.serve.retain:
            _keep_storage_with(kube, run, uid, ns, applied)


def _keep_storage_with(
    kube: Kube, run: api.TrainingRun, run_uid: str, ns: str, deployment: dict[str, Any]
) -> None:
    """A retained server outlives its run, and so must the operator-created PVC it reads:
    the Deployment becomes a second owner, so garbage collection keeps the claim until
    both are gone. A user's own claim (claimName) is left alone."""
    storage = run.spec.checkpoint.storage.pvc
    if storage is None or storage.claim_name:
        return
    claim = ChildNames(run.metadata.name or "").storage
    pvc = kube.read("PersistentVolumeClaim", ns, claim)
    if pvc is None or not ownership.owned_by(pvc, run_uid):
        return  # not the claim this run made
    uid = deployment["metadata"]["uid"]
    refs = list(pvc.get("metadata", {}).get("ownerReferences") or [])
    if any(ref.get("uid") == uid for ref in refs):
        return
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    kube.set_pvc_owners(ns, claim, [*refs, {**owner, "uid": uid}])


def _remove_serving(
    kube: Kube, ns: str, run_name: str, uid: str, settings: OperatorSettings
) -> None:
    """Delete the serving objects the run owns; the Deployment last, since its presence is
    what tells compute_status that something is left."""
    name = ChildNames(run_name).serve
    delete_own(kube, uid, "HorizontalPodAutoscaler", ns, name, serving.HPA_API_VERSION)
    delete_own(kube, uid, "PodDisruptionBudget", ns, name, settings.pdb_api_version)
    delete_own(kube, uid, "Service", ns, name)
    delete_own(kube, uid, "Deployment", ns, name)


def delete_own(
    kube: Kube, uid: str, kind: str, ns: str, name: str, api_version: str | None = None
) -> None:
    """Delete a child by name, only if it is there and the owner's (uid) own."""
    obj = kube.read(kind, ns, name, api_version)
    if obj is not None and ownership.owned_by(obj, uid):
        kube.delete(kind, ns, name, api_version)


def record_conflict(
    kube: Kube,
    body: dict[str, Any],
    status: dict[str, Any],
    conflict: ChildConflict | None,
    now: datetime,
    plural: str = api.PLURAL,
) -> None:
    """Set (or clear) the ChildConflict condition after the children of a run (or, by
    `plural`, a ModelService) were applied."""
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    recorded, events = ownership.record_conflict(status, conflict, generation, now)
    if conflict is not None:
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], conflict.message)
    if recorded != status:
        kube.patch_status(meta["namespace"], meta["name"], recorded, plural=plural)
    for event in events:
        kube.event(body, event.type, event.reason, event.message)


def _clean_up_finished(kube: Kube, ns: str, pods: list[dict[str, Any]]) -> None:
    """A finished run keeps only its head pod if it has terminated (its logs); workers and
    anything still running go."""
    for pod in pods:
        role = pod["metadata"].get("labels", {}).get(LABEL_ROLE)
        done = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        if role != ROLE_HEAD or not done:
            kube.delete("Pod", ns, pod["metadata"]["name"])


def _ttl(
    kube: Kube,
    run: api.TrainingRun | None,
    status: dict[str, Any],
    ns: str,
    name: str,
    now: datetime,
) -> float | None:
    """Seconds until a finished run's ttlSecondsAfterFinished passes; deletes the run once
    it has. (An active run's deadline needs no wake-up: active runs are resynced.)"""
    if not is_terminal(status):
        return None
    remaining = timing.ttl_remaining(run, status, now)
    if remaining is not None and remaining <= 0:
        log.info("deleting %s/%s: ttlSecondsAfterFinished passed", ns, name)
        kube.delete_run(ns, name)
        return None
    return remaining

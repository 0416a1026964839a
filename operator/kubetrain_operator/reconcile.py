"""One reconcile of one TrainingRun: observe, decide (pure), act, record.

1. Observe: parse and validate the spec; list the run's pods; read the head's progress,
   and, once the run has Succeeded, its serving Deployment.
2. Decide: `status.compute_status` turns the observation into the new status, one
   action (none, create_cluster, retry, delete_pods, finish) and what to do about serving
   (none, apply, remove).
3. Record: patch the status only when it changed, and post the decision's events.
4. Act: create (or adopt, on 409: deterministic names) the attempt's children, delete pods
   of other attempts, clean up finished runs, expire them after ttlSecondsAfterFinished.
   compute_status asks for an attempt's pods until it has seen them, so dying between 3
   and 4 is repaired by the next reconcile, and there is never a second set.
5. Serve: create-or-update the serving objects (serving.py) by input hash, or delete them.

Level-based: watch events on the run and its children, and a resync of runs not yet
finished (controller.py), call this, so a missed watch event only delays.
A converged run costs reads only (pods, the ConfigMap while active, the serving objects
while served), no writes.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import yaml

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from kubetrain_api.contract import LABEL_ATTEMPT, LABEL_ROLE, LABEL_RUN, PROGRESS_PATH, ROLE_HEAD
from kubetrain_api.reports import ProgressReport, lenient
from kubetrain_operator import builders, metrics, serving
from kubetrain_operator.k8s import Kube
from kubetrain_operator.names import ChildNames
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


def _stored_spec(kube: Kube, ns: str, name: str) -> api.TrainingRunSpec | None:
    """The spec the running cluster was built from (its ConfigMap), if any."""
    cm = kube.read_config_map(ns, ChildNames(name).config)
    text = ((cm or {}).get("data") or {}).get(builders.CONFIG_KEY)
    if not text:
        return None
    return api.TrainingRun.model_validate(yaml.safe_load(text)).spec


def _attempt(pod: dict[str, Any]) -> int:
    return int(pod["metadata"].get("labels", {}).get(LABEL_ATTEMPT, 0))


def read_progress(pods: list[dict[str, Any]], settings: OperatorSettings) -> ProgressReport | None:
    """The head's /progress (parsed leniently: bad values are dropped), or None when it
    cannot be reached (yet)."""
    heads = [p for p in pods if p["metadata"].get("labels", {}).get(LABEL_ROLE) == ROLE_HEAD]
    if not heads or heads[0].get("status", {}).get("phase") != "Running":
        return None
    host = settings.progress_host_override or heads[0]["status"].get("podIP")
    if not host:
        return None
    url = f"http://{host}:{settings.progress_port}{PROGRESS_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=settings.progress_timeout_seconds) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return lenient(ProgressReport, data) if isinstance(data, dict) else None


def _deadline_exceeded(
    run: api.TrainingRun | None, previous: dict[str, Any], now: datetime
) -> bool:
    if (
        run is None
        or not run.spec.run_policy.active_deadline_seconds
        or not previous.get("startTime")
    ):
        return False
    started = datetime.fromisoformat(previous["startTime"].replace("Z", "+00:00"))
    return now >= started + timedelta(seconds=run.spec.run_policy.active_deadline_seconds)


def _token(kube: Kube, ns: str, name: str) -> str:
    """The run's Ray token: generated once, then read back from its Secret."""
    secret = kube.read_secret(ns, ChildNames(name).ray_token)
    if secret and (secret.get("data") or {}).get("token"):
        return base64.b64decode(secret["data"]["token"]).decode()
    return secrets.token_urlsafe(32)


def _create_cluster(
    kube: Kube, run: api.TrainingRun, uid: str, ns: str, attempt: int, settings: OperatorSettings
) -> None:
    token = _token(kube, ns, run.metadata.name or "")
    for obj in builders.build_cluster(run, uid, ns, attempt, settings, token):
        kube.ensure(obj)


def reconcile(
    body: dict[str, Any],
    kube: Kube,
    settings: OperatorSettings,
    now: datetime | None = None,
) -> float | None:
    """Reconcile one run; returns seconds until it wants to be looked at again (TTL)."""
    started = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    meta = body["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    previous = dict(body.get("status") or {})
    run, invalid = _parse(body, settings)
    attempt = int(previous.get("attempts") or 0)

    # Ray pods only (they have a role): the run's serving pods are never this loop's.
    all_pods = kube.list_pods(ns, f"{LABEL_RUN}={name},{LABEL_ROLE}")
    current = [p for p in all_pods if _attempt(p) == attempt]
    active = attempt > 0 and not is_terminal(previous)
    if run is not None and active:
        stored = _stored_spec(kube, ns, name)
        if stored is not None:
            invalid = validation.immutable_changes(stored, run.spec)
            run = run if not invalid else None
    served = None
    if run is not None and previous.get("phase") == "Succeeded":
        served = kube.read("Deployment", ns, ChildNames(name).serve)

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
            deadline_exceeded=_deadline_exceeded(run, previous, now),
            serving=served,
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
    if action in ("create_cluster", "retry") and run is not None and not leftovers:
        _create_cluster(kube, run, uid, ns, new_attempt, settings)
    if action == "finish":
        _clean_up_finished(kube, ns, [p for p in live if _attempt(p) == new_attempt])
    if decision.serve == "apply" and run is not None:
        version = (status.get("model") or {}).get("version")
        _apply_serving(kube, run, uid, ns, settings, served, version)
    elif decision.serve == "remove":
        _remove_serving(kube, ns, name, settings)
    gpus = 0 if run is None else validation.total_gpus(run.spec)
    metrics.RUNS.set(uid, status.get("phase") or "Pending", gpus)
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    return _ttl(kube, run, status, ns, name, now)


def _apply_serving(
    kube: Kube,
    run: api.TrainingRun,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    deployment: dict[str, Any] | None,
    model_version: str | None,
) -> None:
    """Create-or-update every serving object; reads only once they are as built."""
    name = ChildNames(run.metadata.name or "").serve
    objs = serving.build_serving(run, uid, ns, settings, model_version)
    # Autoscaling turned off: a left-over HPA would keep resizing the Deployment.
    hpa = ("HorizontalPodAutoscaler", ns, name, serving.HPA_API_VERSION)
    if run.spec.serve.autoscaling is None and kube.read(*hpa):
        kube.delete(*hpa)
    for obj in objs:
        kind, version = obj["kind"], obj["apiVersion"]
        live = deployment if kind == "Deployment" else kube.read(kind, ns, name, version)
        applied = kube.ensure(obj, live)
        if kind == "Deployment" and run.spec.serve.retain:
            _keep_storage_with(kube, run, ns, applied)


def _keep_storage_with(
    kube: Kube, run: api.TrainingRun, ns: str, deployment: dict[str, Any]
) -> None:
    """A retained server outlives its run, and so must the operator-created PVC it reads:
    the Deployment becomes a second owner, so garbage collection keeps the claim until
    both are gone. A user's own claim (claimName) is left alone."""
    storage = run.spec.checkpoint.storage.pvc
    if storage is None or storage.claim_name:
        return
    claim = ChildNames(run.metadata.name or "").storage
    pvc = kube.read("PersistentVolumeClaim", ns, claim)
    uid = deployment["metadata"]["uid"]
    refs = list((pvc or {}).get("metadata", {}).get("ownerReferences") or [])
    if pvc is None or any(ref.get("uid") == uid for ref in refs):
        return
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    kube.set_pvc_owners(ns, claim, [*refs, {**owner, "uid": uid}])


def _remove_serving(kube: Kube, ns: str, run_name: str, settings: OperatorSettings) -> None:
    """Delete the serving objects; the Deployment last, since its presence is what tells
    compute_status that something is left."""
    name = ChildNames(run_name).serve
    kube.delete("HorizontalPodAutoscaler", ns, name, serving.HPA_API_VERSION)
    kube.delete("PodDisruptionBudget", ns, name, settings.pdb_api_version)
    kube.delete("Service", ns, name)
    kube.delete("Deployment", ns, name)


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
    if run is None or not is_terminal(status) or not status.get("completionTime"):
        return None
    ttl = run.spec.run_policy.ttl_seconds_after_finished
    if ttl is None:
        return None
    finished = datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
    remaining = (finished + timedelta(seconds=ttl) - now).total_seconds()
    if remaining <= 0:
        log.info("deleting %s/%s: ttlSecondsAfterFinished passed", ns, name)
        kube.delete_run(ns, name)
        return None
    return remaining

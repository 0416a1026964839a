"""One reconcile of one ModelService: observe, decide (pure), record, act.

1. Observe: parse and validate the spec; resolve every variant's model (a TrainingRun's
   exported model once it has Succeeded, or the variant's uri: sources.py); read the
   variants' and the router's Deployments; while an experiment is undecided, read the
   router's counts since it began (stats_client.py, bounded).
2. Decide: `status.compute_service_status` gives the new status, the traffic split and
   the events (an experiment's decision and what it moves).
3. Record: patch the status only when it changed; post the events.
4. Act: once every variant's model is known, create-or-update every child by input hash
   (build.py), the router's ConfigMap carrying the split (the router re-reads it, so
   traffic shifts without a restart); delete the children of variants no longer in the
   spec and an HPA whose autoscaling was turned off.

Only the service's own children are touched (ownership.py): a name held by another object
stops the service at that child with the ChildConflict condition. Deleting the
ModelService deletes its children (owner references).

Level-based like the runs' reconcile: watch events on the service, its children and the
TrainingRuns it serves call this; while an experiment waits for counts, or a variant for
its model, the controller looks again every resync_seconds.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from kubetrain_api import modelservice as ms
from kubetrain_api.modelservice_validation import parse_modelservice
from kubetrain_api.validation import FieldError, InvalidSpec
from kubetrain_operator import metrics, ownership
from kubetrain_operator.k8s import Kube
from kubetrain_operator.modelservice import build, evaluation, sources, stats_client
from kubetrain_operator.modelservice.status import (
    DECIDED,
    ObservedService,
    compute_service_status,
)
from kubetrain_operator.ownership import ChildConflict
from kubetrain_operator.reconcile import delete_own, record_conflict
from kubetrain_operator.settings import OperatorSettings

log = logging.getLogger("kubetrain.modelservice")

# Per variant, in the order they are deleted when the variant leaves the spec (the
# Deployment last: its presence is what the status reads).
VARIANT_KINDS = ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Deployment")


def _parse(
    body: dict[str, Any], settings: OperatorSettings
) -> tuple[ms.ModelService | None, list[FieldError]]:
    doc = {k: body.get(k) for k in ("apiVersion", "kind", "spec")}
    doc["metadata"] = {k: body["metadata"].get(k) for k in ("name", "namespace")}
    try:
        return parse_modelservice(doc, settings.limits), []
    except InvalidSpec as exc:
        return None, exc.errors


def _own(obj: dict[str, Any] | None, uid: str) -> dict[str, Any] | None:
    return obj if obj is not None and ownership.owned_by(obj, uid) else None


def _experiment_start(previous: dict[str, Any], spec: ms.ExperimentSpec) -> datetime | None:
    """When the running (undecided) experiment began, if it is this spec's."""
    old = previous.get("experiment") or {}
    same = (old.get("control"), old.get("treatment")) == (spec.control, spec.treatment)
    if not same or old.get("decision") in DECIDED or not old.get("startTime"):
        return None
    return datetime.fromisoformat(str(old["startTime"]).replace("Z", "+00:00"))


def _resolve(
    kube: Kube, service: ms.ModelService, ns: str, settings: OperatorSettings
) -> dict[str, sources.Resolution]:
    resolutions: dict[str, sources.Resolution] = {}
    for variant in service.spec.variants:
        run_name = variant.source.training_run
        if run_name is not None:
            run = kube.read_run(ns, run_name)
            resolutions[variant.name] = sources.from_training_run(variant, run, settings)
        else:
            resolutions[variant.name] = sources.from_uri(variant, service.spec)
    return resolutions


def reconcile_service(
    body: dict[str, Any], kube: Kube, settings: OperatorSettings, now: datetime | None = None
) -> float | None:
    """Reconcile one ModelService; seconds until it wants another look, if ever."""
    now = now or datetime.now(timezone.utc)
    meta = body["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    previous = dict(body.get("status") or {})
    service, invalid = _parse(body, settings)

    resolutions: dict[str, sources.Resolution] = {}
    deployments: dict[str, Any] = {}
    router = None
    counts, problem = None, None
    if service is not None:
        resolutions = _resolve(kube, service, ns, settings)
        for variant in service.spec.variants:
            live = kube.read("Deployment", ns, ms.variant_name(name, variant.name))
            deployments[variant.name] = _own(live, uid)
        router = _own(kube.read("Deployment", ns, ms.router_name(name)), uid)
        experiment = service.spec.experiment
        start = None if experiment is None else _experiment_start(previous, experiment)
        if experiment is not None and start is not None and router is not None:
            slower = (
                experiment.latency_threshold_seconds
                if experiment.primary_metric == "latency"
                else None
            )
            counts, problem = stats_client.read_stats(name, ns, settings, start, slower)

    decision = compute_service_status(
        ObservedService(
            service=service,
            generation=int(meta.get("generation") or 0),
            now=now,
            previous=previous,
            invalid=invalid,
            resolutions=resolutions,
            deployments=deployments,
            router=router,
            stats=counts,
            stats_problem=problem,
            endpoint=build.endpoint_url(name, ns),
        )
    )
    status = decision.status
    # Continuous evaluation (evaluation.py): its Jobs, status.evaluation, Regressed.
    evaluated = evaluation.Step(None, [], None, [], None)
    if service is not None:
        since = evaluation.since_creation(body)
        evaluated = evaluation.step(
            kube, service, uid, ns, settings, resolutions, previous, now, since
        )
        generation = int(meta.get("generation") or 0)
        status = evaluation.record(status, service, evaluated, generation, now)
    if status != previous:
        kube.patch_status(ns, name, status, previous, plural=ms.PLURAL)
    for event in [*decision.events, *evaluated.events]:
        kube.event(body, event.type, event.reason, event.message)

    if service is not None and decision.weights is not None:
        models = {k: r.source for k, r in resolutions.items() if r.source is not None}
        conflict = None
        try:
            _remove_gone_variants(kube, service, uid, ns, previous, settings)
            _apply(kube, service, uid, ns, settings, models, decision.weights)
        except ChildConflict as exc:
            conflict = exc
        record_conflict(kube, body, status, conflict, now, plural=ms.PLURAL)
    metrics.SERVICES.observe(ns, name, ms.ModelServiceStatus.model_validate(status))
    waits = [evaluated.requeue] if evaluated.requeue is not None else []
    if decision.looking or decision.weights is None:
        waits.append(settings.resync_seconds)
    return min(waits) if waits else None


def _apply(
    kube: Kube,
    service: ms.ModelService,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    models: dict[str, sources.ModelSource],
    weights: dict[str, int],
) -> None:
    """Create-or-update every child; a converged service costs reads only."""
    children = build.build_children(service, uid, ns, settings, models, weights)
    for variant in service.spec.variants:
        if variant.autoscaling is None:  # a left-over HPA would keep resizing it
            name = ms.variant_name(service.metadata.name or "", variant.name)
            _delete_own(kube, uid, "HorizontalPodAutoscaler", ns, name, settings)
    for obj in children:
        meta = obj["metadata"]
        live = kube.read(obj["kind"], ns, meta["name"], obj["apiVersion"])
        kube.ensure(obj, live)


def _delete_own(
    kube: Kube, uid: str, kind: str, ns: str, name: str, settings: OperatorSettings
) -> None:
    version = {
        "HorizontalPodAutoscaler": settings.hpa_api_version,
        "PodDisruptionBudget": settings.pdb_api_version,
    }.get(kind)
    delete_own(kube, uid, kind, ns, name, version)


def _remove_gone_variants(
    kube: Kube,
    service: ms.ModelService,
    uid: str,
    ns: str,
    previous: dict[str, Any],
    settings: OperatorSettings,
) -> None:
    """Delete the children of variants the status knew and the spec no longer has."""
    wanted = {v.name for v in service.spec.variants}
    known = {v.get("name") for v in previous.get("variants") or []}
    for gone in sorted(n for n in known - wanted if isinstance(n, str)):
        name = ms.variant_name(service.metadata.name or "", gone)
        for kind in VARIANT_KINDS:
            _delete_own(kube, uid, kind, ns, name, settings)

"""One reconcile of one ModelService: observe, decide (pure), record, act.

1. Observe: parse and validate the spec; resolve every variant's model (a TrainingRun's
   exported model once it has Succeeded, or the variant's uri: sources.py); read the
   variants' and the router's Deployments; while an experiment is undecided, read the
   router's counts since it began (stats_client.py, bounded), else, when the service has
   spec.retraining or spec.evaluation, over the drift window (drift.py).
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

from pydantic import ValidationError

from kubetrain_api import modelservice as ms
from kubetrain_api.contract import ANNOTATION_MODEL_VERSION
from kubetrain_api.modelservice_validation import parse_modelservice
from kubetrain_api.reports import wire
from kubetrain_api.validation import FieldError, InvalidSpec
from kubetrain_operator import metrics, ownership
from kubetrain_operator.k8s import Kube
from kubetrain_operator.modelservice import (
    build,
    drift,
    evaluation,
    retraining,
    sources,
    stats_client,
)
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

    # The retraining loop first: it decides which models the service serves.
    plan = None
    prior = previous
    if service is not None and service.spec.retraining is not None:
        plan = _retrain(kube, service, body, settings, previous, now)
        service = retraining.effective_spec(
            service, plan.status, plan.champion_ready, plan.challenger_ready
        )
        if plan.new_experiment:  # the old numbers compared other models
            prior = {k: v for k, v in previous.items() if k != "experiment"}

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
        start = None if experiment is None else _experiment_start(prior, experiment)
        if experiment is not None and start is not None and router is not None:
            slower = (
                experiment.latency_threshold_seconds
                if experiment.primary_metric == "latency"
                else None
            )
            counts, problem = stats_client.read_stats(name, ns, settings, start, slower)
        elif router is not None and drift.wants_stats(service.spec):  # for the drift alone
            since = drift.window_start(now)
            counts, problem = stats_client.read_stats(name, ns, settings, since)

    decision = compute_service_status(
        ObservedService(
            service=service,
            generation=int(meta.get("generation") or 0),
            now=now,
            previous=prior,
            invalid=invalid,
            resolutions=resolutions,
            deployments=deployments,
            router=router,
            stats=counts,
            stats_problem=problem,
            endpoint=build.endpoint_url(name, ns),
            regressed_treatment=_regressed_treatment(service, previous),
        )
    )
    status = decision.status
    # Continuous evaluation (evaluation.py): its Jobs, status.evaluation, Regressed.
    evaluated = evaluation.Step(None, [], None, [], None)
    if service is not None:
        created_at = evaluation.since_creation(body)
        evaluated = evaluation.step(
            kube, service, uid, ns, settings, resolutions, previous, now, created_at
        )
        generation = int(meta.get("generation") or 0)
        status = evaluation.record(status, service, evaluated, generation, now)
    if plan is not None:
        last = previous.get("experiment") or {}
        if (
            service is not None
            and service.spec.experiment is None
            and last.get("decision") in DECIDED
        ):
            # No challenger under test: the last experiment's result stays on show.
            status["experiment"] = last
        status["retraining"] = wire(plan.status)
        champion = plan.status.champion
        if champion is not None and champion.generation is not None:
            status["generation"] = champion.generation
    if status != previous:
        kube.patch_status(ns, name, status, previous, plural=ms.PLURAL)
    retrained = plan.events if plan is not None else []
    for event in [*decision.events, *evaluated.events, *retrained]:
        kube.event(body, event.type, event.reason, event.message)
    if plan is not None and service is not None:
        _act(kube, service, uid, ns, settings, plan)

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
    if plan is not None:
        # The loop looks at the router's feedback and its runs as often as an experiment.
        waits.append(settings.resync_seconds)
    elif service is not None and drift.wants_stats(service.spec):
        waits.append(max(settings.resync_seconds, drift.LOOK_SECONDS))  # drift read again
    return min(waits) if waits else None


def _previous_evaluation(previous: dict[str, Any]) -> ms.ServiceEvaluationStatus:
    try:
        return ms.ServiceEvaluationStatus.model_validate(previous.get("evaluation") or {})
    except ValidationError:
        return ms.ServiceEvaluationStatus()


def _regressed_treatment(service: ms.ModelService | None, previous: dict[str, Any]) -> str | None:
    """Why the experiment's treatment must roll back on its continuous evaluation, if so."""
    if service is None or service.spec.evaluation is None:
        return None
    shown = _previous_evaluation(previous)
    target = evaluation.rollback_target(service, shown.regressed)
    if target is None:
        return None
    return f"{target}: {evaluation.regression_message(service.spec.evaluation, shown)}"


def _previous_retraining(previous: dict[str, Any]) -> ms.RetrainingStatus:
    try:
        return ms.RetrainingStatus.model_validate(previous.get("retraining") or {})
    except ValidationError:
        log.warning("status.retraining is unreadable; starting it afresh")
        return ms.RetrainingStatus()


def _retrain(
    kube: Kube,
    service: ms.ModelService,
    body: dict[str, Any],
    settings: OperatorSettings,
    previous: dict[str, Any],
    now: datetime,
) -> retraining.RetrainingPlan:
    """Observe what the retraining loop needs and take its step (pure)."""
    meta = body["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    before = _previous_retraining(previous)
    serving = retraining.effective_spec(service, before)
    champion_name = next(v.name for v in serving.spec.variants if v.name == _champion(service))
    champion = _resolve(kube, serving, ns, settings)[champion_name]
    spec = service.spec.retraining
    assert spec is not None
    new_feedback, router_weights = None, None
    created = datetime.fromisoformat(str(meta["creationTimestamp"]).replace("Z", "+00:00"))
    if _own(kube.read("Deployment", ns, ms.router_name(name)), uid) is not None:
        stats, _ = stats_client.read_stats(name, ns, settings, before.last_run_time or created)
        if stats is not None:
            new_feedback = retraining.feedback_counted(stats)
            router_weights = stats.weights
    live = _own(kube.read("Deployment", ns, ms.variant_name(name, champion_name)), uid)
    slot = _own(kube.read("Deployment", ns, ms.variant_name(name, spec.challenger.name)), uid)
    export_jobs: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for run in before.runs:
        runs[run.name] = _own(kube.read_run(ns, run.name), uid)
        if run.outcome == "Exporting":
            job_name = retraining.export_job_name(name, run.name)
            export_jobs[run.name] = _job_with_message(kube, uid, ns, job_name)
    first = next(v for v in service.spec.variants if v.name == champion_name)
    if first.source.training_run and first.source.training_run not in runs:
        runs[first.source.training_run] = kube.read_run(ns, first.source.training_run)
    source = champion.source
    return retraining.step(
        retraining.RetrainingView(
            service=service,
            uid=uid,
            now=now,
            created=created,
            previous=before,
            experiment=previous.get("experiment") or {},
            champion_model=source,
            champion_version=source.version if source is not None else None,
            new_feedback=new_feedback,
            champion_ready=_serves(
                live, before.champion.model_version if before.champion else None
            ),
            challenger_ready=_serves(
                slot, before.challenger.model_version if before.challenger else None
            ),
            router_weights=router_weights,
            champion_drift=drift.unigram_jsd_of(previous, champion_name),
            champion_metric=_champion_metric(service, previous, champion_name),
            export_jobs=export_jobs,
            runs=runs,
        )
    )


def _serves(deployment: dict[str, Any] | None, version: str | None) -> bool:
    """Every replica of the Deployment is updated, ready and on model `version`."""
    if deployment is None or version is None:
        return False
    template = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    status = deployment.get("status") or {}
    current = status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
    replicas = status.get("replicas", 0)
    return (
        template.get(ANNOTATION_MODEL_VERSION) == version
        and current
        and replicas >= 1
        and status.get("updatedReplicas", 0) == replicas
        and status.get("readyReplicas", 0) == replicas
    )


def _champion_metric(
    service: ms.ModelService, previous: dict[str, Any], champion: str
) -> float | None:
    """The champion's latest continuous-evaluation value of the metricBelow trigger's
    metric."""
    spec = service.spec.retraining
    if spec is None or spec.triggers.metric_below is None:
        return None
    results = _previous_evaluation(previous).results
    return evaluation.latest_value(results, champion, spec.triggers.metric_below.metric)


def _champion(service: ms.ModelService) -> str | None:
    from kubetrain_api.modelservice_validation import champion_variant

    return champion_variant(service.spec)


def _job_with_message(kube: Kube, uid: str, ns: str, name: str) -> dict[str, Any] | None:
    """The Job as stored, with its pod's termination message once it finished."""
    job = _own(kube.read("Job", ns, name), uid)
    if job is None:
        return None
    job = dict(job)
    if (job.get("status") or {}).get("succeeded"):
        for pod in kube.list_pods(ns, f"job-name={name}"):
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated") or {}
                if terminated.get("exitCode") == 0 and terminated.get("message"):
                    job["message"] = terminated["message"]
    return job


def _act(
    kube: Kube,
    service: ms.ModelService,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    plan: retraining.RetrainingPlan,
) -> None:
    for action in plan.actions:
        if isinstance(action, retraining.CreateExportJob):
            kube.ensure(retraining.build_export_job(service, uid, ns, action.run, settings))
        elif isinstance(action, retraining.CreateRun):
            kube.ensure(action.body)
        else:
            delete_own(kube, uid, action.kind, ns, action.name)


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

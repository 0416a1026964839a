"""The retraining loop of a ModelService (spec.retraining), as one pure step plus its
builders. The reconciler observes (the router's feedback count, the jobs and runs this loop
made), calls `step`, records the new status.retraining and carries out the actions.

One retraining run goes through these outcomes (status.retraining.runs[].outcome):

1. `Exporting`: a trigger fired (retraining/triggers.py: schedule, new feedback, a
   continuous-evaluation metric, drift; cooldown and concurrency policy as a CronJob's).
   A Job runs `kubetrain feedback export` against the router's store and writes a data
   set snapshot to spec.retraining.feedback.destination; its termination message names it.
2. `Training`: the TrainingRun `<service>-retrain-<n>` is created from the template, its
   model the champion's (training goes on from it: the new model's lineage names it as
   parent) and its data the template's sources plus the snapshot's SFT examples.
3. `Challenging`: the run succeeded and passed its gate: its model joins the service as
   the challenger variant with trafficPercent of the traffic, and a new experiment
   (spec.experiment, or the defaults) compares it with the champion.
4. `Promoted` (the challenger won: it becomes the champion, served by the champion
   variant at 100%), `RolledBack` (it lost), `Failed` (export, training or gate) or
   `Replaced` (concurrencyPolicy Replace started a newer one).

The champion and challenger live in status, not spec: the spec says what to start from
and how to retrain, the status which model won (as a Rollout's stable ReplicaSet).
`effective_spec` folds them into the spec the rest of the reconcile builds from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from kubetrain_api import contract, routing
from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api.modelservice_validation import champion_variant
from kubetrain_api.reports import wire
from kubetrain_operator import pods
from kubetrain_operator.builders import with_input_hash
from kubetrain_operator.modelservice import build
from kubetrain_operator.modelservice.sources import ModelSource
from kubetrain_operator.retraining import triggers
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import Event

Obj = dict[str, Any]
ACTIVE = ("Exporting", "Training", "Challenging")
EXPORT_CONTAINER = "export"
SNAPSHOTS_VOLUME = "snapshots"
SNAPSHOTS_MOUNT = "/snapshots"
TERMINATION_LOG = "/dev/termination-log"
EXPORT_DEADLINE_SECONDS = 900
FEEDBACK_SOURCE = "feedback"
"""Name of the snapshot's entry in the retraining run's data sources."""
EXPORT_TTL_SECONDS = 3600
"""Finished export Jobs linger this long (their message is read by then) and go."""


# --------------------------------------------------------------------------------------
# The spec the rest of the reconcile builds from
# --------------------------------------------------------------------------------------


def effective_spec(
    service: ms.ModelService,
    status: ms.RetrainingStatus | None,
    champion_ready: bool = True,
    challenger_ready: bool = True,
) -> ms.ModelService:
    """The service as served now: the champion variant serving the latest winner, and the
    challenger slot beside it: while a challenger is tested, with its share of the traffic
    and an experiment against the champion; once decided, as `retiring` with no traffic
    (after a promotion it keeps all of it until the champion variant serves the new model:
    `champion_ready`), until the router has let go of it. A joining challenger gets its
    share once its engines are ready (`challenger_ready`): the router would otherwise send
    users to a Service with no endpoints. Without spec.retraining: the service as
    written."""
    retraining = service.spec.retraining
    champion_name = champion_variant(service.spec)
    if retraining is None or champion_name is None or status is None:
        return service
    spec = service.spec.model_copy(deep=True)
    variants = {v.name: v for v in spec.variants}
    champion = variants[champion_name]
    if status.champion is not None and status.champion.training_run:
        champion.source = ms.VariantSource(training_run=status.champion.training_run)
    base = ms.weights(service.spec)[champion_name]
    slot = status.challenger or status.retiring
    experiment = None  # nothing to compare unless a challenger is under test
    if slot is not None and slot.training_run:
        if status.challenger is not None:
            share = min(retraining.challenger.traffic_percent, base) if challenger_ready else 0
            experiment = spec.experiment or ms.ExperimentSpec(
                control=champion_name, treatment=retraining.challenger.name
            )
        else:
            promoted = status.champion is not None and status.champion == status.retiring
            share = base if promoted and not champion_ready else 0
        challenger = champion.model_copy(
            deep=True,
            update={
                "name": retraining.challenger.name,
                "source": ms.VariantSource(training_run=slot.training_run),
                "weight": share,
                "autoscaling": None,
                "replicas": 1,
            },
        )
        if retraining.challenger.resources is not None:
            challenger.resources = retraining.challenger.resources
        champion.weight = base - share
        spec.variants.append(challenger)
    spec.experiment = experiment
    return service.model_copy(update={"spec": spec})


# --------------------------------------------------------------------------------------
# The pure step
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateExportJob:
    run: str
    """The retraining run the snapshot is for."""


@dataclass(frozen=True)
class CreateRun:
    body: Obj


@dataclass(frozen=True)
class Delete:
    kind: Literal["TrainingRun"]
    name: str


Action = CreateExportJob | CreateRun | Delete


@dataclass(frozen=True, kw_only=True)
class RetrainingView:
    """What the reconciler saw for the loop."""

    service: ms.ModelService
    uid: str
    now: datetime
    created: datetime
    """The ModelService's creation (schedules count from there before the first run)."""
    previous: ms.RetrainingStatus
    experiment: Mapping[str, Any] = field(default_factory=dict)
    """status.experiment as last recorded."""
    champion_model: ModelSource | None = None
    """The champion variant's resolved model (None while unknown)."""
    champion_version: str | None = None
    new_feedback: int | None = None
    """Rated responses since the latest run (None: the router could not be read)."""
    champion_metric: float | None = None
    champion_drift: float | None = None
    champion_ready: bool = False
    """The champion variant's engines all serve the champion's model version."""
    challenger_ready: bool = False
    """The same for the challenger slot and the challenger's model version."""
    router_weights: Mapping[str, int] | None = None
    """The split the router says it applies now (its /stats); None: not read."""
    export_jobs: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    """Per active Exporting run: its export Job as stored, with `message` (the container's
    termination message) added when it finished."""
    runs: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    """Per run in status.retraining.runs: the TrainingRun as stored (None: gone)."""


@dataclass
class RetrainingPlan:
    status: ms.RetrainingStatus
    champion_ready: bool = True
    challenger_ready: bool = True
    """As observed (effective_spec's arguments)."""
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    new_experiment: bool = False
    """A challenger joined or left: the previous experiment's numbers no longer apply."""
    requeue: float | None = None
    """Seconds until the schedule's next time, when it is the next thing to happen."""


def export_job_name(service: str, run: str) -> str:
    """The export Job of retraining run `<service>-retrain-<n>`: `<service>-feedback-<n>`."""
    return f"{ms.feedback_job_prefix(service)}-{run.rsplit('-', 1)[-1]}"


def _served(run: str, body: Mapping[str, Any]) -> ms.ServedModel:
    model = (body.get("status") or {}).get("model") or {}
    return ms.ServedModel(
        training_run=run,
        model_uri=model.get("uri"),
        model_version=model.get("version"),
        generation=model.get("generation"),
    )


def _run_problem(body: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    """(done, why it failed) of a retraining TrainingRun as stored."""
    if body is None:
        return True, "the TrainingRun was deleted"
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        return True, "the TrainingRun failed"
    if phase != "Succeeded":
        return False, None
    if ((status.get("evaluation") or {}).get("gate") or {}).get("passed") is False:
        failures = status["evaluation"]["gate"].get("failures") or []
        return True, "it did not pass its gate: " + "; ".join(failures[:3])
    if not (status.get("model") or {}).get("uri"):
        return True, "it exported no model"
    return True, None


def _snapshot(message: Any) -> ms.FeedbackSnapshotStatus | None:
    """The export's termination message, strictly: None when it is not a snapshot."""
    if not isinstance(message, str) or len(message) > contract.TERMINATION_MESSAGE_LIMIT:
        return None
    try:
        return ms.FeedbackSnapshotStatus.model_validate(json.loads(message))
    except (ValueError, ValidationError, RecursionError):
        return None


def step(view: RetrainingView) -> RetrainingPlan:
    """Advance the loop one look; no I/O."""
    spec = view.service.spec.retraining
    assert spec is not None
    status = view.previous.model_copy(deep=True)
    if view.new_feedback is not None:
        status.new_feedback = view.new_feedback
    plan = RetrainingPlan(
        status, champion_ready=view.champion_ready, challenger_ready=view.challenger_ready
    )
    if status.champion is None and view.champion_model is not None:
        variant = champion_variant(view.service.spec)
        first = next(v for v in view.service.spec.variants if v.name == variant)
        status.champion = ms.ServedModel(
            training_run=first.source.training_run,
            model_uri=model_uri(view.champion_model),
            model_version=view.champion_version,
            generation=_generation(view.runs.get(first.source.training_run or "")),
        )
    _retire(view, plan)
    active = next((r for r in reversed(status.runs) if r.outcome in ACTIVE), None)
    if active is not None:
        _advance(view, plan, active)
    active = next((r for r in reversed(status.runs) if r.outcome in ACTIVE), None)
    _maybe_start(view, plan, active)
    _history(view, plan)
    return plan


def _retire(view: RetrainingView, plan: RetrainingPlan) -> None:
    """Let the decided challenger go once nothing routes to it (its objects then go with
    the variant): after a promotion, the champion variant must serve the new model first;
    and the router must apply a split without it, or its users would get errors."""
    spec = view.service.spec.retraining
    assert spec is not None
    status = plan.status
    if status.retiring is None:
        return
    promoted = status.champion is not None and status.champion == status.retiring
    if promoted and not view.champion_ready:
        return
    weights = view.router_weights
    if weights is None or weights.get(spec.challenger.name, 0) != 0:
        return
    status.retiring = None


def _generation(body: Mapping[str, Any] | None) -> int | None:
    if body is None:
        return None
    value = ((body.get("status") or {}).get("model") or {}).get("generation")
    return value if isinstance(value, int) and value >= 1 else None


def _advance(view: RetrainingView, plan: RetrainingPlan, run: ms.RetrainingRunStatus) -> None:
    spec = view.service.spec.retraining
    assert spec is not None
    status = plan.status
    if run.outcome == "Exporting":
        job = view.export_jobs.get(run.name)
        if job is None:
            plan.actions.append(CreateExportJob(run.name))
            return
        job_status = job.get("status") or {}
        if job_status.get("succeeded"):
            snapshot = _snapshot(job.get("message"))
            if snapshot is None:
                _fail(plan, run, "the feedback export wrote no snapshot (no feedback yet?)")
                return
            if view.champion_model is None:
                return  # the champion's model is not resolved yet: wait for it
            run.snapshot = snapshot
            run.outcome = "Training"
            plan.actions.append(CreateRun(build_run(view, run.name, snapshot)))
            plan.events.append(
                Event(
                    "Normal",
                    "RetrainingStarted",
                    f"TrainingRun {run.name} on snapshot {snapshot.id} ({snapshot.sft} SFT "
                    f"examples) from {status.champion.model_version if status.champion else '?'}",
                )
            )
        elif job_status.get("failed"):
            _fail(plan, run, "the feedback export Job failed (kubectl logs job/...)")
        return
    if run.outcome == "Training":
        done, problem = _run_problem(view.runs.get(run.name))
        if not done or (problem is None and status.retiring is not None):
            return  # training, or the slot is still held by the last challenger
        if problem is not None:
            _fail(plan, run, f"TrainingRun {run.name}: {problem}")
            return
        body = view.runs[run.name]
        assert body is not None
        status.challenger = _served(run.name, body)
        run.outcome = "Challenging"
        plan.new_experiment = True
        plan.events.append(
            Event(
                "Normal",
                "ChallengerJoined",
                f"{status.challenger.model_version} (TrainingRun {run.name}) serves as "
                f"{spec.challenger.name} with {spec.challenger.traffic_percent}% of the traffic",
            )
        )
        return
    # Challenging: the experiment decides.
    experiment = view.experiment
    if experiment.get("treatment") != spec.challenger.name:
        return
    began = _time(experiment.get("startTime"))
    if began is None or began < run.start_time:
        return  # an earlier challenger's experiment, still on show
    decision, winner = experiment.get("decision"), experiment.get("winner")
    if decision not in ("Promote", "Rollback") or not experiment.get("applied"):
        return
    challenger = status.challenger
    if decision == "Promote" and winner == spec.challenger.name and challenger is not None:
        status.champion = challenger
        run.outcome = "Promoted"
        run.message = str(experiment.get("reason") or "")[:1024] or None
        plan.events.append(
            Event(
                "Normal",
                "ChallengerPromoted",
                f"{challenger.model_version} (TrainingRun {run.name}, generation "
                f"{challenger.generation}) is the champion",
            )
        )
    else:
        run.outcome = "RolledBack"
        run.message = str(experiment.get("reason") or "")[:1024] or None
        plan.events.append(
            Event("Normal", "ChallengerRolledBack", f"TrainingRun {run.name} lost: {run.message}")
        )
    status.retiring, status.challenger = challenger, None
    plan.new_experiment = True


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _fail(plan: RetrainingPlan, run: ms.RetrainingRunStatus, message: str) -> None:
    run.outcome, run.message = "Failed", message[:1024]
    plan.events.append(Event("Warning", "RetrainingFailed", f"{run.name}: {message}"))


def _trigger_spec(spec: ms.RetrainingSpec) -> triggers.TriggerSpec:
    t = spec.triggers
    deadline = t.starting_deadline_seconds
    return triggers.TriggerSpec(
        schedule=t.schedule,
        starting_deadline=timedelta(seconds=deadline) if deadline else None,
        min_new_feedback=t.min_new_feedback,
        metric=t.metric_below.metric if t.metric_below else None,
        metric_below=t.metric_below.value if t.metric_below else None,
        drift_above=t.drift_above,
        cooldown=timedelta(seconds=t.cooldown_seconds),
    )


def _maybe_start(
    view: RetrainingView, plan: RetrainingPlan, active: ms.RetrainingRunStatus | None
) -> None:
    spec = view.service.spec.retraining
    assert spec is not None
    status = plan.status
    try:
        decision = triggers.decide(
            _trigger_spec(spec),
            last_run=status.last_run_time,
            since=view.created,
            now=view.now,
            seen=triggers.Observed(
                new_feedback=status.new_feedback or 0,
                metric=view.champion_metric,
                drift=view.champion_drift,
            ),
        )
    except triggers.InvalidTrigger as exc:
        plan.events.append(Event("Warning", "InvalidTrigger", str(exc)))
        return
    status.next_schedule_time = decision.next_check
    if decision.next_check is not None:
        plan.requeue = max(1.0, (decision.next_check - view.now).total_seconds())
    if not decision.start or spec.suspend or view.champion_model is None:
        return
    running = [active.name] if active is not None else []
    allowed = triggers.concurrency(spec.concurrency_policy, running)
    if not allowed.create:
        return
    for name in allowed.delete:
        old = next(r for r in status.runs if r.name == name)
        old.outcome, old.message = "Replaced", allowed.reason
        if status.challenger is not None and status.challenger.training_run == name:
            # Still serving: it retires first (the history limit deletes it later).
            status.retiring, status.challenger = status.challenger, None
            plan.new_experiment = True
        else:
            # Its export Job, if still there, finishes unread and goes with its TTL.
            plan.actions.append(Delete("TrainingRun", name))
    number = 1 + max((_number(r.name) for r in status.runs), default=0)
    name = ms.retraining_run_name(_name(view), number)
    status.runs.append(
        ms.RetrainingRunStatus(
            name=name,
            start_time=view.now,
            reasons=[r[: api.MAX_SHORT] for r in decision.reasons[:8]],
            outcome="Exporting",
        )
    )
    status.runs = status.runs[-ms.MAX_RETRAINING_RUNS :]
    status.last_run_time = view.now
    status.new_feedback = 0
    plan.actions.append(CreateExportJob(name))
    plan.events.append(
        Event("Normal", "RetrainingTriggered", f"{name}: {'; '.join(decision.reasons)}")
    )


def _number(run: str) -> int:
    tail = run.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _name(view: RetrainingView) -> str:
    return view.service.metadata.name or ""


def _history(view: RetrainingView, plan: RetrainingPlan) -> None:
    """Delete the finished runs beyond the history limits (never a serving model's)."""
    spec = view.service.spec.retraining
    assert spec is not None
    status = plan.status
    serving = {m.training_run for m in (status.champion, status.challenger, status.retiring) if m}
    outcome: dict[str, triggers.Outcome] = {
        "Promoted": "Succeeded",
        "RolledBack": "Succeeded",
        "Failed": "Failed",
        "Replaced": "Failed",
    }
    past = [
        triggers.PastRun(r.name, r.start_time, outcome.get(r.outcome or "", "Active"))
        for r in status.runs
        if view.runs.get(r.name) is not None
    ]
    limit = triggers.HistoryLimit(
        spec.successful_runs_history_limit,
        spec.failed_runs_history_limit,
        frozenset(n for n in serving if n),
    )
    for name in triggers.runs_to_delete(past, limit):
        plan.actions.append(Delete("TrainingRun", name))


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def model_uri(source: ModelSource) -> str:
    """A resolved model as a TrainingRun's model.source."""
    if source.claim is not None:
        return f"pvc://{source.claim}/{source.sub_path}".rstrip("/")
    return source.url or ""


def build_run(view: RetrainingView, name: str, snapshot: ms.FeedbackSnapshotStatus) -> Obj:
    """The retraining TrainingRun: the template, from the champion's model, on the
    template's data plus the snapshot's file for the template's method (SFT examples,
    preference pairs or labelled answers)."""
    spec = view.service.spec.retraining
    assert spec is not None
    assert view.champion_model is not None
    service = _name(view)
    run_spec = spec.template.spec.model_copy(deep=True)
    run_spec.model.source = model_uri(view.champion_model)
    run_spec.model.init = "pretrained"
    if view.champion_model.object_store_secret and run_spec.secrets.object_store is None:
        run_spec.secrets.object_store = api.SecretRef(name=view.champion_model.object_store_secret)
    sources = [s for s in run_spec.data.sources if s.name != FEEDBACK_SOURCE]
    # The snapshot's file the method learns from: corrections (SFT), pairs (dpo) or
    # thumbs up and down (kto).
    file, data_format = contract.SNAPSHOT_SOURCE_BY_METHOD[run_spec.method]
    sources.append(
        api.DataSource(
            name=FEEDBACK_SOURCE,
            uri=f"{snapshot_uri(spec, snapshot)}/{file}",
            format=data_format,
            weight=spec.feedback.weight,
        )
    )
    run_spec.data.sources = sources
    labels = {**spec.template.labels, contract.LABEL_MODELSERVICE: service}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": name,
            "namespace": view.service.metadata.namespace,
            "labels": labels,
            "annotations": {contract.ANNOTATION_SERVICE_UID: view.uid},
            # Deleting the service deletes its retraining runs (and so their models).
            "ownerReferences": [build.owner_reference(service, view.uid)],
        },
        "spec": wire(run_spec),
    }


def snapshot_uri(spec: ms.RetrainingSpec, snapshot: ms.FeedbackSnapshotStatus) -> str:
    """The snapshot folder as the run reads it: under the destination, by id."""
    return f"{spec.feedback.destination.rstrip('/')}/{snapshot.id}"


def build_export_job(
    service: ms.ModelService, uid: str, ns: str, run: str, settings: OperatorSettings
) -> Obj:
    """Job `<service>-feedback-<n>`: `kubetrain feedback export` from the router's store to
    the snapshots destination; its termination message is the snapshot's summary."""
    spec = service.spec.retraining
    assert spec is not None
    name = _name_of(service)
    destination = spec.feedback.destination
    env: list[Obj] = [{"name": "HOME", "value": "/tmp"}, build.store_env(service)]
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[Obj] = [{"name": "tmp", "emptyDir": {}}]
    claim = build.router_claim_name(service)
    if claim is not None:  # SQLite: the router's claim (on the router's node, for RWO)
        mounts.append({"name": build.ROUTER_DATA_VOLUME, "mountPath": build.ROUTER_DATA_DIR})
        volumes.append(
            {"name": build.ROUTER_DATA_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
        )
    scheme, _, rest = destination.partition("://")
    if scheme == "pvc":
        dest_claim, _, path = rest.partition("/")
        out = f"{SNAPSHOTS_MOUNT}/{path}".rstrip("/")
        mounts.append({"name": SNAPSHOTS_VOLUME, "mountPath": SNAPSHOTS_MOUNT})
        volumes.append(
            {"name": SNAPSHOTS_VOLUME, "persistentVolumeClaim": {"claimName": dest_claim}}
        )
    else:
        out = destination
    env_from = []
    secret = service.spec.secrets.object_store
    if scheme != "pvc" and secret is not None:
        env_from.append({"secretRef": {"name": secret.name}})
    container = pods.image_container(
        build.service_image(service, settings),
        service.spec.image_pull_policy,
        name=EXPORT_CONTAINER,
        command=[
            "kubetrain",
            "feedback",
            "export",
            "--out",
            out,
            "--result-file",
            TERMINATION_LOG,
        ],
        env=env,
        resources=pods.resources(spec.feedback.resources.cpu, spec.feedback.resources.memory),
        volumeMounts=mounts,
        terminationMessagePath=TERMINATION_LOG,
        terminationMessagePolicy="File",
    )
    if env_from:
        container["envFrom"] = env_from
    pod_spec = pods.restricted_pod_spec([container], volumes, service.spec.image_pull_secrets)
    pod_spec["restartPolicy"] = "Never"
    if claim is not None:
        # A ReadWriteOnce claim is usable on one node only: beside the router's pod.
        pod_spec["affinity"] = {
            "podAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {
                            "matchLabels": build.selector(name, build.COMPONENT_ROUTER)
                        },
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    component = "feedback-export"
    return with_input_hash(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": export_job_name(name, run),
                "namespace": ns,
                "labels": build.labels(name, component),
                "annotations": {contract.ANNOTATION_SERVICE_UID: uid},
                "ownerReferences": [build.owner_reference(name, uid)],
            },
            "spec": {
                "backoffLimit": 1,
                "activeDeadlineSeconds": EXPORT_DEADLINE_SECONDS,
                "ttlSecondsAfterFinished": EXPORT_TTL_SECONDS,
                "template": {
                    "metadata": {"labels": build.labels(name, component)},
                    "spec": pod_spec,
                },
            },
        }
    )


def _name_of(service: ms.ModelService) -> str:
    if not service.metadata.name:
        raise ValueError("the ModelService has no metadata.name (parse rejects such services)")
    return service.metadata.name


def feedback_counted(stats: routing.RouterStats) -> int:
    """Rated responses in the router's counts (every variant)."""
    return sum(v.n for v in stats.variants.values())

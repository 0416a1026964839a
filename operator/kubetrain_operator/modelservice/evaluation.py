"""Continuous evaluation of a ModelService's served models (spec.evaluation).

On the spec's cron schedule (UTC; a time missed while the operator was away runs once, as
a CronJob's), and once for every model version a variant starts serving (its baseline),
the operator starts one Job per variant: the trainer image's
`python -m kubetrain_trainer.evaluate_service` on the variant's model, scoring it with the
code training evaluates with. The Job writes `{"metrics": {...}}` to its termination
message; the operator reads it back (strictly, bounded), keeps the newest results in
status.evaluation (a variant-and-version's first result, its baseline, is kept while that
version has results), and calls a variant regressed when its latest result for
`regression.metric` is worse than its baseline by more than `maxDrop`.

Everything but `step` is pure: the schedule (`due`), the Job (`build_job`), reading a
finished Job (`read_result`), the bounded history (`merge`) and the regressions
(`regressions`). `step` reads and creates the Jobs and returns the new
status.evaluation; the reconciler records it with the Regressed condition.

The Job's pod is the restricted pod of every kubetrain pod: the model is read where the
engine reads it (a claim mounted read-only at `<contract.PVC_ROOT>/<claim>`, a URL
downloaded into /tmp by the evaluator), as are `pvc://` data sets; backoffLimit 0 (a
failed evaluation is a result with an error, the next schedule tries again),
activeDeadlineSeconds from the spec, and a TTL so finished Jobs clean themselves up.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetrain_api import contract
from kubetrain_api import modelservice as ms
from kubetrain_api.contract import (
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_SERVICE_UID,
    LABEL_VARIANT,
)
from kubetrain_api.reports import clip, wire
from kubetrain_api.v1alpha1 import MAX_SHORT
from kubetrain_operator import builders, claims, ownership, pods
from kubetrain_operator.builders import Obj, with_input_hash
from kubetrain_operator.conditions import set_condition
from kubetrain_operator.k8s import Kube
from kubetrain_operator.modelservice import build
from kubetrain_operator.modelservice.sources import ModelSource, Resolution
from kubetrain_operator.retraining.triggers import schedule_times
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import EVENT_MESSAGE_LIMIT, Event

COMPONENT_EVALUATION = "evaluation"
CONTAINER = "evaluate"
MODULE = "kubetrain_trainer.evaluate_service"
JOB_API_VERSION = "batch/v1"
TTL_SECONDS = 24 * 3600
"""Finished Jobs stay a day (their result is read within a resync; the pod's log helps)."""
MAX_ACTIVE = 16
"""status.evaluation.active holds at most this many Jobs; more wait for the next look."""
MAX_PINNED = ms.MAX_EVALUATIONS // 2
"""Baselines kept among the results, at most (the rest are the newest results)."""
ERROR_LIMIT = 1024
LOWER_IS_BETTER = ("loss", "perplexity")
HF_SCHEME = "hf://"
REGRESSED = "Regressed"


# --------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    run: datetime | None
    """The schedule time to evaluate for now (the latest one missed), or None."""
    next: datetime
    """The schedule's first time after now."""


def due(
    spec: ms.ServiceEvaluationSpec,
    previous: ms.ServiceEvaluationStatus | None,
    now: datetime,
    since: datetime | None = None,
) -> Due:
    """Whether a schedule time passed since the last one evaluations were started for
    (or since `since`, the service's creation, before the first; or now, without one).
    Several missed times run once: for the latest."""
    last = previous.last_schedule_time if previous is not None else None
    after = last or since or now
    run, _, following = schedule_times(spec.schedule, after, now)
    return Due(run, following)


# --------------------------------------------------------------------------------------
# the Job
# --------------------------------------------------------------------------------------


def job_name(service: str, variant: str, scheduled: datetime) -> str:
    """`<service>-eval-<variant>-<unix minutes>`, cut to a DNS label (a hash of the
    variant keeps cut names apart)."""
    suffix = f"-{int(scheduled.timestamp() // 60)}"
    base = f"{ms.evaluation_job_prefix(service)}-{variant}"
    if len(base) + len(suffix) > ms.MAX_DNS_LABEL:
        digest = hashlib.sha256(variant.encode()).hexdigest()[:8]
        base = f"{base[: ms.MAX_DNS_LABEL - len(suffix) - len(digest) - 1]}-{digest}"
    return base + suffix


def _model_arg(source: ModelSource) -> str:
    if source.claim is not None:
        path = source.sub_path.strip("/")
        return f"pvc://{source.claim}/{path}" if path else f"pvc://{source.claim}"
    if source.url is None:
        raise ValueError("the model source has neither a claim nor a url")
    return source.url


def _claim_volumes(claim_names: Iterable[str]) -> tuple[list[Obj], list[Obj]]:
    """Every claim read-only, where the evaluator maps `pvc://CLAIM/...` (claims.py)."""
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    for claim in dict.fromkeys(claim_names):
        name = claims.volume_name(claim)
        volumes.append(
            {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": name, "mountPath": claims.mount_path(claim), "readOnly": True})
    return volumes, mounts


def build_job(
    service: ms.ModelService,
    uid: str,
    ns: str,
    variant: str,
    source: ModelSource,
    settings: OperatorSettings,
    scheduled: datetime,
) -> Obj:
    """The evaluation Job of one variant's model for one schedule time."""
    spec = service.spec.evaluation
    if spec is None:
        raise ValueError("the ModelService has no spec.evaluation")
    name = service.metadata.name or ""
    model = _model_arg(source)
    uris = [model, *(ds.uri for ds in spec.datasets), *([spec.held_out] if spec.held_out else [])]
    volumes, mounts = _claim_volumes(c for u in uris if (c := contract.pvc_claim(u)))
    env: list[Obj] = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        {"name": contract.EVALUATION_SPEC_ENV, "value": json.dumps(wire(spec))},
    ]
    token = service.spec.secrets.hugging_face_token
    if any(u.startswith(HF_SCHEME) for u in uris):
        if token is not None:
            ref = {"name": token.name, "key": token.key}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    else:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    secrets = [source.object_store_secret]
    if service.spec.secrets.object_store is not None:
        secrets.append(service.spec.secrets.object_store.name)
    env_from = [{"secretRef": {"name": s}} for s in dict.fromkeys(secrets) if s]
    container = pods.image_container(
        settings.image,
        service.spec.image_pull_policy,
        name=CONTAINER,
        command=["python3", "-m", MODULE, "--model", model],
        args=["--result-file", builders.TERMINATION_LOG],
        env=env,
        resources=pods.resources(spec.resources.cpu, spec.resources.memory, spec.gpus),
        volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}, *mounts],
        terminationMessagePath=builders.TERMINATION_LOG,
        # A failure writes no result: its one-line error (the log's tail) is the message.
        terminationMessagePolicy="FallbackToLogsOnError",
    )
    if env_from:
        container["envFrom"] = env_from
    pod = pods.restricted_pod_spec(
        [container],
        [{"name": "tmp", "emptyDir": {}}, *volumes],
        service.spec.image_pull_secrets,
        restart_policy="Never",
    )
    labels = build.labels(name, COMPONENT_EVALUATION, variant)
    annotations = {ANNOTATION_SERVICE_UID: uid, ANNOTATION_MODEL_VERSION: source.version}
    return with_input_hash(
        {
            "apiVersion": JOB_API_VERSION,
            "kind": "Job",
            "metadata": {
                "name": job_name(name, variant, scheduled),
                "namespace": ns,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [build.owner_reference(name, uid)],
            },
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": spec.active_deadline_seconds,
                "ttlSecondsAfterFinished": TTL_SECONDS,
                "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
            },
        }
    )


# --------------------------------------------------------------------------------------
# reading a finished Job
# --------------------------------------------------------------------------------------


class _Message(BaseModel):
    """The evaluator's result (kubetrain_trainer.evaluate_service.render), read strictly:
    known metric names, finite numbers, nothing else."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    metrics: Annotated[dict[ms.MetricName, float], Field(max_length=64)]


def parse_message(text: str) -> dict[str, float]:
    """The metrics of a termination message; ValueError saying what is wrong with it."""
    if len(text.encode()) > contract.TERMINATION_MESSAGE_LIMIT:
        raise ValueError(f"a result of {len(text.encode())} bytes (more than the limit)")
    try:
        return dict(_Message.model_validate_json(text).metrics)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the message"
        raise ValueError(f"an unreadable result ({where}: {first['msg']})") from None


def _condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _terminated(pods_: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The evaluator container's terminated state in the Job's (newest) pod."""
    newest_first = sorted(
        pods_, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""), reverse=True
    )
    for pod in newest_first:
        for status in reversed((pod.get("status") or {}).get("containerStatuses") or []):
            state = (status.get("state") or {}).get("terminated")
            if status.get("name") == CONTAINER and state:
                return dict(state)
    return None


def read_result(
    job: Mapping[str, Any], pods_: Sequence[Mapping[str, Any]], now: datetime | None = None
) -> ms.EvaluationResult | None:
    """The result of a finished evaluation Job (None while it runs): its metrics, or why
    it failed (a failed Job, or a result that cannot be read)."""
    complete, failed = _condition(job, "Complete"), _condition(job, "Failed")
    status = job.get("status") or {}
    if complete is None and failed is None:
        if status.get("succeeded"):
            complete = {}
        elif status.get("failed"):
            failed = {}
        else:
            return None
    meta = job["metadata"]
    finished = (
        _time(status.get("completionTime"))
        or _time((complete or failed or {}).get("lastTransitionTime"))
        or now
        or datetime.now(timezone.utc)
    )
    result = ms.EvaluationResult(
        variant=(meta.get("labels") or {}).get(LABEL_VARIANT) or "unknown",
        model_version=(meta.get("annotations") or {}).get(ANNOTATION_MODEL_VERSION),
        time=finished,
        job=clip(str(meta["name"]), MAX_SHORT),
    )
    terminated = _terminated(pods_)
    raw = str((terminated or {}).get("message") or "")
    message = raw.strip()
    if failed is not None:
        why = ": ".join(str(p) for p in (failed.get("reason"), failed.get("message")) if p)
        if terminated is not None:
            code = terminated.get("exitCode")
            tail = message.splitlines()[-1] if message else ""
            why = "; ".join(p for p in (why, f"exit code {code}", tail) if p)
        result.error = clip(why or "the evaluation Job failed", ERROR_LIMIT)
        return result
    if not message:
        result.error = "the evaluation Job succeeded without a result"
        return result
    try:
        result.metrics = parse_message(raw)
    except ValueError as exc:
        result.error = clip(f"the evaluation Job wrote {exc}", ERROR_LIMIT)
    return result


# --------------------------------------------------------------------------------------
# history and regressions
# --------------------------------------------------------------------------------------


def _key(result: ms.EvaluationResult) -> tuple[str, str | None]:
    return result.variant, result.model_version


def _baselines(results: Iterable[ms.EvaluationResult]) -> dict[tuple[str, str | None], int]:
    """Index of each variant-and-version's first successful result."""
    out: dict[tuple[str, str | None], int] = {}
    for i, result in enumerate(results):
        if result.error is None:
            out.setdefault(_key(result), i)
    return out


def merge(
    previous: ms.ServiceEvaluationStatus | None, new: Sequence[ms.EvaluationResult]
) -> ms.ServiceEvaluationStatus:
    """`previous` with `new` results added, oldest first, the newest MAX_EVALUATIONS kept;
    the baseline of every variant-and-version among them stays too (in place of the
    oldest others), so regressions keep their reference."""
    old = previous or ms.ServiceEvaluationStatus()
    seen = {r.job for r in old.results if r.job}
    fresh = [r for r in new if r.job is None or r.job not in seen]
    everything = sorted([*old.results, *fresh], key=lambda r: r.time)
    limit = ms.MAX_EVALUATIONS
    newest = list(range(max(0, len(everything) - limit), len(everything)))
    base = _baselines(everything)
    pinned = {base[k] for k in {_key(everything[i]) for i in newest} if k in base}
    pinned = set(sorted(pinned - set(newest))[-MAX_PINNED:])
    keep = sorted(pinned | set(newest[len(pinned) :]))
    return old.model_copy(update={"results": [everything[i] for i in keep]})


def worse_by(metric: str, baseline: float, value: float) -> float:
    """How much worse `value` is than `baseline` (negative: better). Loss and perplexity
    are better lower; accuracy, precision, recall and F1 higher."""
    lower_better = metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER
    return value - baseline if lower_better else baseline - value


def regressions(
    spec: ms.ServiceEvaluationSpec,
    results: Sequence[ms.EvaluationResult],
    versions: Mapping[str, str] | None = None,
) -> list[str]:
    """Variants whose latest result for `regression.metric` is worse than the first result
    of the same variant and model version by more than `maxDrop`, in order of first
    appearance. With `versions` (variant -> the version it serves now), only those."""
    regression = spec.regression
    if regression is None:
        return []
    metric = regression.metric
    first: dict[tuple[str, str | None], float] = {}
    latest: dict[str, tuple[str | None, float]] = {}
    for result in results:
        value = result.metrics.get(metric)
        if result.error is not None or value is None or not math.isfinite(value):
            continue
        if versions is not None and versions.get(result.variant) != result.model_version:
            continue
        first.setdefault(_key(result), value)
        latest[result.variant] = (result.model_version, value)
    return [
        variant
        for variant, (version, value) in latest.items()
        if worse_by(metric, first[variant, version], value) > regression.max_drop
    ]


def latest_value(results: Sequence[ms.EvaluationResult], variant: str, metric: str) -> float | None:
    """The variant's latest successful value of `metric` (a retraining trigger's
    `metricBelow` reads the champion's), or None."""
    for result in reversed(results):
        if result.variant == variant and result.error is None and metric in result.metrics:
            return result.metrics[metric]
    return None


def rollback_target(service: ms.ModelService, regressed: Sequence[str]) -> str | None:
    """The experiment's treatment when it regressed and the spec says to roll back."""
    spec, experiment = service.spec.evaluation, service.spec.experiment
    if spec is None or spec.regression is None or experiment is None:
        return None
    if spec.regression.on_regression != "rollback":
        return None
    return experiment.treatment if experiment.treatment in regressed else None


def regression_message(spec: ms.ServiceEvaluationSpec, status: ms.ServiceEvaluationStatus) -> str:
    """For the Regressed condition: which variants, and by how much."""
    if spec.regression is None or not status.regressed:
        return "no variant regressed"
    metric = spec.regression.metric
    parts = []
    for variant in status.regressed:
        mine = [
            r
            for r in status.results
            if r.variant == variant and metric in r.metrics and not r.error
        ]
        latest = mine[-1]
        baseline = next(r for r in mine if r.model_version == latest.model_version)
        parts.append(
            f"{variant} ({latest.model_version}): {metric} {latest.metrics[metric]:.4g}, "
            f"baseline {baseline.metrics[metric]:.4g} (maxDrop {spec.regression.max_drop:g})"
        )
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# one look
# --------------------------------------------------------------------------------------


def _previous(previous_status: Mapping[str, Any]) -> ms.ServiceEvaluationStatus:
    try:
        return ms.ServiceEvaluationStatus.model_validate(previous_status.get("evaluation") or {})
    except ValidationError:  # another version's, unreadable: start over
        return ms.ServiceEvaluationStatus()


@dataclass
class Step:
    status: dict[str, Any] | None
    """The new status.evaluation (wire form); None without spec.evaluation."""
    events: list[Event]
    requeue: float | None
    """Seconds until the next look (a running Job, the next schedule time)."""
    regressed: list[str]
    rollback: str | None
    """The experiment's treatment to roll back (onRegression: rollback), if any."""


def step(
    kube: Kube,
    service: ms.ModelService,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    resolutions: Mapping[str, Resolution],
    previous_status: Mapping[str, Any],
    now: datetime,
    since: datetime | None = None,
) -> Step:
    """Read the running evaluation Jobs, start the due ones, and return the new
    status.evaluation with its events. `since`: the service's creation time."""
    spec = service.spec.evaluation
    old = _previous(previous_status)
    wanted = {v.name for v in service.spec.variants} if spec is not None else set()
    events: list[Event] = []
    results: list[ms.EvaluationResult] = []
    active: dict[str, str] = {}  # Job -> variant
    for name in old.active:
        job = kube.read("Job", ns, name, JOB_API_VERSION)
        if job is None or not ownership.owned_by(job, uid):
            continue  # deleted (by hand, or its TTL while the operator was away)
        variant = (job["metadata"].get("labels") or {}).get(LABEL_VARIANT, "")
        if variant not in wanted:  # its variant, or evaluation itself, left the spec
            kube.delete("Job", ns, name, JOB_API_VERSION)
            continue
        result = read_result(job, kube.list_pods(ns, f"job-name={name}"), now)
        if result is None:
            active[name] = variant
            continue
        results.append(result)
        if result.error is not None:
            events.append(Event("Warning", "EvaluationFailed", _event(result)))
        else:
            events.append(Event("Normal", "Evaluated", _event(result)))
    if spec is None:
        return Step(None, [], None, [], None)

    sources = {
        v.name: r.source
        for v in service.spec.variants
        if (r := resolutions.get(v.name)) is not None and r.source is not None
    }
    when = due(spec, old, now, since)
    starts: list[tuple[str, datetime]] = []
    if when.run is not None:
        starts += [(variant, when.run) for variant in sources]
    known = {_key(r) for r in [*old.results, *results]}
    running = set(active.values())
    minute = now.replace(second=0, microsecond=0)
    for variant, source in sources.items():
        # A model version's first evaluation (its baseline) runs as soon as it serves.
        scheduled = any(v == variant for v, _ in starts)
        if (variant, source.version) not in known and variant not in running and not scheduled:
            starts.append((variant, minute))
    for variant, at in starts:
        if len(active) >= MAX_ACTIVE:
            break
        job = build_job(service, uid, ns, variant, sources[variant], settings, at)
        name = job["metadata"]["name"]
        if name in active:
            continue
        if kube.read("Job", ns, name, JOB_API_VERSION) is None:
            kube.ensure(job)
            events.append(
                Event(
                    "Normal",
                    "EvaluationStarted",
                    f"evaluating {variant} ({sources[variant].version}): Job {name}",
                )
            )
        active[name] = variant

    merged = merge(old, results)
    versions = {variant: source.version for variant, source in sources.items()}
    regressed = regressions(spec, merged.results, versions)
    status = merged.model_copy(
        update={
            "last_schedule_time": when.run or old.last_schedule_time,
            "next_schedule_time": when.next,
            "active": list(active),
            "regressed": regressed,
        }
    )
    wait = max(1.0, (when.next - now).total_seconds())
    requeue = min(settings.resync_seconds, wait) if active else wait
    if set(regressed) - set(old.regressed):  # newly regressed: say so once
        message = clip(regression_message(spec, status), EVENT_MESSAGE_LIMIT)
        events.append(Event("Warning", REGRESSED, message))
    return Step(wire(status), events, requeue, regressed, rollback_target(service, regressed))


def _event(result: ms.EvaluationResult) -> str:
    head = f"{result.variant} ({result.model_version}), Job {result.job}"
    if result.error is not None:
        return clip(f"{head}: {result.error}", EVENT_MESSAGE_LIMIT)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in list(result.metrics.items())[:8])
    return clip(f"{head}: {shown}", EVENT_MESSAGE_LIMIT)


def since_creation(body: Mapping[str, Any]) -> datetime | None:
    """The service's creation time, where its schedule counts from."""
    return _time(body.get("metadata", {}).get("creationTimestamp"))


def record(
    status: dict[str, Any],
    service: ms.ModelService,
    looked: Step,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    """`status` (wire form) with status.evaluation and the Regressed condition set from
    one `step`; without spec.evaluation, both removed."""
    out = dict(status)
    spec = service.spec.evaluation
    if looked.status is None or spec is None:
        out.pop("evaluation", None)
        out["conditions"] = [c for c in out.get("conditions") or [] if c.get("type") != REGRESSED]
        return out
    out["evaluation"] = looked.status
    evaluated = ms.ServiceEvaluationStatus.model_validate(looked.status)
    regressed = bool(evaluated.regressed)
    reason = "MetricDropped" if regressed else "NoRegression"
    message = regression_message(spec, evaluated)
    old = list(status.get("conditions") or [])
    out["conditions"] = set_condition(
        old, REGRESSED, "True" if regressed else "False", reason, message, generation, now
    )
    return out

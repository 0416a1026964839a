"""Continuous evaluation of a ModelService (modelservice/evaluation.py), without a cluster:
the schedule, the Job, reading a finished Job's termination message, the bounded history
with its baselines, the direction of a regression, and one look of `step` against an
in-memory API."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetrain_api import contract
from kubetrain_api import modelservice as ms
from kubetrain_api.contract import ANNOTATION_MODEL_VERSION, LABEL_MODELSERVICE, LABEL_VARIANT
from kubetrain_api.modelservice_validation import parse_modelservice
from kubetrain_operator import builders, metrics
from kubetrain_operator.modelservice import evaluation
from kubetrain_operator.modelservice.sources import ModelSource, Resolution
from kubetrain_operator.settings import OperatorSettings
from tests.operator.test_builders import restricted_violations

UID = "5e1f0c2a-1111-4222-8333-444455556666"
NS = "team-a"
SETTINGS = OperatorSettings(image="ghcr.io/kubetrain/trainer:test")
T0 = datetime(2026, 12, 2, 10, 0, 30, tzinfo=timezone.utc)
Obj = dict[str, Any]


def service(name: str = "chat", **evaluation_spec: Any) -> ms.ModelService:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "variants": [
                {"name": "a", "source": {"uri": "pvc://models/a"}, "weight": 50},
                {"name": "b", "source": {"uri": "s3://bucket/b/model"}, "weight": 50},
            ],
            "experiment": {"control": "a", "treatment": "b"},
            "secrets": {"objectStore": {"name": "s3-creds"}},
            "evaluation": {
                "schedule": "0 * * * *",
                "datasets": [{"name": "intents", "uri": "pvc://data/intents.jsonl"}],
                "heldOut": "pvc://models/held.jsonl",
                "metrics": ["accuracy", "perplexity"],
                "regression": {"metric": "intents/accuracy", "maxDrop": 0.05},
                **evaluation_spec,
            },
        },
    }
    return parse_modelservice(doc)


SOURCES = {
    "a": ModelSource("a-v1", claim="models", sub_path="a"),
    "b": ModelSource("b-v1", url="s3://bucket/b/model", object_store_secret="run-creds"),
}


def result(
    variant: str, minutes: int, version: str = "v1", error: str | None = None, **metrics: float
) -> ms.EvaluationResult:
    return ms.EvaluationResult(
        variant=variant,
        model_version=version,
        time=T0 + timedelta(minutes=minutes),
        metrics=metrics,
        job=f"job-{variant}-{minutes}",
        error=error,
    )


# ---- the schedule ----------------------------------------------------------------------


def test_nothing_is_due_before_the_first_schedule_time() -> None:
    spec = service().spec.evaluation
    assert spec is not None
    when = evaluation.due(spec, None, T0 + timedelta(minutes=20), since=T0)
    assert when.run is None
    assert when.next == datetime(2026, 12, 2, 11, tzinfo=timezone.utc)


def test_a_schedule_time_is_due_once_and_then_not_again() -> None:
    spec = service().spec.evaluation
    assert spec is not None
    now = datetime(2026, 12, 2, 11, 0, 7, tzinfo=timezone.utc)
    when = evaluation.due(spec, None, now, since=T0)
    assert when.run == datetime(2026, 12, 2, 11, tzinfo=timezone.utc)
    started = ms.ServiceEvaluationStatus(last_schedule_time=when.run)
    assert evaluation.due(spec, started, now + timedelta(seconds=30)).run is None


def test_missed_times_run_once_for_the_latest() -> None:
    spec = service().spec.evaluation
    assert spec is not None
    last = ms.ServiceEvaluationStatus(
        last_schedule_time=datetime(2026, 12, 2, 6, tzinfo=timezone.utc)
    )
    now = datetime(2026, 12, 2, 11, 30, tzinfo=timezone.utc)
    when = evaluation.due(spec, last, now)
    assert when.run == datetime(2026, 12, 2, 11, tzinfo=timezone.utc)
    assert when.next == datetime(2026, 12, 2, 12, tzinfo=timezone.utc)


# ---- the Job ---------------------------------------------------------------------------


def test_the_job_of_a_claim_model() -> None:
    svc = service()
    job = evaluation.build_job(svc, UID, NS, "a", SOURCES["a"], SETTINGS, T0)
    minutes = int(T0.timestamp() // 60)
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == f"chat-eval-a-{minutes}"
    assert meta["name"].startswith(ms.evaluation_job_prefix("chat"))
    assert meta["labels"][LABEL_MODELSERVICE] == "chat"
    assert meta["labels"][LABEL_VARIANT] == "a"
    assert meta["labels"][contract.LABEL_MANAGED_BY] == contract.MANAGED_BY
    assert contract.LABEL_RUN not in meta["labels"]
    assert meta["annotations"][ANNOTATION_MODEL_VERSION] == "a-v1"
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ModelService", "chat", UID, True,
    )  # fmt: skip
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 1800
    assert spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]
    assert pod["metadata"]["labels"] == meta["labels"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert restricted_violations(pod) == []
    (container,) = pod["spec"]["containers"]
    assert container["image"] == SETTINGS.image
    assert container["terminationMessagePath"] == builders.TERMINATION_LOG == "/dev/termination-log"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    assert container["command"][:3] == ["python3", "-m", "kubetrain_trainer.evaluate_service"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    # The spec travels as its JSON and reads back the same.
    assert ms.ServiceEvaluationSpec.model_validate_json(env[contract.EVALUATION_SPEC_ENV]) == (
        svc.spec.evaluation
    )
    # Both claims (the model's, with the held-out text, and the data set's) read-only.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] is True
    assert mounts["/mnt/pvc/data"]["readOnly"] is True
    claims = [
        v["persistentVolumeClaim"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
    ]
    assert claims == [
        {"claimName": "models", "readOnly": True},
        {"claimName": "data", "readOnly": True},
    ]
    # The evaluator's own parser takes the command.
    from kubetrain_trainer.evaluate_service import build_parser

    args = build_parser().parse_args(container["command"][3:] + container["args"])
    assert args.model == "pvc://models/a"
    assert str(args.result_file) == "/dev/termination-log"


def test_the_job_of_an_object_store_model_gets_both_secrets() -> None:
    job = evaluation.build_job(service(), UID, NS, "b", SOURCES["b"], SETTINGS, T0)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "s3://bucket/b/model"
    assert container["envFrom"] == [
        {"secretRef": {"name": "run-creds"}},
        {"secretRef": {"name": "s3-creds"}},
    ]


def test_job_names_stay_dns_labels() -> None:
    long_service, long_variant = "s" * ms.MAX_SERVICE_NAME, "v" * 60
    one = evaluation.job_name(long_service, long_variant, T0)
    other = evaluation.job_name(long_service, long_variant[:-1] + "w", T0)
    assert len(one) <= 63
    assert one != other
    assert one == evaluation.job_name(long_service, long_variant, T0)


# ---- reading a finished Job ------------------------------------------------------------


def job(*, complete: bool = False, failed: str | None = None) -> Obj:
    status: Obj = {}
    if complete:
        status = {
            "succeeded": 1,
            "completionTime": "2026-12-02T10:05:00Z",
            "conditions": [{"type": "Complete", "status": "True"}],
        }
    if failed:
        status = {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": failed,
                    "message": "Job was active longer than specified deadline",
                    "lastTransitionTime": "2026-12-02T10:30:00Z",
                }
            ],
        }
    return {
        "metadata": {
            "name": "chat-eval-a-1",
            "labels": {LABEL_VARIANT: "a"},
            "annotations": {ANNOTATION_MODEL_VERSION: "a-v1"},
        },
        "status": status,
    }


def pod(message: str | None, exit_code: int = 0) -> Obj:
    terminated: Obj = {"exitCode": exit_code}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-12-02T10:00:00Z"},
        "status": {
            "containerStatuses": [{"name": "evaluate", "state": {"terminated": terminated}}]
        },
    }


def test_a_running_job_has_no_result() -> None:
    assert evaluation.read_result(job(), []) is None


def test_a_finished_job_s_metrics() -> None:
    message = '{"metrics":{"intents/accuracy":0.75,"perplexity":12.5,"accuracy":1}}'
    got = evaluation.read_result(job(complete=True), [pod(message)])
    assert got is not None
    assert got.error is None
    assert got.metrics == {"intents/accuracy": 0.75, "perplexity": 12.5, "accuracy": 1.0}
    assert (got.variant, got.model_version, got.job) == ("a", "a-v1", "chat-eval-a-1")
    assert got.time == datetime(2026, 12, 2, 10, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ("not json", "unreadable"),
        ('{"metrics": {"accuracy": "0.5"}}', "metrics.accuracy"),
        ('{"metrics": {"accuracy": NaN}}', "unreadable"),
        ('{"metrics": {"bogus": 0.5}}', "metrics.bogus"),
        ('{"metrics": {}, "extra": 1}', "extra"),
        ('{"metrics": {"accuracy": 0.5}}' + " " * 5000, "bytes"),
        ('{"metrics": {' + ",".join(f'"s{i}/f1": 0' for i in range(70)) + "}}", "metrics"),
        (None, "without a result"),
    ],
)
def test_a_malformed_result_is_an_error_not_metrics(message: str | None, why: str) -> None:
    got = evaluation.read_result(job(complete=True), [pod(message)])
    assert got is not None
    assert got.metrics == {}
    assert got.error is not None
    assert why in got.error
    assert len(got.error) <= 1024


def test_a_failed_job_is_a_result_with_its_error() -> None:
    tail = "evaluate_service: invalid data: spec.evaluation.heldOut: no such file (exit code 11)"
    got = evaluation.read_result(
        job(failed="DeadlineExceeded"), [pod("Loading...\n" + tail, exit_code=11)]
    )
    assert got is not None
    assert got.metrics == {}
    assert got.error is not None
    assert got.error.startswith("DeadlineExceeded: Job was active longer")
    assert "exit code 11" in got.error
    assert got.error.endswith(tail)
    assert got.time == datetime(2026, 12, 2, 10, 30, tzinfo=timezone.utc)


# ---- history and regressions ------------------------------------------------------------


def test_merge_keeps_the_newest_and_the_baselines() -> None:
    old = ms.ServiceEvaluationStatus(results=[result("a", 0, accuracy=0.9)])
    new = [result("a", m, accuracy=0.8) for m in range(1, 40)]
    merged = evaluation.merge(old, new)
    assert len(merged.results) == ms.MAX_EVALUATIONS
    times = [r.time for r in merged.results]
    assert times == sorted(times)
    assert merged.results[0].time == T0  # the baseline
    assert merged.results[-1].time == T0 + timedelta(minutes=39)
    assert merged.results[1].time == T0 + timedelta(minutes=21)
    # The same Job's result is never added twice.
    assert evaluation.merge(merged, new[-1:]).results == merged.results


def test_merge_drops_the_baselines_of_versions_no_longer_among_the_newest() -> None:
    old = [result("a", m, version="v1", accuracy=0.9) for m in range(5)]
    new = [result("a", m, version="v2", accuracy=0.9) for m in range(5, 40)]
    merged = evaluation.merge(ms.ServiceEvaluationStatus(results=old), new)
    assert {r.model_version for r in merged.results} == {"v2"}
    assert merged.results[0].time == T0 + timedelta(minutes=5)


def regressed(metric: str, *values: float, max_drop: float = 0.05) -> list[str]:
    regression = {"metric": metric, "maxDrop": max_drop}
    metrics = ["accuracy", "perplexity", "loss"]
    spec = service(regression=regression, metrics=metrics).spec.evaluation
    assert spec is not None
    results = [result("b", i, **{metric: v}) for i, v in enumerate(values)]
    return evaluation.regressions(spec, results)


def test_accuracy_regresses_when_it_falls() -> None:
    assert regressed("intents/accuracy", 0.9, 0.8) == ["b"]
    assert regressed("intents/accuracy", 0.9, 0.86) == []  # within maxDrop
    assert regressed("accuracy", 0.5, 0.95) == []  # better


def test_perplexity_regresses_when_it_rises() -> None:
    assert regressed("perplexity", 10.0, 12.0, max_drop=1.0) == ["b"]
    assert regressed("perplexity", 10.0, 5.0, max_drop=1.0) == []
    assert regressed("loss", 2.0, 2.2, max_drop=0.1) == ["b"]


def test_the_baseline_is_the_version_s_first_and_the_latest_result_counts() -> None:
    spec = service().spec.evaluation
    assert spec is not None
    metric = "intents/accuracy"
    results = [
        result("a", 0, version="v1", **{metric: 0.9}),
        result("a", 1, version="v1", **{metric: 0.7}),
        result("a", 2, version="v2", **{metric: 0.6}),  # a new model: a new baseline
        result("b", 3, version="v1", **{metric: 0.9}),
        result("b", 4, version="v1", **{metric: 0.5}),
        result("b", 5, version="v1", **{metric: 0.88}),  # recovered
        result("b", 6, version="v1", error="OOMKilled"),  # no number: not a result
    ]
    assert evaluation.regressions(spec, results) == []
    assert evaluation.regressions(spec, results[:2]) == ["a"]
    # Only the versions served now count.
    assert evaluation.regressions(spec, results[:2], {"a": "v2"}) == []


def test_the_latest_successful_value() -> None:
    results = [
        result("a", 0, accuracy=0.9),
        result("a", 1, accuracy=0.8),
        result("a", 2, error="x"),
    ]
    assert evaluation.latest_value(results, "a", "accuracy") == 0.8
    assert evaluation.latest_value(results, "a", "f1") is None
    assert evaluation.latest_value(results, "b", "accuracy") is None


def test_a_regressed_treatment_is_rolled_back_only_when_asked() -> None:
    asked = service(regression={"metric": "accuracy", "onRegression": "rollback"})
    assert evaluation.rollback_target(asked, ["b"]) == "b"
    assert evaluation.rollback_target(asked, ["a"]) is None
    assert evaluation.rollback_target(service(), ["b"]) is None


# ---- one look ----------------------------------------------------------------------------


class FakeKube:
    """The calls `step` makes, on an in-memory store of Jobs and pods."""

    def __init__(self) -> None:
        self.jobs: dict[str, Obj] = {}
        self.pods: dict[str, list[Obj]] = {}

    def read(self, kind: str, ns: str, name: str, api_version: str | None = None) -> Obj | None:
        assert (kind, ns) == ("Job", NS)
        return self.jobs.get(name)

    def ensure(self, obj: Obj, live: Obj | None = None) -> Obj:
        self.jobs[obj["metadata"]["name"]] = obj
        return obj

    def list_pods(self, ns: str, selector: str) -> list[Obj]:
        return self.pods.get(selector.removeprefix("job-name="), [])

    def delete(self, kind: str, ns: str, name: str, api_version: str | None = None) -> bool:
        return self.jobs.pop(name, None) is not None


def test_a_look_starts_baselines_reads_results_and_finds_regressions() -> None:
    kube = FakeKube()
    svc = service()
    resolutions = {k: Resolution(source) for k, source in SOURCES.items()}

    def look(previous: Obj, now: datetime) -> evaluation.Step:
        return evaluation.step(
            kube,
            svc,
            UID,
            NS,
            SETTINGS,
            resolutions,
            {"evaluation": previous},
            now,
            since=T0,  # type: ignore[arg-type]
        )

    # New models: a baseline Job each, at once; the schedule's first time comes later.
    first = look({}, T0)
    assert first.status is not None
    assert sorted(first.status["active"]) == sorted(kube.jobs)
    assert len(kube.jobs) == 2
    assert [e.reason for e in first.events] == ["EvaluationStarted"] * 2
    assert first.status["nextScheduleTime"] == "2026-12-02T11:00:00Z"
    assert first.requeue == SETTINGS.resync_seconds
    # Nothing new while they run.
    again = look(first.status, T0 + timedelta(seconds=10))
    assert again.status == first.status
    assert again.events == []

    for name, body in kube.jobs.items():
        body["metadata"]["uid"] = "job-uid"
        body["status"] = job(complete=True)["status"]
        accuracy = 0.9
        kube.pods[name] = [pod(json.dumps({"metrics": {"intents/accuracy": accuracy}}))]
    done = look(first.status, T0 + timedelta(minutes=5))
    assert done.status is not None
    assert done.status["active"] == []
    assert [r["variant"] for r in done.status["results"]] == ["a", "b"]
    assert done.regressed == []
    assert 3000 < (done.requeue or 0) <= 55 * 60

    # The hourly run: b's accuracy fell.
    hourly = look(done.status, datetime(2026, 12, 2, 11, 0, 5, tzinfo=timezone.utc))
    assert hourly.status is not None
    assert hourly.status["lastScheduleTime"] == "2026-12-02T11:00:00Z"
    assert len(hourly.status["active"]) == 2
    for name in hourly.status["active"]:
        kube.jobs[name]["status"] = job(complete=True)["status"]
        value = 0.7 if "-b-" in name else 0.9
        kube.pods[name] = [pod(json.dumps({"metrics": {"intents/accuracy": value}}))]
    later = look(hourly.status, datetime(2026, 12, 2, 11, 5, tzinfo=timezone.utc))
    assert later.status is not None
    assert later.status["regressed"] == ["b"]
    assert ("Warning", "Regressed") in [(e.type, e.reason) for e in later.events]
    status = evaluation.record({"conditions": []}, svc, later, 3, datetime.now(timezone.utc))
    (condition,) = status["conditions"]
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "Regressed", "True", "MetricDropped",
    )  # fmt: skip
    assert condition["observedGeneration"] == 3
    assert "b (b-v1): intents/accuracy 0.7, baseline 0.9" in condition["message"]
    ms.ModelServiceStatus.model_validate(status)  # the status the CRD takes


def test_jobs_of_a_variant_that_left_the_spec_are_deleted() -> None:
    kube = FakeKube()
    svc = service()
    resolutions = {k: Resolution(source) for k, source in SOURCES.items()}
    first = evaluation.step(kube, svc, UID, NS, SETTINGS, resolutions, {}, T0, since=T0)  # type: ignore[arg-type]
    assert first.status is not None
    doc = svc.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["evaluation"] = None
    plain = parse_modelservice(doc)
    gone = evaluation.step(
        kube, plain, UID, NS, SETTINGS, resolutions, {"evaluation": first.status}, T0
    )  # type: ignore[arg-type]
    assert gone.status is None
    assert kube.jobs == {}
    status = evaluation.record({"evaluation": first.status, "conditions": []}, plain, gone, 2, T0)
    assert "evaluation" not in status


# ---- Prometheus ---------------------------------------------------------------------------


def test_the_latest_value_per_variant_and_metric_is_a_gauge() -> None:
    from tests.operator.test_modelservice_metrics import scrape, value

    evaluated = ms.ServiceEvaluationStatus(
        results=[
            result("a", 0, version="a-v1", accuracy=0.9, perplexity=12.0),
            result("b", 1, version="b-v1", accuracy=0.8),
            result("b", 2, version="b-v2", accuracy=0.7),
            result("b", 3, version="b-v2", error="OOMKilled"),
        ],
        regressed=["b"],
    )
    status = ms.ModelServiceStatus(
        variants=[ms.VariantStatus(name="a"), ms.VariantStatus(name="b")], evaluation=evaluated
    )
    index = metrics.ServiceIndex()
    index.observe("ml", "chat", status)
    s = scrape(index)
    name = "kubetrain_modelservice_evaluation_metric"
    assert value(s, name, variant="a", model_version="a-v1", metric="accuracy") == 0.9
    assert value(s, name, variant="a", model_version="a-v1", metric="perplexity") == 12.0
    assert value(s, name, variant="b", model_version="b-v2", metric="accuracy") == 0.7
    assert value(s, name, variant="b", model_version="b-v1", metric="accuracy") is None
    flag = "kubetrain_modelservice_evaluation_regressed"
    assert value(s, flag, variant="b") == 1
    assert value(s, flag, variant="a") == 0
    index.forget("ml", "chat")
    assert scrape(index) == {}

"""Serving, without a cluster: the pure builders of serving.py, the serving part of the
status computation, and the driver's termination message from writer to reader."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import load_documents, parse
from kubetrain_operator import builders, pods, serving
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import Decision, Observed, compute_status, parse_result
from kubetrain_trainer import local
from tests.operator.test_builders import restricted_violations
from tests.operator.test_rbac import RBAC, grants
from tests.operator.test_status import assert_valid_status, cluster, terminated

ROOT = Path(__file__).resolve().parents[2]
UID = "0b6a0e1c-1111-4222-8333-444455556666"
NS = "team-a"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
Obj = dict[str, Any]


def example(stem: str, **serve: Any) -> api.TrainingRun:
    (doc,) = load_documents((ROOT / "examples" / f"{stem}.yaml").read_text())
    doc["metadata"]["namespace"] = NS
    doc["spec"]["serve"] = {**doc["spec"]["serve"], **serve}
    return parse(doc)


def with_spec(run: api.TrainingRun, **changes: Any) -> api.TrainingRun:
    doc = run.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"] |= changes
    return parse(doc)


def by_kind(objs: list[Obj]) -> dict[str, Obj]:
    return {obj["kind"]: obj for obj in objs}


def pod_of(deployment: Obj) -> Obj:
    return {
        "metadata": deployment["spec"]["template"]["metadata"],
        **deployment["spec"]["template"],
    }


def server(deployment: Obj) -> Obj:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------


def test_quickstart_serving_objects(settings: OperatorSettings) -> None:
    run = example("quickstart")
    objs = serving.build_serving(run, UID, NS, settings, "quickstart-step200")
    # No autoscaling in the quickstart: no HPA.
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "PodDisruptionBudget"]
    for obj in objs:
        meta = obj["metadata"]
        assert (meta["name"], meta["namespace"]) == ("quickstart-serve", NS)
        assert meta["labels"] == builders.labels("quickstart", "serving")
        assert meta["ownerReferences"] == [builders.owner_reference("quickstart", UID)]
        assert meta["annotations"][contract.ANNOTATION_INPUT_HASH] == builders.input_hash(obj)
        assert meta["annotations"][contract.ANNOTATION_RUN_UID] == UID

    deployment = objs[0]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # Not a Ray pod: the reconciler and the run's NetworkPolicy select on this label.
    assert contract.LABEL_RUN not in labels
    assert labels[contract.LABEL_COMPONENT] == "serving"
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
        "kubetrain.dev/model-version": "quickstart-step200",
    }
    assert "restartPolicy" not in template["spec"]  # a Deployment's pods always restart


def test_server_container(settings: OperatorSettings) -> None:
    deployment = serving.build_deployment(example("quickstart"), UID, NS, settings)
    container = server(deployment)
    assert container["name"] == "server"
    assert container["image"] == settings.image
    assert container["command"] == [
        "kubetrain",
        "serve",
        "/model",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--max-tokens",
        "512",
        "--max-concurrency",
        "8",
        "--max-queue",
        "32",
        "--max-body-bytes",
        "1048576",
        "--feedback-path",
        "/feedback/feedback.jsonl",
    ]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    amounts = {"cpu": "1", "memory": "2Gi"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}

    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths = {k: p["httpGet"] for k, p in probes.items()}
    assert paths == {
        "startupProbe": {"path": "/readyz", "port": "http"},
        "readinessProbe": {"path": "/readyz", "port": "http"},
        "livenessProbe": {"path": "/healthz", "port": "http"},
    }
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load


@pytest.mark.parametrize(
    ("uri", "folder"),
    [
        (None, "quickstart-0b6a0e1c"),  # nothing reported: the run's own folder
        ("/storage/quickstart-0b6a0e1c/model", "quickstart-0b6a0e1c"),
        ("file:///storage/quickstart-0b6a0e1c/model", "quickstart-0b6a0e1c"),
        ("/storage/quickstart/model", "quickstart"),  # exported before folders had uids
        ("/storage/../etc/model", "quickstart-0b6a0e1c"),
        ("/storage/a/b/model", "quickstart-0b6a0e1c"),
        ("/elsewhere/quickstart/model", "quickstart-0b6a0e1c"),
        ("s3://bucket/quickstart/model", "quickstart-0b6a0e1c"),
    ],
)
def test_the_served_folder_is_the_one_the_driver_reported(
    settings: OperatorSettings, uri: str | None, folder: str
) -> None:
    run = example("quickstart")
    assert serving.model_folder(run, UID, settings, uri) == folder
    deployment = serving.build_deployment(run, UID, NS, settings, "v1", uri)
    mounts = {m["mountPath"]: m for m in server(deployment)["volumeMounts"]}
    assert mounts["/model"]["subPath"] == f"{folder}/model"
    assert mounts["/feedback"]["subPath"] == f"{folder}/feedback"


def test_model_read_only_and_feedback_writable(settings: OperatorSettings) -> None:
    deployment = serving.build_deployment(example("quickstart"), UID, NS, settings)
    pod_spec = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in server(deployment)["volumeMounts"]}
    assert mounts["/model"] == {
        "name": "storage",
        "mountPath": "/model",
        "subPath": "quickstart-0b6a0e1c/model",
        "readOnly": True,
    }
    assert mounts["/feedback"] == {
        "name": "storage",
        "mountPath": "/feedback",
        "subPath": "quickstart-0b6a0e1c/feedback",
    }
    assert mounts["/tmp"]["name"] == "tmp"
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes == {
        "tmp": {"name": "tmp", "emptyDir": {}},
        "storage": {
            "name": "storage",
            "persistentVolumeClaim": {"claimName": "quickstart-storage"},
        },
    }
    # Where the trainer writes: <storage>/<run>/model (kubetrain run --output-dir).
    claim_named = with_spec(
        example("quickstart"), checkpoint={"storage": {"pvc": {"claimName": "shared"}}}
    )
    claim = serving.build_deployment(claim_named, UID, NS, settings)["spec"]["template"]["spec"]
    assert claim["volumes"][1]["persistentVolumeClaim"] == {"claimName": "shared"}


def test_serving_pods_are_restricted(settings: OperatorSettings) -> None:
    for run in (example("quickstart"), example("finetune-lora-gpu")):
        deployment = serving.build_deployment(run, UID, NS, settings)
        pod = pod_of(deployment)
        assert restricted_violations(pod) == []
        assert pod["spec"]["securityContext"] == pods.pod_security_context()
        assert server(deployment)["securityContext"] == pods.container_security_context()
        assert pod["spec"]["enableServiceLinks"] is False
    # The checker sees serving pods too.
    bad = pod_of(serving.build_deployment(example("quickstart"), UID, NS, settings))
    bad["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert restricted_violations(bad) == ["container server has a writable root filesystem"]


def test_service_and_pdb(settings: OperatorSettings) -> None:
    kinds = by_kind(serving.build_serving(example("quickstart"), UID, NS, settings))
    selector = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    service = kinds["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == selector
    assert service["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    pdb = kinds["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}


def test_pdb_api_version_follows_discovery() -> None:
    assert serving.pdb_api_version({"policy/v1", "policy/v1beta1"}) == "policy/v1"
    assert serving.pdb_api_version({"policy/v1beta1"}) == "policy/v1beta1"
    old = OperatorSettings(pdb_api_version="policy/v1beta1")
    pdb = serving.build_pdb(example("quickstart"), UID, NS, old)
    assert pdb["apiVersion"] == "policy/v1beta1"
    assert (
        pdb["metadata"]["annotations"]
        != serving.build_pdb(example("quickstart"), UID, NS, OperatorSettings())["metadata"][
            "annotations"
        ]
    )


def test_finetune_autoscaling_and_gpus(settings: OperatorSettings) -> None:
    run = example("finetune-lora-gpu")
    kinds = by_kind(serving.build_serving(run, UID, NS, settings))
    assert set(kinds) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    deployment = kinds["Deployment"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v1"
    assert hpa["spec"] == {
        "scaleTargetRef": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "qwen-support-lora-serve",
        },
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetCPUUtilizationPercentage": 70,
    }
    container = server(deployment)
    amounts = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert container["command"][container["command"].index("--max-tokens") + 1] == "1024"
    pod_spec = deployment["spec"]["template"]["spec"]
    # GPUs: the training node selector (GPU product) and tolerations carry over.
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert "priorityClassName" not in pod_spec
    assert contract.LABEL_QUEUE not in deployment["spec"]["template"]["metadata"]["labels"]
    # Without serving GPUs the server stays off the GPU nodes.
    cpu_only = with_spec(run, serve={**run.spec.serve.model_dump(by_alias=True), "gpus": 0})
    assert (
        "nodeSelector"
        not in serving.build_deployment(cpu_only, UID, NS, settings)["spec"]["template"]["spec"]
    )


def test_retain_leaves_out_owner_references(settings: OperatorSettings) -> None:
    objs = serving.build_serving(example("finetune-lora-gpu", retain=True), UID, NS, settings)
    assert len(objs) == 4
    for obj in objs:
        assert "ownerReferences" not in obj["metadata"], obj["kind"]
        assert obj["metadata"]["labels"][contract.LABEL_RUN] == "qwen-support-lora"


def test_builders_are_pure_and_hash_their_inputs(settings: OperatorSettings) -> None:
    run = example("quickstart")
    first = serving.build_serving(run, UID, NS, settings, "v1")
    assert first == serving.build_serving(run, UID, NS, settings, "v1")

    def digest(objs: list[Obj]) -> dict[str, str]:
        return {
            o["kind"]: o["metadata"]["annotations"][contract.ANNOTATION_INPUT_HASH] for o in objs
        }

    # A new model version rolls the pods (template annotation): the Deployment changes.
    other = digest(serving.build_serving(run, UID, NS, settings, "v2"))
    assert [k for k, v in digest(first).items() if other[k] != v] == ["Deployment"]
    bigger = with_spec(run, serve={**run.spec.serve.model_dump(by_alias=True), "maxTokens": 64})
    changed = digest(serving.build_serving(bigger, UID, NS, settings, "v1"))
    assert [k for k, v in digest(first).items() if changed[k] != v] == ["Deployment"]


def object_store_run(
    uri: str = "s3://bucket/runs/", secret: str | None = "s3-creds"
) -> api.TrainingRun:
    run = with_spec(example("quickstart"), checkpoint={"storage": {"uri": uri}})
    if secret is None:
        return run
    return with_spec(run, secrets={"objectStore": {"name": secret}})


def test_local_path_storage_is_not_servable(settings: OperatorSettings) -> None:
    run = with_spec(example("quickstart"), checkpoint={"storage": {"uri": "file:///data/runs"}})
    assert not serving.servable(run)
    assert serving.servable(example("quickstart"))
    assert serving.servable(object_store_run("gs://bucket/runs"))
    with pytest.raises(ValueError, match="PVC or an object store"):
        serving.build_deployment(run, UID, NS, settings)


def test_object_store_model_is_downloaded_not_mounted(settings: OperatorSettings) -> None:
    """The server gets the model's URL and an emptyDir to download it into, the object
    store's credentials by reference, no claim, and no feedback path (nowhere durable)."""
    run = object_store_run()
    deployment = serving.build_deployment(run, UID, NS, settings, "v1")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = server(deployment)
    assert container["command"] == [
        "kubetrain",
        "serve",
        "s3://bucket/runs/quickstart-0b6a0e1c/model",
        "--model-cache",
        "/model-cache/model",
        "--host",
        "0.0.0.0",
        "--port",
        str(contract.SERVE_PORT),
        *contract.serve_args(run.spec.serve.model_dump()),
    ]
    assert pod_spec["volumes"] == [
        {"name": "tmp", "emptyDir": {}},
        {"name": "model-cache", "emptyDir": {}},
    ]
    assert container["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "model-cache", "mountPath": "/model-cache"},
    ]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert restricted_violations(pod_of(deployment)) == []
    # Ambient credentials (node role, workload identity): no envFrom at all.
    ambient = serving.build_deployment(object_store_run(secret=None), UID, NS, settings, "v1")
    assert "envFrom" not in server(ambient)
    # A PVC run's server never gets the object store's Secret.
    pvc_run = with_spec(example("quickstart"), secrets={"objectStore": {"name": "s3-creds"}})
    assert "envFrom" not in server(serving.build_deployment(pvc_run, UID, NS, settings))


@pytest.mark.parametrize(
    ("uri", "folder"),
    [
        (None, "quickstart-0b6a0e1c"),
        ("s3://bucket/runs/quickstart-0b6a0e1c/model", "quickstart-0b6a0e1c"),
        ("s3://bucket/runs/quickstart-0b6a0e1c/model/", "quickstart-0b6a0e1c"),
        ("s3://bucket/runs/quickstart/model", "quickstart"),
        ("s3://bucket/runs/../model", "quickstart-0b6a0e1c"),
        ("s3://other/runs/quickstart/model", "quickstart-0b6a0e1c"),
        ("/storage/quickstart/model", "quickstart-0b6a0e1c"),
    ],
)
def test_the_served_object_store_folder_is_the_one_the_driver_reported(
    settings: OperatorSettings, uri: str | None, folder: str
) -> None:
    run = object_store_run()
    assert serving.model_folder(run, UID, settings, uri) == folder
    deployment = serving.build_deployment(run, UID, NS, settings, "v1", uri)
    assert server(deployment)["command"][2] == f"s3://bucket/runs/{folder}/model"


def test_service_url() -> None:
    assert serving.service_url("quickstart", NS) == "http://quickstart-serve.team-a.svc/v1"


def test_rbac_covers_the_serving_objects(settings: OperatorSettings) -> None:
    import yaml

    (role,) = [d for d in yaml.safe_load_all(RBAC.read_text()) if d["kind"] == "ClusterRole"]
    granted = grants(role["rules"])
    plurals = {
        "Deployment": "deployments",
        "Service": "services",
        "PodDisruptionBudget": "poddisruptionbudgets",
        "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    }
    for obj in serving.build_serving(example("finetune-lora-gpu"), UID, NS, settings):
        group = obj["apiVersion"].rpartition("/")[0]
        assert {"create", "get", "update", "delete"} <= granted[(group, plurals[obj["kind"]])]
    # retain: the operator adds the Deployment as an owner of the run's PVC.
    assert "patch" in granted[("", "persistentvolumeclaims")]


# --------------------------------------------------------------------------------------
# the driver's termination message
# --------------------------------------------------------------------------------------

SUMMARY = {
    "model": {"uri": "/storage/quickstart/model", "version": "quickstart-step200"},
    "evaluation": {
        "step": 200,
        "metrics": {"loss": 1.9, "perplexity": 6.7},
        "gate": {"passed": True, "failures": []},
    },
}


def test_parse_result_keeps_well_formed_json() -> None:
    assert parse_result(json.dumps(SUMMARY)) == SUMMARY


@pytest.mark.parametrize(
    "message",
    [
        None,
        "",
        "Traceback (most recent call last): token=hunter2",
        "[1, 2]",
        '"just a string"',
        json.dumps(SUMMARY)[:-5],  # truncated by the 4 KiB cap
        json.dumps({**SUMMARY, "padding": "x" * 5000}),
        "[" * 100_000,
    ],
    ids=["none", "empty", "text", "array", "string", "truncated", "oversized", "deep"],
)
def test_parse_result_ignores_anything_else(message: str | None) -> None:
    assert parse_result(message) == {}


def test_parse_result_drops_bad_fields() -> None:
    bad = {
        "model": {"uri": "/storage/x\nmodel", "version": "has spaces and a / slash"},
        "evaluation": {"step": -1, "metrics": {"loss": float("nan"), "f1": 0.8}, "gate": "yes"},
    }
    assert parse_result(json.dumps(bad)) == {"evaluation": {"metrics": {"f1": 0.8}}}


def test_termination_log_round_trip(tmp_path: Path) -> None:
    """What `kubetrain run --termination-log` writes is what the operator reads."""
    result = {
        "step": 200,
        "tokens_seen": 409600,
        "metrics": {"loss": 1.9, "perplexity": 6.7, "accuracy": float("nan")},
        "gate": {"passed": False, "failures": ["perplexity 6.7 > max 5"]},
        "model": "/storage/quickstart/model",
    }
    path = tmp_path / "termination-log"
    local.write_termination_log(path, local.termination_summary("quickstart", result))
    assert parse_result(path.read_text()) == {
        "model": {"uri": "/storage/quickstart/model", "version": "quickstart-step200"},
        "evaluation": {
            "step": 200,
            "metrics": {"loss": 1.9, "perplexity": 6.7},
            "gate": {"passed": False, "failures": ["perplexity 6.7 > max 5"]},
        },
    }


def test_termination_log_fits_the_kubelet_limit(tmp_path: Path) -> None:
    result = {
        "step": 7,
        "metrics": {f"validation/metric-{i:03d}": i / 3 for i in range(200)},
        "gate": {"passed": False, "failures": [f"metric-{i} " + "x" * 500 for i in range(40)]},
        "model": "/storage/big/model",
    }
    path = tmp_path / "termination-log"
    local.write_termination_log(path, local.termination_summary("big", result))
    assert len(path.read_bytes()) <= 4096
    parsed = parse_result(path.read_text())
    assert parsed["evaluation"]["gate"]["passed"] is False  # the verdict survives
    assert parsed["model"] == {"uri": "/storage/big/model", "version": "big-step7"}


# --------------------------------------------------------------------------------------
# status: serving of a Succeeded run
# --------------------------------------------------------------------------------------


def head_exited(message: str | None) -> list[dict[str, Any]]:
    """The pods of attempt 1 after the driver exited 0 with `message`."""
    pods = cluster(head=partial(terminated, code=0))
    if message is not None:
        pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = message
    return pods


def running_before(run: api.TrainingRun) -> dict[str, Any]:
    """A status whose attempt 1 is training."""
    status = decide(run, {}).status
    return decide(run, status, pods=cluster()).status


def decide(
    run: api.TrainingRun | None,
    previous: dict[str, Any],
    *,
    pods: list[dict[str, Any]] | None = None,
    deployment: dict[str, Any] | None = None,
    generation: int = 1,
) -> Decision:
    """compute_status with the same checks as test_status: a status the API server
    accepts, and idempotence (same observation again: same status, no events)."""
    observed = Observed(
        run=run,
        generation=generation,
        now=NOW,
        attempt=previous.get("attempts") or 0,
        pods=pods or [],
        previous=previous,
        serving=deployment,
    )
    decision = compute_status(observed)
    assert_valid_status(decision.status)
    again = compute_status(replace(observed, previous=decision.status, now=NOW + timedelta(1)))
    assert (again.status, again.events, again.serve) == (decision.status, [], decision.serve)
    return decision


def succeed(run: api.TrainingRun, message: str | None) -> Decision:
    return decide(run, running_before(run), pods=head_exited(message))


def serving_condition(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status["conditions"] if c["type"] == "Serving"), None)


def live_deployment(available: int, replicas: int = 1, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "quickstart-serve", "generation": 1},
        "spec": {"replicas": replicas},
        "status": {"availableReplicas": available, **status},
    }


def test_gate_passed_records_the_result_and_asks_to_serve() -> None:
    run = example("quickstart")
    done = succeed(run, json.dumps(SUMMARY))
    status = done.status
    assert (status["phase"], done.action, done.serve) == ("Succeeded", "finish", "apply")
    assert status["model"] == SUMMARY["model"]
    assert status["evaluation"] == SUMMARY["evaluation"]
    assert status["serving"] == {
        "service": "quickstart-serve",
        "url": "http://quickstart-serve.team-a.svc/v1",
        "modelVersion": "quickstart-step200",
    }
    cond = serving_condition(status)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "Progressing")
    assert [(e.type, e.reason) for e in done.events] == [("Normal", "Succeeded")]

    # The Deployment has a ready replica: Serving is True, once, with an event.
    up = decide(run, status, deployment=live_deployment(1))
    cond = serving_condition(up.status)
    assert cond is not None
    assert (cond["status"], cond["reason"], up.serve) == ("True", "Available", "apply")
    assert "http://quickstart-serve.team-a.svc/v1" in cond["message"]
    assert up.status["phase"] == "Succeeded"
    assert [(e.type, e.reason) for e in up.events] == [("Normal", "ServingAvailable")]
    # Converged: the same status, no events, still `apply` (a level: repairs deletions).
    steady = decide(run, up.status, deployment=live_deployment(1))
    assert (steady.status, steady.events) == (up.status, [])


def test_final_result_replaces_the_last_progress_report() -> None:
    run = example("quickstart")
    before = running_before(run)
    before["evaluation"] = {"step": 150, "metrics": {"perplexity": 9.0}}
    done = decide(run, before, pods=head_exited(json.dumps(SUMMARY)))
    assert done.status["evaluation"] == SUMMARY["evaluation"]
    evaluated = next(c for c in done.status["conditions"] if c["type"] == "Evaluated")
    assert (evaluated["reason"], evaluated["message"].split(":")[0]) == ("GatePassed", "step 200")


def test_gate_failed_serves_nothing_and_says_why() -> None:
    failed = {
        **SUMMARY,
        "evaluation": {
            "step": 200,
            "metrics": {"perplexity": 410.0},
            "gate": {"passed": False, "failures": ["perplexity 410 > max 200"]},
        },
    }
    done = succeed(example("quickstart"), json.dumps(failed))
    assert (done.status["phase"], done.serve) == ("Succeeded", "none")
    assert "serving" not in done.status
    cond = serving_condition(done.status)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "GateFailed")
    assert "perplexity 410 > max 200" in cond["message"]
    assert ("Warning", "ServingGateFailed") in [(e.type, e.reason) for e in done.events]


def test_without_a_verdict_a_gated_run_is_not_served() -> None:
    done = succeed(example("quickstart"), None)
    cond = serving_condition(done.status)
    assert cond is not None
    assert (cond["reason"], done.serve) == ("GateUnknown", "none")
    assert "model" not in done.status


def test_without_a_gate_a_run_is_served() -> None:
    run = with_spec(example("quickstart"), evaluation={"metrics": ["loss"]})
    done = succeed(run, "not json at all")
    assert done.serve == "apply"
    assert done.status["serving"]["service"] == "quickstart-serve"
    assert "modelVersion" not in done.status["serving"]  # no result reported


def test_non_json_message_is_never_copied() -> None:
    text = "Traceback: KeyError secret-canary-7d3f"
    done = succeed(example("quickstart"), text)
    assert "secret-canary-7d3f" not in json.dumps(done.status)
    assert all("secret-canary-7d3f" not in e.message for e in done.events)


def test_serving_disabled() -> None:
    off = example("quickstart", enabled=False)
    done = succeed(off, json.dumps(SUMMARY))
    assert (serving_condition(done.status), done.serve) == (None, "none")
    assert done.status["model"] == SUMMARY["model"]  # recorded all the same

    # Turned off after serving: the objects go, the condition says so.
    served = decide(example("quickstart"), done.status, deployment=live_deployment(1)).status
    assert serving_condition(served) is not None
    turned_off = decide(off, served, deployment=live_deployment(1), generation=2)
    cond = serving_condition(turned_off.status)
    assert cond is not None
    assert (cond["status"], cond["reason"], turned_off.serve) == ("False", "Disabled", "remove")
    assert cond["observedGeneration"] == 2
    assert "serving" not in turned_off.status
    gone = decide(off, turned_off.status, generation=2)
    assert (gone.serve, gone.status) == ("none", turned_off.status)


def test_local_path_storage_is_reported_not_served() -> None:
    run = with_spec(example("quickstart"), checkpoint={"storage": {"uri": "file:///data/runs"}})
    done = succeed(run, json.dumps(SUMMARY))
    cond = serving_condition(done.status)
    assert cond is not None
    assert (cond["reason"], done.serve) == ("StorageNotServable", "none")
    assert (succeed(object_store_run(), json.dumps(SUMMARY)).serve) == "apply"


@pytest.mark.parametrize(
    ("deployment", "reason"),
    [
        (live_deployment(0), "Progressing"),
        (live_deployment(0, replicas=0), "ScaledToZero"),
        (
            live_deployment(
                0,
                conditions=[
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": 'ReplicaSet "quickstart-serve-5d9" has timed out progressing.',
                    }
                ],
            ),
            "ProgressDeadlineExceeded",
        ),
        (live_deployment(2, replicas=3, updatedReplicas=1), "Available"),
    ],
)
def test_serving_condition_follows_the_deployment(deployment: dict[str, Any], reason: str) -> None:
    run = example("quickstart")
    status = succeed(run, json.dumps(SUMMARY)).status
    decision = decide(run, status, deployment=deployment)
    cond = serving_condition(decision.status)
    assert cond is not None
    assert cond["reason"] == reason
    assert (cond["status"] == "True") == (reason == "Available")
    assert decision.serve == "apply"


def test_invalid_spec_after_success_leaves_serving_alone() -> None:
    run = example("quickstart")
    served = decide(run, succeed(run, json.dumps(SUMMARY)).status, deployment=live_deployment(1))
    later = decide(None, served.status, deployment=live_deployment(1))
    assert (later.serve, later.status) == ("none", served.status)


def test_failed_runs_are_never_served() -> None:
    run = example("quickstart")
    failed = decide(run, running_before(run), pods=cluster(head=partial(terminated, code=1)))
    assert failed.status["phase"] == "Failed"
    assert (failed.serve, serving_condition(failed.status)) == ("none", None)

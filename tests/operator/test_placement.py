"""Gang admission, placement fields and pod template overrides: what the builders make of
them, and what validation refuses (with the field path)."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_api import contract, placement
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import InvalidSpec, parse, validate_document
from kubetrain_cli.main import main
from kubetrain_operator import builders, overrides
from kubetrain_operator.conditions import find_condition
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import Observed, compute_status
from tests.operator.test_builders import restricted_violations

Obj = dict[str, Any]
UID = "0b6a0e1c-1111-4222-8333-444455556666"
NS = "team-a"

BASE: Obj = {
    "apiVersion": "kubetrain.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "gpu-run"},
    "spec": {
        "model": {"source": "builtin://tiny-llama"},
        "data": {"sources": [{"name": "corpus", "uri": "builtin://quickstart-corpus"}]},
        "hyperparameters": {"maxSteps": 10, "globalBatchSize": 24, "microBatchSize": 1},
        "resources": {"workers": 3, "gpusPerWorker": 8, "memoryPerWorker": "16Gi"},
        "checkpoint": {"storage": {"uri": "s3://bucket/runs"}},
    },
}

# Every placement field and override at once, as a GPU cluster with RDMA would ask.
FULL: Obj = copy.deepcopy(BASE)
FULL["spec"]["resources"] |= {
    "queueName": "team-a-gpus",
    "schedulerName": "gang-scheduler",
    "extendedResourcesPerWorker": {"rdma/hca": 1},
    "workerAffinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname"}
            ]
        },
    },
    "workerTopologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ],
}
FULL["spec"]["env"] = [
    {"name": "NCCL_DEBUG", "value": "INFO"},
    {"name": "SHARED", "value": "from-spec"},
]
FULL["spec"]["podOverrides"] = {
    "head": {
        "annotations": {"example.com/owner": "ml-team"},
        "initContainers": [{"name": "warm-cache", "command": ["true"]}],
    },
    "worker": {
        "labels": {"example.com/tier": "gpu"},
        "annotations": {"example.com/rdma": "on"},
        "env": [
            {"name": "NCCL_IB_HCA", "value": "mlx5"},
            {"name": "SHARED", "value": "from-worker"},
        ],
        "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}}],
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        "sidecars": [
            {
                "name": "log-shipper",
                "image": "example.com/shipper:1",
                "securityContext": {"runAsUser": 2000},
            }
        ],
        "capabilities": ["IPC_LOCK"],
    },
}


def run_of(doc: Obj) -> api.TrainingRun:
    return parse(copy.deepcopy(doc))


def pods_of(doc: Obj, attempt: int = 1) -> list[Obj]:
    run = run_of(doc)
    settings = OperatorSettings()
    return [
        builders.build_head_pod(run, UID, NS, attempt, settings),
        *builders.build_worker_pods(run, UID, NS, attempt, settings),
    ]


def env_of(pod: Obj) -> dict[str, str]:
    return {v["name"]: v.get("value", "") for v in pod["spec"]["containers"][0]["env"]}


# --------------------------------------------------------------------------------------
# Kueue gang admission
# --------------------------------------------------------------------------------------


def test_every_pod_of_an_attempt_is_one_kueue_pod_group() -> None:
    first, second = pods_of(FULL, attempt=1), pods_of(FULL, attempt=2)
    assert len(first) == 4  # head + 3 workers
    for pods, attempt in ((first, 1), (second, 2)):
        for pod in pods:
            labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
            assert labels[contract.LABEL_QUEUE] == "team-a-gpus"
            assert labels[contract.LABEL_POD_GROUP] == f"gpu-run-0b6a0e1c-a{attempt}"
            assert annotations[contract.ANNOTATION_POD_GROUP_TOTAL_COUNT] == "4"
            assert annotations[contract.ANNOTATION_RETRIABLE_IN_GROUP] == "false"
    # Deterministic: the same attempt builds the same group.
    assert pods_of(FULL, attempt=1) == first


def test_no_pod_group_without_a_queue() -> None:
    for pod in pods_of(BASE):
        assert not any(k.startswith("kueue.x-k8s.io/") for k in pod["metadata"]["labels"])
        assert not any(
            k.startswith("kueue.x-k8s.io/") for k in pod["metadata"].get("annotations", {})
        )


# --------------------------------------------------------------------------------------
# Placement and overrides, merged
# --------------------------------------------------------------------------------------


def test_scheduling_fields_reach_the_pods() -> None:
    head, *workers = pods_of(FULL)
    assert head["spec"]["schedulerName"] == "gang-scheduler"
    assert "affinity" not in head["spec"]
    assert "topologySpreadConstraints" not in head["spec"]
    attempt_workers = {
        "matchLabels": {
            contract.LABEL_RUN: "gpu-run",
            contract.LABEL_ROLE: "worker",
            contract.LABEL_ATTEMPT: "1",
        }
    }
    for pod in workers:
        spec = pod["spec"]
        assert spec["schedulerName"] == "gang-scheduler"
        anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti == [{"topologyKey": "kubernetes.io/hostname", "labelSelector": attempt_workers}]
        assert (
            spec["affinity"]["nodeAffinity"]
            == FULL["spec"]["resources"]["workerAffinity"]["nodeAffinity"]
        )
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["labelSelector"] == attempt_workers
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
        resources = spec["containers"][0]["resources"]
        for amounts in resources.values():
            assert amounts["rdma/hca"] == "1"
            assert amounts["nvidia.com/gpu"] == "8"


def test_a_given_label_selector_is_kept() -> None:
    doc = copy.deepcopy(FULL)
    own = {"matchLabels": {"team": "a"}}
    doc["spec"]["resources"]["workerTopologySpreadConstraints"][0]["labelSelector"] = own
    for pod in pods_of(doc)[1:]:
        assert pod["spec"]["topologySpreadConstraints"][0]["labelSelector"] == own


def test_overrides_are_merged_over_the_built_pods() -> None:
    head, *workers = pods_of(FULL)
    plain_head, *plain_workers = pods_of(BASE)
    for pod, plain in ((head, plain_head), *zip(workers, plain_workers, strict=True)):
        # Nothing of the operator's is lost.
        assert plain["metadata"]["labels"].items() <= pod["metadata"]["labels"].items()
        built = {v["name"]: v for v in plain["spec"]["volumes"]}
        merged = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert built.items() <= merged.items()
        ray, plain_ray = pod["spec"]["containers"][0], plain["spec"]["containers"][0]
        assert ray["command"] == plain_ray["command"]
        assert ray["image"] == plain_ray["image"]
    # Restricted, but for the capability the workers asked for (RDMA needs IPC_LOCK).
    assert restricted_violations(head) == []
    for pod in workers:
        assert restricted_violations(pod) == ["container ray-worker adds capabilities ['IPC_LOCK']"]
    assert head["metadata"]["annotations"]["example.com/owner"] == "ml-team"
    (init,) = head["spec"]["initContainers"]
    assert init["name"] == "warm-cache"
    assert init["image"] == head["spec"]["containers"][0]["image"]  # the run's by default
    assert init["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    for pod in workers:
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["example.com/tier"] == "gpu"
        assert meta["annotations"]["example.com/rdma"] == "on"
        assert {"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}} in spec["volumes"]
        ray, sidecar = spec["containers"]
        assert {"name": "cache", "mountPath": "/cache", "readOnly": False} in ray["volumeMounts"]
        assert ray["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert sidecar["name"] == "log-shipper"
        assert sidecar["image"] == "example.com/shipper:1"
        assert sidecar["securityContext"]["runAsUser"] == 2000
        assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_env_layers_nccl_defaults_then_spec_then_role() -> None:
    head, worker, *_ = pods_of(FULL)
    env = env_of(worker)
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"  # a default
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"  # spec.env wins over the default
    assert env["SHARED"] == "from-worker"  # the role's env wins over spec.env
    assert env["NCCL_IB_HCA"] == "mlx5"
    names = [v["name"] for v in worker["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))
    assert env["RAY_AUTH_MODE"] == "token"
    # The head trains nothing: no NCCL defaults; spec.env still applies.
    assert "NCCL_SOCKET_IFNAME" not in env_of(head)
    assert env_of(head)["SHARED"] == "from-spec"


def test_no_nccl_defaults_on_cpu_workers() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"] = {"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": 2}
    doc["spec"]["hyperparameters"]["globalBatchSize"] = 2
    for pod in pods_of(doc):
        assert not any(name.startswith(("NCCL_", "TORCH_NCCL_")) for name in env_of(pod))


def test_apply_override_refuses_to_replace_the_operators_parts() -> None:
    run = run_of(BASE)
    pod = builders.build_head_pod(run, UID, NS, 1, OperatorSettings())
    before = copy.deepcopy(pod)
    for bad in (
        {"volumes": [{"name": "config", "emptyDir": {}}]},
        {"volumeMounts": [{"name": "storage", "mountPath": "/dev/shm"}]},
        {"sidecars": [{"name": "ray-head"}]},
        {"labels": {contract.LABEL_RUN: "other"}},
    ):
        with pytest.raises(ValueError, match="kubetrain's"):
            overrides.apply_override(pod, api.PodOverride.model_validate(bad), "ray-head")
    assert pod == before  # pure


# --------------------------------------------------------------------------------------
# /dev/shm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "size"),
    [("16Gi", "5940Mi"), ("2Gi", "1639Mi"), ("1Ti", "315597Mi"), (8 * 2**30, "3482Mi")],
)
def test_shared_memory_rule(memory: int | str, size: str) -> None:
    assert placement.shared_memory_size(memory) == size


def test_shared_memory_fits_rays_object_store_and_explicit_wins() -> None:
    _, worker, *_ = pods_of(BASE)
    shm = next(v for v in worker["spec"]["volumes"] if v["name"] == "dshm")
    limit = placement.quantity_value(shm["emptyDir"]["sizeLimit"])
    assert limit >= placement.quantity_value("16Gi") * placement.OBJECT_STORE_FRACTION + 2**30
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"]["sharedMemory"] = "3Gi"
    for pod in pods_of(doc):
        shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["sizeLimit"] == "3Gi"


# --------------------------------------------------------------------------------------
# Refusals, with the field path
# --------------------------------------------------------------------------------------


def _with(path: str, value: Any, doc: Obj = BASE) -> Obj:
    out = copy.deepcopy(doc)
    node = out["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


REFUSED: list[tuple[str, Obj, str]] = [
    (
        "ray command",
        _with("podOverrides.worker.command", ["sleep", "1"]),
        "spec.podOverrides.worker.command",
    ),
    (
        "sidecar named as the ray container",
        _with("podOverrides.worker.sidecars", [{"name": "ray-worker", "command": ["sh"]}]),
        "spec.podOverrides.worker.sidecars[0].name",
    ),
    (
        "reserved env in a role",
        _with("podOverrides.head.env", [{"name": "RAY_ADDRESS", "value": "x"}]),
        "spec.podOverrides.head.env[0].name",
    ),
    (
        "inline secret in a role's env",
        _with("podOverrides.worker.env", [{"name": "API_TOKEN", "value": "abc"}]),
        "spec.podOverrides.worker.env[0].value",
    ),
    (
        "privileged sidecar",
        _with(
            "podOverrides.worker.sidecars", [{"name": "s", "securityContext": {"privileged": True}}]
        ),
        "spec.podOverrides.worker.sidecars[0].securityContext.privileged",
    ),
    (
        "root init container",
        _with(
            "podOverrides.head.initContainers",
            [{"name": "i", "securityContext": {"runAsNonRoot": False}}],
        ),
        "spec.podOverrides.head.initContainers[0].securityContext.runAsNonRoot",
    ),
    (
        "sidecar capability outside the allowlist",
        _with(
            "podOverrides.worker.sidecars",
            [{"name": "s", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
        ),
        "spec.podOverrides.worker.sidecars[0].securityContext.capabilities.add[0]",
    ),
    (
        "capability outside the allowlist",
        _with("podOverrides.worker.capabilities", ["SYS_ADMIN"]),
        "spec.podOverrides.worker.capabilities[0]",
    ),
    (
        "head sidecar",
        _with("podOverrides.head.sidecars", [{"name": "s"}]),
        "spec.podOverrides.head.sidecars",
    ),
    (
        "reserved label",
        _with("podOverrides.worker.labels", {"kubetrain.dev/run": "x"}),
        "spec.podOverrides.worker.labels.kubetrain.dev/run",
    ),
    (
        "kueue annotation",
        _with("podOverrides.worker.annotations", {"kueue.x-k8s.io/pod-group-total-count": "9"}),
        "spec.podOverrides.worker.annotations.kueue.x-k8s.io/pod-group-total-count",
    ),
    (
        "bad label value",
        _with("podOverrides.worker.labels", {"team": "a b"}),
        "spec.podOverrides.worker.labels.team",
    ),
    (
        "kubetrain's volume name",
        _with("podOverrides.worker.volumes", [{"name": "dshm", "emptyDir": {}}]),
        "spec.podOverrides.worker.volumes[0].name",
    ),
    (
        "hostPath volume",
        _with("podOverrides.worker.volumes", [{"name": "dev", "hostPath": {"path": "/dev"}}]),
        "spec.podOverrides.worker.volumes[0]",
    ),
    (
        "mount over /dev/shm",
        _with(
            "podOverrides.worker",
            {
                "volumes": [{"name": "big", "emptyDir": {}}],
                "volumeMounts": [{"name": "big", "mountPath": "/dev/shm"}],
            },
        ),
        "spec.podOverrides.worker.volumeMounts[0].mountPath",
    ),
    (
        "mount of an unknown volume",
        _with("podOverrides.worker.volumeMounts", [{"name": "nope", "mountPath": "/x"}]),
        "spec.podOverrides.worker.volumeMounts[0].name",
    ),
    (
        "GPUs as an extended resource",
        _with("resources.extendedResourcesPerWorker", {"nvidia.com/gpu": 1}),
        "spec.resources.extendedResourcesPerWorker.nvidia.com/gpu",
    ),
    (
        "fractional extended resource",
        _with("resources.extendedResourcesPerWorker", {"rdma/hca": "500m"}),
        "spec.resources.extendedResourcesPerWorker.rdma/hca",
    ),
    (
        "spread constraint without a topology key",
        _with("resources.workerTopologySpreadConstraints", [{"maxSkew": 1}]),
        "spec.resources.workerTopologySpreadConstraints[0].topologyKey",
    ),
    (
        "RWO default storage with workers spread over nodes",
        _with(
            "checkpoint.storage",
            {"pvc": {"size": "10Gi"}},
            _with(
                "resources.workerAffinity",
                {"podAntiAffinity": FULL["spec"]["resources"]["workerAffinity"]["podAntiAffinity"]},
            ),
        ),
        "spec.checkpoint.storage.pvc",
    ),
]


@pytest.mark.parametrize(("doc", "path"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_the_field_path(doc: Obj, path: str) -> None:
    errors = validate_document(doc)
    assert path in {e.path for e in errors}, errors
    with pytest.raises(InvalidSpec):
        parse(doc)


def test_the_full_gpu_spec_is_valid() -> None:
    assert validate_document(copy.deepcopy(FULL)) == []


def test_rwx_or_object_store_storage_may_spread_over_nodes() -> None:
    spread = copy.deepcopy(FULL)
    for storage in ({"pvc": {"storageClassName": "shared-rwx"}}, {"pvc": {"claimName": "mine"}}):
        spread["spec"]["checkpoint"]["storage"] = storage
        assert validate_document(copy.deepcopy(spread)) == []


def test_rwo_default_storage_on_several_workers_is_a_warning() -> None:
    doc = _with("checkpoint.storage", {"pvc": {"size": "10Gi"}})
    assert validate_document(doc) == []
    ((path, message),) = placement.warnings(run_of(doc).spec)
    assert path == "spec.checkpoint.storage.pvc"
    assert "ReadWriteOnce" in message
    # CPU runs on one node (kind, the quickstart) are not warned about.
    small = _with("resources", {"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": 1}, doc)
    small["spec"]["hyperparameters"]["globalBatchSize"] = 2
    assert placement.warnings(run_of(small).spec) == []


def test_kubetrain_validate_prints_the_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_with("checkpoint.storage", {"pvc": {"size": "10Gi"}})))
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: spec.checkpoint.storage.pvc:" in err
    assert "ReadWriteOnce" in err


def test_the_operator_reports_the_warning_in_validated_and_once_as_an_event() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    run = run_of(_with("checkpoint.storage", {"pvc": {"size": "10Gi"}}))
    observed = Observed(run=run, generation=1, now=now)
    first = compute_status(observed)
    validated = find_condition(first.status["conditions"], "Validated")
    assert validated["status"] == "True"
    assert validated["message"].startswith("spec.checkpoint.storage.pvc: ")
    assert [(e.type, e.reason) for e in first.events if e.reason == "ValidWithWarnings"] == [
        ("Warning", "ValidWithWarnings")
    ]
    again = compute_status(replace(observed, previous=first.status))
    assert not [e for e in again.events if e.reason == "ValidWithWarnings"]
    clean = compute_status(Observed(run=run_of(BASE), generation=1, now=now))
    assert not find_condition(clean.status["conditions"], "Validated").get("message")
    assert not [e for e in clean.events if e.reason == "ValidWithWarnings"]

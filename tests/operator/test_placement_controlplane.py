"""Gang admission and placement through the operator, in-process, on the real API server:
a queued GPU run with placement fields and pod overrides. The API server accepts every pod
the operator builds (it checks the loose parts: affinity, spread, volumes, containers);
the pods stay Pending (no node has GPUs). The test reads back what the server stored.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetrain_api import contract
from tests.support.cluster import kubectl
from tests.support.runs import apply, quickstart, wait_pods

pytestmark = pytest.mark.controlplane

WORKERS = 3


def queued_gpu_run(name: str) -> dict[str, Any]:
    return quickstart(
        name,
        hyperparameters__globalBatchSize=24,
        hyperparameters__microBatchSize=8,
        resources={
            "workers": WORKERS,
            "gpusPerWorker": 1,
            "cpuPerWorker": 1,
            "memoryPerWorker": "2Gi",
            "head": {"cpu": 1, "memory": "2Gi"},
            "queueName": "team-gpus",
            "extendedResourcesPerWorker": {"rdma/hca": 1},
            "workerAffinity": {
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {"topologyKey": "kubernetes.io/hostname"}
                    ]
                }
            },
            "workerTopologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                }
            ],
        },
        # Workers on several nodes need shared (RWX) storage; validation refuses the
        # default RWO claim here.
        checkpoint__storage={"pvc": {"size": "1Gi", "storageClassName": "shared-rwx"}},
        podOverrides={
            "head": {"initContainers": [{"name": "warm-cache", "command": ["true"]}]},
            "worker": {
                "labels": {"example.com/tier": "gpu"},
                "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
                "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                "sidecars": [{"name": "log-shipper", "command": ["sleep", "infinity"]}],
                "capabilities": ["IPC_LOCK"],
            },
        },
    )


def test_every_pod_of_an_attempt_carries_the_kueue_group(operator: None, namespace: str) -> None:
    apply(queued_gpu_run("gang"), namespace)
    pods = wait_pods("gang", namespace, 1, WORKERS + 1)
    uid = kubectl("get", "tr", "gang", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    for pod in pods:
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels[contract.LABEL_QUEUE] == "team-gpus"
        assert labels[contract.LABEL_POD_GROUP] == f"gang-{uid[:8]}-a1"
        assert annotations[contract.ANNOTATION_POD_GROUP_TOTAL_COUNT] == str(WORKERS + 1)
        assert annotations[contract.ANNOTATION_RETRIABLE_IN_GROUP] == "false"

    (head,) = [p for p in pods if p["metadata"]["labels"][contract.LABEL_ROLE] == "head"]
    workers = [p for p in pods if p["metadata"]["labels"][contract.LABEL_ROLE] == "worker"]
    assert [c["name"] for c in head["spec"]["initContainers"]] == ["warm-cache"]
    assert [c["name"] for c in head["spec"]["containers"]] == ["ray-head"]
    for pod in workers:
        spec = pod["spec"]
        assert pod["metadata"]["labels"]["example.com/tier"] == "gpu"
        assert [c["name"] for c in spec["containers"]] == ["ray-worker", "log-shipper"]
        ray = spec["containers"][0]
        assert ray["resources"]["limits"]["rdma/hca"] == "1"
        assert ray["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        env = {v["name"]: v.get("value") for v in ray["env"]}
        assert env["NCCL_IB_HCA"] == "mlx5"
        assert env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert any(m["mountPath"] == "/cache" for m in ray["volumeMounts"])
        (anti,) = spec["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert anti["labelSelector"]["matchLabels"][contract.LABEL_ATTEMPT] == "1"
        assert spec["topologySpreadConstraints"][0]["labelSelector"] == anti["labelSelector"]
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1639Mi"}

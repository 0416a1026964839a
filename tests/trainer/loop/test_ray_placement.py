"""Rank placement on a real multi-node Ray cluster: 2 worker "pods" x 2 processes.

The cluster is built the way the operator builds it: a head with no CPUs and two worker
nodes whose Ray resources are read from the operator's own worker-pod command (`--num-cpus`,
`--resources`). Training then runs through the driver for two steps: every node must host
exactly two ranks, the head none, and FSDP2 must shard the parameters four ways.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain_api import validation
from kubetrain_operator.builders import build_worker_pods
from kubetrain_operator.settings import OperatorSettings
from tests.support.runs import quickstart

pytestmark = pytest.mark.trainer


def _run_doc() -> dict:
    return quickstart(
        "placement",
        model={"source": "builtin://tiny-llama", "configOverrides": {"vocab_size": 512}},
        data__sequenceLength=32,
        hyperparameters__globalBatchSize=8,
        hyperparameters__microBatchSize=2,
        hyperparameters__maxSteps=2,
        hyperparameters__schedule={"warmupSteps": 1},
        # 3 CPUs a pod: CPU-only bundles would PACK 3 ranks onto one pod and 1 onto the other.
        resources={"workers": 2, "processesPerWorker": 2, "cpuPerWorker": 3},
        checkpoint__intervalSteps=2,
        evaluation={"intervalSteps": 2, "metrics": ["loss"], "maxBatches": 1},
    )


def ray_start_options(pod: dict) -> dict:
    """--num-cpus and --resources of the `ray start` in an operator-built worker pod."""
    script = pod["spec"]["containers"][0]["command"][-1]
    words = shlex.split(script.split("exec ", 1)[1])
    options = dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)
    return {
        "num_cpus": int(options["--num-cpus"]),
        "num_gpus": int(options["--num-gpus"]),
        "resources": json.loads(options["--resources"]),
    }


@pytest.fixture
def cluster() -> Iterator[str]:
    import ray
    from ray.cluster_utils import Cluster

    run = validation.parse(_run_doc())
    pods = build_worker_pods(run, "uid", "ns", 1, OperatorSettings())
    assert len(pods) == 2
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for pod in pods:
            c.add_node(**ray_start_options(pod))
        c.wait_for_nodes()
        yield c.address
    finally:
        ray.shutdown()
        c.shutdown()


def test_two_pods_host_two_ranks_each_and_fsdp_shards_four_ways(
    cluster: str, tmp_path: Path
) -> None:
    import ray

    from kubetrain_trainer.driver import run_training

    run = validation.parse(_run_doc())
    out = tmp_path / "placement"
    result = run_training(run, out, address=cluster, use_gpu=False, max_failures=0)
    assert result["step"] == 2

    ranks = [json.loads(p.read_text()) for p in sorted((out / "placement").glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
    assert {r["world_size"] for r in ranks} == {4}
    worker_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0}
    per_node = Counter(r["node_id"] for r in ranks)
    assert set(per_node) == worker_nodes, "a rank ran on the head, or a pod stayed idle"
    assert sorted(per_node.values()) == [2, 2]
    # (Not local ranks: Ray Train counts them per IP, and these test nodes share one.)

    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (setup,) = [e for e in events if e["kind"] == "setup"]
    assert setup["world_size"] == 4
    shares = [n / setup["params_total"] for n in setup["params_local_by_rank"]]
    assert len(shares) == 4
    assert all(0.2 <= s <= 0.3 for s in shares), shares
    assert sum(setup["params_local_by_rank"]) == setup["params_total"]


def test_the_worker_command_advertises_the_pods_share_of_ranks() -> None:
    run = validation.parse(_run_doc())
    (pod, _) = build_worker_pods(run, "uid", "ns", 1, OperatorSettings())
    assert ray_start_options(pod)["resources"] == {"kubetrain_worker_slot": 2}
    script = pod["spec"]["containers"][0]["command"][-1]
    assert re.search(r"--resources='\{\"kubetrain_worker_slot\": 2\}'", script)

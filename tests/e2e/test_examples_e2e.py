"""End to end on a real node (hack/node.py: containerd, kubelet, kube-proxy, cluster DNS)
joined to the local control plane, with the images built from this repository:

- `helm install` the chart as a user does: the operator runs as its pod, in-cluster, with
  the chart's ServiceAccount, RBAC and restricted security context;
- `kubectl apply` the quickstart: the Ray head and two workers run from the CPU trainer
  image as uid 1000 with a read-only root; FSDP2 trains across the two worker pods;
- a worker's container is killed, later a worker pod is deleted: each time the run goes
  on from its latest checkpoint; it succeeds; the head's log is read with `kubectl logs`;
- the serving pod answers the `openai` client through its Service's ClusterIP;
- a run whose workers exceed their memory limit is classified OOMKilled, retried per its
  run policy and failed; the head it leaves behind stops promptly on SIGTERM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import contract
from tests.helm.chart import NAMESPACE, install_release, operator_identity_from_chart
from tests.support.cluster import kubectl, wait_until
from tests.support.images import built_images
from tests.support.realnode import RealNode
from tests.support.runs import apply, condition, get_run, quickstart, status, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane]

STEPS, CHECKPOINT = 60, 20
OPERATOR_DEPLOYMENT = "kubetrain-operator"
# The node has 2 CPUs: the head, two workers and the serving pod share them.
SMALL = {"cpu": "250m", "memory": "2Gi"}


@pytest.fixture(scope="module")
def chart_operator(cluster: Any, crd_installed: None, real_node: RealNode) -> Iterator[str]:
    """Both images on the node, then `helm install` with the chart's defaults except the CPU
    trainer's tag and a shorter resync. Yields the trainer image."""
    refs = built_images(real_node)
    values = {
        "trainer": {"image": {"tag": refs["trainer"].rsplit(":", 1)[1]}},
        "operator": {"resyncSeconds": 2},
    }
    with operator_identity_from_chart(cluster):
        install_release(cluster, values)
        try:
            kubectl(
                "rollout", "status", f"deploy/{OPERATOR_DEPLOYMENT}", "-n", NAMESPACE,
                "--timeout=180s", timeout=200,
            )  # fmt: skip
            yield refs["trainer"]
        except BaseException:
            sys.stderr.write(real_node.diagnostics(NAMESPACE))
            raise
        finally:
            sys.stderr.write(_operator_log_tail())
    # Uninstalled: no second operator may reconcile the runs of later tests.
    wait_until(
        lambda: not kubectl("get", "pods", "-n", NAMESPACE, "-o", "name").stdout.strip(),
        timeout=120,
        message="the chart's operator pod to go",
    )


def _operator_log_tail() -> str:
    out = kubectl(
        "logs", f"deploy/{OPERATOR_DEPLOYMENT}", "-n", NAMESPACE, "--tail=60", check=False
    )
    return f"\n----- operator log (tail) -----\n{out.stdout}{out.stderr}\n"


def small_run(name: str, **changes: Any) -> dict[str, Any]:
    """The quickstart sized for the 2-CPU node."""
    return quickstart(
        name,
        resources__cpuPerWorker=SMALL["cpu"],
        resources__head=SMALL,
        serve__resources=SMALL,
        **changes,
    )


def container_id(namespace: str, pod: str) -> str:
    out = kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout
    (container,) = json.loads(out)["status"]["containerStatuses"]
    return str(container["containerID"]).removeprefix("containerd://")


def kill_container(node: RealNode, namespace: str, pod: str) -> None:
    """SIGKILL the pod's container through containerd, as the kernel's OOM killer or a
    crash would: the container exits 137 and the kubelet reports it."""
    subprocess.run(
        ["ctr", "--address", str(node.node.containerd_socket), "-n", "k8s.io",
         "tasks", "kill", "--signal", "SIGKILL", container_id(namespace, pod)],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def storage_events(namespace: str, run: str) -> list[dict[str, Any]]:
    """The trainer's events (metrics.jsonl) on the run's volume, read from the host."""
    claim = json.loads(
        kubectl(
            "get", "pvc", "-n", namespace, "-l", f"kubetrain.dev/run={run}", "-o", "json"
        ).stdout
    )["items"][0]
    pv = json.loads(kubectl("get", "pv", claim["spec"]["volumeName"], "-o", "json").stdout)
    # `kubetrain run --output-dir /storage --run-uid UID` keeps each run in its own folder.
    folder = contract.run_folder(run, get_run(run, namespace)["metadata"]["uid"])
    path = Path(pv["spec"]["hostPath"]["path"]) / folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpointed(namespace: str, run: str) -> int:
    """The run's latest committed checkpoint step; fails at once if the run failed."""
    st = status(run, namespace)
    if st.get("phase") == "Failed":
        pytest.fail(f"{run} failed: {condition(st, 'Failed')}")
    return int(st.get("checkpoints", {}).get("latest", {}).get("step", 0))


def wait_checkpoint(namespace: str, run: str, step: int) -> dict[str, Any]:
    wait_until(
        lambda: checkpointed(namespace, run) >= step,
        timeout=900,
        interval=0.5,
        message=f"the checkpoint of step {step}",
    )
    return status(run, namespace)


def test_quickstart_trains_on_real_pods_resumes_and_serves(
    real_node: RealNode, chart_operator: str, namespace: str
) -> None:
    started = time.monotonic()
    run = small_run(
        "quickstart",
        hyperparameters__maxSteps=STEPS,
        checkpoint__intervalSteps=CHECKPOINT,
        evaluation__intervalSteps=CHECKPOINT,
        evaluation__gate=[{"metric": "perplexity", "max": 1000}],
        # Two failures are caused on purpose; room for one slow Ray start on 2 cores.
        runPolicy__backoffLimit=4,
    )
    apply(run, namespace)
    try:
        first = wait_checkpoint(namespace, "quickstart", CHECKPOINT)
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        head = next(p for p in pods if p["metadata"]["labels"].get("kubetrain.dev/role") == "head")
        # Training pods run as the image's non-root user, on a read-only root.
        for pod in pods:
            ctx = pod["spec"]["containers"][0]["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        uid = kubectl("exec", head["metadata"]["name"], "-n", namespace, "--", "id", "-u")
        assert uid.stdout.strip() == "1000"
        assert pods
        assert all(p["spec"]["nodeName"] == real_node.name for p in pods)

        # 1. A worker's container dies (as an OOM kill or a crash would).
        kill_container(real_node, namespace, f"quickstart-a{first['attempts']}-worker-1")
        wait_until(
            lambda: status("quickstart", namespace).get("attempts", 0) > first["attempts"],
            timeout=300,
            message="a new attempt after the container kill",
        )
        second = wait_checkpoint(namespace, "quickstart", 2 * CHECKPOINT)
        # 2. A worker pod is deleted (a drained node, a user's mistake).
        kubectl(
            "delete", "pod", f"quickstart-a{second['attempts']}-worker-0", "-n", namespace,
            "--wait=false",
        )  # fmt: skip
        final = wait_phase("quickstart", namespace, "Succeeded", timeout=900)
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    trained = time.monotonic() - started
    assert final["attempts"] > second["attempts"]
    assert final["progress"]["step"] == STEPS
    assert final["evaluation"]["metrics"]["perplexity"] < 1000
    assert final["model"]
    # Each attempt after the first started from a committed checkpoint, not from scratch.
    resumed = [
        e["resumed_from"] for e in storage_events(namespace, "quickstart") if e["kind"] == "setup"
    ]
    assert resumed[0] == 0
    assert CHECKPOINT in resumed[1:]
    assert max(resumed) >= 2 * CHECKPOINT

    # The driver's output is in the head's log, through the API server and the kubelet.
    logs = kubectl(
        "logs", f"quickstart-a{final['attempts']}-head", "-n", namespace, "--tail=200"
    ).stdout
    assert f"run quickstart: {STEPS} steps" in logs

    wait_until(
        lambda: condition(status("quickstart", namespace), "Serving").get("status") == "True",
        timeout=300,
        message="Serving condition True",
    )
    cluster_ip = json.loads(
        kubectl("get", "svc", "quickstart-serve", "-n", namespace, "-o", "json").stdout
    )["spec"]["clusterIP"]

    import openai

    client = openai.OpenAI(base_url=f"http://{cluster_ip}:80/v1", api_key="-", timeout=30)
    completion = client.completions.create(
        model="quickstart", prompt="the cat was", max_tokens=8, seed=0
    )
    assert completion.choices[0].text
    sys.stderr.write(
        f"\ne2e: trained in {trained:.0f}s over {final['attempts']} attempts (resumed from"
        f" {resumed}), served after {time.monotonic() - started:.0f}s;"
        f" completion={completion.choices[0].text!r}\n"
    )


def test_workers_over_their_memory_limit_are_oomkilled_and_retried(
    real_node: RealNode, chart_operator: str, namespace: str
) -> None:
    # Importing Ray alone takes more than this; the kernel kills the worker's container.
    run = small_run("oom", resources__memoryPerWorker="96Mi", runPolicy__backoffLimit=1)
    apply(run, namespace)
    try:
        # The first attempt's head waits for workers that never join; when the operator
        # starts the next attempt it deletes that head, which must stop on SIGTERM at once
        # (not after the grace period).
        head = "oom-a1-head"
        wait_until(
            lambda: kubectl("get", "pod", head, "-n", namespace, check=False).returncode == 0,
            timeout=300,
            message=f"pod {head}",
        )
        grace = json.loads(kubectl("get", "pod", head, "-n", namespace, "-o", "json").stdout)[
            "spec"
        ]["terminationGracePeriodSeconds"]
        deleting = wait_until(
            lambda: json.loads(
                kubectl("get", "pod", head, "-n", namespace, "-o", "json", check=False).stdout
                or '{"metadata": {"deletionTimestamp": "gone"}}'
            )["metadata"].get("deletionTimestamp"),
            timeout=600,
            interval=0.2,
            message=f"{head} to be deleted by the operator",
        )
        asked = time.monotonic()
        wait_until(
            lambda: kubectl("get", "pod", head, "-n", namespace, check=False).returncode != 0,
            timeout=grace + 30,
            interval=0.2,
            message=f"{head} to stop",
        )
        stopped_after = time.monotonic() - asked
        final = wait_phase("oom", namespace, "Failed", timeout=600)
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    failed = condition(final, "Failed")
    assert final["attempts"] == 2  # backoffLimit 1: one retry
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"].startswith("OOMKilled:"), failed
    assert "exit code 137" in failed["message"]
    assert deleting != "gone", f"{head} went before its deletion could be seen"
    assert stopped_after < grace / 2, f"head took {stopped_after:.1f}s of its {grace}s"
    sys.stderr.write(f"\noom: head stopped {stopped_after:.1f}s after deletion; {failed}\n")

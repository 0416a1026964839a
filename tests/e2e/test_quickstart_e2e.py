"""End to end on the local control plane: `kubectl apply` the quickstart TrainingRun; the
real `kubetrain operator` (with the chart's RBAC) creates the Ray cluster; the node runner
runs the head and the two workers as local processes (Ray forms a 3-node cluster, FSDP2
trains across the two worker pods); the run reaches Succeeded with progress, evaluation
and model; the serving Deployment's pod runs `kubetrain serve`, and the `openai` client
gets a completion through the Service's ClusterIP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helm.chart import install_release, operator_identity_from_chart
from tests.support.cluster import controlplane, kubectl, wait_until
from tests.support.node import NodeRunner
from tests.support.operators import free_port, operator_command
from tests.support.runs import apply, quickstart, status, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane]

STEPS, CHECKPOINT = 60, 20


@pytest.fixture
def operator_process(cluster: Any, crd_installed: None, tmp_path: Path) -> Iterator[Path]:
    """`helm install` the chart, then `kubetrain operator` as a local process with the
    operator token, whose identity is the chart's ServiceAccount: only the chart's RBAC
    applies to it. (The chart's own operator pod is kept off the node runner by a node
    selector: it would need in-cluster credentials the runner does not project.)
    Yields the operator's log."""
    with operator_identity_from_chart(cluster):
        install_release(cluster, {"nodeSelector": {"kubetrain.dev/e2e": "no-such-node"}})
        log = tmp_path / "operator.log"
        env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
        env["KUBETRAIN_RESYNC_SECONDS"] = "2"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                operator_command(free_port()),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=controlplane._parent_death_signal(),
            )
        try:
            yield log
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kill_container(namespace: str, pod: str) -> None:
    """SIGKILL the pod's container (its PID 1, the node runner's shim's child), as an OOM
    kill or a crashed node would: the container exits 137."""
    out = kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout
    (container,) = json.loads(out)["status"]["containerStatuses"]
    shim = int(container["containerID"].removeprefix("noderunner://"))
    (init,) = Path(f"/proc/{shim}/task/{shim}/children").read_text().split()
    os.kill(int(init), signal.SIGKILL)


def storage_events(namespace: str, run: str) -> list[dict[str, Any]]:
    """The trainer's events (metrics.jsonl) on the run's volume, read from the host."""
    claim = json.loads(
        kubectl(
            "get", "pvc", "-n", namespace, "-l", f"kubetrain.dev/run={run}", "-o", "json"
        ).stdout
    )["items"][0]
    pv = json.loads(kubectl("get", "pv", claim["spec"]["volumeName"], "-o", "json").stdout)
    # `kubetrain run --output-dir /storage` keeps each run in a folder of its name.
    path = Path(pv["spec"]["hostPath"]["path"]) / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpointed(namespace: str, run: str) -> int:
    """The run's latest committed checkpoint step; fails at once if the run failed."""
    st = status(run, namespace)
    if st.get("phase") == "Failed":
        failed = [c for c in st.get("conditions", []) if c["type"] == "Failed"]
        pytest.fail(f"{run} failed: {failed}")
    return int(st.get("checkpoints", {}).get("latest", {}).get("step", 0))


def test_quickstart_trains_on_ray_pods_resumes_and_serves(
    node: NodeRunner, operator_process: Path, namespace: str
) -> None:
    started = time.monotonic()
    # Shorter than the example (200 steps) to keep the test quick; the gate stays on.
    run = quickstart(
        "quickstart",
        hyperparameters__maxSteps=STEPS,
        checkpoint__intervalSteps=CHECKPOINT,
        evaluation__intervalSteps=CHECKPOINT,
        evaluation__gate=[{"metric": "perplexity", "max": 1000}],
        # Room for an attempt whose Ray node misses Ray's fixed 30 s start-up wait on a
        # busy 2-core machine, besides the one the test kills.
        runPolicy__backoffLimit=6,
    )
    apply(run, namespace)
    try:
        # A worker dies mid-training once the first checkpoint is committed.
        wait_until(
            lambda: checkpointed(namespace, "quickstart") >= CHECKPOINT,
            timeout=900,
            interval=0.5,
            message=f"the checkpoint of step {CHECKPOINT}",
        )
        at_kill = status("quickstart", namespace)
        killed_at, killed_attempt = at_kill["progress"]["step"], at_kill["attempts"]
        kill_container(namespace, f"quickstart-a{killed_attempt}-worker-1")
        final = wait_phase("quickstart", namespace, "Succeeded", timeout=900)
    except BaseException:
        sys.stderr.write(operator_process.read_text()[-5000:])
        raise
    trained = time.monotonic() - started
    assert killed_at < STEPS, "the kill came after training had finished"
    # The killed attempt was retried (on a loaded machine an attempt may also fail to
    # form its Ray cluster in time, and be retried too).
    assert final["attempts"] > killed_attempt
    assert final["progress"]["step"] == STEPS
    assert final["evaluation"]["metrics"]["perplexity"] < 1000
    assert final["model"]
    # The second attempt started from the committed checkpoint, not from scratch.
    resumed = [
        e["resumed_from"] for e in storage_events(namespace, "quickstart") if e["kind"] == "setup"
    ]
    assert resumed[0] == 0
    assert max(resumed) >= CHECKPOINT

    serving = wait_until(
        lambda: (
            (s := status("quickstart", namespace).get("serving", {}))
            and any(
                c["type"] == "Serving" and c["status"] == "True"
                for c in status("quickstart", namespace).get("conditions", [])
            )
            and s
        ),
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
        f"\ne2e: trained in {trained:.0f}s, served after {time.monotonic() - started:.0f}s;"
        f" serving={serving}, completion={completion.choices[0].text!r}\n"
    )

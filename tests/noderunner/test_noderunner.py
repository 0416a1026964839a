"""hack/noderunner.py against the real local control plane: pods bound by kube-scheduler
run as local processes with their volumes, network and Services, and report their status
like a kubelet would."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import kubectl, wait_until
from tests.support.node import NodeRunner

pytestmark = pytest.mark.controlplane


def apply(namespace: str, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


def get_pod(namespace: str, name: str) -> dict[str, Any]:
    out = kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(out.stdout)) if out.returncode == 0 else {}


def wait_phase(namespace: str, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    return wait_until(
        lambda: (p := get_pod(namespace, name)).get("status", {}).get("phase") == phase and p,
        timeout=timeout,
        message=f"pod {name} {phase}",
    )


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "ignored", "command": ["bash", "-c", script]}
    container |= spec.pop("container", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def terminated(p: dict[str, Any]) -> dict[str, Any]:
    return dict(p["status"]["containerStatuses"][0]["state"]["terminated"])


def test_exit_status_termination_message_configmap_and_field_env(
    node: NodeRunner, namespace: str
) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "greeting"},
        "data": {"text": "hello"},
    }
    ok = pod(
        "ok",
        'echo "$(cat /etc/greeting/text) from $POD_IP" > /dev/termination-log; echo done',
        container={
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "volumeMounts": [{"name": "greeting", "mountPath": "/etc/greeting"}],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        },
        volumes=[{"name": "greeting", "configMap": {"name": "greeting"}}],
    )
    apply(namespace, config, ok, pod("fails", "echo oops >&2; exit 3"))

    done = wait_phase(namespace, "ok", "Succeeded")
    ip = done["status"]["podIP"]
    assert ip.startswith("10.")
    assert done["spec"]["nodeName"] == node.name  # bound by kube-scheduler
    assert terminated(done)["exitCode"] == 0
    assert terminated(done)["reason"] == "Completed"
    assert terminated(done)["message"] == f"hello from {ip}\n"
    assert "done" in node.pod_log(namespace, "ok", "main")

    failed = wait_phase(namespace, "fails", "Failed")
    assert terminated(failed)["exitCode"] == 3
    assert terminated(failed)["reason"] == "Error"
    assert "oops" in node.pod_log(namespace, "fails", "main")


def test_pods_share_a_claim_and_restart_policy_always_restarts(
    node: NodeRunner, namespace: str
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    volume = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]}
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    writer = pod("writer", "echo from-writer > /data/file", container=mount, **volume)
    reader = pod(
        "reader",
        "until [ -f /data/file ]; do sleep 0.2; done; cat /data/file > /dev/termination-log",
        container=mount,
        **volume,
    )
    flaky = pod("flaky", "echo run; exit 1", restartPolicy="Always")
    apply(namespace, claim, writer, reader, flaky)

    assert terminated(wait_phase(namespace, "reader", "Succeeded"))["message"] == "from-writer\n"
    restarted = wait_until(
        lambda: (
            (get_pod(namespace, "flaky").get("status", {}).get("containerStatuses") or [{}])[0].get(
                "restartCount", 0
            )
            >= 1
        ),
        timeout=20,
        message="flaky to restart",
    )
    assert restarted
    assert get_pod(namespace, "flaky")["status"]["phase"] == "Running"


def test_services_resolve_and_cluster_ip_proxies_from_the_host(
    node: NodeRunner, namespace: str
) -> None:
    server = pod(
        "server",
        "echo served-by-$HOSTNAME > index.html; exec python3 -m http.server 8080",
        container={
            "workingDir": "/tmp",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        },
    )
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server-headless"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app": "server"},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http"}],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server"},
        "spec": {
            "selector": {"app": "server"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
    client = pod(
        "client",
        f"until curl -sf http://server-headless.{namespace}.svc:8080/ -o /tmp/a; do sleep 0.3;"
        " done; until curl -sf http://server/ -o /tmp/b; do sleep 0.3; done;"
        " cat /tmp/a /tmp/b > /dev/termination-log",
    )
    apply(namespace, server, headless, service, client)

    running = wait_until(
        lambda: (
            (p := get_pod(namespace, "server"))
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )
            and p
        ),
        timeout=30,
        message="server Ready (readiness probe)",
    )
    assert running["status"]["containerStatuses"][0]["ready"] is True
    done = wait_phase(namespace, "client", "Succeeded")
    assert terminated(done)["message"] == "served-by-server\nserved-by-server\n"

    cluster_ip = json.loads(kubectl("get", "svc", "server", "-n", namespace, "-o", "json").stdout)[
        "spec"
    ]["clusterIP"]

    def fetch() -> str:
        try:
            with urllib.request.urlopen(f"http://{cluster_ip}:80/", timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    assert wait_until(fetch, timeout=20, message=f"http://{cluster_ip}/ from the host") == (
        "served-by-server\n"
    )


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()  # noqa: SIM115
        except OSError:
            continue
        out |= {int(k) for k in kids}
        todo += [int(k) for k in kids]
    return out


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
    except OSError:
        return False
    return state not in ("Z", "X")


def test_deleting_a_pod_ends_all_its_processes(node: NodeRunner, namespace: str) -> None:
    # A background child that ignores SIGTERM, under PID 1 that ignores it too (bash as
    # PID 1 of its namespace): only the SIGKILL after the grace period ends them.
    sleeper = pod(
        "sleeper",
        "(trap '' TERM; sleep 1000) & sleep 1000 & wait",
        terminationGracePeriodSeconds=2,
    )
    apply(namespace, sleeper)
    running = wait_phase(namespace, "sleeper", "Running")
    # The container ID names the shim that leads the container's processes.
    shim = int(running["status"]["containerStatuses"][0]["containerID"].split("://")[1])
    assert shim in node.started_pids()
    procs = wait_until(
        lambda: len(d := descendants(shim)) >= 3 and d, timeout=10, message="the pod's processes"
    )
    started = time.monotonic()
    kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
    wait_until(lambda: not get_pod(namespace, "sleeper"), timeout=30, message="pod deleted")
    assert time.monotonic() - started >= 1.5  # the grace period was given
    wait_until(
        lambda: not any(alive(p) for p in procs | {shim}), timeout=10, message="processes gone"
    )


def test_pod_environment_is_isolated(node: NodeRunner, namespace: str) -> None:
    """Own PID namespace, hostname, /tmp; PATH starts with the venv's bin, which stays
    reachable even when it lives under the host's /tmp (as in a CI clone)."""
    marker = Path(tempfile.gettempdir()) / f"kt-host-only-{uuid.uuid4().hex[:8]}"
    marker.touch()
    try:
        # `$$` is Kubernetes' escape for `$`, so bash sees `$$` (its pid) as `$$$$` here.
        probe = pod(
            "env",
            f'echo "$(hostname) $$$$ $(test -e {marker} && echo seen || echo unseen)'
            ' ${PATH%%:*} $(test -x ${PATH%%:*}/kubetrain && echo runs || echo missing)"'
            " > /dev/termination-log",
        )
        apply(namespace, probe)
        message = terminated(wait_phase(namespace, "env", "Succeeded"))["message"].split()
    finally:
        marker.unlink()
    assert message[:3] == ["env", "1", "unseen"]
    assert message[3] == str(Path(sys.prefix) / "bin")
    assert message[4] == "runs"

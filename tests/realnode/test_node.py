"""Pods on a real node (hack/node.py): containerd + kubelet + kube-proxy + cluster DNS.

One node for the module; each test runs a few real pods from a busybox image built here.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import kubectl, wait_until
from tests.support.realnode import RealNode

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]
POD_TIMEOUT = 90


def _apply(manifest: dict[str, Any] | list[dict[str, Any]], namespace: str) -> None:
    items = manifest if isinstance(manifest, list) else [manifest]
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


def _pod(name: str, image: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", script],
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": spec.pop("labels", {"app": name})},
        "spec": {
            "containers": [container],
            "terminationGracePeriodSeconds": 1,
            **spec,
        },
    }


def _get(kind: str, name: str, namespace: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout))


def _wait_phase(node: RealNode, namespace: str, pod: str, phases: set[str]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = _get("pod", pod, namespace)
        phase = obj.get("status", {}).get("phase")
        if phase in phases:
            return obj
        if phase in ("Failed", "Succeeded"):
            pytest.fail(f"pod {pod} ended {phase}:\n{node.diagnostics(namespace)}")
        return None

    try:
        return wait_until(check, timeout=POD_TIMEOUT, message=f"pod {pod} {phases}")
    except BaseException:
        print(node.diagnostics(namespace))
        raise


def _exec(namespace: str, pod: str, script: str, check: bool = True) -> str:
    proc = kubectl("exec", "-n", namespace, pod, "--", "/bin/sh", "-c", script, check=check)
    return proc.stdout + proc.stderr


def test_node_is_ready(rnode: RealNode) -> None:
    node = json.loads(kubectl("get", "node", rnode.name, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True", conditions
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == rnode.ip
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.20.2"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def test_pod_runs_with_logs_and_exec(rnode: RealNode, namespace: str) -> None:
    image = rnode.busybox_image()
    _apply(_pod("hello", image, "echo hello-from-$(hostname); exec sleep 3600"), namespace)
    pod = _wait_phase(rnode, namespace, "hello", {"Running"})
    assert pod["spec"]["nodeName"] == rnode.name
    assert pod["status"]["podIP"].rsplit(".", 1)[0] == rnode.subnet.rsplit(".", 1)[0]
    wait_until(
        lambda: "hello-from-hello" in kubectl("logs", "-n", namespace, "hello").stdout,
        timeout=30,
        message="the pod's log line",
    )
    assert _exec(namespace, "hello", "echo $((6 * 7)); id -u").split() == ["42", "0"]
    # The container's files come from the image: busybox's applets in /bin.
    assert "busybox" in _exec(namespace, "hello", "readlink /bin/sh")


def test_services_dns_and_api_server(rnode: RealNode, namespace: str) -> None:
    """ClusterIP (also from its own backend), headless Service by DNS names, the API server
    through `kubernetes.default.svc`, and nothing beyond the node."""
    image = rnode.busybox_image()
    # A listener on every host address: pods may reach it on the bridge address only.
    host_ip = _outside_address()
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    threading.Thread(target=_accept_forever, args=(listener,), daemon=True).start()
    web = _pod(
        "web",
        image,
        "mkdir -p /tmp/www && echo pong-from-$(hostname) > /tmp/www/index.html && "
        "exec httpd -f -p 8080 -h /tmp/www",
        labels={"app": "web"},
    )
    services = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-headless"},
            "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]},
        },
    ]
    client = _pod("client", image, "exec sleep 3600", labels={"app": "client"})
    _apply([web, *services, client], namespace)
    web_pod = _wait_phase(rnode, namespace, "web", {"Running"})
    _wait_phase(rnode, namespace, "client", {"Running"})
    web_ip = web_pod["status"]["podIP"]
    cluster_ip = _get("service", "web", namespace)["spec"]["clusterIP"]

    def fetch(pod: str, host: str, port: int = 80) -> str:
        # An HTTP GET through nc: busybox-static's wget crashes in glibc's static NSS.
        script = f"(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc -w 5 {host} {port}"
        return _exec(namespace, pod, script, check=False)

    fqdn = f"web.{namespace}.svc.cluster.local"
    for host in ("web", f"web.{namespace}", fqdn):
        wait_until(
            lambda host=host: "pong-from-web" in fetch("client", host),
            timeout=30,
            message=f"{host}:80 from the client pod",
        )
    # Hairpin: the backend reaches itself through its Service's ClusterIP.
    assert "pong-from-web" in fetch("web", cluster_ip)
    # The host reaches it too (kube-proxy's OUTPUT rules; the replies come back in through
    # the bridge, addressed to the host's own address).
    with urllib.request.urlopen(f"http://{cluster_ip}:80/", timeout=10) as reply:
        assert b"pong-from-web" in reply.read()
    headless = f"web-headless.{namespace}.svc.cluster.local"
    lookup = wait_until(
        lambda: (
            (out := _exec(namespace, "client", f"nslookup {headless}", check=False))
            and web_ip in out
            and out
        ),
        timeout=30,
        message=f"{headless} -> {web_ip}",
    )
    assert cluster_ip not in lookup
    assert "pong-from-web" in fetch("client", "web-headless", 8080)
    # The API server, through the kubernetes Service and the node's forwarder: Go's HTTPS
    # server answers a plain HTTP request with its own 400 (busybox has no usable TLS client).
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert "BEGIN CERTIFICATE" in _exec(namespace, "client", f"cat {sa}/ca.crt")
    assert _exec(namespace, "client", f"cat {sa}/namespace") == namespace
    hello = _exec(
        namespace,
        "client",
        "(printf 'GET /version HTTP/1.0\\r\\n\\r\\n'; sleep 2)"
        " | nc -w 5 kubernetes.default.svc 443",
    )
    assert "Client sent an HTTP request to an HTTPS server" in hello, hello
    # Confinement: the host's bridge address is reachable, its other addresses are not.
    assert "OPEN" in _exec(namespace, "client", f"echo | nc -w 3 {rnode.ip} {port} && echo OPEN")
    blocked = _exec(
        namespace, "client", f"echo | nc -w 3 {host_ip} {port} && echo OPEN", check=False
    )
    assert "OPEN" not in blocked, blocked
    listener.close()
    # A pod going away must not disturb the others (the bridge keeps its MAC, so their ARP
    # entry for the gateway - DNS, Services - stays valid).
    mac = Path(f"/sys/class/net/{rnode.node.bridge}/address").read_text()
    # Graceful: the API object goes once the kubelet has stopped the sandbox (veth gone).
    kubectl("delete", "pod", "web", "-n", namespace, "--grace-period=1", "--wait=true")
    assert Path(f"/sys/class/net/{rnode.node.bridge}/address").read_text() == mac
    after = _exec(namespace, "client", "echo | nc -w 3 kubernetes.default.svc 443 && echo OPEN")
    assert "OPEN" in after, after


def _outside_address() -> str:
    """This machine's address on its default route (not loopback, not the pod bridge)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # no packet is sent for a UDP connect
        return str(s.getsockname()[0])


def _accept_forever(listener: socket.socket) -> None:
    with __import__("contextlib").suppress(OSError):
        while True:
            conn, _ = listener.accept()
            conn.close()


def test_memory_limit_oomkilled(rnode: RealNode, namespace: str) -> None:
    image = rnode.busybox_image()
    pod = _pod(
        "hog",
        image,
        "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived",
        restartPolicy="Never",
        container={"resources": {"limits": {"memory": "32Mi", "cpu": "500m"}}},
    )
    _apply(pod, namespace)
    done = wait_until(
        lambda: (
            (p := _get("pod", "hog", namespace))["status"].get("phase") in ("Failed", "Succeeded")
            and p
        ),
        timeout=POD_TIMEOUT,
        message="the memory hog to end",
    )
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled", terminated
    assert terminated["exitCode"] == 137
    assert done["status"]["phase"] == "Failed"


def test_security_context(rnode: RealNode, namespace: str) -> None:
    """readOnlyRootFilesystem is enforced; runAsNonRoot refuses a root image."""
    image = rnode.busybox_image()
    readonly = _pod(
        "readonly",
        image,
        "if touch /probe 2>/dev/null; then echo ROOT-WRITABLE; else echo ROOT-READONLY; fi; "
        "touch /scratch/ok && echo SCRATCH-OK; exec sleep 3600",
        container={
            "securityContext": {"readOnlyRootFilesystem": True},
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        },
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    nonroot = _pod("nonroot", image, "exec sleep 3600", securityContext={"runAsNonRoot": True})
    _apply([readonly, nonroot], namespace)
    _wait_phase(rnode, namespace, "readonly", {"Running"})
    logs = wait_until(
        lambda: (
            (out := kubectl("logs", "-n", namespace, "readonly").stdout)
            and "SCRATCH-OK" in out
            and out
        ),
        timeout=30,
        message="the readonly pod's log",
    )
    assert "ROOT-READONLY" in logs, logs
    assert "ROOT-WRITABLE" not in logs
    assert "Read-only file system" in _exec(namespace, "readonly", "touch /x 2>&1", check=False)

    def waiting_reason() -> str | None:
        statuses = _get("pod", "nonroot", namespace)["status"].get("containerStatuses") or []
        return statuses and statuses[0]["state"].get("waiting", {}).get("reason")

    reason = wait_until(waiting_reason, timeout=60, message="nonroot pod refused")
    assert reason == "CreateContainerConfigError"


def test_pvc_bound_and_writable_by_non_root(rnode: RealNode, namespace: str) -> None:
    image = rnode.busybox_image()
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
    }
    writer = _pod(
        "writer",
        image,
        "echo written-by-$(id -u) > /data/out.txt && cat /data/out.txt",
        restartPolicy="Never",
        securityContext={"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
        container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
    )
    _apply([pvc, writer], namespace)
    wait_until(
        lambda: _get("pvc", "data", namespace)["status"].get("phase") == "Bound",
        timeout=60,
        message="the claim to be bound",
    )
    _wait_phase(rnode, namespace, "writer", {"Succeeded"})
    assert "written-by-1000" in kubectl("logs", "-n", namespace, "writer").stdout
    volume = _get("pvc", "data", namespace)["spec"]["volumeName"]
    pv = json.loads(kubectl("get", "pv", volume, "-o", "json").stdout)
    path = Path(pv["spec"]["hostPath"]["path"])
    assert path.is_relative_to(rnode.dir)
    out = path / "out.txt"
    assert out.read_text().strip() == "written-by-1000"
    assert out.stat().st_uid == 1000

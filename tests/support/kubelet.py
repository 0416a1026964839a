"""Play the kubelet for pods on the local control plane (which has no nodes): write pod
status the way a kubelet would (phase, readiness, pod IP, container exit codes and reasons,
evictions), and serve a head's /progress endpoint.

Writes go through the pods' status subresource with the admin identity, exactly the call a
kubelet makes, so the operator under test sees real watch events.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.cluster import kubectl


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    out = kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    return list(json.loads(out.stdout)["items"])


def _container_status(pod: dict[str, Any], state: dict[str, Any], ready: bool) -> list[dict]:
    return [
        {
            "name": c["name"],
            "image": c["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": 0,
            "state": state,
        }
        for c in pod["spec"]["containers"]
    ]


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    kubectl(
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def _pod(namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout))


def set_running(namespace: str, name: str, ip: str = "127.0.0.1") -> None:
    pod = _pod(namespace, name)
    _patch_status(
        namespace,
        name,
        {
            "phase": "Running",
            "podIP": ip,
            "startTime": _now(),
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": _now()}],
            "containerStatuses": _container_status(
                pod, {"running": {"startedAt": _now()}}, ready=True
            ),
        },
    )


def set_terminated(
    namespace: str,
    name: str,
    exit_code: int,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    """The pod's containers exited; `message` is what a container wrote to its
    terminationMessagePath, which the kubelet copies into its terminated state."""
    pod = _pod(namespace, name)
    terminated = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": _now(),
        "finishedAt": _now(),
    }
    if message is not None:
        terminated["message"] = message
    _patch_status(
        namespace,
        name,
        {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": _now()}],
            "containerStatuses": _container_status(pod, {"terminated": terminated}, ready=False),
        },
    )


def evict(namespace: str, name: str) -> None:
    """What the kubelet writes when it evicts a pod (node pressure)."""
    _patch_status(
        namespace,
        name,
        {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."},
    )


class FakeProgress:
    """A head's telemetry endpoint: GET /progress answers the document last set."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(outer.document).encode()
                self.send_response(200 if self.path == "/progress" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

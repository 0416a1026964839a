"""`down` undoes everything a node did to this machine, with a pod running at the time."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import realnode
from tests.support.cluster import kubectl, wait_until

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]
nodelib = realnode.nodelib


def _iptables_chains() -> set[str]:
    chains = set()
    for binary in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([binary], capture_output=True, text=True, check=True).stdout
        chains |= {line[1:].split()[0] for line in out.splitlines() if line.startswith(":")}
    return {c for c in chains if c.startswith(("KUBE-", "KTN-", "CNI-"))}


def _sysctls() -> dict[str, str | None]:
    return {key: nodelib._read_sysctl(key) for key in nodelib.SYSCTLS}


def test_down_leaves_nothing_behind(
    cluster: Any, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if os.environ.get("KUBETRAIN_KUBECONFIG") and nodelib.running_node_dir():
        pytest.skip("the `make cluster-up` node runs on this machine (one node per machine)")
    # Nodes are module-scoped (tests/support/realnode.py): none may be running here.
    assert not realnode._active
    assert nodelib.running_node_dir() is None
    sysctls_before = _sysctls()
    chains_before = _iptables_chains()
    assert not any(c.startswith(("KUBE-", "KTN-")) for c in chains_before), chains_before
    outside_before = {p: os.path.lexists(p) for p in nodelib.OUTSIDE_DIRS}
    state = tmp_path_factory.mktemp("teardown-node")
    node = nodelib.up(state, cluster, die_with_parent=True)
    try:
        real = realnode.RealNode(node, cluster)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": real.busybox_image(),
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "echo up; exec sleep 3600"],
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    }
                ],
                "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}],
            },
        }
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
        wait_until(
            lambda: (
                kubectl(
                    "get", "pod", "sleeper", "-n", namespace, "-o", "jsonpath={.status.phase}"
                ).stdout
                == "Running"
            ),
            timeout=90,
            message="the pod to run",
        )
        pids = [pid for pid, _, _ in nodelib.cp._read_pids(state)]
        container_pids = nodelib._cgroup_pids(node.cgroup_root)
        shims = nodelib._shim_pids(node.containerd_socket)
        assert container_pids, "no container processes found in the node's cgroups"
        assert shims, "no containerd shims found"
        assert nodelib._mounts_under(state), "nothing mounted under the node's state dir"
        assert node.bridge in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
        assert any(c.startswith("KUBE-") for c in _iptables_chains())
    except BaseException:
        nodelib.down(state, keep_logs=True)
        raise

    nodelib.down(state)

    leftovers = [p for p in (*pids, *container_pids, *shims) if nodelib.cp._alive(p)]
    assert not leftovers, f"processes left running: {leftovers}"
    assert not nodelib.processes_referencing(state)
    assert not nodelib._mounts_under(state)
    assert not state.exists(), list(state.iterdir())
    assert _sysctls() == sysctls_before
    assert _iptables_chains() == chains_before
    link = subprocess.run(["ip", "link", "show", node.bridge], capture_output=True, text=True)
    assert link.returncode != 0, link.stdout
    for mount in nodelib._cgroup_mounts():
        assert not (mount / node.cgroup_root.strip("/")).exists(), mount
    for path, existed in outside_before.items():
        if not existed:
            assert not os.path.lexists(path), f"{path} was left behind"
    assert not list(Path("/var/log/pods").glob(f"{namespace}_*"))
    gone = kubectl("get", "node", node.name, "--ignore-not-found", "-o", "name").stdout
    assert gone.strip() == ""

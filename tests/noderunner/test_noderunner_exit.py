"""Stopping the node runner ends every process it started and removes its network."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.noderunner.test_noderunner import alive, descendants, get_pod, pod
from tests.support.cluster import kubectl, wait_until
from tests.support.node import running_node

pytestmark = pytest.mark.controlplane


def test_runner_exit_leaves_no_process_namespace_or_link(
    cluster: Any, namespace: str, tmp_path: Path
) -> None:
    with running_node(cluster, tmp_path / "node") as runner:
        bridge = re.search(r"bridge (kt-[0-9a-f]+-)br", runner.log())
        assert bridge is not None
        prefix = bridge.group(1)
        pinned = {"nodeSelector": {"kubernetes.io/hostname": runner.name}}
        docs = [
            pod("stubborn", "trap '' TERM; sleep 1000 & wait", **pinned),
            pod("quick", "sleep 1000", **pinned),
        ]
        kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
        wait_until(
            lambda: all(
                get_pod(namespace, n).get("status", {}).get("phase") == "Running"
                for n in ("stubborn", "quick")
            ),
            timeout=30,
            message="both pods Running",
        )
        shims = set(runner.started_pids())
        # 2 shims, stubborn's bash and sleep, quick's sleep
        procs = wait_until(
            lambda: len(p := set().union(*(descendants(s) for s in shims)) | shims) >= 5 and p,
            timeout=10,
            message="the pods' processes",
        )
        assert (
            prefix + "br"
            in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        )
        assert runner.stop() == 0

    assert not [p for p in procs if alive(p)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in links
    assert prefix not in netns
    assert "Stopped" not in runner.log()
    assert kubectl("get", "node", runner.name, check=False).returncode != 0

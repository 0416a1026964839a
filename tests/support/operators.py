"""The operator under test: in this process (kopf's KopfRunner), as the tests of the
operator and of the chart run it, or as a `kubetrain operator` child process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def in_process_operator(kubeconfig: Path, *scope: str, **env: str) -> Iterator[None]:
    """kopf runs kubetrain_operator.handlers with `kubeconfig`'s identity; `scope` as
    kopf's CLI takes it (`--all-namespaces`, `--namespace NS`); `env` is set for the block
    (KUBETRAIN_* settings). Fails if the operator ended with an error."""
    from kopf.testing import KopfRunner

    env = {"KUBECONFIG": str(kubeconfig), "KUBETRAIN_RESYNC_SECONDS": "1", **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    args = ["run", "--standalone", *scope, "-m", "kubetrain_operator.handlers"]
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield
        assert runner.exit_code == 0, runner.output
        assert runner.exception is None, runner.output
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operator_command(metrics_port: int, liveness_port: int | None = None) -> list[str]:
    """`kubetrain operator` as the chart runs it, on the given ports, for a child process."""
    return [
        sys.executable,
        "-m",
        "kubetrain_cli.main",
        "operator",
        "--liveness-port",
        str(liveness_port or free_port()),
        "--metrics-port",
        str(metrics_port),
    ]


class OperatorProcess:
    """`kubetrain operator` as a child process that can be killed like the OOM killer.
    `env` adds KUBETRAIN_* settings; `log` receives its output (else it is dropped)."""

    def __init__(
        self, kubeconfig: str, progress_port: int, log: Path | None = None, **env: str
    ) -> None:
        self.liveness, self.metrics = free_port(), free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "KUBETRAIN_RESYNC_SECONDS": "1",
            "KUBETRAIN_PROGRESS_PORT": str(progress_port),
            "KUBETRAIN_PROGRESS_HOST": "127.0.0.1",
            **env,
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            operator_command(self.metrics, self.liveness),
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT if self.log else subprocess.DEVNULL,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return str(resp.read().decode())

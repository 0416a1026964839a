"""A real Prometheus (Debian's /usr/bin/prometheus, installed by `hack/controlplane.py
tools`) on a free loopback port, with a static scrape config and a private data dir, and a
client for its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BINARY = "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> bool:
    return shutil.which(BINARY) is not None


@dataclass
class ScrapeJob:
    """One static scrape job: `targets` are host:port, `labels` are added to every series
    (as Kubernetes service discovery would add namespace and pod); `honor_labels`: a
    scraped label wins over a target label of the same name."""

    name: str
    targets: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    honor_labels: bool = False


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """`with Prometheus(jobs, rule_files=[...]) as prom: prom.query("up")`."""

    def __init__(
        self,
        jobs: list[ScrapeJob],
        *,
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
    ) -> None:
        self.jobs, self.rule_files, self.scrape_interval = jobs, list(rule_files), scrape_interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- process ---------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": job.name,
                    "honor_labels": job.honor_labels,
                    "static_configs": [{"targets": job.targets, "labels": job.labels}],
                }
                for job in self.jobs
            ],
        }

    def start(self, timeout: float = 30) -> Prometheus:
        self._dir = tempfile.TemporaryDirectory(prefix="kubetrain-prometheus-")
        root = Path(self._dir.name)
        (root / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        self.log = root / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    BINARY,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- HTTP API --------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        """GET /api/v1/<path>; returns the whole JSON answer, errors included (status
        "error" with errorType and error), so callers can assert on them."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as err:  # 400/422: a bad query, with a JSON body
            return dict(json.load(err))

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        return self.api("query", query=expr, time=at)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> dict[str, Any]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)

    def values(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query; raises on an error answer."""
        answer = self.query(expr, at)
        if answer.get("status") != "success":
            raise PrometheusError(f"{expr}: {answer}")
        return list(answer["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["data"]["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        return list(self.api("rules")["data"]["groups"])

    def wait_for(self, expr: str, timeout: float = 60, at: float | None = None) -> list[Any]:
        """Poll an instant query until it returns at least one series."""
        deadline = time.monotonic() + timeout
        while not (result := self.values(expr, at)):
            if time.monotonic() > deadline:
                raise PrometheusError(f"no data for {expr} after {timeout}s")
            time.sleep(0.5)
        return result

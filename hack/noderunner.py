#!/usr/bin/env python3
"""A local pod runner that plays the node (the kubelet, a CNI and kube-proxy) for the local
control plane of hack/controlplane.py, well enough to run kubetrain's pods for real.

    python hack/noderunner.py --kubeconfig ADMIN_KUBECONFIG --state-dir DIR [--node NAME]

Test infrastructure, not product code. What it does:

- Registers a Node (Ready, 64 CPUs, 256Gi, 110 pods) and renews its status and its Lease in
  kube-node-lease every few seconds, so the node lifecycle controller never taints it. The
  control plane's kube-scheduler binds pods to it; the runner never binds pods itself.
- Plays a static PV provisioner: each Pending PVC gets a pre-bound hostPath PV (Retain) on
  a per-claim folder; released PVs and their folders are deleted. Every pod that mounts the
  same claim sees the same folder (the shared checkpoint volume).
- Runs each pod bound to the node: a network namespace with a veth pair to the runner's
  bridge (`kt-<id>-br`, a free 10.x.0.0/16, one address per pod, default route via the
  bridge), then per container a small shim (`noderunner.py shim`, see `shim_main`) that
  enters a new PID, mount and UTS namespace, bind-mounts the pod's volumes (ConfigMap and
  Secret keys as files, emptyDir and PVC folders, subPath, readOnly), a private /tmp and
  /dev/shm unless the pod mounts its own, /etc/hosts (the pod's name and its namespace's
  Services: headless ones resolve to their endpoints' pod IPs, others to their ClusterIP;
  rewritten in place as endpoints change), an /etc/resolv.conf with no reachable DNS (names
  resolve from /etc/hosts only) and the termination-log file, then execs the
  container's command + args with the pod's env in workingDir. The image is ignored: the
  host runs the command, with PATH starting with this Python's bin folder (the venv), so
  `kubetrain` and `ray` resolve. Output goes to `DIR/logs/<ns>_<pod>_<container>.log`.
- Reports pod status through pods/status like a kubelet: Pending -> Running (podIP, hostIP,
  startTime, containerStatuses), readiness and startup probes (httpGet, tcpSocket, exec),
  liveness probes (restart), terminated with exit code, reason Completed/Error, the
  termination message (File policy, <= 4096 bytes; FallbackToLogsOnError too), phase
  Succeeded/Failed for restartPolicy Never, restarts with restartCount for Always/OnFailure.
- A tiny kube-proxy: each ClusterIP Service gets its ClusterIP on the host's `lo` and a TCP
  proxy (asyncio) from ClusterIP:port to a ready endpoint on this node (round robin; with
  none, connections are closed at once), so the host and the pods reach e.g.
  http://CLUSTER_IP:80.
- Deletion: SIGTERM to the container's PID 1, the grace period (at most 10 s), SIGKILL
  (which ends the whole PID namespace), then the pod is deleted with gracePeriodSeconds=0
  as a kubelet confirms it, and its network namespace and folders are removed.
- SIGTERM/SIGINT: ends every pod (same steps, at most 3 s grace), removes the namespaces, veths,
  bridge, ClusterIP addresses, mount points it created on the host, its PVs, Lease and Node.

Limits (it is not a kubelet): everything runs as root (runAsUser, fsGroup, capabilities,
seccomp and readOnlyRootFilesystem are ignored); no resource limits or cgroups (so no
OOMKilled); no init containers, images, image entrypoints, `kubectl logs/exec`, ConfigMap
updates after start, hostNetwork or NetworkPolicy. Mount points missing on the host (e.g.
/storage, /etc/kubetrain) are created there as empty folders and removed at exit. Two
runners at once get separate bridges and subnets, but ClusterIPs of two control planes can
collide on the host (a second address is skipped with a warning).

Standard library plus PyYAML (for the kubeconfig). Needs root, `ip` (iproute2) and Linux
namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import datetime as dt
import fcntl
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Obj = dict[str, Any]

RUNNER_LABEL = "kubetrain.dev/noderunner"
CAPACITY = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "200Gi"}
HEARTBEAT_S = 5.0
LEASE_S = 40
TICK_S = 0.25  # main loop and pod workers
SERVICES_EVERY_S = 1.0
MAX_GRACE_S = 10.0
EXIT_GRACE_S = 3.0
MESSAGE_MAX = 4096
SUBNET_CANDIDATES = [f"10.{x}.0.0/16" for x in range(244, 255)]
LOCK_DIR = Path("/run/kubetrain-noderunner")
CLUSTER_DOMAIN = "cluster.local"

# Linux constants for the shim.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(msg: str) -> None:
    stamp = dt.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    sys.stdout.write(f"{stamp} noderunner: {msg}\n")
    sys.stdout.flush()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _pdeathsig(sig: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# --------------------------------------------------------------------------- API client


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


class Api:
    """A minimal Kubernetes REST client: one keep-alive connection per thread."""

    def __init__(self, kubeconfig: Path):
        import yaml  # the only non-stdlib dependency; the shim never loads it

        cfg = yaml.safe_load(kubeconfig.read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        url = urllib.parse.urlsplit(cluster["server"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        if cluster.get("insecure-skip-tls-verify"):
            self.ssl = ssl.create_default_context()
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE
        elif "certificate-authority-data" in cluster:
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            self.ssl = ssl.create_default_context(cadata=ca)
        else:
            self.ssl = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
        self.headers = {"Accept": "application/json"}
        if user.get("token"):
            self.headers["Authorization"] = f"Bearer {user['token']}"
        if user.get("client-certificate"):
            self.ssl.load_cert_chain(user["client-certificate"], user.get("client-key"))
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=30)
            self._local.conn = conn
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        ok404: bool = False,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(3):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)
                continue
            obj = json.loads(raw) if raw else None
            if resp.status == 404 and ok404:
                return None
            if resp.status >= 400:
                raise ApiError(resp.status, obj)
            return obj
        raise AssertionError("unreachable")

    def get(self, path: str, **query: str) -> Any:
        qs = f"?{urllib.parse.urlencode(query)}" if query else ""
        return self.request("GET", path + qs, ok404=True)

    def merge_patch(self, path: str, body: Obj) -> Any:
        return self.request(
            "PATCH", path, body, content_type="application/merge-patch+json", ok404=True
        )


# --------------------------------------------------------------------------- network


class Network:
    """The runner's bridge, pod network namespaces and ClusterIP addresses on lo."""

    def __init__(self, rid: str):
        self.rid = rid
        self.bridge = f"kt-{rid}-br"
        self.subnet = ipaddress.IPv4Network("10.244.0.0/16")
        self.gateway = ""
        self._next = 2
        self._lock = threading.Lock()
        self.cluster_ips: set[str] = set()

    def setup(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOCK_DIR / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two runners starting at once pick apart
            used = self._used_networks()
            self.subnet = next(
                n
                for n in map(ipaddress.IPv4Network, SUBNET_CANDIDATES)
                if not any(n.overlaps(u) for u in used)
            )
            self.gateway = str(self.subnet.network_address + 1)
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
        (LOCK_DIR / f"{self.rid}.pid").write_text(f"{os.getpid()}\n")

    @staticmethod
    def _used_networks() -> list[ipaddress.IPv4Network]:
        used = []
        for route in json.loads(sh("ip", "-j", "route", "show", "table", "all").stdout or "[]"):
            dst = route.get("dst", "")
            if dst and dst != "default" and ":" not in dst:
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.IPv4Network(dst, strict=False))
        return used

    def allocate(self) -> str:
        # Never reused while the runner lives: a stale hosts entry or Endpoints address may
        # still name a deleted pod's IP (a /16 is plenty for a test session).
        with self._lock:
            ip = str(self.subnet.network_address + self._next)
            self._next += 1
            return ip

    def add_pod(self, netns: str, veth: str, ip: str) -> None:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", self.gateway)

    @staticmethod
    def remove_pod(netns: str, veth: str) -> None:
        sh("ip", "link", "del", veth, check=False)  # takes its peer along
        sh("ip", "netns", "del", netns, check=False)

    def add_cluster_ip(self, ip: str) -> bool:
        if ip in self.cluster_ips:
            return True
        proc = sh("ip", "addr", "add", f"{ip}/32", "dev", "lo", check=False)
        if proc.returncode != 0:
            log(f"WARNING: cannot add ClusterIP {ip} to lo ({proc.stderr.strip()}); skipped")
            return False
        self.cluster_ips.add(ip)
        return True

    def remove_cluster_ip(self, ip: str) -> None:
        if ip in self.cluster_ips:
            sh("ip", "addr", "del", f"{ip}/32", "dev", "lo", check=False)
            self.cluster_ips.discard(ip)

    def teardown(self) -> None:
        for ip in list(self.cluster_ips):
            self.remove_cluster_ip(ip)
        remove_leftovers(self.rid)
        (LOCK_DIR / f"{self.rid}.pid").unlink(missing_ok=True)


def remove_leftovers(rid: str) -> None:
    """Delete every netns and link named kt-<rid>-*."""
    prefix = f"kt-{rid}-"
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix) and not name.endswith("-br"):
            sh("ip", "link", "del", name, check=False)
    sh("ip", "link", "del", f"{prefix}br", check=False)
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            sh("ip", "netns", "del", name, check=False)


def clean_dead_runners() -> None:
    """Remove what runners that were SIGKILLed left behind (their pid file names them)."""
    if not LOCK_DIR.is_dir():
        return
    for pidfile in LOCK_DIR.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().split()[0])
            if Path(f"/proc/{pid}").exists():
                continue
            log(f"removing leftovers of dead runner {pidfile.stem} (pid {pid})")
            remove_leftovers(pidfile.stem)
            pidfile.unlink()


# --------------------------------------------------------------------------- kube-proxy


class Proxy:
    """TCP from ClusterIP:port to a ready endpoint, on an asyncio loop in its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.backends: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self._rr = 0
        self.failed: set[tuple[str, int]] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def update(self, backends: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
        self.backends = backends
        fut = asyncio.run_coroutine_threadsafe(self._sync(set(backends)), self.loop)
        fut.result(timeout=10)

    async def _sync(self, wanted: set[tuple[str, int]]) -> None:
        for key in set(self.servers) - wanted:
            self.servers.pop(key).close()
        for key in wanted - set(self.servers):
            try:
                self.servers[key] = await asyncio.start_server(
                    lambda r, w, k=key: self._handle(k, r, w), key[0], key[1], reuse_address=True
                )
            except OSError as exc:
                if key not in self.failed:
                    log(f"WARNING: cannot listen on {key[0]}:{key[1]}: {exc}")
                self.failed.add(key)

    async def _handle(
        self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        targets = self.backends.get(key) or []
        if not targets:
            writer.close()
            return
        self._rr += 1
        host, port = targets[self._rr % len(targets)]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.update({})
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- the shim


def shim_main(spec_path: str) -> int:
    """Run one container: `noderunner.py shim SPEC.json`, started inside the pod's netns.

    Forks the container's PID 1 into a new PID namespace (so SIGKILL of that process ends
    every process the container started), which makes its own mount and UTS namespaces,
    mounts the volumes and execs the command. This process forwards SIGTERM/SIGINT to it
    and writes the exit status (code or signal) to the status file the runner reads.
    """
    spec = json.loads(Path(spec_path).read_text())
    status_fd = os.open(spec["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    pid = os.fork()
    if pid == 0:
        try:
            _pdeathsig(signal.SIGKILL)
            _container_init(spec)
        except BaseException as exc:  # anything here is a setup failure: say why, exit 128
            sys.stderr.write(f"noderunner shim: {exc!r}\n")
            sys.stderr.flush()
            os._exit(128)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        result = {"signal": os.WTERMSIG(status), "exitCode": 128 + os.WTERMSIG(status)}
    else:
        result = {"exitCode": os.WEXITSTATUS(status)}
    os.write(status_fd, json.dumps(result).encode())
    os.close(status_fd)
    return int(result["exitCode"])


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    ret = _libc.mount(
        src.encode() if src else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(ret, f"mount {src} -> {target}")


def _container_init(spec: Obj) -> None:
    """PID 1 of the container: namespaces, mounts, hostname, then exec the command."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    socket.sethostname(spec["hostname"])
    # Sources may live under paths a mount covers (the state dir under /tmp): hold them open.
    fds = []
    for m in spec["mounts"]:
        fds.append(os.open(m["source"], os.O_PATH) if m["kind"] == "bind" else -1)
    for m, fd in zip(spec["mounts"], fds, strict=True):
        target = m["target"]
        if m.get("file"):
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                Path(target).touch()
        else:
            os.makedirs(target, exist_ok=True)
        if m["kind"] == "tmpfs":
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, m.get("options", ""))
        else:
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
            if m.get("readOnly"):
                _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for fd in fds:
        if fd >= 0:
            os.close(fd)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(spec["workingDir"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


# --------------------------------------------------------------------------- pods


def _fmt_quantity_cpu(value: str) -> str:
    if value.endswith("m"):
        return str(max(1, -(-int(value[:-1]) // 1000)))
    return str(max(1, int(float(value) + 0.999999)))


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
_SUFFIX |= {"G": 10**9, "T": 10**12}


def _bytes(value: str) -> int:
    for suffix, mult in sorted(_SUFFIX.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * mult)
    return int(float(value))


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


class NotReady(Exception):
    """A pod cannot start yet (a ConfigMap, Secret or claim is missing): retry."""


@dataclass
class Container:
    spec: Obj
    log_path: Path
    status_path: Path
    spec_path: Path
    term_log: Path | None
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restart_count: int = 0
    last_state: Obj = field(default_factory=dict)
    terminated: Obj | None = None
    waiting: Obj | None = None
    ready: bool = False
    started: bool = False  # the startup probe has passed (or there is none)
    restart_at: float = 0.0
    probe_next: dict[str, float] = field(default_factory=dict)
    probe_fails: dict[str, int] = field(default_factory=dict)
    probe_ok: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])


class PodWorker(threading.Thread):
    """Runs one pod from start to deletion, reporting its status."""

    def __init__(self, runner: Runner, pod: Obj, index: int):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner = runner
        self.api = runner.api
        self.pod = pod
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.path = f"/api/v1/namespaces/{self.ns}/pods/{self.name}"
        self.dir = runner.state / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        self.netns = f"kt-{runner.rid}-{index}"
        self.veth = f"kt-{runner.rid}-{index}h"
        self.ip = ""
        self.hosts_path = self.dir / "hosts"
        self.resolv_path = self.dir / "resolv.conf"
        self.hosts_text = ""
        self.containers: list[Container] = []
        self.deleting = threading.Event()
        self.gone = threading.Event()
        self.done = threading.Event()
        self.start_time = ""
        self.last_status: Obj | None = None
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        self.wait_reason = ("ContainerCreating", "")
        self.phase = ""

    # ---- main loop

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log(f"{self.ns}/{self.name}: worker crashed: {exc!r}")
            self._stop_all(0)
        finally:
            self._cleanup()
            self.done.set()

    def _run(self) -> None:
        self.start_time = now()
        while not self._prepared():
            if self.deleting.is_set() or self.gone.is_set():
                return self._finish_deletion()
            self._report()
            time.sleep(1)
        for c in self.containers:
            self._start(c)
        while not (self.deleting.is_set() or self.gone.is_set()):
            for c in self.containers:
                self._poll(c)
            self._probe_all()
            self._report()
            self.deleting.wait(TICK_S)
        self._finish_deletion()

    def _finish_deletion(self) -> None:
        grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        if self.pod["metadata"].get("deletionGracePeriodSeconds") is not None:
            grace = self.pod["metadata"]["deletionGracePeriodSeconds"]
        leaving = self.runner.stopping.is_set()
        self._stop_all(min(float(grace), EXIT_GRACE_S if leaving else MAX_GRACE_S))
        if not self.gone.is_set():
            with contextlib.suppress(ApiError):
                self.api.request(
                    "DELETE",
                    self.path,
                    {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                    ok404=True,
                )
        log(f"{self.ns}/{self.name}: deleted")

    # ---- start

    def _prepared(self) -> bool:
        """Network, volumes and container specs; False while a referenced object is missing."""
        try:
            if not self.ip:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.ip = self.runner.network.allocate()
                self.runner.network.add_pod(self.netns, self.veth, self.ip)
                self.hosts_text = self.runner.hosts_for(self)
                self.hosts_path.write_text(self.hosts_text)
                # Names come from /etc/hosts only: there is no cluster DNS, and the host's
                # resolver is unreachable from pods (it would cost a 5 s timeout per lookup).
                self.resolv_path.write_text(
                    f"search {self.ns}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
                    "nameserver 127.0.0.1\n"
                )
            volumes = self._volumes()
            self.containers = [self._container(c, volumes) for c in self.pod["spec"]["containers"]]
        except NotReady as exc:
            self.wait_reason = ("ContainerCreating", str(exc))
            return False
        except ValueError as exc:
            self.wait_reason = ("CreateContainerConfigError", str(exc))
            return False
        return True

    def _volumes(self) -> dict[str, str]:
        """Volume name -> host folder, with ConfigMap and Secret keys written as files."""
        out: dict[str, str] = {}
        for vol in self.pod["spec"].get("volumes", []):
            name = vol["name"]
            local = self.dir / "volumes" / name
            if "emptyDir" in vol:
                local.mkdir(parents=True, exist_ok=True)
                out[name] = str(local)
            elif "configMap" in vol or "secret" in vol:
                src = vol.get("configMap") or vol["secret"]
                kind = "configmaps" if "configMap" in vol else "secrets"
                obj_name = src.get("name") or src.get("secretName")
                obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{obj_name}")
                if obj is None:
                    if src.get("optional"):
                        obj = {}
                    else:
                        raise NotReady(f'{kind[:-1]} "{obj_name}" not found')
                data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
                if kind == "secrets":
                    data = {k: base64.b64decode(v) for k, v in data.items()}
                for k, v in (obj.get("binaryData") or {}).items():
                    data[k] = base64.b64decode(v)
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                local.mkdir(parents=True, exist_ok=True)
                for item in items:
                    if item["key"] not in data:
                        raise ValueError(f"{obj_name} has no key {item['key']}")
                    path = local / item["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[item["key"]])
                    path.chmod(item.get("mode", src.get("defaultMode", 0o644)))
                out[name] = str(local)
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                out[name] = self.runner.claim_dir(self.ns, claim)
            elif "hostPath" in vol:
                out[name] = vol["hostPath"]["path"]
            else:
                raise ValueError(f"volume {name}: unsupported type")
        return out

    def _container(self, spec: Obj, volumes: dict[str, str]) -> Container:
        name = spec["name"]
        cdir = self.dir / "containers" / name
        cdir.mkdir(parents=True, exist_ok=True)
        if not spec.get("command") and not spec.get("args"):
            raise ValueError(f"container {name} has no command (images are not run)")
        env = self._env(spec)
        argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        mounts: list[Obj] = []
        targets = set()
        for m in spec.get("volumeMounts", []):
            if m["name"] not in volumes:
                raise ValueError(f"volumeMount {m['name']}: no such volume")
            source = volumes[m["name"]]
            if m.get("subPath"):
                source = os.path.join(source, m["subPath"])
                os.makedirs(source, exist_ok=True)
            mounts.append(
                {
                    "kind": "bind",
                    "source": source,
                    "target": m["mountPath"],
                    "readOnly": bool(m.get("readOnly")),
                }
            )
            targets.add(os.path.normpath(m["mountPath"]))
        private = cdir / "tmp"
        private.mkdir(exist_ok=True)
        if "/tmp" not in targets:
            mounts.append({"kind": "bind", "source": str(private), "target": "/tmp"})
        if "/dev/shm" not in targets:
            mounts.append({"kind": "tmpfs", "target": "/dev/shm", "options": "size=1g"})
        # The runtime the pods run on (the venv, and the source tree of its editable
        # install) stays visible where a mount would cover it: a checkout under /tmp
        # (as CI clones it) under the private /tmp.
        covering = [m["target"] for m in mounts]
        for keep in self.runner.runtime_paths:
            if any(Path(keep).is_relative_to(target) for target in covering):
                mounts.append({"kind": "bind", "source": keep, "target": keep})
        for source, target in (
            (self.hosts_path, "/etc/hosts"),
            (self.resolv_path, "/etc/resolv.conf"),
        ):
            mounts.append({"kind": "bind", "source": str(source), "target": target, "file": True})
        term_path = spec.get("terminationMessagePath", "/dev/termination-log")
        term_log = cdir / "termination-log"
        term_log.write_bytes(b"")
        mounts.append({"kind": "bind", "source": str(term_log), "target": term_path, "file": True})
        mounts.sort(key=lambda m: len(Path(m["target"]).parts))  # parents before children
        for m in mounts:
            self.runner.ensure_mountpoint(m["target"], bool(m.get("file")), mounts)
        container = Container(
            spec=spec,
            log_path=self.runner.state / "logs" / f"{self.ns}_{self.name}_{name}.log",
            status_path=cdir / "status.json",
            spec_path=cdir / "spec.json",
            term_log=term_log,
        )
        container.spec_path.write_text(
            json.dumps(
                {
                    "hostname": self.name[:63],
                    "mounts": mounts,
                    "workingDir": spec.get("workingDir") or "/",
                    "argv": argv,
                    "env": env,
                    "status": str(container.status_path),
                }
            )
        )
        container.started = "startupProbe" not in spec
        return container

    def _env(self, spec: Obj) -> dict[str, str]:
        meta, pod_spec = self.pod["metadata"], self.pod["spec"]
        env = {
            "PATH": f"{self.runner.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
            ":/sbin:/bin",
            "HOSTNAME": self.name[:63],
            "HOME": "/root",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        for src in spec.get("envFrom", []):
            ref = src.get("configMapRef") or src.get("secretRef")
            kind = "configmaps" if "configMapRef" in src else "secrets"
            obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{ref['name']}")
            if obj is None:
                if ref.get("optional"):
                    continue
                raise NotReady(f'{kind[:-1]} "{ref["name"]}" not found')
            for k, v in (obj.get("data") or {}).items():
                val = base64.b64decode(v).decode() if kind == "secrets" else v
                env[src.get("prefix", "") + k] = val
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": self.ns,
            "metadata.uid": self.uid,
            "spec.nodeName": self.runner.node,
            "spec.serviceAccountName": pod_spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": self.runner.network.gateway,
        }
        for var in spec.get("env", []):
            name = var["name"]
            if "value" in var:
                env[name] = expand(var["value"], env)
                continue
            src = var.get("valueFrom", {})
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                if m:
                    env[name] = (meta.get(m.group(1)) or {}).get(m.group(2), "")
                elif path in fields:
                    env[name] = fields[path]
                else:
                    raise ValueError(f"env {name}: unsupported fieldPath {path}")
            elif "resourceFieldRef" in src:
                res = src["resourceFieldRef"]["resource"]
                kind, _, what = res.partition(".")
                amount = (spec.get("resources", {}).get(kind) or {}).get(what)
                if amount is None:
                    amount = CAPACITY["cpu" if what == "cpu" else "memory"]
                env[name] = _fmt_quantity_cpu(amount) if what == "cpu" else str(_bytes(amount))
            elif "secretKeyRef" in src or "configMapKeyRef" in src:
                ref = src.get("secretKeyRef") or src["configMapKeyRef"]
                kind = "secrets" if "secretKeyRef" in src else "configmaps"
                obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{ref['name']}")
                data = (obj or {}).get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise NotReady(f'{kind[:-1]} "{ref["name"]}" key {ref["key"]} not found')
                value = data[ref["key"]]
                env[name] = base64.b64decode(value).decode() if kind == "secrets" else value
        return env

    def _start(self, c: Container) -> None:
        c.status_path.unlink(missing_ok=True)
        if c.term_log is not None:
            c.term_log.write_bytes(b"")
        c.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(c.log_path, "ab") as out:
            if c.restart_count:
                out.write(f"----- noderunner: restart {c.restart_count} -----\n".encode())
            c.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "shim",
                    str(c.spec_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # A SIGKILLed runner takes its shims along, and each shim its container.
                preexec_fn=lambda: _pdeathsig(signal.SIGKILL),
            )
        self.runner.track(c.proc.pid)
        c.started_at = now()
        c.terminated = None
        c.waiting = None
        c.ready = False
        c.started = "startupProbe" not in c.spec
        c.probe_next = {}
        c.probe_fails = {}
        c.probe_ok = {}
        log(f"{self.ns}/{self.name}: started {c.name} (pid {c.proc.pid}, ip {self.ip})")

    # ---- run

    def init_pid(self, c: Container) -> int | None:
        """Host pid of the container's PID 1 (the shim's only child)."""
        if c.proc is None or c.proc.poll() is not None:
            return None
        try:
            kids = Path(f"/proc/{c.proc.pid}/task/{c.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def _poll(self, c: Container) -> None:
        if c.proc is not None and c.terminated is None and c.proc.poll() is not None:
            self._record_exit(c)
        if c.terminated is not None and c.restart_at and time.monotonic() >= c.restart_at:
            c.last_state = {"terminated": c.terminated}
            c.restart_count += 1
            c.restart_at = 0.0
            self._start(c)

    def _record_exit(self, c: Container) -> None:
        assert c.proc is not None
        try:
            result = json.loads(c.status_path.read_text())
        except (OSError, ValueError):
            rc = c.proc.returncode
            result = {"exitCode": 128 - rc if rc < 0 else rc}
        code = int(result["exitCode"])
        message = ""
        if c.term_log is not None and c.term_log.is_file():
            message = c.term_log.read_bytes()[:MESSAGE_MAX].decode(errors="replace")
        fallback = c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and code != 0 and fallback:
            message = _tail_bytes(c.log_path, 2048)
        term: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now(),
            "containerID": f"noderunner://{c.proc.pid}",
        }
        if "signal" in result:
            term["signal"] = result["signal"]
        if message:
            term["message"] = message
        c.terminated = term
        c.ready = False
        log(f"{self.ns}/{self.name}: {c.name} exited {code}")
        if self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code):
            backoff = min(10.0, 2.0 ** min(c.restart_count, 4))
            c.restart_at = time.monotonic() + backoff
            c.waiting = {"reason": "CrashLoopBackOff", "message": f"back-off {backoff:.0f}s"}

    def _stop_all(self, grace: float) -> None:
        running = [c for c in self.containers if c.proc is not None and c.proc.poll() is None]
        for c in running:
            init = self.init_pid(c)
            with contextlib.suppress(ProcessLookupError):
                if init:
                    os.kill(init, signal.SIGTERM)
                elif c.proc is not None:
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            c.proc and c.proc.poll() is None for c in running
        ):
            time.sleep(0.1)
        for c in running:
            assert c.proc is not None
            if c.proc.poll() is None:
                init = self.init_pid(c)
                with contextlib.suppress(ProcessLookupError):
                    # SIGKILL of PID 1 ends its whole PID namespace; the shim then exits.
                    if init:
                        os.kill(init, signal.SIGKILL)
                    else:
                        c.proc.kill()
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            if c.terminated is None:
                self._record_exit(c)
            c.restart_at = 0.0

    # ---- probes

    def _probe_all(self) -> None:
        t = time.monotonic()
        for c in self.containers:
            if c.proc is None or c.terminated is not None:
                continue
            kinds = ["startupProbe"] if not c.started else ["readinessProbe", "livenessProbe"]
            if c.started and "readinessProbe" not in c.spec:
                c.ready = True
            for kind in kinds:
                probe = c.spec.get(kind)
                if probe is None:
                    continue
                first = c.probe_next.setdefault(kind, t + probe.get("initialDelaySeconds", 0))
                if t < first:
                    continue
                c.probe_next[kind] = t + probe.get("periodSeconds", 10)
                ok = self._probe(c, probe)
                if ok:
                    c.probe_fails[kind] = 0
                    c.probe_ok[kind] = c.probe_ok.get(kind, 0) + 1
                else:
                    c.probe_ok[kind] = 0
                    c.probe_fails[kind] = c.probe_fails.get(kind, 0) + 1
                fails, oks = c.probe_fails[kind], c.probe_ok[kind]
                if kind == "startupProbe":
                    if ok:
                        c.started = True
                    elif fails >= probe.get("failureThreshold", 3):
                        self._kill_for_probe(c, "startup")
                elif kind == "readinessProbe":
                    if oks >= probe.get("successThreshold", 1):
                        c.ready = True
                    elif fails >= probe.get("failureThreshold", 3):
                        c.ready = False
                elif fails >= probe.get("failureThreshold", 3):
                    self._kill_for_probe(c, "liveness")

    def _kill_for_probe(self, c: Container, kind: str) -> None:
        log(f"{self.ns}/{self.name}: {c.name} failed its {kind} probe; killing it")
        init = self.init_pid(c)
        if init:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        if c.proc is not None:
            c.proc.wait(timeout=10)
        self._record_exit(c)

    def _port(self, c: Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no port named {port}")

    def _probe(self, c: Container, probe: Obj) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                host = get.get("host") or self.ip
                port = self._port(c, get["port"])
                if get.get("scheme", "HTTP").upper() == "HTTPS":
                    ctx = ssl._create_unverified_context()
                    conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                        host, port, timeout=timeout, context=ctx
                    )
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                try:
                    headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                    conn.request("GET", get.get("path", "/"), headers=headers)
                    return 200 <= conn.getresponse().status < 400
                finally:
                    conn.close()
            if "tcpSocket" in probe:
                port = self._port(c, probe["tcpSocket"]["port"])
                with socket.create_connection((self.ip, port), timeout=timeout):
                    return True
            if "exec" in probe:
                init = self.init_pid(c)
                if not init:
                    return False
                env = json.loads(c.spec_path.read_text())["env"]
                cmd = ["nsenter", "-t", str(init), "-n", "-m", "-p", "-u", "--"]
                proc = subprocess.run(
                    cmd + probe["exec"]["command"],
                    env=env,
                    capture_output=True,
                    timeout=timeout,
                    cwd="/",
                )
                return proc.returncode == 0
        except (OSError, ValueError, subprocess.TimeoutExpired, http.client.HTTPException):
            return False
        return False

    # ---- status

    def _container_status(self, c: Container | None, spec: Obj) -> Obj:
        status: Obj = {
            "name": spec["name"],
            "image": spec.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
        }
        if c is None or c.proc is None:
            reason, message = self.wait_reason
            status["state"] = {
                "waiting": {"reason": reason, **({"message": message} if message else {})}
            }
            return status
        status["containerID"] = f"noderunner://{c.proc.pid}"
        status["restartCount"] = c.restart_count
        if c.last_state:
            status["lastState"] = c.last_state
        if c.terminated is not None and c.waiting is not None:
            status["state"] = {"waiting": c.waiting}
            status["lastState"] = {"terminated": c.terminated}
        elif c.terminated is not None:
            status["state"] = {"terminated": c.terminated}
        else:
            status["state"] = {"running": {"startedAt": c.started_at}}
            status["ready"] = c.ready
            status["started"] = c.started
        return status

    def compute_status(self) -> Obj:
        specs = self.pod["spec"]["containers"]
        by_name = {c.name: c for c in self.containers}
        statuses = [self._container_status(by_name.get(s["name"]), s) for s in specs]
        started = all(c.proc is not None for c in self.containers) and bool(self.containers)
        finished = [c.terminated for c in self.containers if c.terminated and not c.waiting]
        if not started:
            phase = "Pending"
        elif self.restart_policy == "Never" and len(finished) == len(specs):
            phase = "Succeeded" if all(t["exitCode"] == 0 for t in finished) else "Failed"
        elif (
            self.restart_policy == "OnFailure"
            and len(finished) == len(specs)
            and all(t["exitCode"] == 0 for t in finished)
        ):
            phase = "Succeeded"
        else:
            phase = "Running"
        ready = started and all(s["ready"] for s in statuses)
        stamp = now()
        old = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions", [])}

        def cond(type_: str, value: bool, reason: str = "") -> Obj:
            text = "True" if value else "False"
            prev = old.get(type_)
            since = prev["lastTransitionTime"] if prev and prev.get("status") == text else stamp
            out: Obj = {"type": type_, "status": text, "lastProbeTime": None}
            out["lastTransitionTime"] = since
            if reason and not value:
                out["reason"] = reason
            return out

        conditions = [
            cond("Initialized", True),
            cond("Ready", ready, "ContainersNotReady"),
            cond("ContainersReady", ready, "ContainersNotReady"),
        ]
        conditions += [
            c for t, c in old.items() if t not in ("Initialized", "Ready", "ContainersReady")
        ]
        status: Obj = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.runner.network.gateway,
            "startTime": self.start_time,
            "containerStatuses": statuses,
        }
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        return status

    def _report(self) -> None:
        status = self.compute_status()
        if status == self.last_status:
            return
        try:
            pod = self.api.merge_patch(f"{self.path}/status", {"status": status})
        except ApiError as exc:
            log(f"{self.ns}/{self.name}: status update failed: {exc}")
            return
        if pod is not None:
            self.pod["status"] = pod.get("status", {})
            # Conditions now carry the server's copy, so the next comparison is exact.
            self.last_status = self.compute_status()
        if status["phase"] != self.phase:
            log(f"{self.ns}/{self.name}: {status['phase']}")
            self.phase = status["phase"]

    def set_hosts(self, text: str) -> None:
        """Rewrite /etc/hosts in place: the pods see it through a bind mount of this inode."""
        if text != self.hosts_text and self.hosts_path.exists():
            with open(self.hosts_path, "r+") as fh:
                fh.write(text)
                fh.truncate()
            self.hosts_text = text

    def _cleanup(self) -> None:
        if self.ip:
            self.runner.network.remove_pod(self.netns, self.veth)
        shutil.rmtree(self.dir, ignore_errors=True)


def _tail_bytes(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- the runner


class Runner:
    def __init__(self, api: Api, state: Path, node: str, rid: str):
        self.api = api
        self.state = state
        self.node = node
        self.rid = rid
        self.network = Network(rid)
        self.proxy: Proxy | None = None
        self.workers: dict[str, PodWorker] = {}
        self.index = 0
        self.stopping = threading.Event()
        self.bin_dir = str(Path(sys.prefix) / "bin")
        self.runtime_paths = sorted({sys.prefix, str(Path(__file__).resolve().parents[1])})
        self.created_mountpoints: list[tuple[str, bool]] = []
        self._mount_lock = threading.Lock()
        self.pids_file = state / "pids"
        self.ns_hosts: dict[str, list[tuple[str, list[str]]]] = {}

    # ---- node

    def node_status(self) -> Obj:
        stamp = now()

        def cond(type_: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": self.started_at,
            }

        return {
            "capacity": dict(CAPACITY),
            "allocatable": dict(CAPACITY),
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "kubetrain noderunner is posting ready"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.network.gateway},
                {"type": "Hostname", "address": self.node},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": self.rid,
                "systemUUID": self.rid,
                "bootID": self.rid,
                "kernelVersion": os.uname().release,
                "osImage": "kubetrain noderunner",
                "containerRuntimeVersion": "noderunner://0.1",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        self.started_at = now()
        labels = {
            "kubernetes.io/hostname": self.node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            RUNNER_LABEL: "true",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": labels},
            "spec": {"podCIDR": str(self.network.subnet), "podCIDRs": [str(self.network.subnet)]},
            "status": self.node_status(),
        }
        self.api.request("DELETE", f"/api/v1/nodes/{self.node}", ok404=True)
        node = self.api.request("POST", "/api/v1/nodes", body)
        self.node_uid = node["metadata"]["uid"]
        self.heartbeat()

    def heartbeat(self) -> None:
        self.api.merge_patch(f"/api/v1/nodes/{self.node}/status", {"status": self.node_status()})
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_S}
        spec["renewTime"] = now_micro()
        if self.api.merge_patch(lease_path, {"spec": spec}) is None:
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node_uid}
            with contextlib.suppress(ApiError):
                self.api.request(
                    "POST",
                    "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                    {
                        "metadata": {"name": self.node, "ownerReferences": [owner]},
                        "spec": spec,
                    },
                )

    # ---- helpers for workers

    def track(self, pid: int) -> None:
        with open(self.pids_file, "a") as fh:
            fh.write(f"{pid}\n")

    def ensure_mountpoint(self, target: str, is_file: bool, mounts: list[Obj]) -> None:
        """Create a mount point missing on the host (once), unless another mount covers it."""
        norm = os.path.normpath(target)
        for m in mounts:
            other = os.path.normpath(m["target"])
            if other != norm and norm.startswith(other.rstrip("/") + "/"):
                return  # the shim creates it inside that volume
        with self._mount_lock:
            if os.path.lexists(norm):
                return
            missing = []
            path = Path(norm)
            while not path.exists():
                missing.append(path)
                path = path.parent
            for p in reversed(missing):
                if p == Path(norm) and is_file:
                    p.touch()
                else:
                    p.mkdir()
                self.created_mountpoints.append((str(p), p.is_file()))

    def claim_dir(self, ns: str, claim: str) -> str:
        pvc = self.api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
        if pvc is None or not pvc.get("spec", {}).get("volumeName"):
            raise NotReady(f'persistentvolumeclaim "{claim}" not bound')
        pv = self.api.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
        path = ((pv or {}).get("spec", {}).get("hostPath") or {}).get("path")
        if not path:
            raise ValueError(f"claim {claim}: its volume is not a hostPath")
        os.makedirs(path, exist_ok=True)
        return str(path)

    def hosts_for(self, worker: PodWorker) -> str:
        lines = [
            "# written by the kubetrain noderunner",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{worker.ip}\t{worker.name[:63]}",
        ]
        for ip, names in self.ns_hosts.get(worker.ns, []):
            lines.append(f"{ip}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    # ---- loops

    def sync_pods(self) -> None:
        pods = self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node}")
        seen = set()
        for pod in (pods or {}).get("items", []):
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # not ours to run (another runner's, before a restart)
                self.index += 1
                worker = PodWorker(self, pod, self.index)
                self.workers[uid] = worker
                log(f"{worker.ns}/{worker.name}: new pod")
                worker.start()
            if pod["metadata"].get("deletionTimestamp") and not worker.deleting.is_set():
                worker.pod["metadata"] = pod["metadata"]
                worker.deleting.set()
        for uid, worker in list(self.workers.items()):
            if uid not in seen and not worker.gone.is_set():
                worker.gone.set()
                worker.deleting.set()
            if worker.done.is_set():
                del self.workers[uid]

    def sync_services(self) -> None:
        services = (self.api.get("/api/v1/services") or {}).get("items", [])
        endpoints = {
            (e["metadata"]["namespace"], e["metadata"]["name"]): e
            for e in (self.api.get("/api/v1/endpoints") or {}).get("items", [])
        }
        hosts: dict[str, list[tuple[str, list[str]]]] = {}
        backends: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for svc in services:
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            names = [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"]
            ep = endpoints.get((ns, name)) or {}
            cluster_ip = svc["spec"].get("clusterIP")
            if cluster_ip == "None":
                ips = sorted(
                    {
                        a["ip"]
                        for s in ep.get("subsets") or []
                        for a in (s.get("addresses") or []) + (s.get("notReadyAddresses") or [])
                    }
                )
                hosts.setdefault(ns, []).extend((ip, names) for ip in ips)
            elif cluster_ip:
                hosts.setdefault(ns, []).append((cluster_ip, names))
                for port in svc["spec"].get("ports", []):
                    if port.get("protocol", "TCP") != "TCP":
                        continue
                    targets = [
                        (a["ip"], p["port"])
                        for s in ep.get("subsets") or []
                        for p in s.get("ports") or []
                        if p.get("name", "") == port.get("name", "")
                        for a in s.get("addresses") or []
                        if ipaddress.ip_address(a["ip"]) in self.network.subnet
                    ]
                    # Listen even without endpoints: a client then gets a quick close
                    # instead of a SYN sent nowhere (the host does not forward).
                    if (ns, name) != ("default", "kubernetes"):
                        backends[(cluster_ip, int(port["port"]))] = targets
        self.ns_hosts = hosts
        for worker in list(self.workers.values()):
            if worker.ip:
                worker.set_hosts(self.hosts_for(worker))
        wanted_ips = {ip for ip, _ in backends}
        for ip in self.network.cluster_ips - wanted_ips:
            self.network.remove_cluster_ip(ip)
        backends = {k: v for k, v in backends.items() if self.network.add_cluster_ip(k[0])}
        assert self.proxy is not None
        self.proxy.update(backends)

    def sync_volumes(self) -> None:
        """Pre-bound hostPath PVs for Pending claims; released PVs and folders deleted."""
        claims = (self.api.get("/api/v1/persistentvolumeclaims") or {}).get("items", [])
        for pvc in claims:
            meta, spec = pvc["metadata"], pvc["spec"]
            if spec.get("volumeName") or pvc.get("status", {}).get("phase") != "Pending":
                continue
            if meta.get("deletionTimestamp"):
                continue
            path = self.state / "volumes" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
            path.mkdir(parents=True, exist_ok=True)
            size = spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")
            pv = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"pvc-{meta['uid']}", "labels": {RUNNER_LABEL: self.node}},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": spec.get("storageClassName") or "",
                    "volumeMode": spec.get("volumeMode", "Filesystem"),
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "namespace": meta["namespace"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            }
            try:
                self.api.request("POST", "/api/v1/persistentvolumes", pv)
                log(f"provisioned {pv['metadata']['name']} for {meta['namespace']}/{meta['name']}")
            except ApiError as exc:
                if exc.status != 409:
                    log(f"PV for {meta['namespace']}/{meta['name']}: {exc}")
        for pv in self._own_pvs():
            if pv.get("status", {}).get("phase") in ("Released", "Failed"):
                self._delete_pv(pv)

    def _own_pvs(self) -> list[Obj]:
        pvs = self.api.get("/api/v1/persistentvolumes", labelSelector=f"{RUNNER_LABEL}={self.node}")
        return list((pvs or {}).get("items", []))

    def _delete_pv(self, pv: Obj) -> None:
        self.api.request(
            "DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}", ok404=True
        )
        path = pv["spec"].get("hostPath", {}).get("path", "")
        if path and Path(path).resolve().is_relative_to(self.state.resolve()):
            shutil.rmtree(path, ignore_errors=True)

    def run(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        clean_dead_runners()
        self.network.setup()
        self.proxy = Proxy()
        self.register()
        log(
            f"node {self.node} registered (bridge {self.network.bridge}, pods "
            f"{self.network.subnet}, venv bin {self.bin_dir})"
        )
        log("ready")
        next_heartbeat = next_services = 0.0
        while not self.stopping.is_set():
            t = time.monotonic()
            try:
                if t >= next_heartbeat:
                    self.heartbeat()
                    next_heartbeat = t + HEARTBEAT_S
                self.sync_pods()
                if t >= next_services:
                    self.sync_services()
                    self.sync_volumes()
                    next_services = t + SERVICES_EVERY_S
            except (ApiError, OSError, http.client.HTTPException) as exc:
                log(f"sync failed (will retry): {exc!r}")
            self.stopping.wait(TICK_S)

    def shutdown(self) -> None:
        log("stopping: ending every pod")
        for worker in list(self.workers.values()):
            worker.gone.set()  # no API confirmation: the runner is leaving
            worker.deleting.set()
        for worker in list(self.workers.values()):
            worker.join(timeout=MAX_GRACE_S + 20)
        if self.proxy is not None:
            self.proxy.stop()
        self.network.teardown()
        for path, is_file in reversed(self.created_mountpoints):
            with contextlib.suppress(OSError):
                os.unlink(path) if is_file else os.rmdir(path)
        with contextlib.suppress(ApiError, OSError):
            for pv in self._own_pvs():
                self._delete_pv(pv)
            self.api.request(
                "DELETE",
                f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}",
                ok404=True,
            )
            self.api.request("DELETE", f"/api/v1/nodes/{self.node}", ok404=True)
        log("stopped")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shim"]:
        return shim_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, type=Path, help="admin kubeconfig")
    parser.add_argument("--state-dir", required=True, type=Path, help="pods, volumes, logs")
    parser.add_argument("--node", help="Node name (default kt-node-<random id>)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network and mount namespaces)")
    rid = secrets.token_hex(2)
    runner = Runner(
        Api(args.kubeconfig), args.state_dir.resolve(), args.node or f"kt-node-{rid}", rid
    )

    def stop(signum: int, _frame: Any) -> None:
        log(f"got signal {signum}")
        runner.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runner.run()
    finally:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A real Kubernetes node for the local control plane (hack/controlplane.py), without Docker.

Runs, on this machine: containerd (CRI, runc, CNI bridge), kubelet and kube-proxy 1.20.2
(built by ``controlplane.py build``), dnsmasq as the cluster DNS (records generated from
Services and Endpoints), and an agent process that forwards the `kubernetes` Service to the
loopback API server and provisions hostPath PersistentVolumes for pending claims.

Pods live on a private bridge (a free 10.244.X.0/24) and are confined to this machine:
forwarding from the bridge to any other interface is dropped, and from the bridge only the
bridge address itself (DNS, API forwarder) is reachable on the host.

CLI::

    python3 hack/node.py up --dir DIR --kubeconfig ADMIN_KUBECONFIG
    python3 hack/node.py status --dir DIR
    python3 hack/node.py import --dir DIR ARCHIVE...    # docker-archive tarballs
    python3 hack/node.py down --dir DIR

Library::

    node = up(state_dir, cluster)        # -> Node, once the Node object is Ready
    import_image(node, "image.tar")
    down(state_dir)

Everything the node changes on the machine is undone by ``down``: processes (by recorded
PID and start time), containers (by their cgroups), mounts under DIR, iptables chains,
the bridge, sysctls, and the files kubelet/containerd write outside DIR.

Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import ipaddress
import json
import os
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _load_controlplane() -> ModuleType:
    """hack/controlplane.py, under the same module name tests/support/cluster.py uses."""
    name = "kubetrain_hack_controlplane"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("controlplane.py"))
    if spec is None or spec.loader is None:
        raise ImportError("cannot load hack/controlplane.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cp = _load_controlplane()
log = cp.log

NODE_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "buildah",
    "dnsmasq-base",
    "ipset",
    "conntrack",
    "iptables",
    "iproute2",
)
CNI_BIN_DIR = Path("/usr/lib/cni")
POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "localhost/kubetrain/pause:3.4"
BUSYBOX_IMAGE = "localhost/kubetrain/busybox:test"
NODE_USER = "kubetrain-node"  # the node's token line in the control plane's tokens.csv
NODE_LABEL = "kubetrain.dev/node"
READY_TIMEOUT_S = 180.0
# sysctls kubelet, kube-proxy and the CNI plugins may change; restored by `down`.
SYSCTLS = (
    "kernel/panic_on_oops",
    "kernel/panic",
    "vm/overcommit_memory",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/netfilter/nf_conntrack_max",
)
# Paths outside DIR that kubelet/containerd write; removed at `down` if `up` created them.
OUTSIDE_DIRS = (
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/containerd",
    "/etc/cni",
)
# Everything `up` writes into its directory (`down` removes exactly these).
STATE_ENTRIES = (
    "pids",
    "logs",
    "node.json",
    "agent.json",
    "before.json",
    "kubeconfig",
    "resolv.conf",
    "kubelet-config.json",
    "containerd",
    "cni",
    "kubelet",
    "dns",
    "volumes",
)
IPT_PREFIXES = ("KUBE-", "CNI-")


class NodeError(RuntimeError):
    """Starting, using or stopping the node failed."""


# --------------------------------------------------------------------------- the node


@dataclasses.dataclass(frozen=True)
class Node:
    """A running node: how to reach and inspect it."""

    name: str
    dir: Path
    ip: str  # the bridge address: node IP, DNS server, API forwarder
    subnet: str  # pod subnet (CIDR)
    bridge: str
    containerd_socket: Path
    kubeconfig: Path  # the cluster's admin kubeconfig
    kubelet_port: int
    api_forward_port: int
    cgroup_root: str
    netid: str

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def import_image(self, archive: Path | str) -> list[str]:
        return import_image(self, archive)

    def log_tails(self, lines: int = 40) -> str:
        parts = [f"(full logs in {self.logs_dir})"]
        for path in sorted(self.logs_dir.glob("*.log")):
            parts.append(f"===== {path.name} (last {lines} lines) =====\n{cp._tail(path, lines)}")
        return "\n".join(parts)

    def to_json(self) -> str:
        data = {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
        }
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Node:
        data = json.loads(text)
        for key in ("dir", "containerd_socket", "kubeconfig"):
            data[key] = Path(data[key])
        return cls(**data)


def load(state_dir: Path | str) -> Node:
    path = Path(state_dir).resolve() / "node.json"
    if not path.is_file():
        raise NodeError(f"no node in {state_dir}")
    return Node.from_json(path.read_text())


def import_image(node: Node, archive: Path | str) -> list[str]:
    """Import a docker-archive (or OCI) tarball into the node's containerd (namespace k8s.io).

    Returns the image references the archive carried.
    """
    out = cp._run(
        [
            "ctr",
            "-a",
            node.containerd_socket,
            "-n",
            "k8s.io",
            "images",
            "import",
            "--no-unpack=false",
            str(archive),
        ],
        quiet=True,
    )
    refs = []
    for line in out.splitlines():
        # "unpacking localhost/x:y (sha256:...)...done"
        words = line.split()
        if len(words) >= 2 and words[0] == "unpacking":
            refs.append(words[1])
    return refs


# --------------------------------------------------------------------------- images


def build_image_archive(ref: str, rootfs: Path, archive: Path, cmd: Sequence[str] = ()) -> Path:
    """A one-layer image from a rootfs tarball (buildah, FROM scratch) as a docker-archive.

    buildah's storage lives in a temporary directory, so nothing is left under
    /var/lib/containers.
    """
    cp.ensure_apt_packages(["buildah"])
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kubetrain-buildah-") as tmp:
        base = [
            "buildah",
            "--root",
            f"{tmp}/root",
            "--runroot",
            f"{tmp}/run",
            "--storage-driver",
            "vfs",
        ]
        env = dict(os.environ, BUILDAH_ISOLATION="chroot", REGISTRIES_CONFIG_PATH="/dev/null")
        ctr = _run_env([*base, "from", "scratch"], env).strip().splitlines()[-1]
        _run_env([*base, "add", ctr, str(rootfs), "/"], env)
        if cmd:
            _run_env([*base, "config", "--cmd", json.dumps(list(cmd)), ctr], env)
        _run_env([*base, "commit", "--quiet", ctr, ref], env)
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        _run_env([*base, "push", "--quiet", ref, f"docker-archive:{partial}:{ref}"], env)
        partial.rename(archive)
    return archive


def _run_env(cmd: Sequence[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NodeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def _digest(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _rootfs_tar(dest: Path, files: dict[str, Path], links: dict[str, str], dirs: Sequence[str]):
    with tarfile.open(dest, "w") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for name, src in files.items():
            info = tar.gettarinfo(str(src), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)


def pause_archive() -> Path:
    """The sandbox image (the static pause binary FROM scratch), cached by content."""
    binary = cp.k8s_bin_dir() / cp.PAUSE_BINARY
    if not binary.is_file():
        raise NodeError(f"{binary} missing: run `python3 hack/controlplane.py build`")
    archive = cp.cache_dir() / "images" / f"pause-{_digest(binary, extra=PAUSE_IMAGE)}.tar"
    if archive.is_file():
        return archive
    with cp._file_lock(archive.parent / ".lock"), tempfile.TemporaryDirectory() as tmp:
        if not archive.is_file():
            rootfs = Path(tmp) / "rootfs.tar"
            _rootfs_tar(rootfs, {"pause": binary}, {}, [])
            build_image_archive(PAUSE_IMAGE, rootfs, archive, cmd=["/pause"])
    return archive


def busybox_archive() -> tuple[Path, str]:
    """A tiny image: Debian's static busybox with its applets linked in /bin; cached by content.

    Returns (archive, image reference).
    """
    cp.ensure_apt_packages(["busybox-static"])
    binary = Path("/bin/busybox")
    archive = cp.cache_dir() / "images" / f"busybox-{_digest(binary, extra=BUSYBOX_IMAGE)}.tar"
    if archive.is_file():
        return archive, BUSYBOX_IMAGE
    with cp._file_lock(archive.parent / ".lock"), tempfile.TemporaryDirectory() as tmp:
        if not archive.is_file():
            applets = subprocess.run(
                [str(binary), "--list"], capture_output=True, text=True, check=True
            ).stdout.split()
            links = {f"bin/{a}": "busybox" for a in applets if a and a != "busybox"}
            rootfs = Path(tmp) / "rootfs.tar"
            _rootfs_tar(rootfs, {"bin/busybox": binary}, links, ["bin", "etc", "tmp"])
            build_image_archive(BUSYBOX_IMAGE, rootfs, archive, cmd=["/bin/sh"])
    return archive, BUSYBOX_IMAGE


# --------------------------------------------------------------------------- API client


class Api:
    """A minimal Kubernetes API client (bearer token, CA-verified TLS)."""

    def __init__(self, server: str, token: str, ca: Path | str | None):
        self.server = server.rstrip("/")
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca)) if ca else None

    def request(
        self, method: str, path: str, body: Any = None, *, ok404: bool = False, timeout: float = 10
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and ok404:
                return None
            raise ApiError(exc.code, f"{method} {path}: {exc.code} {exc.read()[:300]!r}") from exc
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path, ok404=True)


class ApiError(NodeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _api_for(cluster: Any) -> Api:
    return Api(cluster.server, cluster.admin_token, cluster.ca_file)


# --------------------------------------------------------------------------- helpers


def _sh(*cmd: str | os.PathLike[str], check: bool = True) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise NodeError(f"{shlex.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", key).write_text(value + "\n")


def _ipt_chains(binary: str) -> dict[str, list[str]]:
    """{table: [chain, ...]} of the chains with our prefixes."""
    out: dict[str, list[str]] = {}
    for table in ("filter", "nat", "mangle", "raw"):
        text = _sh(f"{binary}-save", "-t", table, check=False)
        out[table] = [
            line[1:].split()[0]
            for line in text.splitlines()
            if line.startswith(":") and line[1:].startswith((*IPT_PREFIXES, "KTN-"))
        ]
    return out


def _ipt_remove_chains(binary: str, keep: dict[str, list[str]], prefixes: tuple[str, ...]) -> None:
    """Delete chains with the given prefixes (except keep[table]) and every jump to them."""
    for table in ("filter", "nat", "mangle", "raw"):
        text = _sh(f"{binary}-save", "-t", table, check=False)
        chains = [
            line[1:].split()[0]
            for line in text.splitlines()
            if line.startswith(":") and line[1:].startswith(prefixes)
        ]
        doomed = [c for c in chains if c not in keep.get(table, [])]
        if not doomed:
            continue
        script = [f"*{table}"]
        for line in text.splitlines():
            if not line.startswith("-A "):
                continue
            words = shlex.split(line)
            chain = words[1]
            target = words[words.index("-j") + 1] if "-j" in words else ""
            if chain not in doomed and target in doomed:
                script.append("-D " + line[3:])
        script += [f"-F {c}" for c in doomed] + [f"-X {c}" for c in doomed] + ["COMMIT", ""]
        proc = subprocess.run(
            [f"{binary}-restore", "--noflush"],
            input="\n".join(script),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            log(f"{binary}-restore ({table}) failed: {proc.stderr.strip()}")


def _cgroup_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(left.split()[4]))
    return mounts


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4].replace("\\040", " ")
        if mountpoint.startswith(prefix) or mountpoint == str(root):
            found.append(mountpoint)
    return found


def _cgroup_pids(root_name: str) -> set[int]:
    pids: set[int] = set()
    for mount in _cgroup_mounts():
        base = mount / root_name.strip("/")
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _shim_pids(socket_path: Path) -> list[int]:
    """containerd shims serving our containerd (they outlive it in their own groups)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"containerd-shim" in cmdline[0] and str(socket_path).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def processes_referencing(path: Path) -> list[int]:
    """PIDs whose command line mentions path (for leak checks)."""
    needle = str(path).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.244.0.0/16 that no route or address on this machine overlaps."""
    used = []
    for line in _sh("ip", "-4", "route", "show", "table", "all").splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "prohibit", "blackhole"):
            word = line.split()[1]
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(word, strict=False))
    for line in _sh("ip", "-4", "-o", "addr").splitlines():
        words = line.split()
        if "inet" in words:
            used.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    for candidate in list(POD_NETWORK.subnets(new_prefix=24))[10:250]:
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise NodeError("no free /24 in 10.244.0.0/16 for the pod bridge")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ensure_node_rbac(api: Api) -> None:
    """The node's user (group system:nodes) gets the kubelet's and kube-proxy's roles."""
    for name, role in (
        ("kubetrain:node", "system:node"),
        ("kubetrain:node-proxier", "system:node-proxier"),
    ):
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}
            ],
        }
        try:
            api.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)
        except ApiError as exc:
            if exc.status != 409:
                raise


def _node_token(cluster: Any) -> str:
    tokens = Path(cluster.dir) / "tokens.csv"
    with contextlib.suppress(OSError):
        for line in tokens.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 1 and parts[1] == NODE_USER:
                return parts[0]
    raise NodeError(
        f"no {NODE_USER} token in {tokens}: restart the control plane with the current "
        "hack/controlplane.py (it adds one)"
    )


# --------------------------------------------------------------------------- up


def up(
    state_dir: Path | str,
    cluster: Any,
    *,
    timeout: float = READY_TIMEOUT_S,
    die_with_parent: bool = False,
) -> Node:
    """Start a node whose state lives in state_dir against cluster (a controlplane.Cluster).

    Returns once the Node is Ready and the `kubernetes` Service has its endpoint.
    """
    state = Path(state_dir).resolve()
    if (state / "node.json").is_file():
        node = load(state)
        if _healthy(node):
            log(f"node {node.name} already up in {state}")
            return node
    if (state / "pids").exists() or (state / "before.json").exists():
        down(state)
    other = running_node_dir()
    if other is not None:
        raise NodeError(
            f"another kubetrain node runs on this machine ({other}); nodes share the host's "
            "iptables, sysctls and kube-proxy chains, so only one may run at a time"
        )
    started = time.monotonic()
    cp.ensure_apt_packages(NODE_PACKAGES)
    k8s_bin = cp.build()
    state.mkdir(parents=True, exist_ok=True)
    strangers = sorted(p.name for p in state.iterdir() if p.name not in STATE_ENTRIES)
    if strangers:
        raise NodeError(f"{state} holds other files ({', '.join(strangers[:5])})")
    (state / "logs").mkdir(exist_ok=True)
    (state / "pids").write_text("")
    api = _api_for(cluster)
    netid = hashlib.sha256(str(state).encode()).hexdigest()[:8]
    name = f"kubetrain-node-{netid}"
    with cp._file_lock(cp.cache_dir() / "node.lock"):
        # What exists before the node, so `down` removes only what the node added.
        before = {
            "sysctls": {k: _read_sysctl(k) for k in SYSCTLS},
            "outside": [p for p in OUTSIDE_DIRS if os.path.lexists(p)],
            "iptables": _ipt_chains("iptables"),
            "ip6tables": _ipt_chains("ip6tables"),
            "var_log_pods": sorted(os.listdir("/var/log/pods"))
            if os.path.isdir("/var/log/pods")
            else [],
            "var_log_containers": sorted(os.listdir("/var/log/containers"))
            if os.path.isdir("/var/log/containers")
            else [],
        }
        (state / "before.json").write_text(json.dumps(before, indent=2))
        subnet = _pick_subnet()
        bridge = f"ktb{netid}"
        ip = str(subnet.network_address + 1)
        # A fixed MAC: else the bridge takes its lowest port's, and every pod that goes
        # changes it, so other pods' ARP entries for the gateway (DNS, Services) go stale.
        mac = "02:6b:74:" + ":".join(netid[i : i + 2] for i in (0, 2, 4))
        _sh("ip", "link", "add", bridge, "address", mac, "type", "bridge")
        _sh("ip", "addr", "add", f"{ip}/{subnet.prefixlen}", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
    kubelet_port, forward_port = _free_port(ip), _free_port(ip)
    cgroup_root = f"/kubetrain-{netid}"
    sock = state / "containerd" / "containerd.sock"
    node = Node(
        name=name,
        dir=state,
        ip=ip,
        subnet=str(subnet),
        bridge=bridge,
        containerd_socket=sock,
        kubeconfig=Path(cluster.kubeconfig).resolve(),
        kubelet_port=kubelet_port,
        api_forward_port=forward_port,
        cgroup_root=cgroup_root,
        netid=netid,
    )
    (state / "node.json").write_text(node.to_json() + "\n")
    agent_conf = state / "agent.json"
    agent_conf.write_text(
        json.dumps(
            {
                "server": cluster.server,
                "token": cluster.admin_token,
                "ca": str(cluster.ca_file) if cluster.ca_file else None,
            },
        )
    )
    agent_conf.chmod(0o600)
    deadline = time.monotonic() + timeout
    try:
        _isolate(node)
        _make_cgroup_root(cgroup_root)
        _ensure_node_rbac(api)
        token = _node_token(cluster)
        cp._write_kubeconfig(
            state / "kubeconfig", cluster.server, cluster.ca_file, NODE_USER, token
        )

        log(f"node {name}: agent (API forwarder {ip}:{forward_port}, DNS records, volumes)")
        (state / "dns").mkdir(exist_ok=True)
        (state / "dns" / "hosts").write_text("")
        (state / "volumes").mkdir(exist_ok=True)
        cp._start(
            "agent",
            [sys.executable, Path(__file__).resolve(), "agent", "--dir", state]
            + (["--cleanup-when-orphaned"] if die_with_parent else []),
            state,
            die_with_parent,
        )
        cp._start(
            "dnsmasq",
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
                f"--listen-address={ip}",
                "--bind-interfaces",
                "--port=53",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--group=root",
                "--pid-file=",
                "--cache-size=0",
                f"--local=/{CLUSTER_DOMAIN}/",
                f"--addn-hosts={state / 'dns' / 'hosts'}",
            ],
            state,
            die_with_parent,
        )

        log(f"node {name}: containerd ({sock})")
        _write_containerd_config(node)
        cp._start(
            "containerd",
            ["containerd", "--config", state / "containerd" / "config.toml"],
            state,
            die_with_parent,
        )
        cp._wait_for("containerd socket", lambda: _ctr_ok(sock), state, deadline, "containerd")
        import_image(node, pause_archive())

        log(f"node {name}: kubelet (node IP {ip}, port {kubelet_port}) and kube-proxy")
        _write_kubelet_config(node)
        cp._start(
            "kubelet",
            [
                k8s_bin / "kubelet",
                f"--config={state / 'kubelet-config.json'}",
                f"--kubeconfig={state / 'kubeconfig'}",
                f"--root-dir={state / 'kubelet'}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{sock}",
                f"--node-ip={ip}",
                f"--hostname-override={name}",
                f"--pod-infra-container-image={PAUSE_IMAGE}",
                f"--node-labels={NODE_LABEL}={name}",
                "--v=1",
            ],
            state,
            die_with_parent,
        )
        healthz, metrics = cp._free_ports(2)
        cp._start(
            "kube-proxy",
            [
                k8s_bin / "kube-proxy",
                f"--kubeconfig={state / 'kubeconfig'}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={subnet}",
                f"--hostname-override={name}",
                f"--bind-address={ip}",
                f"--healthz-bind-address=127.0.0.1:{healthz}",
                f"--metrics-bind-address=127.0.0.1:{metrics}",
                f"--nodeport-addresses={ip}/32",
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--oom-score-adj=0",
                "--feature-gates=EndpointSliceProxying=false",
                "--v=1",
            ],
            state,
            die_with_parent,
        )
        cp._wait_for(
            f"Node {name} Ready", lambda: _node_ready(api, name), state, deadline, "kubelet"
        )
        cp._wait_for(
            "kubernetes Service endpoint",
            lambda: _endpoint_ok(api, node),
            state,
            deadline,
            "agent",
        )
    except BaseException:
        log(f"node {name} failed to start; logs in {state / 'logs'}")
        raise
    log(f"node {name} Ready in {time.monotonic() - started:.1f}s (pods on {bridge} {subnet})")
    return node


def _ctr_ok(sock: Path) -> bool:
    if not sock.exists():
        return False
    proc = subprocess.run(
        ["ctr", "-a", str(sock), "version"], capture_output=True, timeout=10, check=False
    )
    return proc.returncode == 0


def _node_ready(api: Api, name: str) -> bool:
    try:
        node = api.get(f"/api/v1/nodes/{name}")
    except (ApiError, OSError):
        return False
    conditions = (node or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _endpoint_ok(api: Api, node: Node) -> bool:
    try:
        ep = api.get("/api/v1/namespaces/default/endpoints/kubernetes") or {}
    except (ApiError, OSError):
        return False
    return any(
        a.get("ip") == node.ip for s in ep.get("subsets", []) for a in s.get("addresses", [])
    )


def _healthy(node: Node) -> bool:
    entries = cp._read_pids(node.dir)
    return bool(entries) and all(cp._alive(pid, start) for pid, _, start in entries)


def _isolate(node: Node) -> None:
    """Pods reach only each other and the bridge address (DNS, API forwarder) - nothing else.

    FORWARD: traffic from the bridge to any other interface is dropped. INPUT: from the
    bridge only the bridge address is reachable, and not the kubelet's port; replies to
    connections the host opened pass.
    """
    fwd, inp = f"KTN-{node.netid}-FWD", f"KTN-{node.netid}-IN"
    for chain, rules, parent in (
        (fwd, [["-i", node.bridge, "!", "-o", node.bridge, "-j", "DROP"]], "FORWARD"),
        (
            inp,
            [
                # Replies to connections the host opened (e.g. to a ClusterIP, whose source
                # is the host's own address) come back in through the bridge.
                [
                    "-i",
                    node.bridge,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "RETURN",
                ],
                ["-i", node.bridge, "-p", "tcp", "--dport", str(node.kubelet_port), "-j", "DROP"],
                ["-i", node.bridge, "!", "-d", node.ip, "-j", "DROP"],
            ],
            "INPUT",
        ),
    ):
        _sh("iptables", "-N", chain)
        for rule in rules:
            _sh("iptables", "-A", chain, *rule)
        _sh("iptables", "-I", parent, "1", "-j", chain)
    # No IPv6 on the bridge at all.
    _write_sysctl(f"net/ipv6/conf/{node.bridge}/disable_ipv6", "1")


def _make_cgroup_root(root: str) -> None:
    for mount in _cgroup_mounts():
        if mount.name == "unified" or not (mount / "cgroup.procs").exists():
            continue
        path = mount / root.strip("/")
        path.mkdir(exist_ok=True)
        for key in ("cpuset.cpus", "cpuset.mems"):
            if (mount / key).exists():
                (path / key).write_text((mount / key).read_text())


def _write_containerd_config(node: Node) -> None:
    root = node.dir / "containerd"
    root.mkdir(exist_ok=True)
    cni = node.dir / "cni"
    (cni / "net.d").mkdir(parents=True, exist_ok=True)
    (cni / "ipam").mkdir(exist_ok=True)
    conflist = {
        "cniVersion": "0.4.0",
        "name": f"kubetrain-{node.netid}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(cni / "ipam"),
                    "ranges": [[{"subnet": node.subnet, "gateway": node.ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (cni / "net.d" / "10-kubetrain.conflist").write_text(json.dumps(conflist, indent=2))
    (root / "config.toml").write_text(
        f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
plugin_dir = ""
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{node.containerd_socket}"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_unprivileged_ports = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{root / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni / "net.d"}"
    max_conf_num = 1
"""
    )


def _write_kubelet_config(node: Node) -> None:
    (node.dir / "resolv.conf").write_text("")  # pods get only the cluster's DNS settings
    (node.dir / "kubelet").mkdir(exist_ok=True)
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.ip,
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": _free_port("127.0.0.1"),
        # The API server calls the kubelet (logs, exec) without a client certificate; only
        # the host reaches this port (pods are dropped by the node's INPUT rules).
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "failSwapOn": False,
        "clusterDNS": [node.ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(node.dir / "resolv.conf"),
        "volumePluginDir": str(node.dir / "kubelet" / "volume-plugins"),
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        # Imported images cannot be pulled again: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        # A ConfigMap's new content reaches a pod's volume at its next sync: every 10 s
        # here (default 1 min), so a ModelService's traffic shift shows within seconds.
        "syncFrequency": "10s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "hairpinMode": "hairpin-veth",
    }
    (node.dir / "kubelet-config.json").write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------- down


def down(state_dir: Path | str, *, keep_logs: bool = False, api_timeout: float = 5) -> None:
    """Stop the node in state_dir and undo what `up` changed on the machine. Idempotent."""
    state = Path(state_dir).resolve()
    if not state.exists():
        return
    started = time.monotonic()
    node = load(state) if (state / "node.json").is_file() else None
    before = (
        json.loads((state / "before.json").read_text())
        if (state / "before.json").is_file()
        else None
    )
    cp._stop_processes(state)
    if node is not None:
        _kill_containers(node)
    for mountpoint in sorted(_mounts_under(state), key=len, reverse=True):
        if subprocess.run(["umount", mountpoint], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    k8s_bin = cp.k8s_bin_dir()
    if (k8s_bin / "kube-proxy").is_file():
        subprocess.run(
            [str(k8s_bin / "kube-proxy"), "--cleanup", "--proxy-mode=iptables"],
            capture_output=True,
            timeout=60,
        )
    if before is not None:
        _ipt_remove_chains("iptables", before["iptables"], IPT_PREFIXES)
        _ipt_remove_chains("ip6tables", before["ip6tables"], IPT_PREFIXES)
    if node is not None:
        _ipt_remove_chains("iptables", {}, (f"KTN-{node.netid}-",))
        subprocess.run(["ip", "link", "del", node.bridge], capture_output=True)
        for mount in _cgroup_mounts():
            base = mount / node.cgroup_root.strip("/")
            if base.is_dir():
                for sub in sorted((p for p in base.rglob("*") if p.is_dir()), reverse=True):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                with contextlib.suppress(OSError):
                    base.rmdir()
        _forget_node(state, node, api_timeout)
    if before is not None:
        for key, value in before["sysctls"].items():
            if value is not None and _read_sysctl(key) != value:
                _write_sysctl(key, value)
        _clean_outside(before, node)
    for name in STATE_ENTRIES:
        if keep_logs and name == "logs":
            continue
        path = state / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state.rmdir()
    log(f"node in {state} down ({time.monotonic() - started:.1f}s)")


def _kill_containers(node: Node) -> None:
    """SIGKILL every process in the node's pod cgroups, then the containerd shims."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = _cgroup_pids(node.cgroup_root) | set(_shim_pids(node.containerd_socket))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    log(f"processes still in {node.cgroup_root}: {sorted(_cgroup_pids(node.cgroup_root))}")


def _forget_node(state: Path, node: Node, timeout: float) -> None:
    """Best effort: remove the Node object, our PVs and the `kubernetes` endpoint."""
    conf = state / "agent.json"
    if not conf.is_file():
        return
    data = json.loads(conf.read_text())
    api = Api(data["server"], data["token"], data["ca"])
    with contextlib.suppress(ApiError, OSError):
        for pv in (
            api.get(f"/api/v1/persistentvolumes?labelSelector={NODE_LABEL}%3D{node.name}") or {}
        ).get("items", []):
            api.request(
                "DELETE",
                f"/api/v1/persistentvolumes/{pv['metadata']['name']}",
                ok404=True,
                timeout=timeout,
            )
        ep = api.get("/api/v1/namespaces/default/endpoints/kubernetes") or {}
        if any(a.get("ip") == node.ip for s in ep.get("subsets", []) for a in s["addresses"]):
            api.request(
                "DELETE",
                "/api/v1/namespaces/default/endpoints/kubernetes",
                ok404=True,
                timeout=timeout,
            )
        api.request("DELETE", f"/api/v1/nodes/{node.name}", ok404=True, timeout=timeout)


def _clean_outside(before: dict[str, Any], node: Node | None) -> None:
    """Remove what kubelet/containerd wrote outside DIR since `up`."""
    for dirname, key in (
        ("/var/log/pods", "var_log_pods"),
        ("/var/log/containers", "var_log_containers"),
    ):
        if os.path.isdir(dirname):
            for entry in set(os.listdir(dirname)) - set(before[key]):
                path = os.path.join(dirname, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
    if node is not None:
        results = Path("/var/lib/cni/results")
        if results.is_dir():
            for entry in results.glob(f"kubetrain-{node.netid}-*"):
                entry.unlink(missing_ok=True)
    for path in OUTSIDE_DIRS:
        if path in before["outside"] or not os.path.lexists(path):
            continue
        if _mounts_under(Path(path)):
            log(f"not removing {path}: something is mounted under it")
            continue
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- agent


def agent(state_dir: Path | str, cleanup_when_orphaned: bool = False) -> None:
    """The node's helper process: API forwarder, `kubernetes` endpoint, DNS records, PVs.

    cleanup_when_orphaned: if the process that started the node dies (e.g. a killed test
    run; every component then gets SIGTERM), run `down` in a detached process, so that
    containers, mounts, iptables chains, the bridge and sysctls do not outlive it.
    """
    state = Path(state_dir).resolve()
    parent = os.getppid()
    lock = _hold_machine_lock(state)
    node = load(state)
    conf = json.loads((state / "agent.json").read_text())
    api = Api(conf["server"], conf["token"], conf["ca"])
    upstream = conf["server"].split("//", 1)[1]
    host, port = upstream.rsplit(":", 1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    listener = socket.create_server((node.ip, node.api_forward_port), reuse_port=False)
    threading.Thread(
        target=_forward_loop, args=(listener, (host, int(port)), stop), daemon=True
    ).start()
    print(f"agent: forwarding {node.ip}:{node.api_forward_port} -> {upstream}", flush=True)
    hosts = state / "dns" / "hosts"
    last_hosts = None
    next_volumes = 0.0
    while not stop.is_set():
        try:
            _ensure_endpoint(api, node)
            text = _dns_records(api)
            if text != last_hosts:
                tmp = hosts.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.rename(hosts)
                for pid, name, start in cp._read_pids(state):
                    if name == "dnsmasq" and cp._alive(pid, start):
                        os.kill(pid, signal.SIGHUP)
                last_hosts = text
            if time.monotonic() >= next_volumes:
                _sync_volumes(api, node)
                next_volumes = time.monotonic() + 2
        except (NodeError, OSError, ValueError, KeyError) as exc:
            print(f"agent: sync failed (will retry): {exc!r}", flush=True)
        stop.wait(1.0)
    listener.close()
    lock.close()
    if cleanup_when_orphaned and os.getppid() != parent:
        print("agent: the node's owner is gone; running `down`", flush=True)
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "down", "--dir", str(state)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def _machine_lock_path() -> Path:
    return cp.cache_dir() / "node-running.lock"


def running_node_dir() -> str | None:
    """The state dir of the node running on this machine (its agent holds a lock), if any."""
    path = _machine_lock_path()
    if not path.is_file():
        return None
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "unknown"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def _hold_machine_lock(state: Path) -> Any:
    """Held by the agent for the node's lifetime: one node per machine."""
    path = _machine_lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip()
        raise NodeError(f"another kubetrain node runs on this machine ({owner})") from None
    fh.truncate(0)
    fh.write(f"{state}\n")
    fh.flush()
    return fh


def _ensure_endpoint(api: Api, node: Node) -> None:
    want = [
        {
            "addresses": [{"ip": node.ip}],
            "ports": [{"name": "https", "port": node.api_forward_port, "protocol": "TCP"}],
        }
    ]
    path = "/api/v1/namespaces/default/endpoints/kubernetes"
    ep = api.get(path)
    if ep is None:
        body = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "subsets": want,
        }
        api.request("POST", "/api/v1/namespaces/default/endpoints", body)
        print(
            f"agent: created endpoint kubernetes -> {node.ip}:{node.api_forward_port}", flush=True
        )
    elif ep.get("subsets") != want:
        ep["subsets"] = want
        api.request("PUT", path, ep)
        print(f"agent: set endpoint kubernetes -> {node.ip}:{node.api_forward_port}", flush=True)


def _dns_records(api: Api) -> str:
    """hosts-file lines: ClusterIP Services, and headless Services' endpoint addresses."""
    services = (api.get("/api/v1/services") or {}).get("items", [])
    endpoints = {
        (e["metadata"]["namespace"], e["metadata"]["name"]): e
        for e in (api.get("/api/v1/endpoints") or {}).get("items", [])
    }
    lines = []
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec", {})
        fqdn = f"{meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}"
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            lines.append(f"{cluster_ip} {fqdn}")
            continue
        ep = endpoints.get((meta["namespace"], meta["name"])) or {}
        for subset in ep.get("subsets") or []:
            addresses = list(subset.get("addresses") or [])
            if spec.get("publishNotReadyAddresses"):
                addresses += subset.get("notReadyAddresses") or []
            for addr in addresses:
                lines.append(f"{addr['ip']} {fqdn}")
                if addr.get("hostname"):
                    lines.append(f"{addr['ip']} {addr['hostname']}.{fqdn}")
    return "\n".join(sorted(set(lines))) + "\n"


def _sync_volumes(api: Api, node: Node) -> None:
    """Pre-bound hostPath PVs for Pending claims; released PVs and their folders deleted."""
    for pvc in (api.get("/api/v1/persistentvolumeclaims") or {}).get("items", []):
        meta, spec = pvc["metadata"], pvc["spec"]
        if spec.get("volumeName") or pvc.get("status", {}).get("phase") != "Pending":
            continue
        if meta.get("deletionTimestamp"):
            continue
        path = node.dir / "volumes" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # non-root pods write here
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"pvc-{meta['uid']}", "labels": {NODE_LABEL: node.name}},
            "spec": {
                "capacity": {
                    "storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")
                },
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.get("storageClassName") or "",
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(path), "type": "Directory"},
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
            api.request("POST", "/api/v1/persistentvolumes", pv)
            print(
                f"agent: provisioned {pv['metadata']['name']} for "
                f"{meta['namespace']}/{meta['name']} at {path}",
                flush=True,
            )
        except ApiError as exc:
            if exc.status != 409:
                raise
    pvs = api.get(f"/api/v1/persistentvolumes?labelSelector={NODE_LABEL}%3D{node.name}") or {}
    for pv in pvs.get("items", []):
        if pv.get("status", {}).get("phase") in ("Released", "Failed"):
            api.request("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}", ok404=True)
            path = Path(pv["spec"].get("hostPath", {}).get("path", "/nonexistent"))
            if path.resolve().is_relative_to(node.dir / "volumes"):
                shutil.rmtree(path, ignore_errors=True)
            print(f"agent: deleted released {pv['metadata']['name']}", flush=True)


def _forward_loop(listener: socket.socket, upstream: tuple[str, int], stop: threading.Event):
    listener.settimeout(0.5)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=_pipe_pair, args=(client, upstream), daemon=True).start()


def _pipe_pair(client: socket.socket, upstream: tuple[str, int]) -> None:
    try:
        server = socket.create_connection(upstream, timeout=10)
    except OSError:
        client.close()
        return
    server.settimeout(None)
    client.settimeout(None)
    socks = [client, server]
    try:
        while True:
            readable, _, _ = select.select(socks, [], [], 60)
            if not readable:
                continue
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                (server if sock is client else client).sendall(data)
    except OSError:
        pass
    finally:
        client.close()
        server.close()


# --------------------------------------------------------------------------- CLI


def status(state_dir: Path | str) -> bool:
    state = Path(state_dir).resolve()
    entries = cp._read_pids(state)
    if not entries:
        print(f"no node in {state}")
        return False
    healthy = True
    for pid, name, start in entries:
        alive = cp._alive(pid, start)
        healthy &= alive
        print(f"{name:16} pid {pid:<8} {'running' if alive else 'NOT RUNNING'}")
    if (state / "node.json").is_file():
        node = load(state)
        print(f"{'node':16} {node.name} ip {node.ip} pods {node.subnet} bridge {node.bridge}")
        print(f"{'containerd':16} {node.containerd_socket}")
    return healthy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "import", "agent"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, required=True, help="the node's state directory")
        if name == "up":
            p.add_argument("--kubeconfig", type=Path, required=True, help="admin kubeconfig")
            p.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
        if name == "agent":
            p.add_argument("--cleanup-when-orphaned", action="store_true")
        if name == "import":
            p.add_argument("archives", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            try:
                node = up(args.dir, cp.attach(args.kubeconfig), timeout=args.timeout)
            except BaseException:
                down(args.dir, keep_logs=True)
                if (args.dir / "logs").is_dir():
                    print(f"node logs kept in {args.dir / 'logs'}", file=sys.stderr)
                raise
            print(
                f"node:       {node.name} ({node.ip}, pods {node.subnet})\n"
                f"containerd: {node.containerd_socket}"
            )
        elif args.command == "down":
            down(args.dir)
        elif args.command == "status":
            return 0 if status(args.dir) else 1
        elif args.command == "import":
            node = load(args.dir)
            for archive in args.archives:
                print(" ".join(import_image(node, archive)))
        elif args.command == "agent":
            agent(args.dir, cleanup_when_orphaned=args.cleanup_when_orphaned)
    except (NodeError, cp.ControlPlaneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

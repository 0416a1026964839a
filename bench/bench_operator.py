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
    the burst until its first resync wave (target <= 300 MiB).

The minimal operator goes first: deleting ours' runs leaves garbage collection of its
children running, which would slow whoever comes next. Each operator gets fresh
namespaces and waits for the cluster to hold no runs before it starts.
Run: `python -m bench.bench_operator [--quick]`; prints JSON on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

from kubernetes import client, config, watch

from kubetrain_api import crd, validation
from kubetrain_api import v1alpha1 as api

ROOT = Path(__file__).resolve().parents[1]
TARGET_LATENCY_RATIO = 1.5
TARGET_BURST_S = 60.0
TARGET_RSS_MIB = 300.0
RESYNC_SECONDS = 30
CREATE_THREADS = 8
# Pause between creates for the "settled" latency: the operator finishes creating the
# previous run's children (well under a second) before the next run arrives.
SETTLED_GAP_S = 1.0
NAMESPACES = ("warmup", "latency", "settled", "burst")  # per operator: bench-<label>-<kind>
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
    """Samples a process tree's RSS in a thread; `.peak` is the largest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes(self.pid))
            self._stop.wait(RSS_SAMPLE_S)

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


def _ours(kubeconfig: Path, log_path: Path) -> OperatorProcess:
    argv = [sys.executable, "-m", "kubetrain_cli.main", "operator"]
    argv += ["--liveness-port", str(_free_port()), "--metrics-port", str(_free_port())]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env["KUBETRAIN_RESYNC_SECONDS"] = str(RESYNC_SECONDS)
    return OperatorProcess("ours", argv, env, log_path)


def _minimal(kubeconfig: Path, log_path: Path) -> OperatorProcess:
    argv = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces"]
    argv.append(str(ROOT / "bench" / "minimal_operator.py"))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return OperatorProcess("minimal", argv, env, log_path)


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
    """Create runs one at a time; seconds from each create's return to its first phase.
    gap_s: pause after each phase, so the operator can finish acting on that run first."""
    phases = PhaseWatch(custom, namespace)
    try:
        samples = []
        for i in range(runs):
            name = f"lat-{i:03d}"
            _create(custom, namespace, name)
            created = time.monotonic()
            samples.append(phases.wait([name], timeout=60, alive=op)[name] - created)
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
    """Create runs at once; time until all have a phase (and pods), and the peak RSS."""
    names = [f"burst-{i:03d}" for i in range(runs)]
    phases = PhaseWatch(custom, namespace)
    idle_rss, cpu_before = _rss_bytes(op.proc.pid), _cpu_seconds(op.proc.pid)
    try:
        with RssPeak(op.proc.pid) as rss:
            started = time.monotonic()
            with ThreadPoolExecutor(CREATE_THREADS) as pool:
                list(pool.map(lambda n: _create(custom, namespace, n), names))
            created = time.monotonic()
            _log(f"  {runs} runs created in {created - started:.1f}s")
            last_phase = max(phases.wait(names, timeout=600, alive=op).values())
            _log(f"  all {runs} have a phase after {last_phase - started:.1f}s")
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
        "all_pods_s": None if all_pods is None else round(all_pods, 3),
        "idle_rss_mib": round(idle_rss / 2**20, 1),
        "peak_rss_mib": round(rss.peak / 2**20, 1),
        "operator_cpu_s": round(cpu, 2),
        "window_s": round(time.monotonic() - started, 1),
    }


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


def _clear(core: client.CoreV1Api, custom: client.CustomObjectsApi, label: str) -> None:
    """Delete an operator's namespaces and wait until no run is left in the cluster."""
    for kind in NAMESPACES:
        with contextlib.suppress(client.ApiException):
            core.delete_namespace(f"bench-{label}-{kind}")
    _wait(lambda: _run_count(custom) == 0, timeout=300, what="the runs to be deleted", interval=1)


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    """Both benchmarks for both operators on a private control plane in workdir (a temp
    dir by default); the control plane and the operators are always stopped."""
    latency_runs, burst_runs = (5, 20) if quick else (30, 200)
    settle_s = 0.0 if quick else 2.0 * RESYNC_SECONDS
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
        previous = None
        for label, start, pods_per_run in (
            ("minimal", _minimal, 0),
            ("ours", _ours, _pods_per_run()),
        ):
            if previous:
                _clear(core, custom, previous)
            previous = label
            _log(f"{label}: starting the operator")
            op = start(cluster.operator_kubeconfig, workdir / f"{label}-operator.log")
            try:
                results[label] = bench_one(
                    op, custom, core, latency_runs, burst_runs, pods_per_run, settle_s
                )
            except BaseException:
                _log(f"{label} operator log tail:\n{op.log_tail()}")
                raise
            finally:
                op.stop()
    ours, minimal = results["ours"], results["minimal"]
    for kind in ("latency", "settled"):
        for q in ("p50", "p95"):
            ratio = ours[kind][f"{q}_s"] / minimal[kind][f"{q}_s"]
            results[f"{kind}_ratio_{q}"] = round(ratio, 3)
    results["targets"] = {
        "latency_ratio_p50_max": TARGET_LATENCY_RATIO,
        "ours_burst_all_status_s_max": TARGET_BURST_S,
        "ours_burst_peak_rss_mib_max": TARGET_RSS_MIB,
    }
    return results


def plot_bars(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(label, value, target, 'max'|'min') bars for bench/run_all.py's plot."""
    burst, ratio = results["ours"]["burst"], TARGET_LATENCY_RATIO
    runs = burst["runs"]
    return [
        ("first status p50\nours / kopf min", results["latency_ratio_p50"], ratio, "max"),
        (
            "first status p50, 1s\napart: ours / kopf min",
            results["settled_ratio_p50"],
            ratio,
            "max",
        ),
        (f"burst of {runs}: all\nstatus (s, ours)", burst["all_status_s"], TARGET_BURST_S, "max"),
        ("operator peak\nRSS (MiB, ours)", burst["peak_rss_mib"], TARGET_RSS_MIB, "max"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 + 20 runs instead of 30 + 200")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

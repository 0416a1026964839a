"""The live monitoring stack shared by tests/monitoring and `make dashboards-preview`: a
real Prometheus scraping, every second, the real `kubetrain operator` (optional: it needs
a control plane), a real `kubetrain run` (a shrunk quickstart, then `--serve` on the model it
exported, in the same process), a real `kubetrain route` (ModelService `chat`: variants a
and b, both on that model server), the operator's ModelService series (metrics.ServiceIndex
in this process, fed the statuses of an experiment that collects, then rolls back on a
guardrail) and traffic through the `openai` client.

Scrape jobs carry the `namespace`/`pod` labels Kubernetes service discovery would add.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from kubetrain_api.modelservice import ModelServiceStatus
from kubetrain_api.routing import STORE_ENV, RouterConfig, RouteVariant, dump_router_config
from kubetrain_operator.metrics import ServiceIndex
from kubetrain_trainer.route.assign import choose
from tests.support.prometheus import Prometheus, ScrapeJob, free_port

ROOT = Path(__file__).resolve().parents[2]
RUN = "mon"
RUN_NAMESPACE = "ml-team"
OPERATOR_NAMESPACE = "kubetrain-system"
SERVICE = "chat"  # the ModelService (the router's model name)
PROMPTS = ("the cat was", "the seal was curious, so it", "once upon a time", "the dog")


def shrunk_quickstart(path: Path, steps: int, name: str = RUN) -> Path:
    """examples/quickstart.yaml with one worker and `steps` steps, checkpoints and
    evaluations a few times along the way."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    spec["resources"]["workers"] = 1
    hp = spec["hyperparameters"]
    hp.update(maxSteps=steps, globalBatchSize=8, microBatchSize=8)
    hp["schedule"]["warmupSteps"] = max(1, steps // 6)
    interval = max(1, steps // 3)
    spec["checkpoint"]["intervalSteps"] = interval
    spec["evaluation"]["intervalSteps"] = interval
    path.write_text(yaml.safe_dump(doc))
    return path


class Stack:
    """Start with `start()`, stop with `stop()` (or use it as a context manager).

    `operator_kubeconfig` None leaves the operator out (no control plane needed)."""

    def __init__(
        self,
        workdir: Path,
        *,
        steps: int = 30,
        operator_kubeconfig: Path | None = None,
        rule_files: list[Path] | None = None,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.workdir, self.steps, self.log = Path(workdir), steps, log
        self.operator_kubeconfig = operator_kubeconfig
        self.trainer_port, self.serve_port = free_port(), free_port()
        self.operator_port = free_port()
        self.router_port, self.services_port = free_port(), free_port()
        jobs = [
            ScrapeJob(
                "kubetrain-trainer",
                [f"127.0.0.1:{self.trainer_port}"],
                {"namespace": RUN_NAMESPACE, "pod": f"{RUN}-a1-head"},
            ),
            ScrapeJob(
                "kubetrain-serving",
                [f"127.0.0.1:{self.serve_port}"],
                {"namespace": RUN_NAMESPACE, "pod": f"{RUN}-serve-0"},
            ),
            ScrapeJob(
                "kubetrain-router",
                [f"127.0.0.1:{self.router_port}"],
                {"namespace": RUN_NAMESPACE, "pod": f"{SERVICE}-router-0"},
            ),
            # The operator's ModelService series, as the chart scrapes the operator: their
            # own `namespace` (the ModelService's) wins over the target's.
            ScrapeJob(
                "kubetrain-operator-services",
                [f"127.0.0.1:{self.services_port}"],
                {"namespace": OPERATOR_NAMESPACE, "pod": "kubetrain-operator-0"},
                honor_labels=True,
            ),
        ]
        if operator_kubeconfig is not None:
            jobs.append(
                ScrapeJob(
                    "kubetrain-operator",
                    [f"127.0.0.1:{self.operator_port}"],
                    {"namespace": OPERATOR_NAMESPACE, "pod": "kubetrain-operator-0"},
                    honor_labels=True,
                )
            )
        self.prometheus = Prometheus(jobs, rule_files=rule_files or [])
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.base_url = f"http://127.0.0.1:{self.serve_port}"
        self.router_url = f"http://127.0.0.1:{self.router_port}"
        self.services = ServiceIndex()
        self._services_server: Any = None
        self.history: list[dict[str, Any]] = []  # status.history of `chat`
        self.looks = 0
        self.started = 0.0
        self.trained = 0.0  # when the model server answered /readyz (training is over)
        self.sent: dict[str, Any] = {}  # what traffic() sent

    # ---- processes -------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "kubetrain_cli.main", *args],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )

    def start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.prometheus.start()
        self.log(f"prometheus on {self.prometheus.url}")
        if self.operator_kubeconfig is not None:
            self._spawn(
                "operator",
                [
                    "operator",
                    "--metrics-port",
                    str(self.operator_port),
                    "--liveness-port",
                    str(free_port()),
                ],
                {"KUBECONFIG": str(self.operator_kubeconfig), "KUBETRAIN_RESYNC_SECONDS": "5"},
            )
            self.log(f"operator: metrics on :{self.operator_port}")
        run_file = shrunk_quickstart(self.workdir / "run.yaml", self.steps)
        self._spawn(
            "trainer",
            [
                "run",
                str(run_file),
                "--output-dir",
                str(self.workdir / "runs"),
                "--overwrite",
                "--metrics-port",
                str(self.trainer_port),
                "--metrics-host",
                "127.0.0.1",
                "--serve",
                "--serve-port",
                str(self.serve_port),
            ],
        )
        self.log(f"kubetrain run ({self.steps} steps): metrics on :{self.trainer_port}")
        self.router_config = RouterConfig(
            model=SERVICE,
            variants=[
                RouteVariant(
                    name=name,
                    url=self.base_url,
                    model_version=f"{RUN}-{name}",
                    weight=50,
                    upstream_model=RUN,
                )
                for name in ("a", "b")
            ],
        )
        (self.workdir / "router.yaml").write_text(dump_router_config(self.router_config))
        self._spawn(
            "router",
            [
                *("route", "--config", str(self.workdir / "router.yaml")),
                *("--host", "127.0.0.1", "--port", str(self.router_port)),
                *("--log-level", "warning"),
            ],
            {STORE_ENV: str(self.workdir / "router.db")},
        )
        self.log(f"kubetrain route ({SERVICE}): {self.router_url}")
        registry = CollectorRegistry()
        registry.register(self.services)
        self._services_server, _ = start_http_server(
            self.services_port, "127.0.0.1", registry=registry
        )
        self.experiment("Collecting", {"a": 50, "b": 50})
        return self

    def wait_served(self, timeout: float = 600) -> None:
        """Until training is over and the model server is ready."""
        deadline = time.monotonic() + timeout
        last_step = None
        while True:
            self.check_alive()
            try:
                ready = httpx.get(f"{self.base_url}/readyz", timeout=2)
                if ready.status_code == 200:
                    # Another server on the port (picked free, bound later) would answer
                    # every later request wrongly: say so here.
                    if "json" not in ready.headers.get("content-type", ""):
                        raise RuntimeError(f"{self.base_url} is not the model server")
                    break
            except httpx.HTTPError:
                pass
            step = self._trainer_step()
            if step is not None and step != last_step:
                self.log(f"training: step {step}/{self.steps}")
                last_step = step
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model server after {timeout}s:\n{self.tail('trainer')}")
            time.sleep(1)
        self.trained = time.time()
        self.log(f"serving the exported model on {self.base_url}/v1")

    def _trainer_step(self) -> int | None:
        try:
            progress = httpx.get(f"http://127.0.0.1:{self.trainer_port}/progress", timeout=1)
            return progress.json().get("step") if progress.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def stop(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.log(f"{name} did not stop on SIGTERM; killing it")
                    proc.kill()
                    proc.wait()
        if self._services_server is not None:
            self._services_server.shutdown()
        self.prometheus.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the operator's view of ModelService `chat` ------------------------------------

    def experiment(self, decision: str, weights: dict[str, int], cause: str = "Spec") -> None:
        """What the reconcile reports after a look: the split, the rates with intervals
        (numbers as the experiment's statistics give them), the decision; a new split is
        appended to the history as a traffic change of `cause`."""
        split = [{"name": n, "weight": w} for n, w in weights.items()]
        if not self.history or self.history[-1]["weights"] != split:
            self.history.append({"time": time.time(), "weights": split, "cause": cause})
        self.looks += 1
        looks = self.looks
        status = ModelServiceStatus.model_validate(
            {
                "variants": [{"name": n, "weight": w, "ready": True} for n, w in weights.items()],
                "experiment": {
                    "control": "a",
                    "treatment": "b",
                    "variants": [
                        {
                            "name": "a",
                            "samples": 40 * looks,
                            "successes": 22 * looks,
                            "rate": 0.55,
                            "interval": {"lower": 0.40, "upper": 0.69},
                        },
                        {
                            "name": "b",
                            "samples": 38 * looks,
                            "successes": 17 * looks,
                            "rate": 0.4474,
                            "interval": {"lower": 0.30, "upper": 0.60},
                        },
                    ],
                    "difference": -0.1026,
                    "differenceInterval": {"lower": -0.31, "upper": 0.11},
                    "pValue": 0.42 / looks,
                    "decision": decision,
                    "looks": looks,
                },
                "history": self.history,
            }
        )
        self.services.observe(RUN_NAMESPACE, SERVICE, status)

    # ---- traffic ---------------------------------------------------------------------

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="-", max_retries=0)

    def traffic(self) -> dict[str, Any]:
        """A few requests of each kind: completions (one streamed), a chat completion, one
        refused with 400, and feedback up and down. Returns what was sent."""
        client = self.client()
        ids = []
        for prompt in PROMPTS[:3]:
            ids.append(client.completions.create(model=RUN, prompt=prompt, max_tokens=8).id)
        stream = client.completions.create(model=RUN, prompt=PROMPTS[3], max_tokens=8, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream)
        chat = client.chat.completions.create(
            model=RUN, messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        ids.append(chat.id)
        try:
            client.completions.create(model=RUN, prompt="x", max_tokens=10**6)
            refused = None
        except openai.BadRequestError as err:
            refused = err.status_code
        for response_id, rating in ((ids[0], "up"), (ids[1], "down")):
            answer = httpx.post(
                f"{self.base_url}/v1/feedback",
                json={"response_id": response_id, "rating": rating},
                timeout=10,
            )
            answer.raise_for_status()
        self.sent = {
            "completions": len(ids),
            "streamed": streamed,
            "refused": refused,
            "routed": self.routed_traffic(),
        }
        return self.sent

    def routed_traffic(self) -> dict[str, int]:
        """Through the router: two users per variant (sticky, so each variant gets two
        completions), and one rating (up on a, down on b). Returns requests per variant."""
        router = openai.OpenAI(base_url=f"{self.router_url}/v1", api_key="-", max_retries=0)
        users: dict[str, list[str]] = {"a": [], "b": []}
        for i in range(100):
            chosen = choose(f"user-{i}", self.router_config.hash_salt, self.router_config.variants)
            if len(users[chosen.name]) < 2:
                users[chosen.name].append(f"user-{i}")
        routed = {}
        for name, keys in users.items():
            ids = [
                router.completions.create(model=SERVICE, prompt=PROMPTS[0], max_tokens=4, user=u).id
                for u in keys
            ]
            routed[name] = len(ids)
            answer = httpx.post(
                f"{self.router_url}/v1/feedback",
                json={"response_id": ids[0], "rating": "up" if name == "a" else "down"},
                headers={"X-Kubetrain-Caller": "monitoring-test"},
                timeout=10,
            )
            answer.raise_for_status()
        return routed

    def load(self, seconds: float, concurrency: int = 2, seed: int = 0) -> int:
        """Steady traffic for the preview's curves: `concurrency` clients sending
        completions of varying length, one in ten refused, some feedback. Returns requests."""
        rng = random.Random(seed)
        plans = [(rng.choice(PROMPTS), rng.randint(4, 40), rng.random()) for _ in range(10_000)]
        sent = [0]
        lock = threading.Lock()
        end = time.monotonic() + seconds

        def worker(offset: int) -> None:
            client = self.client()
            i = offset
            while time.monotonic() < end:
                prompt, tokens, dice = plans[i % len(plans)]
                i += concurrency
                try:
                    if dice < 0.1:
                        client.completions.create(model=RUN, prompt=prompt, max_tokens=10**6)
                    else:
                        reply = client.completions.create(
                            model=RUN, prompt=prompt, max_tokens=tokens
                        )
                        if dice > 0.85:
                            httpx.post(
                                f"{self.base_url}/v1/feedback",
                                json={
                                    "response_id": reply.id,
                                    "rating": "up" if dice > 0.9 else "down",
                                },
                                timeout=10,
                            )
                except openai.APIStatusError:
                    pass
                with lock:
                    sent[0] += 1
                time.sleep(rng.uniform(0.0, 0.3))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sent[0]

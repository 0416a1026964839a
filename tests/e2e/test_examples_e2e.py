"""End to end on a real node (hack/node.py: containerd, kubelet, kube-proxy, cluster DNS)
joined to the local control plane, with the images built from this repository:

- `helm install` the chart as a user does: the operator runs as its pod, in-cluster, with
  the chart's ServiceAccount, RBAC and restricted security context;
- `kubectl apply` the quickstart: the Ray head and two workers run from the CPU trainer
  image as uid 1000 with a read-only root; FSDP2 trains across the two worker pods; a
  worker pod is deleted and the run goes on from its latest checkpoint; it succeeds; the
  head's log is read with `kubectl logs`; the serving pod answers the `openai` client
  through its Service's ClusterIP;
- the CPU twins of the GPU examples, as written: `pretrain-cpu` keeps everything on an S3
  server (SeaweedFS on the node's bridge address), survives a killed worker container by
  resuming from the object store, and serves the model it fetches from there;
  `finetune-lora-cpu` reads its model, data and evaluation set from claims mounted
  read-only, trains LoRA adapters, passes its gate and serves;
- a run whose workers exceed their memory limit is classified OOMKilled, retried per its
  run policy and failed; the head it leaves behind stops promptly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetrain_api import contract, validation
from tests.helm.chart import NAMESPACE, install_release, operator_identity_from_chart
from tests.support import example_inputs
from tests.support.cluster import kubectl, wait_until
from tests.support.images import built_images
from tests.support.population import Population, TaskUsers
from tests.support.postgres import start_postgres
from tests.support.realnode import RealNode
from tests.support.runs import (
    ROOT,
    apply,
    condition,
    example,
    get_run,
    quickstart,
    status,
    wait_phase,
)
from tests.support.s3 import S3Server, start_s3

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane]

STEPS, CHECKPOINT = 40, 20
OPERATOR_DEPLOYMENT = "kubetrain-operator"
# The node has 2 CPUs: the head, two workers, the serving pod and the operator (100m)
# share them. Requests are limits (Guaranteed QoS), so a Ray pod gets no more than this:
# at 250m a busy machine starved Ray's head until it declared workers dead.
TRAIN = {"cpu": "500m", "memory": "2Gi"}
SERVE = {"cpu": "250m", "memory": "2Gi"}


@pytest.fixture(scope="module")
def chart_operator(cluster: Any, crd_installed: None, real_node: RealNode) -> Iterator[str]:
    """Both images on the node, then `helm install` with the chart's defaults except the CPU
    trainer's tag and a shorter resync. Yields the trainer image."""
    refs = built_images(real_node)
    values = {
        "trainer": {"image": {"tag": refs["trainer"].rsplit(":", 1)[1]}},
        "operator": {"resyncSeconds": 2},
    }
    with operator_identity_from_chart(cluster):
        install_release(cluster, values)
        try:
            kubectl(
                "rollout", "status", f"deploy/{OPERATOR_DEPLOYMENT}", "-n", NAMESPACE,
                "--timeout=180s", timeout=200,
            )  # fmt: skip
            yield refs["trainer"]
        except BaseException:
            sys.stderr.write(real_node.diagnostics(NAMESPACE))
            raise
        finally:
            sys.stderr.write(_operator_log_tail())
    # Uninstalled: no second operator may reconcile the runs of later tests.
    wait_until(
        lambda: not kubectl("get", "pods", "-n", NAMESPACE, "-o", "name").stdout.strip(),
        timeout=120,
        message="the chart's operator pod to go",
    )


def _operator_log_tail() -> str:
    out = kubectl(
        "logs", f"deploy/{OPERATOR_DEPLOYMENT}", "-n", NAMESPACE, "--tail=60", check=False
    )
    return f"\n----- operator log (tail) -----\n{out.stdout}{out.stderr}\n"


def small_run(name: str, **changes: Any) -> dict[str, Any]:
    """The quickstart sized for the 2-CPU node."""
    return quickstart(
        name,
        resources__cpuPerWorker=TRAIN["cpu"],
        resources__head=TRAIN,
        serve__resources=SERVE,
        **changes,
    )


def container_id(namespace: str, pod: str) -> str:
    out = kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout
    (container,) = json.loads(out)["status"]["containerStatuses"]
    return str(container["containerID"]).removeprefix("containerd://")


def kill_container(node: RealNode, namespace: str, pod: str) -> None:
    """SIGKILL the pod's container through containerd, as the kernel's OOM killer or a
    crash would: the container exits 137 and the kubelet reports it."""
    subprocess.run(
        ["ctr", "--address", str(node.node.containerd_socket), "-n", "k8s.io",
         "tasks", "kill", "--signal", "SIGKILL", container_id(namespace, pod)],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def storage_events(namespace: str, run: str) -> list[dict[str, Any]]:
    """The trainer's events (metrics.jsonl) on the run's volume, read from the host."""
    claim = json.loads(
        kubectl(
            "get", "pvc", "-n", namespace, "-l", f"kubetrain.dev/run={run}", "-o", "json"
        ).stdout
    )["items"][0]
    pv = json.loads(kubectl("get", "pv", claim["spec"]["volumeName"], "-o", "json").stdout)
    # `kubetrain run --output-dir /storage --run-uid UID` keeps each run in its own folder.
    folder = contract.run_folder(run, get_run(run, namespace)["metadata"]["uid"])
    path = Path(pv["spec"]["hostPath"]["path"]) / folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpointed(namespace: str, run: str) -> int:
    """The run's latest committed checkpoint step; fails at once if the run failed."""
    st = status(run, namespace)
    if st.get("phase") == "Failed":
        pytest.fail(f"{run} failed: {condition(st, 'Failed')}")
    return int(st.get("checkpoints", {}).get("latest", {}).get("step", 0))


def wait_checkpoint(namespace: str, run: str, step: int) -> dict[str, Any]:
    wait_until(
        lambda: checkpointed(namespace, run) >= step,
        timeout=900,
        interval=0.5,
        message=f"the checkpoint of step {step}",
    )
    return status(run, namespace)


def ask_served_model(namespace: str, run: str, prompt: str) -> str:
    """Wait for the run's Serving condition, then a completion from the `openai` client
    through the serving Service's ClusterIP."""
    wait_until(
        lambda: condition(status(run, namespace), "Serving").get("status") == "True",
        timeout=300,
        message=f"{run}: Serving condition True",
    )
    cluster_ip = json.loads(
        kubectl("get", "svc", f"{run}-serve", "-n", namespace, "-o", "json").stdout
    )["spec"]["clusterIP"]

    import openai

    client = openai.OpenAI(base_url=f"http://{cluster_ip}:80/v1", api_key="-", timeout=30)
    completion = client.completions.create(model=run, prompt=prompt, max_tokens=8, seed=0)
    text = completion.choices[0].text
    assert text, completion
    return text


def test_quickstart_trains_on_real_pods_resumes_and_serves(
    real_node: RealNode, chart_operator: str, namespace: str
) -> None:
    started = time.monotonic()
    run = small_run(
        "quickstart",
        hyperparameters__maxSteps=STEPS,
        checkpoint__intervalSteps=CHECKPOINT,
        evaluation__intervalSteps=CHECKPOINT,
        evaluation__gate=[{"metric": "perplexity", "max": 1000}],
        # A failure is caused on purpose; room for one slow Ray start on 2 cores.
        runPolicy__backoffLimit=3,
    )
    apply(run, namespace)
    try:
        first = wait_checkpoint(namespace, "quickstart", CHECKPOINT)
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        head = next(p for p in pods if p["metadata"]["labels"].get("kubetrain.dev/role") == "head")
        # Training pods run as the image's non-root user, on a read-only root.
        for pod in pods:
            ctx = pod["spec"]["containers"][0]["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        uid = kubectl("exec", head["metadata"]["name"], "-n", namespace, "--", "id", "-u")
        assert uid.stdout.strip() == "1000"
        assert pods
        assert all(p["spec"]["nodeName"] == real_node.name for p in pods)

        # A worker pod is deleted (a drained node, a user's mistake). (The pretrain twin
        # below kills a worker's container instead.)
        kubectl(
            "delete", "pod", f"quickstart-a{first['attempts']}-worker-0", "-n", namespace,
            "--wait=false",
        )  # fmt: skip
        final = wait_phase("quickstart", namespace, "Succeeded", timeout=900)
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    trained = time.monotonic() - started
    assert final["attempts"] > first["attempts"]
    assert final["progress"]["step"] == STEPS
    assert final["evaluation"]["metrics"]["perplexity"] < 1000
    assert final["model"]
    # Each attempt after the first started from a committed checkpoint, not from scratch.
    resumed = [
        e["resumed_from"] for e in storage_events(namespace, "quickstart") if e["kind"] == "setup"
    ]
    assert resumed[0] == 0
    assert min(resumed[1:]) >= CHECKPOINT

    # The driver's output is in the head's log, through the API server and the kubelet.
    logs = kubectl(
        "logs", f"quickstart-a{final['attempts']}-head", "-n", namespace, "--tail=200"
    ).stdout
    assert f"run quickstart: {STEPS} steps" in logs

    text = ask_served_model(namespace, "quickstart", "the cat was")
    sys.stderr.write(
        f"\ne2e: trained in {trained:.0f}s over {final['attempts']} attempts (resumed from"
        f" {resumed}), served after {time.monotonic() - started:.0f}s;"
        f" completion={text!r}\n"
    )


# --------------------------------------------------------------------------------------
# The CPU twins of the GPU examples, as written (resized only to share a 2-CPU node)
# --------------------------------------------------------------------------------------


def resized(stem: str) -> dict[str, Any]:
    return example(
        stem,
        resources__cpuPerWorker=TRAIN["cpu"],
        resources__head=TRAIN,
        serve__resources=SERVE,
    )


@pytest.fixture
def object_store(real_node: RealNode) -> Iterator[S3Server]:
    """SeaweedFS on the node's bridge address, the one host address pods may reach."""
    server = start_s3(host=real_node.node.ip)
    try:
        yield server
    finally:
        server.stop()


def test_pretrain_twin_keeps_everything_on_the_object_store(
    real_node: RealNode, chart_operator: str, namespace: str, object_store: S3Server
) -> None:
    """examples/pretrain-cpu.yaml: model config, data, checkpoints and the exported model
    on S3; a worker's container is killed and the next attempt resumes from the
    checkpoint on the object store (the pods' local scratch is gone with them); the model
    is served from the object store."""
    fs = object_store.filesystem()
    for bucket in ("model-bucket", "corpus-bucket", "checkpoint-bucket"):
        object_store.make_bucket(bucket)
    fs.pipe(example_inputs.pretrain_objects())
    # The Secret the example names: credentials and endpoint, by reference only.
    kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", namespace,
        *(f"--from-literal={k}={v}" for k, v in object_store.env().items()),
    )  # fmt: skip
    run = resized("pretrain-cpu")
    name, steps = run["metadata"]["name"], run["spec"]["hyperparameters"]["maxSteps"]
    interval = run["spec"]["checkpoint"]["intervalSteps"]
    apply(run, namespace)
    try:
        first = wait_checkpoint(namespace, name, interval)
        kill_container(real_node, namespace, f"{name}-a{first['attempts']}-worker-1")
        final = wait_phase(name, namespace, "Succeeded", timeout=900)
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    assert final["attempts"] > first["attempts"]
    assert final["progress"]["step"] == steps
    root = contract.run_url(
        "s3://checkpoint-bucket/pretrain-cpu",
        contract.run_folder(name, get_run(name, namespace)["metadata"]["uid"]),
    ).removeprefix("s3://")
    assert final["model"]["uri"] == f"s3://{root}/{contract.MODEL_DIR}", final["model"]
    assert final["checkpoints"]["latest"]["path"].startswith(f"s3://{root}/"), final
    events = [
        json.loads(line)
        for line in fs.cat(f"{root}/{contract.METRICS_FILE}").decode().splitlines()
        if line.strip()
    ]
    resumed = [e["resumed_from"] for e in events if e["kind"] == "setup"]
    assert resumed[0] == 0, resumed
    assert min(resumed[1:]) >= interval, resumed
    summary = json.loads(fs.cat(f"{root}/{contract.DATA_DIR}/summary.json"))
    assert set(summary["sources"]) == {"web", "code"}
    assert ask_served_model(namespace, name, "the fox")


def test_finetune_twin_reads_mounted_claims_trains_lora_and_serves(
    real_node: RealNode, chart_operator: str, namespace: str, tmp_path: Path
) -> None:
    """examples/finetune-lora-cpu.yaml: the model, both data sources and the evaluation
    set come from two claims mounted read-only; LoRA on every projection; the labelled
    metrics are computed, the gate passes, the merged model is served."""
    kubectl(
        "create", "priorityclass", "training-high", "--value=1000", check=False
    )  # fmt: skip
    example_inputs.write_finetune_claims(tmp_path / "claims")
    for claim in ("models", "datasets"):
        apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
            namespace,
        )
        volume = claim_folder(namespace, claim)
        shutil.copytree(tmp_path / "claims" / claim, volume, dirs_exist_ok=True)
    run = resized("finetune-lora-cpu")
    name = run["metadata"]["name"]
    apply(run, namespace)
    try:
        final = wait_phase(name, namespace, "Succeeded", timeout=900)
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    metrics = final["evaluation"]["metrics"]
    assert {"loss", "perplexity", "accuracy", "f1", "intents/accuracy"} <= set(metrics)
    assert final["evaluation"]["gate"]["passed"] is True
    assert ask_served_model(namespace, name, "where is my parcel")


def claim_folder(namespace: str, claim: str) -> Path:
    """The host folder of a claim the node's provisioner bound to a hostPath volume."""
    volume = wait_until(
        lambda: json.loads(kubectl("get", "pvc", claim, "-n", namespace, "-o", "json").stdout)[
            "spec"
        ].get("volumeName"),
        timeout=60,
        message=f"claim {claim} to be bound",
    )
    pv = json.loads(kubectl("get", "pv", volume, "-o", "json").stdout)
    return Path(pv["spec"]["hostPath"]["path"])


# --------------------------------------------------------------------------------------
# A ModelService: examples/modelservice-ab.yaml as written (resized), on real pods
# --------------------------------------------------------------------------------------

AB_STEPS = 20
ROUTER = {"cpu": "250m", "memory": "1Gi"}


def ab_documents() -> list[dict[str, Any]]:
    """examples/modelservice-ab.yaml: the two runs (shortened and resized) and the
    ModelService (its pods resized)."""
    docs = validation.load_documents((ROOT / "examples" / "modelservice-ab.yaml").read_text())
    for doc in docs:
        spec = doc["spec"]
        if doc["kind"] == "TrainingRun":
            spec["hyperparameters"]["maxSteps"] = AB_STEPS
            spec["checkpoint"]["intervalSteps"] = spec["evaluation"]["intervalSteps"] = 10
            spec["resources"] |= {"cpuPerWorker": TRAIN["cpu"], "head": TRAIN}
        else:
            for variant in spec["variants"]:
                variant["resources"] = SERVE
            spec["router"]["resources"] = ROUTER
    return docs


def service_status(name: str, namespace: str) -> dict[str, Any]:
    out = kubectl("get", "modelservice", name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


def wait_service(name: str, namespace: str, check: Any, what: str, timeout: float) -> Any:
    def look() -> Any:
        return check(service_status(name, namespace))

    try:
        return wait_until(look, timeout=timeout, message=f"{name}: {what}")
    except pytest.fail.Exception as exc:
        raise AssertionError(
            f"{exc}; status: {json.dumps(service_status(name, namespace))}"
        ) from None


def is_ready(status_: dict[str, Any]) -> bool:
    """The Ready condition is True (a status without conditions yet is not ready)."""
    ready = [c for c in status_.get("conditions", []) if c["type"] == "Ready"]
    return bool(ready) and ready[0]["status"] == "True"


def router_url(name: str, namespace: str) -> str:
    svc = json.loads(kubectl("get", "svc", f"{name}-router", "-n", namespace, "-o", "json").stdout)
    return f"http://{svc['spec']['clusterIP']}:80"


def test_modelservice_ab_test_rolls_back_by_feedback_and_on_a_broken_engine(
    real_node: RealNode, chart_operator: str, namespace: str
) -> None:
    """Two TrainingRuns train two tiny models; a ModelService serves them as A and B at
    50/50 behind its router; a simulated population (the `openai` client, sticky by user)
    rates A's answers positive 60% of the time and B's 40%; the operator reads the
    router's counts, declares A the winner at alpha 0.05 and moves all traffic to A,
    which new users then get. Then a second service over the same models with its router
    on PostgreSQL (two replicas): B's engine is taken down (its requests fail with 502),
    and the error guardrail rolls back to A at once; feedback posted to one router replica
    is counted by the other."""
    started = time.monotonic()
    docs = ab_documents()
    for doc in docs:
        apply(doc, namespace)
    try:
        for run in ("chat-a", "chat-b"):
            wait_phase(run, namespace, "Succeeded", timeout=900)
        trained = time.monotonic() - started
        ready = wait_service(
            "chat", namespace,
            lambda s: s if is_ready(s) else None,
            "Ready", timeout=300,
        )  # fmt: skip
        assert ready["traffic"] == "a=50,b=50"
        shown = kubectl("get", "modelservice", "chat", "-n", namespace).stdout
        sys.stderr.write(f"\n$ kubectl get ms chat\n{shown}")
        versions = {v["name"]: v["modelVersion"] for v in ready["variants"]}
        population = Population(router_url("chat", namespace), "chat", {"a": 0.6, "b": 0.4})
        users = 0
        while users < 1600:
            population.round(range(users, users + 50))
            users += 50
            decision = service_status("chat", namespace).get("experiment", {}).get("decision")
            if decision in ("Promote", "Rollback"):
                break
        decided = wait_service(
            "chat", namespace,
            lambda s: s if s.get("experiment", {}).get("decision") in ("Promote", "Rollback")
            else None,
            "a decision", timeout=60,
        )  # fmt: skip
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    experiment = decided["experiment"]
    assert experiment["decision"] == "Rollback", experiment  # B, the treatment, lost
    assert experiment["winner"] == "a"
    assert experiment["pValue"] <= 0.05
    assert decided["traffic"] == "a=100,b=0"
    assert condition(decided, "RolledBack")["status"] == "True"
    # Every response carried its variant's model version (the run's).
    assert population.versions == versions
    # The router applies the new split (the kubelet updates its ConfigMap's file): new
    # users all get A.
    wait_until(
        lambda: {population.ask(f"late-{time.monotonic_ns()}")[0] for _ in range(10)} == {"a"},
        timeout=120,
        message="new users routed to a only",
    )
    ab_seconds = time.monotonic() - started
    shown = kubectl("get", "modelservice", "chat", "-n", namespace, "-o", "wide").stdout
    sys.stderr.write(f"\n$ kubectl get ms chat -o wide\n{shown}")
    sys.stderr.write(
        f"\nmodelservice: trained both in {trained:.0f}s; decided after {users} users "
        f"({experiment['reason']}); {ab_seconds:.0f}s in all\n"
    )

    guardrail_on_postgres(real_node, namespace, docs[-1])


def guardrail_on_postgres(real_node: RealNode, namespace: str, service: dict[str, Any]) -> None:
    kubectl("delete", "modelservice", "chat", "-n", namespace, "--wait=false")
    database = start_postgres(host=real_node.node.ip)
    try:
        kubectl(
            "create", "secret", "generic", "router-db", "-n", namespace,
            f"--from-literal=dsn={database.create_database('router')}",
        )  # fmt: skip
        guard = json.loads(json.dumps(service))
        guard["metadata"]["name"] = "guard"
        guard["spec"]["router"] |= {
            "replicas": 2,
            "database": {"postgres": {"dsnSecretRef": {"name": "router-db", "key": "dsn"}}},
        }
        guard["spec"]["experiment"]["minSamplesPerVariant"] = 10_000  # only a guardrail acts
        apply(guard, namespace)
        wait_service(
            "guard", namespace,
            lambda s: s if is_ready(s) else None,
            "Ready", timeout=300,
        )  # fmt: skip
        routers = [
            p["status"]["podIP"]
            for p in json.loads(
                kubectl(
                    "get", "pods", "-n", namespace, "-l",
                    "kubetrain.dev/modelservice=guard,app.kubernetes.io/component=router",
                    "-o", "json",
                ).stdout
            )["items"]
        ]  # fmt: skip
        assert len(routers) == 2
        # Feedback through one replica is counted by the other (one shared database).
        first = Population(f"http://{routers[0]}:8000", "guard", {"a": 1.0, "b": 1.0})
        variant, response_id = first.ask("shared-user")
        first.rate("shared-user", variant, response_id)
        counted = httpx.get(f"http://{routers[1]}:8000/stats", timeout=30).json()
        assert counted["backend"] == "postgresql"
        assert counted["variants"][variant]["n"] == 1, counted

        # B's engine goes down: its users get 502s from the router.
        kubectl("scale", "deployment", "guard-b", "-n", namespace, "--replicas=0")
        wait_until(
            lambda: not kubectl(
                "get", "pods", "-n", namespace, "-l", "kubetrain.dev/variant=b,"
                "kubetrain.dev/modelservice=guard", "-o", "name",
            ).stdout.strip(),
            timeout=120,
            message="guard-b's pods gone",
        )  # fmt: skip
        population = Population(router_url("guard", namespace), "guard", {"a": 0.5, "b": 0.5})
        codes: Counter[int] = Counter()
        for i in range(200):
            codes[population.try_ask(f"g-{i}")] += 1
            if codes[502] >= 30:
                break
        assert set(codes) == {200, 502}, codes  # A answers, B's requests fail
        rolled = wait_service(
            "guard", namespace,
            lambda s: s if s.get("experiment", {}).get("decision") == "Rollback" else None,
            "the guardrail's rollback", timeout=120,
        )  # fmt: skip
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    finally:
        database.stop()
    assert "5xx rate" in rolled["experiment"]["guardrailBreach"]
    assert rolled["traffic"] == "a=100,b=0"
    assert condition(rolled, "RolledBack")["reason"] == "GuardrailBreached"
    assert rolled["history"][-1]["cause"] == "Guardrail"


# --------------------------------------------------------------------------------------
# The loop: feedback -> snapshot -> retraining -> challenger -> promotion -> lineage
# --------------------------------------------------------------------------------------


def retraining_documents() -> list[dict[str, Any]]:
    """examples/modelservice-retraining.yaml, its pods resized for the node."""
    path = ROOT / "examples" / "modelservice-retraining.yaml"
    docs = validation.load_documents(path.read_text())
    for doc in docs:
        spec = doc["spec"]
        if doc["kind"] == "TrainingRun":
            spec["resources"] |= {"cpuPerWorker": TRAIN["cpu"], "head": TRAIN}
        else:
            for variant in spec["variants"]:
                variant["resources"] = SERVE
            spec["router"] = {"resources": ROUTER}
            template = spec["retraining"]["template"]["spec"]
            template["resources"] |= {"cpuPerWorker": TRAIN["cpu"], "head": TRAIN}
    return docs


def retraining_outcome(status_: dict[str, Any]) -> str | None:
    runs = (status_.get("retraining") or {}).get("runs") or []
    return runs[-1].get("outcome") if runs else None


def claims_root(namespace: str, tmp: Path, claims: list[str]) -> Path:
    """A folder with each claim's volume under the claim's name: what a debugging pod that
    mounts the claims at /mnt/<claim> sees, for `kubetrain lineage` (KUBETRAIN_PVC_ROOT)."""
    root = tmp / "claims"
    root.mkdir()
    for claim in claims:
        (root / claim).symlink_to(claim_folder(namespace, claim))
    return root


def test_the_model_keeps_improving_from_its_users(
    cluster: Any, real_node: RealNode, chart_operator: str, namespace: str, tmp_path: Path
) -> None:
    """examples/modelservice-retraining.yaml on real pods: helper-v1 serves as the champion
    of the ModelService `helper`; simulated users ask a small synthetic task (colours of
    animals it never saw) and correct its wrong answers; after 40 rated answers the
    operator exports the feedback (a Job running `kubetrain feedback export` on the
    router's SQLite claim), trains helper-retrain-1 from the champion on the instructions
    plus the snapshot's corrections, serves it as the challenger with 20% of the traffic;
    the users' ratings promote it; `kubetrain lineage` shows champion -> challenger with
    the snapshot in between."""
    started = time.monotonic()
    kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        str(ROOT / "examples" / "claims" / "feedback-snapshots.yaml"),
    )
    for doc in retraining_documents():
        apply(doc, namespace)
    try:
        wait_phase("helper-v1", namespace, "Succeeded", timeout=900)
        wait_service(
            "helper", namespace,
            lambda s: s if is_ready(s) else None,
            "Ready", timeout=300,
        )  # fmt: skip
        users = TaskUsers(router_url("helper", namespace), "helper")
        users.round(range(48), prefix="first")
        assert users.right["live"] <= 8, users.right  # the champion does not know the task
        trained = wait_service(
            "helper", namespace,
            lambda s: s if retraining_outcome(s) in ("Challenging", "Failed") else None,
            "the retrained challenger", timeout=900,
        )  # fmt: skip
        assert retraining_outcome(trained) == "Challenging", trained["retraining"]
        wait_service(
            "helper", namespace,
            lambda s: s if is_ready(s) and s.get("variantsReady") == "2/2" else None,
            "the challenger ready", timeout=300,
        )  # fmt: skip
        # The router applies the new split once the kubelet updates its ConfigMap's file.
        wait_until(
            lambda: users.ask_and_rate(f"probe-{time.monotonic_ns()}", "goat") == "challenger",
            timeout=180,
            message="a user routed to the challenger",
        )
        n = 0
        while n < 800 and retraining_outcome(service_status("helper", namespace)) == "Challenging":
            users.round(range(n, n + 40), prefix="second")
            n += 40
        promoted = wait_service(
            "helper", namespace,
            lambda s: s if retraining_outcome(s) in ("Promoted", "RolledBack") else None,
            "the experiment's outcome", timeout=120,
        )  # fmt: skip
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        sys.stderr.write(_operator_log_tail())
        raise
    loop = promoted["retraining"]
    (run,) = loop["runs"]
    assert run["outcome"] == "Promoted", (loop, promoted.get("experiment"))
    assert run["name"] == "helper-retrain-1"
    assert "40 new feedback records" in run["reasons"][0] or "new feedback" in run["reasons"][0]
    snapshot = run["snapshot"]
    assert snapshot["sft"] >= 1  # the corrections
    assert loop["champion"]["trainingRun"] == "helper-retrain-1"
    assert loop["champion"]["generation"] == 2
    assert promoted["generation"] == 2
    assert promoted["experiment"]["winner"] == "challenger"
    # The corrected answers won: users liked the challenger's far more often.
    rate = {v: users.right[v] / max(1, users.asked[v]) for v in ("live", "challenger")}
    assert rate["challenger"] > rate["live"] + 0.3, (rate, users.asked)
    shown = kubectl("get", "ms", "helper", "-n", namespace).stdout
    runs_shown = kubectl("get", "tr", "-n", namespace).stdout
    sys.stderr.write(f"\n$ kubectl get ms helper\n{shown}\n$ kubectl get tr\n{runs_shown}")
    generations = {line.split()[0]: line.split()[4] for line in runs_shown.splitlines()[1:]}
    assert generations == {"helper-v1": "1", "helper-retrain-1": "2"}

    # The champion now serves the retrained model (live at 100%, the challenger gone).
    final = wait_service(
        "helper", namespace,
        lambda s: s if s.get("traffic") == "live=100" and is_ready(s) else None,
        "live serving the new champion", timeout=300,
    )  # fmt: skip
    (live,) = final["variants"]
    assert live["modelVersion"] == loop["champion"]["modelVersion"]

    # Lineage: the champion's model back through helper-v1's to the base, with the snapshot.
    model_uri = live["modelUri"]
    claims = kubectl("get", "pvc", "-n", namespace, "-o", "name").stdout.split()
    root = claims_root(
        namespace, tmp_path, [c.removeprefix("persistentvolumeclaim/") for c in claims]
    )
    env = {**os.environ, contract.PVC_ROOT_ENV: str(root)}
    lineage = subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", "lineage",
         contract.pvc_path(model_uri, str(root))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    sys.stderr.write(f"\n$ kubetrain lineage ...\n{lineage.stdout}{lineage.stderr}")
    assert lineage.returncode == 0, lineage.stderr
    assert "helper-retrain-1" in lineage.stdout
    assert "helper-v1" in lineage.stdout
    assert snapshot["id"] in lineage.stdout
    assert lineage.stdout.index("helper-retrain-1") < lineage.stdout.index("helper-v1")
    # The same from the ModelService: every model it serves, from its status.
    served = subprocess.run(
        [sys.executable, "-m", "kubetrain_cli.main", "lineage", "ms/helper", "-n", namespace],
        cwd=ROOT, env={**env, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    sys.stderr.write(f"\n$ kubetrain lineage ms/helper\n{served.stdout}{served.stderr}")
    assert served.returncode == 0, served.stderr
    assert served.stdout.startswith("variant live (100% of the traffic)")
    assert lineage.stdout.strip().splitlines()[0] in served.stdout
    sys.stderr.write(
        f"\nretraining loop: {time.monotonic() - started:.0f}s; answers right: "
        f"{dict(users.right)} of {dict(users.asked)}\n"
    )


def test_workers_over_their_memory_limit_are_oomkilled_and_retried(
    real_node: RealNode, chart_operator: str, namespace: str
) -> None:
    # Importing Ray alone takes more than this; the kernel kills the worker's container.
    run = small_run("oom", resources__memoryPerWorker="96Mi", runPolicy__backoffLimit=1)
    apply(run, namespace)
    try:
        # The first attempt's head waits for workers that never join; when the operator
        # starts the next attempt it deletes that head, which must stop on SIGTERM at once
        # (not after the grace period).
        head = "oom-a1-head"
        wait_until(
            lambda: kubectl("get", "pod", head, "-n", namespace, check=False).returncode == 0,
            timeout=300,
            message=f"pod {head}",
        )
        grace = json.loads(kubectl("get", "pod", head, "-n", namespace, "-o", "json").stdout)[
            "spec"
        ]["terminationGracePeriodSeconds"]
        deleting = wait_until(
            lambda: json.loads(
                kubectl("get", "pod", head, "-n", namespace, "-o", "json", check=False).stdout
                or '{"metadata": {"deletionTimestamp": "gone"}}'
            )["metadata"].get("deletionTimestamp"),
            timeout=600,
            interval=0.2,
            message=f"{head} to be deleted by the operator",
        )
        asked = time.monotonic()
        wait_until(
            lambda: kubectl("get", "pod", head, "-n", namespace, check=False).returncode != 0,
            timeout=grace + 30,
            interval=0.2,
            message=f"{head} to stop",
        )
        stopped_after = time.monotonic() - asked
        final = wait_phase("oom", namespace, "Failed", timeout=600)
    except BaseException:
        sys.stderr.write(real_node.diagnostics(namespace))
        raise
    failed = condition(final, "Failed")
    assert final["attempts"] == 2  # backoffLimit 1: one retry
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"].startswith("OOMKilled:"), failed
    assert "exit code 137" in failed["message"]
    assert deleting != "gone", f"{head} went before its deletion could be seen"
    assert stopped_after < grace / 2, f"head took {stopped_after:.1f}s of its {grace}s"
    sys.stderr.write(f"\noom: head stopped {stopped_after:.1f}s after deletion; {failed}\n")

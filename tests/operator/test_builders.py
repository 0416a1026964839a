"""Pure builders: golden structural properties on the examples, and properties of any spec."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from kubetrain_api import contract, placement
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import load_documents, parse
from kubetrain_operator import builders, claims
from kubetrain_operator.names import ChildNames
from kubetrain_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
UID = "0b6a0e1c-1111-4222-8333-444455556666"
NS = "team-a"
TOKEN = "ray-token-canary-9d1c27f0b5e34a8f"
LABEL_CANARY = "label-canary-3f9a"

Obj = dict[str, Any]


def load(path: Path) -> api.TrainingRun:
    return parse(load_documents(path.read_text())[0])


def example(stem: str) -> api.TrainingRun:
    return load(ROOT / "examples" / f"{stem}.yaml")


def with_spec(run: api.TrainingRun, **changes: Any) -> api.TrainingRun:
    """A copy of `run` with spec fields replaced, validated again."""
    doc = run.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"] |= changes
    return parse(doc)


def pods(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] == "Pod"]


def containers(pod: Obj) -> list[Obj]:
    spec = pod["spec"]
    return [
        *spec.get("initContainers", []),
        *spec["containers"],
        *spec.get("ephemeralContainers", []),
    ]


# The restricted Pod Security Standard (which includes baseline), checked field by field as
# the admission controller does, plus kubetrain's own rules (read-only root, no token).
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
}


def restricted_violations(pod: Obj) -> list[str]:
    """Every way `pod` breaks the restricted profile or kubetrain's pod rules."""
    spec, out = pod["spec"], []
    pod_sc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"spec.{field} is true")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {volume['name']} has type {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"unsafe sysctl {sysctl['name']}")
    if spec.get("automountServiceAccountToken") is not False:
        out.append("service-account token is mounted")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccomp {pod_seccomp}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runs as UID 0")
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        out.append("pod is a Windows host process")
    for c in containers(pod):
        where = f"container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{where} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where} allows privilege escalation")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where} does not drop ALL capabilities")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where} adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"{where} may run as root")
        if sc.get("runAsUser") == 0:
            out.append(f"{where} runs as UID 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where} seccomp is {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where} procMount {sc['procMount']}")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            out.append(f"{where} AppArmor unconfined")
        selinux = {**pod_sc.get("seLinuxOptions", {}), **sc.get("seLinuxOptions", {})}
        if selinux.get("user") or selinux.get("role"):
            out.append(f"{where} sets SELinux user or role")
        if selinux.get("type", "container_t") not in (
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ):
            out.append(f"{where} SELinux type {selinux['type']}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{where} uses hostPort {port['hostPort']}")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{where} has a writable root filesystem")
    return out


def test_restricted_checker_catches_violations(settings: OperatorSettings) -> None:
    pod = builders.build_head_pod(example("quickstart"), UID, NS, 1, settings)
    assert restricted_violations(pod) == []
    bad = json.loads(json.dumps(pod))
    bad["spec"]["hostNetwork"] = True
    bad["spec"]["automountServiceAccountToken"] = True
    bad["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    sc = bad["spec"]["containers"][0]["securityContext"]
    sc |= {"allowPrivilegeEscalation": True, "privileged": True, "runAsNonRoot": False}
    sc["capabilities"] = {"add": ["SYS_ADMIN"]}
    bad["spec"]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    assert sorted(restricted_violations(bad)) == sorted(
        [
            "spec.hostNetwork is true",
            "volume host has type ['hostPath']",
            "service-account token is mounted",
            "pod seccomp Unconfined",
            "container ray-head is privileged",
            "container ray-head allows privilege escalation",
            "container ray-head does not drop ALL capabilities",
            "container ray-head adds capabilities ['SYS_ADMIN']",
            "container ray-head may run as root",
            "container ray-head seccomp is Unconfined",
        ]
    )


# --------------------------------------------------------------------------------------
# Golden structure of the examples
# --------------------------------------------------------------------------------------


@pytest.fixture(params=EXAMPLES, ids=lambda p: p.stem)
def run(request: pytest.FixtureRequest) -> api.TrainingRun:
    return load(request.param)


def cluster(run: api.TrainingRun, settings: OperatorSettings, attempt: int = 1) -> list[Obj]:
    return builders.build_cluster(run, UID, NS, attempt, settings, TOKEN)


def test_cluster_objects_in_apply_order(run: api.TrainingRun, settings: OperatorSettings) -> None:
    names = ChildNames(run.metadata.name or "", 2)
    objs = cluster(run, settings, attempt=2)
    workers = run.spec.resources.workers
    has_pvc = run.spec.checkpoint.storage.pvc is not None
    expected = [
        ("ConfigMap", names.config),
        ("Secret", names.ray_token),
        *([("PersistentVolumeClaim", names.storage)] if has_pvc else []),
        ("NetworkPolicy", names.network_policy),
        ("Service", names.head_service),
        ("Pod", names.head_pod),
        *(("Pod", names.worker_pod(i)) for i in range(workers)),
    ]
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == expected


def test_every_child_is_owned_labelled_and_hashed(
    run: api.TrainingRun, settings: OperatorSettings
) -> None:
    name = run.metadata.name
    for obj in cluster(run, settings):
        meta = obj["metadata"]
        assert meta["namespace"] == NS
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetrain.dev/v1alpha1",
                "kind": "TrainingRun",
                "name": name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert (
            meta["labels"].items()
            >= {
                "app.kubernetes.io/name": "kubetrain",
                "app.kubernetes.io/instance": name,
                "app.kubernetes.io/managed-by": "kubetrain-operator",
                "app.kubernetes.io/part-of": "kubetrain",
                "kubetrain.dev/run": name,
            }.items()
        )
        assert meta["labels"]["app.kubernetes.io/component"] in {
            "config",
            "ray-head",
            "ray-worker",
            "storage",
            "network",
            "ray-token",
        }
        digest = meta["annotations"][contract.ANNOTATION_INPUT_HASH]
        assert re.fullmatch(r"[0-9a-f]{16}", digest)
        assert digest == builders.input_hash(obj)


def test_pod_labels(settings: OperatorSettings) -> None:
    objs = cluster(example("finetune-lora-gpu"), settings, attempt=7)
    head, *workers = pods(objs)
    assert (
        head["metadata"]["labels"].items()
        >= {
            "app.kubernetes.io/component": "ray-head",
            "kubetrain.dev/attempt": "7",
            "kubetrain.dev/role": "head",
            "kueue.x-k8s.io/queue-name": "team-nlp",
        }.items()
    )
    for worker in workers:
        assert (
            worker["metadata"]["labels"].items()
            >= {
                "app.kubernetes.io/component": "ray-worker",
                "kubetrain.dev/attempt": "7",
                "kubetrain.dev/role": "worker",
                "kueue.x-k8s.io/queue-name": "team-nlp",
            }.items()
        )
    quick = pods(cluster(example("quickstart"), settings))
    assert all("kueue.x-k8s.io/queue-name" not in p["metadata"]["labels"] for p in quick)


def test_only_the_head_is_scraped_by_annotation(settings: OperatorSettings) -> None:
    head, *workers = pods(cluster(example("quickstart"), settings))
    annotations = head["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    # The annotated port is one the head's container really exposes.
    ports = {p["containerPort"] for c in head["spec"]["containers"] for p in c["ports"]}
    assert int(annotations["prometheus.io/port"]) in ports
    for worker in workers:
        assert "prometheus.io/scrape" not in worker["metadata"].get("annotations", {})


def test_builders_are_deterministic(run: api.TrainingRun, settings: OperatorSettings) -> None:
    assert cluster(run, settings) == cluster(run, settings)
    assert cluster(run, settings) != cluster(run, settings, attempt=2)


def test_input_hash_follows_the_spec(settings: OperatorSettings) -> None:
    before = {o["metadata"]["name"]: o for o in cluster(example("quickstart"), settings)}
    changed = with_spec(
        example("quickstart"),
        resources={"workers": 2, "cpuPerWorker": 2, "memoryPerWorker": "2Gi"},
    )
    after = {o["metadata"]["name"]: o for o in cluster(changed, settings)}

    def digest(obj: Obj) -> str:
        return obj["metadata"]["annotations"][contract.ANNOTATION_INPUT_HASH]

    for name in ("quickstart-config", "quickstart-a1-worker-0", "quickstart-a1-worker-1"):
        assert digest(before[name]) != digest(after[name]), name
    # Children the change does not touch keep their hash: the reconciler leaves them alone.
    for name in ("quickstart-ray", "quickstart-head", "quickstart-storage"):
        assert digest(before[name]) == digest(after[name]), name


def test_input_hash_helpers() -> None:
    obj = {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}}
    hashed = builders.with_input_hash(obj)
    assert "annotations" not in obj["metadata"]  # the input is not mutated
    assert builders.input_hash(hashed) == builders.input_hash(obj)
    assert builders.input_hash({**obj, "data": {"a": "2"}}) != builders.input_hash(obj)
    # Key order does not matter: the JSON is canonical.
    reordered = {"data": {"a": "1"}, "metadata": {"name": "x"}, "kind": "ConfigMap"}
    assert builders.input_hash(reordered) == builders.input_hash(obj)


def test_pods_are_restricted(run: api.TrainingRun, settings: OperatorSettings) -> None:
    for pod in pods(cluster(run, settings)):
        assert restricted_violations(pod) == [], pod["metadata"]["name"]
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never"
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsUser"] != 0


def test_requests_equal_limits_and_gpus(run: api.TrainingRun, settings: OperatorSettings) -> None:
    res = run.spec.resources
    head, *workers = pods(cluster(run, settings))
    head_res = head["spec"]["containers"][0]["resources"]
    assert head_res["requests"] == head_res["limits"]
    assert head_res["limits"] == {"cpu": str(res.head.cpu), "memory": str(res.head.memory)}
    for worker in workers:
        limits = worker["spec"]["containers"][0]["resources"]["limits"]
        assert worker["spec"]["containers"][0]["resources"]["requests"] == limits
        assert limits["cpu"] == str(res.cpu_per_worker)
        assert limits["memory"] == str(res.memory_per_worker)
        if res.gpus_per_worker > 0:
            assert limits["nvidia.com/gpu"] == str(res.gpus_per_worker)
        else:
            assert "nvidia.com/gpu" not in limits


def test_placement_is_carried(settings: OperatorSettings) -> None:
    for pod in pods(cluster(example("finetune-lora-gpu"), settings)):
        spec = pod["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert spec["priorityClassName"] == "training-high"
    for pod in pods(cluster(example("quickstart"), settings)):
        assert not {"nodeSelector", "tolerations", "priorityClassName"} & pod["spec"].keys()


def volume(pod: Obj, name: str) -> Obj | None:
    return next((v for v in pod["spec"]["volumes"] if v["name"] == name), None)


def mount(pod: Obj, name: str) -> Obj | None:
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    return next((m for m in mounts if m["name"] == name), None)


def test_writable_dirs_and_shared_memory(run: api.TrainingRun, settings: OperatorSettings) -> None:
    res = run.spec.resources
    for pod in pods(cluster(run, settings)):
        dshm = volume(pod, "dshm")
        is_head = pod["metadata"]["labels"][contract.LABEL_ROLE] == contract.ROLE_HEAD
        size = placement.shared_memory_size(res.head.memory if is_head else res.memory_per_worker)
        assert dshm == {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": str(res.shared_memory or size)},
        }
        paths = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert {"/tmp", "/home/ray", "/dev/shm", "/etc/kubetrain"} <= paths.keys()
        assert paths["/etc/kubetrain"]["readOnly"] is True
        assert volume(pod, "config") == {
            "name": "config",
            "configMap": {"name": f"{run.metadata.name}-config"},
        }


def test_storage_created_claim(settings: OperatorSettings) -> None:
    objs = cluster(example("finetune-lora-gpu"), settings)
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "qwen-support-lora-storage"
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "shared-rwx",
    }
    quick = builders.build_storage_pvc(example("quickstart"), UID, NS)
    assert quick is not None
    assert quick["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in quick["spec"]
    for pod in pods(objs):
        claim = volume(pod, "storage")
        assert claim is not None
        assert claim["persistentVolumeClaim"] == {"claimName": "qwen-support-lora-storage"}
        assert mount(pod, "storage") == {"name": "storage", "mountPath": settings.storage_mount}


def test_storage_existing_claim(settings: OperatorSettings) -> None:
    run = with_spec(
        example("quickstart"), checkpoint={"storage": {"pvc": {"claimName": "team-ckpt"}}}
    )
    objs = cluster(run, settings)
    assert builders.build_storage_pvc(run, UID, NS) is None
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objs}
    for pod in pods(objs):
        claim = volume(pod, "storage")
        assert claim is not None
        assert claim["persistentVolumeClaim"] == {"claimName": "team-ckpt"}


def test_storage_uri_gets_scratch_space_and_no_claim(settings: OperatorSettings) -> None:
    run = example("pretrain-gpu")
    assert run.spec.checkpoint.storage.uri
    objs = cluster(run, settings)
    assert builders.build_storage_pvc(run, UID, NS) is None
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objs}
    for pod in pods(objs):
        assert volume(pod, "storage") == {"name": "storage", "emptyDir": {}}
        assert mount(pod, "storage")["mountPath"] == settings.storage_mount


def claim_run(**changes: Any) -> api.TrainingRun:
    """The quickstart reading its model, tokenizer, data and evaluation set from claims:
    `models` twice (model and tokenizer), `datasets` twice, `evals` only for evaluation."""
    spec: Obj = {
        "model": {"source": "pvc://models/llama", "tokenizer": "pvc://models/tokenizer"},
        "data": {
            "sources": [
                {"name": "a", "uri": "pvc://datasets/a.jsonl"},
                {"name": "b", "uri": "pvc://datasets/b/", "format": "text"},
                {"name": "c", "uri": "builtin://quickstart-corpus"},
            ]
        },
        "evaluation": {
            "metrics": ["loss", "accuracy"],
            "datasets": [{"name": "intents", "uri": "pvc://evals/x.jsonl", "labels": ["a", "b"]}],
        },
    }
    return with_spec(example("quickstart"), **(spec | changes))


def claim_volume(claim: str) -> Obj:
    return {"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}


def claim_mount(claim: str, volume: str | None = None) -> Obj:
    return {"name": volume or f"pvc-{claim}", "mountPath": f"/mnt/pvc/{claim}", "readOnly": True}


def pvc_volumes(pod: Obj) -> list[Obj]:
    return [v for v in pod["spec"]["volumes"] if v["name"].startswith("pvc-")]


def pvc_mounts(pod: Obj) -> list[Obj]:
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    return [m for m in mounts if m["mountPath"].startswith(contract.PVC_ROOT + "/")]


def test_claims_are_mounted_read_only_into_the_pods_that_read_them(
    settings: OperatorSettings,
) -> None:
    head, *workers = pods(cluster(claim_run(), settings))
    assert len(workers) == 2
    # The head prepares data and loads the tokenizer; it never evaluates.
    assert pvc_volumes(head) == [claim_volume("models"), claim_volume("datasets")]
    assert pvc_mounts(head) == [claim_mount("models"), claim_mount("datasets")]
    for worker in workers:
        assert pvc_volumes(worker) == [
            claim_volume("models"),
            claim_volume("datasets"),
            claim_volume("evals"),
        ]
        assert pvc_mounts(worker) == [
            claim_mount("models"),
            claim_mount("datasets"),
            claim_mount("evals"),
        ]
    # The trainer finds each source where the pods mount its claim.
    assert contract.pvc_path("pvc://datasets/a.jsonl") == "/mnt/pvc/datasets/a.jsonl"


def test_no_claim_is_mounted_where_no_source_names_one(settings: OperatorSettings) -> None:
    for run in (example("quickstart"), example("pretrain-gpu")):
        for pod in pods(cluster(run, settings)):
            assert pvc_volumes(pod) == []
            assert pvc_mounts(pod) == []
    # Evaluation alone reads a claim: the workers mount it, the head does not.
    run = with_spec(
        example("quickstart"),
        evaluation={
            "metrics": ["accuracy"],
            "datasets": [{"name": "e", "uri": "pvc://evals/e.jsonl", "labels": ["x"]}],
        },
    )
    head, *workers = pods(cluster(run, settings))
    assert pvc_volumes(head) == []
    assert pvc_mounts(head) == []
    for worker in workers:
        assert pvc_volumes(worker) == [claim_volume("evals")]


def test_the_lora_example_mounts_its_datasets_claim(settings: OperatorSettings) -> None:
    head, *workers = pods(cluster(example("finetune-lora-gpu"), settings))
    assert pvc_volumes(head) == [claim_volume("datasets")]
    for worker in workers:
        assert pvc_volumes(worker) == [claim_volume("datasets")]
        assert pvc_mounts(worker) == [claim_mount("datasets")]


def test_a_source_on_the_storage_claim_reuses_its_volume(settings: OperatorSettings) -> None:
    run = claim_run(checkpoint={"storage": {"pvc": {"claimName": "datasets"}}})
    for pod in pods(cluster(run, settings)):
        claims_used = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims_used.count("datasets") == 1
        assert volume(pod, "pvc-datasets") is None
        assert claim_mount("datasets", volume="storage") in pvc_mounts(pod)
        assert mount(pod, "storage") == {"name": "storage", "mountPath": settings.storage_mount}


def test_claim_volume_names_are_dns_labels_that_never_collide() -> None:
    long_a, long_b = "a" * 200 + "-x", "a" * 200 + "-y"
    names = {
        claim: claims.volume_name(claim) for claim in ("data", "a" * 58, "a" * 59, long_a, long_b)
    }
    assert names["data"] == "pvc-data"
    assert names["a" * 58] == "pvc-" + "a" * 58
    assert len(set(names.values())) == len(names)
    for name in names.values():
        assert len(name) <= 63, name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    assert claims.volume_name(long_a) == names[long_a]  # deterministic
    assert len(names["a" * 59]) == len(names[long_a]) == 63  # cut names are all 63 long
    run = claim_run(data={"sources": [{"name": "a", "uri": f"pvc://{long_a}/x.jsonl"}]})
    for pod in pods(cluster(run, OperatorSettings())):
        assert volume(pod, names[long_a]) == {
            "name": names[long_a],
            "persistentVolumeClaim": {"claimName": long_a, "readOnly": True},
        }
        assert claim_mount(long_a, volume=names[long_a]) in pvc_mounts(pod)


def test_object_store_storage_is_scratch_plus_credentials_by_reference(
    settings: OperatorSettings,
) -> None:
    run = with_spec(
        example("quickstart"),
        checkpoint={"storage": {"uri": "s3://bucket/runs"}},
        secrets={"objectStore": {"name": "s3-creds"}},
    )
    for pod in pods(cluster(run, settings)):
        container = pod["spec"]["containers"][0]
        assert volume(pod, "storage") == {"name": "storage", "emptyDir": {}}
        assert mount(pod, "storage") == {"name": "storage", "mountPath": settings.storage_mount}
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {
            e["name"] for e in container["env"]
        }
    # The head's arguments do not change: the trainer derives the URL from the spec.
    head = pods(cluster(run, settings))[0]
    script = head["spec"]["containers"][0]["command"][-1]
    assert f"--output-dir {settings.storage_mount} --run-uid {UID} --resume" in script
    assert "s3://" not in script
    # Ambient credentials (node role, workload identity): allowed, no envFrom.
    bare = with_spec(example("quickstart"), checkpoint={"storage": {"uri": "s3://bucket/runs"}})
    for pod in pods(cluster(bare, settings)):
        assert "envFrom" not in pod["spec"]["containers"][0]


def test_secrets_by_reference(settings: OperatorSettings) -> None:
    objs = cluster(example("pretrain-gpu"), settings)
    for pod in pods(objs):
        container = pod["spec"]["containers"][0]
        assert volume(pod, "hf-token") == {
            "name": "hf-token",
            "secret": {
                "secretName": "hf-token",
                "items": [{"key": "token", "path": "token"}],
                "defaultMode": 0o440,
            },
        }
        assert mount(pod, "hf-token") == {
            "name": "hf-token",
            "mountPath": "/var/run/secrets/kubetrain/hf",
            "readOnly": True,
        }
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN_PATH"] == {
            "name": "HF_TOKEN_PATH",
            "value": "/var/run/secrets/kubetrain/hf/token",
        }
        assert env["RAY_AUTH_TOKEN"] == {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "llama-1b-pretrain-ray-token", "key": "token"}},
        }
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    for pod in pods(cluster(example("quickstart"), settings)):
        container = pod["spec"]["containers"][0]
        assert "envFrom" not in container
        assert volume(pod, "hf-token") is None
        assert "HF_TOKEN_PATH" not in {e["name"] for e in container["env"]}


def test_ray_token_only_in_its_secret(run: api.TrainingRun, settings: OperatorSettings) -> None:
    objs = cluster(run, settings)
    secret = objs[1]
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    for obj in objs:
        text = json.dumps(obj)
        assert TOKEN not in text
        if obj is not secret:
            assert secret["data"]["token"] not in text


def test_env(settings: OperatorSettings) -> None:
    head, *_ = pods(cluster(example("finetune-lora-gpu"), settings, attempt=4))
    env = head["spec"]["containers"][0]["env"]
    assert env[0] == {"name": "RAY_AUTH_MODE", "value": "token"}
    by_name = {e["name"]: e for e in env}
    assert by_name["KUBETRAIN_RUN"]["value"] == "qwen-support-lora"
    assert by_name["KUBETRAIN_ATTEMPT"]["value"] == "4"
    # The image each exported model's lineage names.
    assert by_name[contract.IMAGE_ENV]["value"] == head["spec"]["containers"][0]["image"]
    assert env[-1] == {"name": "NCCL_DEBUG", "value": "WARN"}


def test_a_rerun_of_the_same_name_gets_its_own_storage_folder(settings: OperatorSettings) -> None:
    """The head resumes (`--resume`) in the run's folder: keyed by uid, a run deleted and
    re-created under the same name starts fresh instead of continuing the old checkpoints,
    and serving reads the model of the run that made it."""
    run = example("quickstart")
    other = "7c1f2e3d-aaaa-4bbb-8ccc-dddddddddddd"

    def head_script(uid: str) -> str:
        head = builders.build_head_pod(run, uid, NS, 1, settings)
        return str(head["spec"]["containers"][0]["command"][-1])

    assert f"--run-uid {UID} " in head_script(UID)
    assert f"--run-uid {other} " in head_script(other)
    folders = {contract.run_folder("quickstart", uid) for uid in (UID, other)}
    assert folders == {"quickstart-0b6a0e1c", "quickstart-7c1f2e3d"}


def test_head_pod_and_service(settings: OperatorSettings) -> None:
    objs = cluster(example("quickstart"), settings)
    service = next(o for o in objs if o["kind"] == "Service")
    head, *workers = pods(objs)
    container = head["spec"]["containers"][0]
    assert container["name"] == "ray-head"
    *guard, shell, flag, script = container["command"]
    assert (tuple(guard), shell, flag) == (contract.OOM_GUARD_COMMAND, "bash", "-c")
    assert "ray start --head --port=6379" in script
    assert "--num-cpus=0" in script
    assert "exec kubetrain run /etc/kubetrain/run.yaml --address auto" in script
    assert f"--output-dir /storage --run-uid {UID} --resume --metrics-port 8080" in script
    assert "--metrics-host 0.0.0.0" in script
    # The driver's result reaches the operator as the container's termination message.
    assert script.endswith(" --termination-log /dev/termination-log")
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"  # never log lines
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs": 6379, "dashboard": 8265, "metrics": 8080}
    # No Ray Client server: the driver runs in the head (`--address auto`), and the server
    # would need ray[client] (grpcio), which the trainer image does not install.
    assert "--ray-client-server-port" not in script

    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in ports.items()
    }
    selector = service["spec"]["selector"].items()
    assert selector <= head["metadata"]["labels"].items()
    assert all(not selector <= w["metadata"]["labels"].items() for w in workers)
    # Only this attempt's head: a retry's workers never dial the previous, dying one.
    later_head = pods(cluster(example("quickstart"), settings, attempt=2))[0]
    assert not selector <= later_head["metadata"]["labels"].items()
    assert container["readinessProbe"]["tcpSocket"] == {"port": "gcs"}


@pytest.mark.parametrize(
    ("cpu", "expected"), [(1, 1), ("500m", 1), ("2500m", 2), ("1.5", 1), (96, 96), ("4", 4)]
)
def test_worker_command(settings: OperatorSettings, cpu: int | str, expected: int) -> None:
    run = with_spec(
        example("quickstart"),
        resources={"workers": 2, "cpuPerWorker": cpu, "gpusPerWorker": 0},
    )
    for worker in builders.build_worker_pods(run, UID, NS, 1, settings):
        container = worker["spec"]["containers"][0]
        assert container["name"] == "ray-worker"
        head = f"quickstart-head.{NS}.svc:6379"
        assert container["command"] == [
            *contract.OOM_GUARD_COMMAND,
            "bash",
            "-c",
            f"until ray health-check --address={head} >/dev/null 2>&1; do sleep 2; done"
            f" && exec ray start --address={head} --num-cpus={expected}"
            """ --num-gpus=0 --resources='{"kubetrain_worker_slot": 1}'"""
            " --block --disable-usage-stats",
        ]


@pytest.mark.parametrize(
    ("resources", "slots"),
    [
        ({"workers": 4, "gpusPerWorker": 8}, 8),  # one rank per GPU
        ({"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": 4, "processesPerWorker": 3}, 3),
    ],
)
def test_worker_pods_advertise_one_slot_per_rank_they_host(
    settings: OperatorSettings, resources: dict, slots: int
) -> None:
    doc = example("quickstart").model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"]["resources"] |= resources
    doc["spec"]["hyperparameters"] |= {"globalBatchSize": 96, "microBatchSize": 1}
    run = parse(doc)
    workers = builders.build_worker_pods(run, UID, NS, 1, settings)
    assert len(workers) == resources["workers"]
    for worker in workers:
        script = worker["spec"]["containers"][0]["command"][-1]
        assert f"""--resources='{{"kubetrain_worker_slot": {slots}}}'""" in script
    head = builders.build_head_pod(run, UID, NS, 1, settings)
    assert "kubetrain_worker_slot" not in head["spec"]["containers"][0]["command"][-1]


# The NetworkPolicy: tests/operator/test_network_policy.py.


def test_config_map_holds_the_resolved_run(
    run: api.TrainingRun, settings: OperatorSettings
) -> None:
    config = builders.build_config_map(run, UID, NS)
    doc = load_documents(config["data"]["run.yaml"])[0]
    assert "status" not in doc
    assert doc["metadata"] == {"name": run.metadata.name, "namespace": NS}
    # Defaults are filled in, so the driver needs no defaults of its own.
    assert doc["spec"]["hyperparameters"]["adamBeta2"] == run.spec.hyperparameters.adam_beta2
    # What the driver parses is exactly what the operator validated.
    assert parse(doc).spec == run.spec


def test_config_map_drops_status_and_extra_metadata() -> None:
    doc = example("quickstart").model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["metadata"] |= {"labels": {"team": "nlp"}, "uid": "abc", "generation": 3}
    doc["status"] = {"phase": "Running", "attempts": 1}
    run = api.TrainingRun.model_validate(doc)
    assert builders.run_document(run, NS)["metadata"] == {"name": "quickstart", "namespace": NS}
    assert "status" not in builders.run_document(run, NS)


def test_pod_label_selector() -> None:
    assert builders.pod_label_selector("demo") == "kubetrain.dev/run=demo"
    assert (
        builders.pod_label_selector("demo", 3) == "kubetrain.dev/run=demo,kubetrain.dev/attempt=3"
    )


# --------------------------------------------------------------------------------------
# Any valid spec
# --------------------------------------------------------------------------------------


def no_credential_shape(text: str) -> bool:
    # Validation rejects strings shaped like well-known credentials anywhere in a spec.
    return not re.search(r"sk-|xox[baprs]-|hf_|AKIA|ASIA|ghp_", text)


RUN_NAMES = st.from_regex(r"\A[a-z]([-a-z0-9]{0,38}[a-z0-9])?\Z").filter(no_credential_shape)
OBJECT_NAMES = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?\Z").filter(no_credential_shape)
SECRET_KEYS = st.from_regex(r"\A[a-z][a-z0-9.-]{0,15}\Z").filter(no_credential_shape)
QUANTITIES = st.sampled_from([1, 4, "500m", "1.5", "2", "96"])
MEMORY = st.sampled_from([1, "512Mi", "2Gi", "16Gi", "1Ti"])
SOURCES = st.sampled_from(
    [
        "builtin://quickstart-corpus",
        "pvc://datasets/corpus.jsonl",
        "pvc://existing-claim/corpus.jsonl",  # the storage claim of one drawn storage
        f"pvc://{'long-claim-' * 20}x/corpus.jsonl",
    ]
)
OPERATOR_ENV = {
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "KUBETRAIN_RUN",
    "KUBETRAIN_ATTEMPT",
    "KUBETRAIN_IMAGE",
}


@st.composite
def env_vars(draw: st.DrawFn) -> list[Obj]:
    out = []
    for i in range(draw(st.integers(0, 5))):
        name = f"USER_VAR_{i}"
        kind = draw(st.sampled_from(["value", "secretKeyRef", "configMapKeyRef"]))
        if kind == "value":
            value = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", max_size=20))
            out.append({"name": name, "value": value})
        else:
            ref = {"name": draw(OBJECT_NAMES), "key": draw(SECRET_KEYS)}
            out.append({"name": name, "valueFrom": {kind: ref}})
    return out


@st.composite
def tolerations(draw: st.DrawFn) -> list[Obj]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        toleration: Obj = {"key": draw(st.sampled_from(["nvidia.com/gpu", "dedicated"]))}
        if draw(st.booleans()):
            toleration |= {"operator": "Equal", "value": LABEL_CANARY}
        else:
            toleration["operator"] = "Exists"
        effect = draw(st.sampled_from([None, "NoSchedule", "NoExecute"]))
        if effect:
            toleration["effect"] = effect
        out.append(toleration)
    return out


@st.composite
def training_runs(draw: st.DrawFn) -> api.TrainingRun:
    workers = draw(st.integers(1, 24))
    gpus = draw(st.integers(0, min(16, 512 // workers)))
    micro = draw(st.integers(1, 4))
    data_parallel = workers * max(1, gpus)
    resources: Obj = {
        "workers": workers,
        "gpusPerWorker": gpus,
        "cpuPerWorker": draw(QUANTITIES),
        "memoryPerWorker": draw(MEMORY),
        "sharedMemory": draw(MEMORY),
        "head": {"cpu": draw(QUANTITIES), "memory": draw(MEMORY)},
        "tolerations": draw(tolerations()),
    }
    if draw(st.booleans()):
        resources["nodeSelector"] = {"example.com/pool": LABEL_CANARY}
    if draw(st.booleans()):
        resources["priorityClassName"] = draw(OBJECT_NAMES)
    if draw(st.booleans()):
        resources["queueName"] = draw(OBJECT_NAMES)
    storage = draw(
        st.sampled_from(
            [
                {"pvc": {"size": "1Gi"}},
                {"pvc": {"size": "10Gi", "storageClassName": "shared"}},
                {"pvc": {"claimName": "existing-claim"}},
                {"uri": "s3://bucket-x/runs"},
            ]
        )
    )
    secrets: Obj = {}
    if draw(st.booleans()):
        secrets["huggingFaceToken"] = {"name": draw(OBJECT_NAMES), "key": draw(SECRET_KEYS)}
    if draw(st.booleans()):
        secrets["objectStore"] = {"name": draw(OBJECT_NAMES)}
    spec: Obj = {
        "model": {"source": "builtin://tiny-llama"},
        "method": "pretrain",
        "data": {"sources": [{"name": "corpus", "uri": draw(SOURCES)}]},
        "hyperparameters": {
            "maxSteps": 10,
            "microBatchSize": micro,
            "globalBatchSize": micro * data_parallel * draw(st.integers(1, 3)),
        },
        "resources": resources,
        "checkpoint": {"storage": storage},
        "env": draw(env_vars()),
        "secrets": secrets,
        "imagePullSecrets": [{"name": n} for n in draw(st.lists(OBJECT_NAMES, max_size=2))],
    }
    if draw(st.booleans()):
        spec["image"] = "registry.example.com/trainer:dev"
    doc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": draw(RUN_NAMES)},
        "spec": spec,
    }
    return parse(doc)


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=training_runs(), attempt=st.integers(1, 999))
def test_any_valid_run_builds_safe_pods(run: api.TrainingRun, attempt: int) -> None:
    settings = OperatorSettings()
    objs = builders.build_cluster(run, UID, NS, attempt, settings, TOKEN)
    spec = run.spec
    all_pods = pods(objs)
    assert len(all_pods) == 1 + spec.resources.workers
    assert len(builders.build_worker_pods(run, UID, NS, attempt, settings)) == (
        spec.resources.workers
    )
    spec_env = {var.name: var for var in spec.env}
    literal_ok = (
        OPERATOR_ENV
        | {"HF_TOKEN_PATH"}
        | {n for n, v in spec_env.items() if v.value is not None}
        | {n for n, _ in placement.NCCL_DEFAULTS}
    )
    for obj in objs:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
        assert TOKEN not in json.dumps(obj)
    # Kueue admits a queued attempt as one group: head + every worker, one name.
    groups = {p["metadata"]["labels"].get(contract.LABEL_POD_GROUP) for p in all_pods}
    counts = {
        p["metadata"].get("annotations", {}).get(contract.ANNOTATION_POD_GROUP_TOTAL_COUNT)
        for p in all_pods
    }
    if spec.resources.queue_name:
        assert counts == {str(len(all_pods))}
        (group,) = groups
        assert group is not None
        assert len(group) <= 63
    else:
        assert groups == counts == {None}
    for pod in all_pods:
        assert restricted_violations(pod) == [], pod["metadata"]["name"]
        assert len(pod["metadata"]["name"]) <= 63
        container = pod["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        if pod["metadata"]["labels"]["kubetrain.dev/role"] == "worker":
            assert limits.get("nvidia.com/gpu") == (
                str(spec.resources.gpus_per_worker) if spec.resources.gpus_per_worker else None
            )
        for var in container["env"]:
            assert ("value" in var) != ("valueFrom" in var), var
            if "value" in var:
                assert var["name"] in literal_ok, var
                assert LABEL_CANARY not in var["value"]
            if var["name"] in spec_env and spec_env[var["name"]].value_from is not None:
                expected = spec_env[var["name"]].model_dump(by_alias=True, exclude_none=True)
                assert var == expected
        assert LABEL_CANARY not in json.dumps(container)
        if spec.secrets.object_store:
            assert container["envFrom"] == [{"secretRef": {"name": spec.secrets.object_store.name}}]
        hf = spec.secrets.hugging_face_token
        hf_volume = volume(pod, "hf-token")
        if hf is None:
            assert hf_volume is None
        else:
            assert hf_volume is not None
            assert hf_volume["secret"]["secretName"] == hf.name
            assert hf_volume["secret"]["items"] == [{"key": hf.key, "path": hf.key}]
            hf_path = next(e for e in container["env"] if e["name"] == "HF_TOKEN_PATH")
            assert hf_path["value"] == f"{builders.HF_TOKEN_DIR}/{hf.key}"
        names = [v["name"] for v in pod["spec"]["volumes"]]
        assert len(names) == len(set(names)), names
        for vol in pod["spec"]["volumes"]:
            assert len(vol["name"]) <= 63
            if vol["name"] != "storage" and "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["readOnly"] is True
        for m in container["volumeMounts"]:
            if m["mountPath"].startswith(contract.PVC_ROOT + "/"):
                assert m["readOnly"] is True
        storage = volume(pod, "storage")
        claim = builders.storage_claim_name(run)
        if spec.checkpoint.storage.uri:
            assert storage == {"name": "storage", "emptyDir": {}}
        else:
            assert storage == {"name": "storage", "persistentVolumeClaim": {"claimName": claim}}

"""Pod-bound fields: kubetrain's checks (kubetrain_api/k8s_rules.py) agree with the API
server's, in both directions.

- A run that uses every field that reaches a pod spec or a claim, each at its valid
  extreme (longest names, prefixed keys, empty values, odd quantity spellings), passes
  `kubetrain validate`, and the API server accepts the pods, claim and serving Deployment
  the operator's builders make of it (dry-run=server).
- For each bad value of the table, `kubetrain validate` refuses the run naming the field,
  and the API server refuses the object the builders would make, carrying that value.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import k8s_rules, validation
from kubetrain_operator import builders, serving
from kubetrain_operator.settings import OperatorSettings
from tests.support.cluster import kubectl, scratch_namespace

ROOT = Path(__file__).resolve().parents[2]
UID = "7c1d2e3f-aaaa-4bbb-8ccc-ddddeeeeffff"
Obj = dict[str, Any]

# Longest valid names and keys.
SUBDOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
LABEL_NAME = "N" + "a-_." * 15 + "9z"
LABEL_KEY = f"{SUBDOMAIN}/{LABEL_NAME}"
LABEL_VALUE = "X" + "b._-" * 15 + "0z"
assert (len(SUBDOMAIN), len(LABEL_NAME), len(LABEL_VALUE), len(LABEL_KEY)) == (253, 63, 63, 317)


def extreme_doc() -> Obj:
    """The quickstart with every pod-bound field set, each at a valid extreme."""
    docs = validation.load_documents((ROOT / "examples" / "quickstart.yaml").read_bytes())
    doc: Obj = docs[0]
    doc["metadata"] = {
        "name": "pod-fields-extremes",
        "labels": {LABEL_KEY: LABEL_VALUE, "empty": ""},
        "annotations": {LABEL_KEY: "x" * 4096},
    }
    spec = doc["spec"]
    spec["model"]["configOverrides"] = {
        "hidden_size": 64,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    spec["image"] = "registry.example.com:5000/team/trainer_x__y--z.w:v1.2-rc_3@sha256:" + "0" * 64
    spec["imagePullSecrets"] = [{"name": SUBDOMAIN}]
    spec["env"] = [
        {"name": "my.env-name", "value": "1"},
        {"name": "-a..b", "value": ""},
        {"name": "_", "valueFrom": {"secretKeyRef": {"name": SUBDOMAIN, "key": ".a..b-_"}}},
        {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": SUBDOMAIN, "key": "k" * 253}}},
    ]
    spec["secrets"] = {
        "huggingFaceToken": {"name": SUBDOMAIN, "key": "token.txt"},
        "objectStore": {"name": SUBDOMAIN},
    }
    spec["resources"] |= {
        "cpuPerWorker": "+500m",
        "memoryPerWorker": "1e9",
        "sharedMemory": "0",
        "head": {"cpu": ".5", "memory": "1.5Gi"},
        "nodeSelector": {LABEL_KEY: LABEL_VALUE, "plain": ""},
        "tolerations": [
            {"operator": "Exists"},
            {
                "key": LABEL_KEY,
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 31_536_000,
            },
            {"key": "gpu", "value": LABEL_VALUE, "effect": "PreferNoSchedule"},
            {"key": "x", "operator": "Equal"},
        ],
        "priorityClassName": SUBDOMAIN,
        "queueName": "q" * 63,
    }
    spec["checkpoint"]["storage"] = {"pvc": {"size": "1", "storageClassName": SUBDOMAIN}}
    spec["serve"]["resources"] = {"cpu": "1E-3", "memory": 128974848}
    return doc


def objects(doc: Obj, ns: str) -> list[Obj]:
    """What the operator creates for a valid run: attempt 1's children, the serving
    Deployment."""
    run = validation.parse(doc)
    settings = OperatorSettings()
    out = builders.build_cluster(run, UID, ns, 1, settings, token="t" * 32)
    out.append(serving.build_deployment(run, UID, ns, settings, model_version="v1"))
    return out


def by_kind(objs: list[Obj], kind: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind)


def server_create(obj: Obj, ns: str) -> tuple[int, str]:
    out = kubectl(
        "create",
        "--dry-run=server",
        "--validate=false",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(obj),
        check=False,
    )
    return out.returncode, out.stderr


@pytest.fixture(scope="module")
def dry_run_ns(cluster: object) -> Iterator[str]:
    """One namespace for the module: dry-run creates leave nothing in it."""
    with scratch_namespace("pod-fields") as name:
        yield name


@pytest.fixture(scope="module")
def priority_class(cluster: object) -> Iterator[None]:
    """The Priority admission plugin refuses pods of a PriorityClass that does not exist."""
    pc = {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": SUBDOMAIN},
        "value": 1000,
    }
    kubectl("apply", "-f", "-", input=json.dumps(pc))
    yield
    kubectl("delete", "priorityclass", SUBDOMAIN, "--wait=false", check=False)


def test_extremes_pass_kubetrain_validate() -> None:
    assert validation.validate_document(extreme_doc()) == []


@pytest.mark.controlplane
def test_api_server_accepts_the_extremes(
    crd_installed: None, priority_class: None, dry_run_ns: str
) -> None:
    namespace = dry_run_ns
    doc = extreme_doc()
    # The TrainingRun itself. Kubernetes 1.20 refuses an empty string in a custom
    # resource's string fields ("must be of type string: null"), which pods accept: send
    # the run without the two empty values, the pods with them.
    run = copy.deepcopy(doc)
    del run["spec"]["resources"]["nodeSelector"]["plain"], run["spec"]["env"][1]
    code, stderr = server_create(run, namespace)
    assert code == 0, stderr
    objs = objects(doc, namespace)
    kinds = {o["kind"] for o in objs}
    assert {"Pod", "PersistentVolumeClaim", "Deployment"} <= kinds
    for obj in objs:
        code, stderr = server_create(obj, namespace)
        assert code == 0, f"{obj['kind']} {obj['metadata']['name']}: {stderr}"


# --------------------------------------------------------------------------------------
# Bad values: (id, change to the run, path kubetrain names, kind of the object built,
# the same value put where the builders put it)
# --------------------------------------------------------------------------------------


def res(doc: Obj) -> Obj:
    out: Obj = doc["spec"]["resources"]
    return out


def container(pod: Obj) -> Obj:
    out: Obj = pod["spec"]["containers"][0]
    return out


def env_var(pod: Obj, name: str) -> Obj:
    return next(e for e in container(pod)["env"] if e["name"] == name)


def set_quantity(pod: Obj, resource: str, value: str) -> None:
    for part in ("requests", "limits"):
        container(pod)["resources"][part][resource] = value


def volume(pod: Obj, name: str) -> Obj:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


Mutation = Callable[[Obj], None]
BAD: list[tuple[str, Mutation, str, str, Mutation]] = [
    (
        "node-selector-key-two-slashes",
        lambda d: res(d)["nodeSelector"].update({"a.io/b/c": "x"}),
        "spec.resources.nodeSelector.a.io/b/c",
        "Pod",
        lambda p: p["spec"]["nodeSelector"].update({"a.io/b/c": "x"}),
    ),
    (
        "node-selector-key-leading-dash",
        lambda d: res(d)["nodeSelector"].update({"-gpu": "x"}),
        "spec.resources.nodeSelector.-gpu",
        "Pod",
        lambda p: p["spec"]["nodeSelector"].update({"-gpu": "x"}),
    ),
    (
        "node-selector-key-prefix-uppercase",
        lambda d: res(d)["nodeSelector"].update({"Example.com/gpu": "x"}),
        "spec.resources.nodeSelector.Example.com/gpu",
        "Pod",
        lambda p: p["spec"]["nodeSelector"].update({"Example.com/gpu": "x"}),
    ),
    (
        "node-selector-value-space",
        lambda d: res(d)["nodeSelector"].update({"gpu": "a100 80gb"}),
        "spec.resources.nodeSelector.gpu",
        "Pod",
        lambda p: p["spec"]["nodeSelector"].update({"gpu": "a100 80gb"}),
    ),
    (
        "node-selector-value-64",
        lambda d: res(d)["nodeSelector"].update({"gpu": "a" * 64}),
        "spec.resources.nodeSelector.gpu",
        "Pod",
        lambda p: p["spec"]["nodeSelector"].update({"gpu": "a" * 64}),
    ),
    (
        "toleration-exists-with-value",
        lambda d: res(d)["tolerations"][0].update({"value": "x"}),
        "spec.resources.tolerations[0].value",
        "Pod",
        lambda p: p["spec"]["tolerations"][0].update({"value": "x"}),
    ),
    (
        "toleration-seconds-without-noexecute",
        lambda d: res(d)["tolerations"][1].update({"effect": "NoSchedule"}),
        "spec.resources.tolerations[1].effect",
        "Pod",
        lambda p: p["spec"]["tolerations"][1].update({"effect": "NoSchedule"}),
    ),
    (
        "toleration-equal-without-key",
        lambda d: res(d)["tolerations"][0].update({"operator": "Equal"}),
        "spec.resources.tolerations[0].operator",
        "Pod",
        lambda p: p["spec"]["tolerations"][0].update({"operator": "Equal"}),
    ),
    (
        "toleration-key-space",
        lambda d: res(d)["tolerations"][2].update({"key": "gpu type"}),
        "spec.resources.tolerations[2].key",
        "Pod",
        lambda p: p["spec"]["tolerations"][2].update({"key": "gpu type"}),
    ),
    (
        "toleration-value-not-a-label-value",
        lambda d: res(d)["tolerations"][2].update({"value": "a/b"}),
        "spec.resources.tolerations[2].value",
        "Pod",
        lambda p: p["spec"]["tolerations"][2].update({"value": "a/b"}),
    ),
    (
        "toleration-effect-unknown",
        lambda d: res(d)["tolerations"][2].update({"effect": "NoRun"}),
        "spec.resources.tolerations[2].effect",
        "Pod",
        lambda p: p["spec"]["tolerations"][2].update({"effect": "NoRun"}),
    ),
    (
        "cpu-negative",
        lambda d: res(d)["head"].update({"cpu": "-1"}),
        "spec.resources.head.cpu",
        "Pod",
        lambda p: set_quantity(p, "cpu", "-1"),
    ),
    (
        "memory-fractional-exponent",
        lambda d: res(d)["head"].update({"memory": "2e9.5"}),
        "spec.resources.head.memory",
        "Pod",
        lambda p: set_quantity(p, "memory", "2e9.5"),
    ),
    (
        "memory-unknown-unit",
        lambda d: res(d)["head"].update({"memory": "16GB"}),
        "spec.resources.head.memory",
        "Pod",
        lambda p: set_quantity(p, "memory", "16GB"),
    ),
    (
        "shared-memory-negative",
        lambda d: res(d).update({"sharedMemory": "-1Gi"}),
        "spec.resources.sharedMemory",
        "Pod",
        lambda p: volume(p, "dshm")["emptyDir"].update({"sizeLimit": "-1Gi"}),
    ),
    (
        "claim-size-zero",
        lambda d: d["spec"]["checkpoint"]["storage"]["pvc"].update({"size": 0}),
        "spec.checkpoint.storage.pvc.size",
        "PersistentVolumeClaim",
        lambda c: c["spec"]["resources"]["requests"].update({"storage": "0"}),
    ),
    (
        "storage-class-uppercase",
        lambda d: d["spec"]["checkpoint"]["storage"]["pvc"].update({"storageClassName": "Fast"}),
        "spec.checkpoint.storage.pvc.storageClassName",
        "PersistentVolumeClaim",
        lambda c: c["spec"].update({"storageClassName": "Fast"}),
    ),
    (
        "env-name-dot-dot-prefix",
        lambda d: d["spec"]["env"][0].update({"name": "..CONFIG"}),
        "spec.env[0].name",
        "Pod",
        lambda p: env_var(p, "my.env-name").update({"name": "..CONFIG"}),
    ),
    (
        "env-name-dot",
        lambda d: d["spec"]["env"][0].update({"name": "."}),
        "spec.env[0].name",
        "Pod",
        lambda p: env_var(p, "my.env-name").update({"name": "."}),
    ),
    (
        "env-name-digit-first",
        lambda d: d["spec"]["env"][0].update({"name": "1X"}),
        "spec.env[0].name",
        "Pod",
        lambda p: env_var(p, "my.env-name").update({"name": "1X"}),
    ),
    (
        "secret-key-with-slash",
        lambda d: d["spec"]["env"][2]["valueFrom"]["secretKeyRef"].update({"key": "a/b"}),
        "spec.env[2].valueFrom.secretKeyRef.key",
        "Pod",
        lambda p: env_var(p, "_")["valueFrom"]["secretKeyRef"].update({"key": "a/b"}),
    ),
    (
        "config-map-key-dot-dot",
        lambda d: d["spec"]["env"][3]["valueFrom"]["configMapKeyRef"].update({"key": ".."}),
        "spec.env[3].valueFrom.configMapKeyRef.key",
        "Pod",
        lambda p: env_var(p, "CM")["valueFrom"]["configMapKeyRef"].update({"key": ".."}),
    ),
    (
        "secret-name-uppercase",
        lambda d: d["spec"]["env"][2]["valueFrom"]["secretKeyRef"].update({"name": "Db"}),
        "spec.env[2].valueFrom.secretKeyRef.name",
        "Pod",
        lambda p: env_var(p, "_")["valueFrom"]["secretKeyRef"].update({"name": "Db"}),
    ),
    (
        "hugging-face-key-dot-dot-prefix",
        lambda d: d["spec"]["secrets"]["huggingFaceToken"].update({"key": "..token"}),
        "spec.secrets.huggingFaceToken.key",
        "Pod",
        lambda p: volume(p, "hf-token")["secret"]["items"][0].update(
            {"key": "..token", "path": "..token"}
        ),
    ),
    (
        "object-store-secret-name-too-long",
        lambda d: d["spec"]["secrets"]["objectStore"].update({"name": "a" * 254}),
        "spec.secrets.objectStore.name",
        "Pod",
        lambda p: container(p)["envFrom"][0]["secretRef"].update({"name": "a" * 254}),
    ),
    (
        "priority-class-name-underscore",
        lambda d: res(d).update({"priorityClassName": "high_priority"}),
        "spec.resources.priorityClassName",
        "Pod",
        lambda p: p["spec"].update({"priorityClassName": "high_priority"}),
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_kubetrain_validate_refuses_bad_pod_fields(case: tuple[Any, ...]) -> None:
    _, change, path, _, _ = case
    doc = extreme_doc()
    change(doc)
    paths = [e.path for e in validation.validate_document(doc)]
    assert path in paths, f"expected an error at {path}, got {paths}"


@pytest.mark.controlplane
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_api_server_refuses_the_same_values(
    case: tuple[Any, ...], priority_class: None, dry_run_ns: str
) -> None:
    namespace = dry_run_ns
    _, _, _, kind, change = case
    obj = copy.deepcopy(by_kind(objects(extreme_doc(), namespace), kind))
    change(obj)
    code, stderr = server_create(obj, namespace)
    assert code != 0, f"the API server accepted a {kind} that kubetrain refuses"
    # A 422 (validation), a 400 (a quantity that does not parse) or admission's refusal.
    assert "is invalid" in stderr or "quantities must match" in stderr or "Forbidden" in stderr, (
        stderr
    )


# --------------------------------------------------------------------------------------
# Checks the API server leaves to later, which kubetrain makes up front: the kubelet
# refuses such an image (a pod that never starts); a pull Secret's name the API server does
# not check in a pod, but no Secret can have it.
# --------------------------------------------------------------------------------------


@pytest.mark.controlplane
def test_api_server_leaves_pull_secret_names_to_later(dry_run_ns: str) -> None:
    namespace = dry_run_ns
    doc = extreme_doc()
    doc["spec"]["imagePullSecrets"][0]["name"] = "reg_cred"
    assert "spec.imagePullSecrets[0].name" in [e.path for e in validation.validate_document(doc)]
    pod = copy.deepcopy(by_kind(objects(extreme_doc(), namespace), "Pod"))
    pod["spec"]["imagePullSecrets"][0]["name"] = "reg_cred"
    pod["spec"].pop("priorityClassName")
    assert server_create(pod, namespace)[0] == 0
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "reg_cred"}}
    code, stderr = server_create(secret, namespace)
    assert code != 0
    assert "is invalid" in stderr, stderr


@pytest.mark.parametrize(
    "image",
    [
        "registry.example.com/Team/trainer:v1",  # uppercase repository path
        "trainer:v1:v2",
        "trainer@sha256:abc",  # digest too short
        "trainer:" + "t" * 129,  # tag over 128 characters
        "-trainer",
        "",
    ],
)
def test_image_references_the_kubelet_refuses(image: str) -> None:
    assert k8s_rules.check_image(image)
    doc = extreme_doc()
    doc["spec"]["image"] = image
    assert "spec.image" in [e.path for e in validation.validate_document(doc)]


@pytest.mark.parametrize(
    "image",
    ["trainer", "localhost:5000/a/b:tag", "ghcr.io/kubetrain/trainer:0.1.0", "a__b-c.d/e"],
)
def test_image_references_that_parse(image: str) -> None:
    assert k8s_rules.check_image(image) == []

"""A ModelService's children, without a cluster: the pure builders of modelservice/build.py
and engines.py (names, labels, owner references, restricted pods, the router's
configuration and store, both engines, autoscaling, model sources), the commands checked
against the real `kubetrain serve` and `kubetrain route` parsers, and one dry run of
everything through the real API server.

vLLM is not installed here and there is no GPU: the vllm variant is checked as built
(command, probes, GPU request, the router's upstream model), not run.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_api import contract, routing
from kubetrain_api.documents import parse_document
from kubetrain_api.modelservice import ModelService
from kubetrain_api.validation import load_documents
from kubetrain_operator import builders, pods
from kubetrain_operator.modelservice import build, engines, stats_client
from kubetrain_operator.modelservice.build import ModelSource
from kubetrain_operator.settings import OperatorSettings
from tests.operator.test_builders import containers, restricted_violations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "modelservice-ab.yaml"
UID = "5e1f0c2a-1111-4222-8333-444455556666"
NS = "team-a"
SETTINGS = OperatorSettings()
Obj = dict[str, Any]

MODELS = {
    "a": ModelSource(version="chat-a-step200", claim="chat-a-storage", sub_path="chat-a-1/model"),
    "b": ModelSource(
        version="chat-b-step50", url="s3://models/chat-b/model", object_store_secret="s3-creds"
    ),
}
SPLIT = {"a": 50, "b": 50}
PLURALS = {
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
}


def example_doc() -> Obj:
    (doc,) = [d for d in load_documents(EXAMPLE.read_text()) if d["kind"] == "ModelService"]
    return dict(doc)


def service(**spec: Any) -> ModelService:
    """The example's ModelService with `spec` merged over its spec."""
    doc = example_doc()
    doc["spec"] = {**doc["spec"], **spec}
    ms = parse_document(doc)
    assert isinstance(ms, ModelService)
    return ms


def variant_changed(index: int, **changes: Any) -> list[Obj]:
    variants = copy.deepcopy(example_doc()["spec"]["variants"])
    variants[index] |= changes
    return variants


def children(
    ms: ModelService | None = None,
    models: dict[str, ModelSource] = MODELS,
    weights: dict[str, int] = SPLIT,
    settings: OperatorSettings = SETTINGS,
    ns: str = NS,
) -> list[Obj]:
    return build.build_children(ms or service(), UID, ns, settings, models, weights)


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_of(deployment: Obj) -> Obj:
    return {
        "metadata": deployment["spec"]["template"]["metadata"],
        **deployment["spec"]["template"],
    }


def engine_of(objs: list[Obj], variant: str) -> Obj:
    deployment = one(objs, "Deployment", f"chat-{variant}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def config_of(objs: list[Obj]) -> routing.RouterConfig:
    config_map = one(objs, "ConfigMap", "chat-router")
    return routing.parse_router_config(config_map["data"][routing.CONFIG_FILE])


# Variations that together build every kind and every pod shape.
VARIATIONS: dict[str, dict[str, Any]] = {
    "example": {},
    "postgres": {
        "router": {
            "replicas": 3,
            "database": {"postgres": {"dsnSecretRef": {"name": "router-db", "key": "dsn"}}},
        }
    },
    "vllm-autoscaled": {
        "variants": variant_changed(
            1, engine="vllm", gpus=2, autoscaling={"targetConcurrency": 4, "maxReplicas": 3}
        )
    },
    "cpu-autoscaled": {"variants": variant_changed(0, autoscaling={})},
}


@pytest.fixture(params=sorted(VARIATIONS))
def built(request: pytest.FixtureRequest) -> list[Obj]:
    return children(service(**VARIATIONS[request.param]))


# --------------------------------------------------------------------------------------
# Every child
# --------------------------------------------------------------------------------------


def test_the_example_builds_every_child_in_apply_order() -> None:
    objs = children()
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("ConfigMap", "chat-router"),
        ("PersistentVolumeClaim", "chat-router-db"),
        ("Deployment", "chat-a"),
        ("Service", "chat-a"),
        ("PodDisruptionBudget", "chat-a"),
        ("Deployment", "chat-b"),
        ("Service", "chat-b"),
        ("PodDisruptionBudget", "chat-b"),
        ("Deployment", "chat-router"),
        ("Service", "chat-router"),
        ("PodDisruptionBudget", "chat-router"),
    ]


def test_every_child_is_named_labelled_annotated_and_owned(built: list[Obj]) -> None:
    for obj in built:
        meta, where = obj["metadata"], f"{obj['kind']} {obj['metadata']['name']}"
        assert meta["namespace"] == NS, where
        variant = meta["labels"].get(contract.LABEL_VARIANT)
        component = "variant" if variant is not None else "router"
        assert meta["labels"] == {
            contract.LABEL_NAME: "kubetrain",
            contract.LABEL_INSTANCE: "chat",
            contract.LABEL_COMPONENT: component,
            contract.LABEL_MANAGED_BY: "kubetrain-operator",
            contract.LABEL_PART_OF: "kubetrain",
            contract.LABEL_MODELSERVICE: "chat",
            **({contract.LABEL_VARIANT: variant} if variant is not None else {}),
        }, where
        names = [f"chat-{variant}"] if variant else ["chat-router", "chat-router-db"]
        assert meta["name"] in names, where
        assert meta["annotations"][contract.ANNOTATION_SERVICE_UID] == UID, where
        assert meta["annotations"][contract.ANNOTATION_INPUT_HASH] == builders.input_hash(obj)
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetrain.dev/v1alpha1",
                "kind": "ModelService",
                "name": "chat",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], where


def test_no_child_or_pod_carries_the_ray_pods_run_label(built: list[Obj]) -> None:
    assert contract.LABEL_RUN not in json.dumps(built)


def test_every_kind_built_is_in_child_kinds(built: list[Obj]) -> None:
    kinds = set(build.child_kinds())
    for obj in built:
        group = obj["apiVersion"].rpartition("/")[0]
        assert (group, PLURALS[obj["kind"]]) in kinds, obj["kind"]


def test_pods_are_restricted_guaranteed_and_scraped(built: list[Obj]) -> None:
    for deployment in [o for o in built if o["kind"] == "Deployment"]:
        pod = pod_of(deployment)
        spec = pod["spec"]
        assert restricted_violations(pod) == [], deployment["metadata"]["name"]
        assert spec["securityContext"] == pods.pod_security_context()
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]
        for container in containers(pod):
            assert container["securityContext"] == pods.container_security_context()
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
            assert env_of(container)["HOME"] == {"name": "HOME", "value": "/tmp"}
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], container["name"]
        annotations = pod["metadata"]["annotations"]
        assert annotations[contract.ANNOTATION_SCRAPE] == "true"
        assert annotations[contract.ANNOTATION_SCRAPE_PORT] == "8000"


def test_the_selectors_match_their_pods_and_nothing_else(built: list[Obj]) -> None:
    deployments = {o["metadata"]["name"]: o for o in built if o["kind"] == "Deployment"}
    for obj in built:
        if obj["kind"] not in ("Service", "PodDisruptionBudget"):
            continue
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        matched = [
            name
            for name, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched == [obj["metadata"]["name"]], obj["kind"]


def test_images_pull_policy_and_pull_secrets_come_from_the_spec() -> None:
    ms = service(
        image="registry.example/serve:2",
        imagePullPolicy="Always",
        imagePullSecrets=[{"name": "regcred"}],
        variants=variant_changed(1, image="registry.example/other:1"),
    )
    objs = children(ms)
    images = {}
    for d in [o for o in objs if o["kind"] == "Deployment"]:
        spec = d["spec"]["template"]["spec"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        (container,) = spec["containers"]
        assert container["imagePullPolicy"] == "Always"
        images[d["metadata"]["name"]] = container["image"]
    assert images == {
        "chat-a": "registry.example/serve:2",
        "chat-b": "registry.example/other:1",
        "chat-router": "registry.example/serve:2",
    }
    # Without any: the installation's image, which has `kubetrain serve` and `route`.
    assert {engine_of(children(), v)["image"] for v in "ab"} == {SETTINGS.image}


# --------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------


def test_the_config_map_carries_the_weights_given_not_the_specs() -> None:
    config = config_of(children(weights={"a": 100, "b": 0}))
    assert config.weights() == {"a": 100, "b": 0}  # the spec says 50/50
    assert config.model == config.salt == "chat"
    assert config.sticky_header is None  # source: user
    assert [(v.name, v.url, v.model_version, v.upstream_model) for v in config.variants] == [
        ("a", "http://chat-a.team-a.svc:80", "chat-a-step200", None),
        ("b", "http://chat-b.team-a.svc:80", "chat-b-step50", None),
    ]


def test_router_config_takes_the_sticky_header_and_refuses_a_bad_split() -> None:
    ms = service(router={"stickyKey": {"source": "header", "header": "X-User-Id"}})
    assert build.router_config(ms, NS, MODELS, SPLIT).sticky_header == "X-User-Id"
    with pytest.raises(ValueError, match="weights sum to 90"):
        build.router_config(ms, NS, MODELS, {"a": 50, "b": 40})
    with pytest.raises(ValueError, match="variant b: no model source"):
        build.router_config(ms, NS, {"a": MODELS["a"]}, SPLIT)


def test_the_router_reads_its_config_map_as_a_folder_the_kubelet_updates() -> None:
    objs = children()
    router = one(objs, "Deployment", "chat-router")
    spec = router["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == build.ROUTER_CONFIG_VOLUME]
    assert "subPath" not in mount  # a subPath mount never sees the ConfigMap's updates
    (volume,) = [v for v in spec["volumes"] if v["name"] == build.ROUTER_CONFIG_VOLUME]
    assert volume["configMap"] == {"name": "chat-router"}
    assert container["command"][:2] == ["kubetrain", "route"]
    path = container["command"][container["command"].index("--config") + 1]
    assert path == f"{mount['mountPath']}/{routing.CONFIG_FILE}"
    # New weights change the ConfigMap only, never the router's pods.
    shifted = children(weights={"a": 0, "b": 100})
    assert one(shifted, "Deployment", "chat-router") == router
    assert one(shifted, "ConfigMap", "chat-router") != one(objs, "ConfigMap", "chat-router")


def test_the_router_command_is_one_kubetrain_route_accepts() -> None:
    from kubetrain_trainer.route.__main__ import build_parser

    (container,) = one(children(), "Deployment", "chat-router")["spec"]["template"]["spec"][
        "containers"
    ]
    args = build_parser().parse_args(container["command"][2:])
    assert args.port == routing.ROUTER_PORT == container["ports"][0]["containerPort"]
    assert str(args.config) == build.ROUTER_CONFIG_PATH
    probes = {k: container[k]["httpGet"]["path"] for k in ("readinessProbe", "livenessProbe")}
    assert probes == {"readinessProbe": routing.READY_PATH, "livenessProbe": routing.HEALTH_PATH}


def test_sqlite_is_a_claim_one_replica_and_recreate() -> None:
    objs = children()
    pvc = one(objs, "PersistentVolumeClaim", "chat-router-db")
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
    }
    router = one(objs, "Deployment", "chat-router")
    assert router["spec"]["replicas"] == 1
    assert router["spec"]["strategy"] == {"type": "Recreate"}
    spec = router["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "chat-router-db"}} in spec[
        "volumes"
    ]
    (container,) = spec["containers"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    store = env_of(container)[routing.STORE_ENV]["value"]
    assert store.startswith("/data/")
    # A claim the spec names: mounted, not created.
    named = children(service(router={"database": {"sqlite": {"claimName": "mine"}}}))
    assert not [o for o in named if o["kind"] == "PersistentVolumeClaim"]
    spec = one(named, "Deployment", "chat-router")["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "mine"}} in spec["volumes"]


def test_the_postgres_dsn_reaches_the_router_only_through_its_secret() -> None:
    objs = children(service(**VARIATIONS["postgres"]))
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    router = one(objs, "Deployment", "chat-router")
    assert router["spec"]["replicas"] == 3
    assert router["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert env_of(container)[routing.STORE_ENV] == {
        "name": routing.STORE_ENV,
        "valueFrom": {"secretKeyRef": {"name": "router-db", "key": "dsn"}},
    }
    assert "--store" not in container["command"]
    assert not [v for v in router["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]


def test_router_service_pdb_and_urls() -> None:
    objs = children()
    svc = one(objs, "Service", "chat-router")
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert one(objs, "PodDisruptionBudget", "chat-router")["spec"]["maxUnavailable"] == 1
    assert build.endpoint_url("chat", NS) == "http://chat-router.team-a.svc/v1"
    # The operator reads the router's counts through that Service, at its port.
    host, port = stats_client.router_address("chat", NS, OperatorSettings())
    assert (host, port) == (f"chat-router.{NS}.svc", svc["spec"]["ports"][0]["port"])
    router = one(objs, "Deployment", "chat-router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == pods.resources("1", "1Gi")  # spec.router's default


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


def test_a_builtin_variant_serves_its_claim_with_its_limits() -> None:
    from kubetrain_trainer.serve.__main__ import build_parser

    ms = service(variants=variant_changed(0, maxTokens=64, maxConcurrency=3, maxQueue=7))
    deployment = one(children(ms), "Deployment", "chat-a")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"][:3] == ["kubetrain", "serve", engines.MODEL_MOUNT]
    args = build_parser().parse_args(container["command"][2:])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert (args.max_tokens, args.max_concurrency, args.max_queue) == (64, 3, 7)
    assert args.feedback_path is None  # the router keeps feedback
    assert {
        "name": "model",
        "mountPath": "/model",
        "subPath": "chat-a-1/model",
        "readOnly": True,
    } in container["volumeMounts"]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "chat-a-storage", "readOnly": True},
    } in spec["volumes"]
    assert env_of(container)["HF_HUB_OFFLINE"]["value"] == "1"
    assert {
        k: container[k]["httpGet"]["path"]
        for k in ("startupProbe", "readinessProbe", "livenessProbe")
    } == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    # Generous: minutes for a large model to load.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"][contract.ANNOTATION_MODEL_VERSION] == "chat-a-step200"
    assert deployment["spec"]["replicas"] == 1
    assert container["resources"] == pods.resources("1", "2Gi")


def test_a_url_variant_downloads_into_an_empty_dir_with_the_object_store_secret() -> None:
    from kubetrain_trainer.serve.__main__ import build_parser

    container = engine_of(children(), "b")
    args = build_parser().parse_args(container["command"][2:])
    assert args.model_dir == "s3://models/chat-b/model"
    mount = {m["name"]: m for m in container["volumeMounts"]}["model-cache"]
    assert str(args.model_cache).startswith(mount["mountPath"] + "/")
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    spec = one(children(), "Deployment", "chat-b")["spec"]["template"]["spec"]
    assert {"name": "model-cache", "emptyDir": {}} in spec["volumes"]
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]


def test_file_and_hub_sources() -> None:
    ms = service(secrets={"huggingFaceToken": {"name": "hf", "key": "token"}})
    models = {
        "a": ModelSource(version="v1", url="file:///opt/models/tiny"),
        "b": ModelSource(version="main", url="hf://org/tiny"),
    }
    objs = children(ms, models=models)
    a, b = engine_of(objs, "a"), engine_of(objs, "b")
    assert a["command"][2] == "/opt/models/tiny"  # in the image: read in place
    assert [m["name"] for m in a["volumeMounts"]] == ["tmp"]
    assert b["command"][2] == "hf://org/tiny"
    assert "HF_HUB_OFFLINE" not in env_of(b)  # the Hub is where the model is
    assert env_of(b)["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "HF_TOKEN" not in env_of(a)
    with pytest.raises(ValueError, match=r"variant a: .*absolute path"):
        children(ms, models={**models, "a": ModelSource(version="v", url="file://rel")})
    with pytest.raises(ValueError, match="variant a: the model source has neither"):
        children(ms, models={**models, "a": ModelSource(version="v")})


def test_a_vllm_variant_serves_under_the_service_name_on_its_gpus() -> None:
    ms = service(variants=variant_changed(0, engine="vllm", gpus=2, maxConcurrency=16))
    objs = children(ms)
    container = engine_of(objs, "a")
    command = container["command"]
    assert command[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--model": "/model",
        "--served-model-name": "chat",
        "--host": "0.0.0.0",
        "--port": "8000",
        "--max-num-seqs": "16",
        "--tensor-parallel-size": "2",
    }
    assert container["resources"]["limits"][pods.GPU_RESOURCE] == "2"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert {
        container[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    } == {"/health"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    config = config_of(objs)
    assert {v.name: v.upstream_model for v in config.variants} == {"a": "chat", "b": None}


def test_a_vllm_variant_on_an_object_store_gets_the_model_from_an_init_container() -> None:
    ms = service(
        image="registry.example/kubetrain:1",
        variants=variant_changed(1, engine="vllm", gpus=1, image="vllm/vllm-openai:v0"),
    )
    objs = children(ms)
    spec = one(objs, "Deployment", "chat-b")["spec"]["template"]["spec"]
    (fetch,) = spec["initContainers"]
    # The download runs in the kubetrain image (vLLM's image has no kubetrain).
    assert fetch["image"] == "registry.example/kubetrain:1"
    assert fetch["command"][:2] == ["python3", "-c"]
    assert fetch["command"][3:] == ["s3://models/chat-b/model", "/model-cache/model"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    (container,) = spec["containers"]
    assert container["image"] == "vllm/vllm-openai:v0"
    assert container["command"][container["command"].index("--model") + 1] == "/model-cache/model"
    assert "envFrom" not in container  # the credentials stay with the download
    assert {"name": "model-cache", "mountPath": "/model-cache"} in container["volumeMounts"]


def test_the_fetch_script_is_the_builtin_servers_download() -> None:
    """The init container's one-liner runs: a local folder is returned as is."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", engines.FETCH_SCRIPT + "; print('ok')", "file:///x", "/tmp/y"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_variant_service_and_pdb() -> None:
    objs = children()
    for v in "ab":
        svc = one(objs, "Service", f"chat-{v}")
        assert svc["spec"]["ports"] == [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
        ]
        assert svc["spec"]["selector"] == {
            contract.LABEL_MODELSERVICE: "chat",
            contract.LABEL_COMPONENT: "variant",
            contract.LABEL_VARIANT: v,
        }
        pdb = one(objs, "PodDisruptionBudget", f"chat-{v}")
        assert pdb["apiVersion"] == SETTINGS.pdb_api_version
        assert pdb["spec"]["maxUnavailable"] == 1


def cpu_metric(percent: int) -> Obj:
    target = {"type": "Utilization", "averageUtilization": percent}
    return {"type": "Resource", "resource": {"name": "cpu", "target": target}}


IN_FLIGHT = {
    "type": "Pods",
    "pods": {
        "metric": {"name": "kubetrain_serve_in_flight"},
        "target": {"type": "AverageValue", "averageValue": "4"},
    },
}


@pytest.mark.parametrize(
    ("autoscaling", "metric"),
    [({}, cpu_metric(70)), ({"targetCpuUtilization": 55}, cpu_metric(55)),
     ({"targetConcurrency": 4}, IN_FLIGHT)],
    ids=["cpu-default", "cpu", "concurrency"],
)  # fmt: skip
def test_autoscaling_is_an_hpa_v2_that_owns_the_replicas(autoscaling: Obj, metric: Obj) -> None:
    ms = service(variants=variant_changed(0, autoscaling={**autoscaling, "minReplicas": 2}))
    objs = children(ms)
    hpa = one(objs, "HorizontalPodAutoscaler", "chat-a")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-a"},
        "minReplicas": 2,
        "maxReplicas": 4,
        "metrics": [metric],
    }
    assert "replicas" not in one(objs, "Deployment", "chat-a")["spec"]
    assert one(objs, "Deployment", "chat-b")["spec"]["replicas"] == 1
    assert not [
        o
        for o in objs
        if o["kind"] == "HorizontalPodAutoscaler" and o["metadata"]["name"] == "chat-b"
    ]


def test_a_vllm_variant_scales_on_vllms_own_in_flight_gauge() -> None:
    objs = children(service(**VARIATIONS["vllm-autoscaled"]))
    (metric,) = one(objs, "HorizontalPodAutoscaler", "chat-b")["spec"]["metrics"]
    assert metric["pods"]["metric"] == {"name": "vllm:num_requests_running"}


def test_the_children_are_deterministic() -> None:
    assert children() == children()


# --------------------------------------------------------------------------------------
# The serving image
# --------------------------------------------------------------------------------------


def test_the_trainer_image_installs_vllm_only_when_asked() -> None:
    text = (ROOT / "trainer_image" / "Dockerfile").read_text()
    assert "ARG WITH_VLLM=0\n" in text
    assert 'if [ "${WITH_VLLM}" = 1 ]; then' in text
    assert 'pip install "vllm' in text


# --------------------------------------------------------------------------------------
# The real API server
# --------------------------------------------------------------------------------------


@pytest.fixture
def dry_run_ns(cluster: object) -> Iterator[str]:
    from tests.support.cluster import scratch_namespace

    with scratch_namespace("ms-build") as name:
        yield name


@pytest.mark.controlplane
def test_the_api_server_accepts_every_child(
    crd_installed: None, dry_run_ns: str, tmp_path: Path
) -> None:
    from tests.support.cluster import kubectl, server_dry_run

    served = set(kubectl("api-versions").stdout.split())
    settings = OperatorSettings(
        pdb_api_version="policy/v1" if "policy/v1" in served else "policy/v1beta1",
        hpa_api_version="autoscaling/v2" if "autoscaling/v2" in served else "autoscaling/v2beta2",
    )
    objs = [
        obj
        for variation in VARIATIONS.values()
        for obj in children(service(**variation), settings=settings, ns=dry_run_ns)
    ]
    assert {o["kind"] for o in objs} == {
        "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
        "PodDisruptionBudget", "HorizontalPodAutoscaler",
    }  # fmt: skip
    for index, obj in enumerate(objs):
        path = tmp_path / f"{index:02d}.json"
        path.write_text(json.dumps(obj))
        code, stderr = server_dry_run(path, dry_run_ns)
        assert code == 0, f"{obj['kind']} {obj['metadata']['name']}: {stderr}"

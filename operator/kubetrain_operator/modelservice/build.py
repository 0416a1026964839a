"""Pure builders: a parsed ModelService, the models its variants resolved to and the split
to apply now in; the Kubernetes objects that serve it out.

Per variant `<service>-<variant>`: a Deployment of its engine (engines.py), a Service
(port 80 to the engine's 8000), a PodDisruptionBudget and, with autoscaling, an
autoscaling/v2 HorizontalPodAutoscaler. The router `<service>-router`: a ConfigMap with
`router.yaml` (routing.RouterConfig: the variants' in-cluster URLs, model versions and
weights), for SQLite a PVC `<service>-router-db` (unless the spec names a claim), a
Deployment of `kubetrain route`, a Service (port 80, the endpoint) and a
PodDisruptionBudget.

The ConfigMap is mounted as a folder (not a subPath), so the kubelet's update reaches
the file and the router re-reads it: new weights (a promotion, a rollback) shift traffic
without restarting the router, and the router's pod template does not change with them.

Every child carries the standard labels (instance: the service, component `router` or
`variant`), `kubetrain.dev/modelservice` (and `kubetrain.dev/variant` on a variant's
objects), the service's uid annotation, an owner reference to the ModelService and the
input hash. Never `kubetrain.dev/run`: that label marks the Ray pods of a TrainingRun.
Like builders.py, nothing here does I/O: the same inputs give the same objects.
"""

from __future__ import annotations

from kubetrain_api import routing
from kubetrain_api.contract import (
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_SERVICE_UID,
    LABEL_COMPONENT,
    LABEL_MODELSERVICE,
    LABEL_RUN,
    LABEL_VARIANT,
)
from kubetrain_api.modelservice import (
    KIND,
    ModelService,
    Variant,
    router_database_claim_name,
    router_name,
    variant_name,
)
from kubetrain_api.routing import RouterConfig, RouteVariant
from kubetrain_api.v1alpha1 import API_VERSION
from kubetrain_operator import builders, pods, serving
from kubetrain_operator.builders import Obj, with_input_hash
from kubetrain_operator.modelservice import engines
from kubetrain_operator.modelservice.sources import ModelSource
from kubetrain_operator.settings import OperatorSettings

COMPONENT_ROUTER = "router"
COMPONENT_VARIANT = "variant"
ROUTER_CONTAINER = "router"
PORT_NAME = serving.PORT_NAME
SERVICE_PORT = 80
ENGINE_PORT = engines.PORT
ROUTER_PORT = routing.ROUTER_PORT
ROUTER_CONFIG_DIR = "/etc/kubetrain/router"
ROUTER_CONFIG_PATH = f"{ROUTER_CONFIG_DIR}/{routing.CONFIG_FILE}"
ROUTER_CONFIG_VOLUME = "config"
ROUTER_DATA_VOLUME = "data"
ROUTER_DATA_DIR = "/data"
ROUTER_SQLITE_FILE = f"{ROUTER_DATA_DIR}/router.db"
DEFAULT_TARGET_CPU = 70


# --------------------------------------------------------------------------------------
# Names, URLs, metadata
# --------------------------------------------------------------------------------------


def endpoint_url(service: str, ns: str) -> str:
    """In-cluster base URL of the service's OpenAI-compatible API (the router's)."""
    return f"http://{router_name(service)}.{ns}.svc/v1"


def variant_url(service: str, variant: str, ns: str) -> str:
    """Base URL of a variant's engine, through its Service (without `/v1`)."""
    return f"http://{variant_name(service, variant)}.{ns}.svc:{SERVICE_PORT}"


def child_kinds() -> list[tuple[str, str]]:
    """(API group, plural) of every kind build_children makes ("" is the core group)."""
    return [
        ("", "configmaps"),
        ("", "persistentvolumeclaims"),
        ("", "services"),
        ("apps", "deployments"),
        ("policy", "poddisruptionbudgets"),
        ("autoscaling", "horizontalpodautoscalers"),
    ]


def owner_reference(service: str, uid: str) -> Obj:
    """Controller reference to the ModelService: its children go when it goes."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": service,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(service: str, component: str, variant: str | None = None) -> dict[str, str]:
    """Labels of every child: the standard ones (builders.labels) without the Ray pods'
    `kubetrain.dev/run`, plus the service's (and the variant's) own."""
    out = builders.labels(service, component)
    del out[LABEL_RUN]
    out[LABEL_MODELSERVICE] = service
    if variant is not None:
        out[LABEL_VARIANT] = variant
    return out


def selector(service: str, component: str, variant: str | None = None) -> dict[str, str]:
    """Labels that select the router's or one variant's pods (immutable in a Deployment)."""
    out = {LABEL_MODELSERVICE: service, LABEL_COMPONENT: component}
    if variant is not None:
        out[LABEL_VARIANT] = variant
    return out


def _service_name(ms: ModelService) -> str:
    if not ms.metadata.name:
        raise ValueError("the ModelService has no metadata.name (parse rejects such services)")
    return ms.metadata.name


def _metadata(
    ms: ModelService, uid: str, ns: str, name: str, component: str, variant: str | None = None
) -> Obj:
    service = _service_name(ms)
    return {
        "name": name,
        "namespace": ns,
        "labels": labels(service, component, variant),
        "annotations": {ANNOTATION_SERVICE_UID: uid},
        "ownerReferences": [owner_reference(service, uid)],
    }


def service_image(ms: ModelService, settings: OperatorSettings) -> str:
    """The router's image (it has every `kubetrain` command)."""
    return _image(ms, settings)


def _image(ms: ModelService, settings: OperatorSettings, variant: Variant | None = None) -> str:
    """The variant's image, else the service's, else the installation's (the trainer image,
    which has `kubetrain serve` and `kubetrain route`)."""
    return (variant.image if variant is not None else None) or ms.spec.image or settings.image


def _service_obj(meta: Obj, sel: dict[str, str]) -> Obj:
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "type": "ClusterIP",
                "selector": sel,
                "ports": [
                    {
                        "name": PORT_NAME,
                        "port": SERVICE_PORT,
                        "targetPort": PORT_NAME,
                        "protocol": "TCP",
                    }
                ],
            },
        }
    )


def _pdb(meta: Obj, sel: dict[str, str], settings: OperatorSettings) -> Obj:
    return with_input_hash(
        {
            "apiVersion": settings.pdb_api_version,
            "kind": "PodDisruptionBudget",
            "metadata": meta,
            # Drains take one pod at a time.
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": sel}},
        }
    )


# One extra pod at a time, never one fewer: capacity holds during a rollout.
ROLLING = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


# --------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------


def router_config(
    ms: ModelService, ns: str, models: dict[str, ModelSource], weights: dict[str, int]
) -> RouterConfig:
    """The router's configuration: the variants in spec order with their in-cluster URL,
    model version and the weight to apply now (`weights`, which may differ from the spec
    after a promotion). Raises ValueError (pydantic's) when the weights do not sum to 100."""
    service = _service_name(ms)
    sticky = ms.spec.router.sticky_key
    variants = [
        RouteVariant(
            name=v.name,
            url=variant_url(service, v.name, ns),
            model_version=_model(models, v).version,
            weight=weights.get(v.name, 0),
            upstream_model=service if v.engine == "vllm" else None,
        )
        for v in ms.spec.variants
    ]
    return RouterConfig(
        model=service,
        salt=service,
        sticky_header=sticky.header if sticky.source == "header" else None,
        variants=variants,
    )


def _model(models: dict[str, ModelSource], variant: Variant) -> ModelSource:
    try:
        return models[variant.name]
    except KeyError:
        raise ValueError(f"variant {variant.name}: no model source resolved") from None


def router_claim_name(ms: ModelService) -> str | None:
    """The SQLite claim the router mounts (the spec's, or `<service>-router-db`), or None
    with PostgreSQL."""
    sqlite = ms.spec.router.database.sqlite
    if sqlite is None:
        return None
    return sqlite.claim_name or router_database_claim_name(_service_name(ms))


def build_router_config_map(
    ms: ModelService,
    uid: str,
    ns: str,
    models: dict[str, ModelSource],
    weights: dict[str, int],
) -> Obj:
    """ConfigMap `<service>-router` with `router.yaml`."""
    config = router_config(ms, ns, models, weights)
    name = router_name(_service_name(ms))
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(ms, uid, ns, name, COMPONENT_ROUTER),
            "data": {routing.CONFIG_FILE: routing.dump_router_config(config)},
        }
    )


def build_router_pvc(ms: ModelService, uid: str, ns: str) -> Obj | None:
    """PVC `<service>-router-db` for SQLite, unless the spec names an existing claim."""
    sqlite = ms.spec.router.database.sqlite
    if sqlite is None or sqlite.claim_name:
        return None
    spec: Obj = {
        "accessModes": ["ReadWriteOnce"],  # one router replica writes it
        "resources": {"requests": {"storage": str(sqlite.size)}},
    }
    if sqlite.storage_class_name:
        spec["storageClassName"] = sqlite.storage_class_name
    name = router_database_claim_name(_service_name(ms))
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _metadata(ms, uid, ns, name, COMPONENT_ROUTER),
            "spec": spec,
        }
    )


def store_env(ms: ModelService) -> Obj:
    """The router store's environment variable (the router and the feedback export)."""
    postgres = ms.spec.router.database.postgres
    if postgres is not None:
        # By reference only: the DSN carries a password.
        ref = {"name": postgres.dsn_secret_ref.name, "key": postgres.dsn_secret_ref.key}
        return {"name": routing.STORE_ENV, "valueFrom": {"secretKeyRef": ref}}
    return {"name": routing.STORE_ENV, "value": ROUTER_SQLITE_FILE}


def build_router_deployment(ms: ModelService, uid: str, ns: str, settings: OperatorSettings) -> Obj:
    """Deployment `<service>-router`: `kubetrain route` on the mounted ConfigMap. SQLite has
    one writer: one replica, and Recreate so the old pod lets go of the file first."""
    service = _service_name(ms)
    spec, router = ms.spec, ms.spec.router
    claim = router_claim_name(ms)
    mounts: list[Obj] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": ROUTER_CONFIG_VOLUME, "mountPath": ROUTER_CONFIG_DIR, "readOnly": True},
    ]
    volumes: list[Obj] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": ROUTER_CONFIG_VOLUME, "configMap": {"name": router_name(service)}},
    ]
    if claim is not None:
        mounts.append({"name": ROUTER_DATA_VOLUME, "mountPath": ROUTER_DATA_DIR})
        volumes.append({"name": ROUTER_DATA_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
    container = pods.image_container(
        _image(ms, settings),
        spec.image_pull_policy,
        name=ROUTER_CONTAINER,
        command=[
            "kubetrain",
            "route",
            "--config",
            ROUTER_CONFIG_PATH,
            "--port",
            str(ROUTER_PORT),
        ],
        env=[{"name": "HOME", "value": "/tmp"}, store_env(ms)],
        ports=[{"name": PORT_NAME, "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        resources=pods.resources(router.resources.cpu, router.resources.memory),
        readinessProbe=serving.probe(routing.READY_PATH, 5, 3, timeout=3),
        livenessProbe=serving.probe(routing.HEALTH_PATH, 10, 3, timeout=5),
        volumeMounts=mounts,
    )
    sel = selector(service, COMPONENT_ROUTER)
    deployment_spec: Obj = {
        "replicas": 1 if claim is not None else router.replicas,
        "selector": {"matchLabels": sel},
        "strategy": {"type": "Recreate"} if claim is not None else ROLLING,
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels(service, COMPONENT_ROUTER),
                "annotations": pods.scrape_annotations(ROUTER_PORT),
            },
            "spec": pods.restricted_pod_spec([container], volumes, spec.image_pull_secrets),
        },
    }
    return with_input_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(ms, uid, ns, router_name(service), COMPONENT_ROUTER),
            "spec": deployment_spec,
        }
    )


def build_router_service(ms: ModelService, uid: str, ns: str) -> Obj:
    """ClusterIP Service `<service>-router`: the endpoint, port 80 to the router's 8000."""
    service = _service_name(ms)
    meta = _metadata(ms, uid, ns, router_name(service), COMPONENT_ROUTER)
    return _service_obj(meta, selector(service, COMPONENT_ROUTER))


def build_router_pdb(ms: ModelService, uid: str, ns: str, settings: OperatorSettings) -> Obj:
    service = _service_name(ms)
    meta = _metadata(ms, uid, ns, router_name(service), COMPONENT_ROUTER)
    return _pdb(meta, selector(service, COMPONENT_ROUTER), settings)


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


def engine(
    ms: ModelService, variant: Variant, source: ModelSource, settings: OperatorSettings
) -> engines.Engine:
    """The variant's engine container parts (engines.py)."""
    hf_token = ms.spec.secrets.hugging_face_token
    if variant.engine == "vllm":
        return engines.vllm(
            variant,
            source,
            _service_name(ms),
            hf_token,
            fetch_image=ms.spec.image or settings.image,
            pull_policy=ms.spec.image_pull_policy,
        )
    return engines.builtin(variant, source, hf_token)


def build_variant_deployment(
    ms: ModelService, variant: Variant, source: ModelSource, uid: str, ns: str,
    settings: OperatorSettings,
) -> Obj:  # fmt: skip
    """Deployment `<service>-<variant>` of the variant's engine. The model version annotates
    the pod template, so a new model rolls the pods."""
    service = _service_name(ms)
    eng = engine(ms, variant, source, settings)
    container = pods.image_container(
        _image(ms, settings, variant),
        ms.spec.image_pull_policy,
        name=engines.CONTAINER,
        command=eng.command,
        env=eng.env,
        ports=[{"name": PORT_NAME, "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        resources=pods.resources(variant.resources.cpu, variant.resources.memory, variant.gpus),
        startupProbe=eng.startup,
        readinessProbe=eng.readiness,
        livenessProbe=eng.liveness,
        volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}, *eng.mounts],
    )
    if eng.env_from:
        container["envFrom"] = eng.env_from
    volumes = [{"name": "tmp", "emptyDir": {}}, *eng.volumes]
    pod = pods.restricted_pod_spec([container], volumes, ms.spec.image_pull_secrets)
    if eng.init_containers:
        pod["initContainers"] = eng.init_containers
    annotations = pods.scrape_annotations(ENGINE_PORT)
    annotations[ANNOTATION_MODEL_VERSION] = source.version
    sel = selector(service, COMPONENT_VARIANT, variant.name)
    deployment_spec: Obj = {
        "selector": {"matchLabels": sel},
        "strategy": ROLLING,
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels(service, COMPONENT_VARIANT, variant.name),
                "annotations": annotations,
            },
            "spec": pod,
        },
    }
    if variant.autoscaling is None:
        # With autoscaling the HPA owns the replica count.
        deployment_spec = {"replicas": variant.replicas, **deployment_spec}
    name = variant_name(service, variant.name)
    return with_input_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(ms, uid, ns, name, COMPONENT_VARIANT, variant.name),
            "spec": deployment_spec,
        }
    )


def _variant_meta(ms: ModelService, variant: Variant, uid: str, ns: str) -> Obj:
    name = variant_name(_service_name(ms), variant.name)
    return _metadata(ms, uid, ns, name, COMPONENT_VARIANT, variant.name)


def build_variant_service(ms: ModelService, variant: Variant, uid: str, ns: str) -> Obj:
    """ClusterIP Service `<service>-<variant>`: port 80 to the engine's 8000."""
    sel = selector(_service_name(ms), COMPONENT_VARIANT, variant.name)
    return _service_obj(_variant_meta(ms, variant, uid, ns), sel)


def build_variant_pdb(
    ms: ModelService, variant: Variant, uid: str, ns: str, settings: OperatorSettings
) -> Obj:
    sel = selector(_service_name(ms), COMPONENT_VARIANT, variant.name)
    return _pdb(_variant_meta(ms, variant, uid, ns), sel, settings)


def build_variant_hpa(
    ms: ModelService, variant: Variant, uid: str, ns: str, settings: OperatorSettings
) -> Obj | None:
    """HorizontalPodAutoscaler `<service>-<variant>` (autoscaling/v2), only with autoscaling:
    on requests in flight per replica (targetConcurrency: the engine's gauge as a Pods
    metric, served by a custom-metrics adapter) or on CPU (targetCpuUtilization, 70% when
    neither is set)."""
    auto = variant.autoscaling
    if auto is None:
        return None
    metric: Obj
    if auto.target_concurrency is not None:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": engines.IN_FLIGHT_METRICS[variant.engine]},
                "target": {"type": "AverageValue", "averageValue": str(auto.target_concurrency)},
            },
        }
    else:
        cpu = auto.target_cpu_utilization or DEFAULT_TARGET_CPU
        metric = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": cpu},
            },
        }
    name = variant_name(_service_name(ms), variant.name)
    return with_input_hash(
        {
            "apiVersion": settings.hpa_api_version,
            "kind": "HorizontalPodAutoscaler",
            "metadata": _variant_meta(ms, variant, uid, ns),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": auto.min_replicas,
                "maxReplicas": auto.max_replicas,
                "metrics": [metric],
            },
        }
    )


# --------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------


def build_children(
    ms: ModelService,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    models: dict[str, ModelSource],
    weights: dict[str, int],
) -> list[Obj]:
    """Every child in apply order: router ConfigMap, router PVC (SQLite without claimName),
    per variant: Deployment, Service, PodDisruptionBudget, HPA (with autoscaling); then the
    router's Deployment, Service and PodDisruptionBudget. `models` has every variant;
    `weights` is the split the router must apply now (may differ from the spec after a
    promotion). The router comes last so that it starts with its variants' Services in
    place."""
    out = [build_router_config_map(ms, uid, ns, models, weights)]
    pvc = build_router_pvc(ms, uid, ns)
    if pvc is not None:
        out.append(pvc)
    for variant in ms.spec.variants:
        source = _model(models, variant)
        out += [
            build_variant_deployment(ms, variant, source, uid, ns, settings),
            build_variant_service(ms, variant, uid, ns),
            build_variant_pdb(ms, variant, uid, ns, settings),
        ]
        hpa = build_variant_hpa(ms, variant, uid, ns, settings)
        if hpa is not None:
            out.append(hpa)
    out += [
        build_router_deployment(ms, uid, ns, settings),
        build_router_service(ms, uid, ns),
        build_router_pdb(ms, uid, ns, settings),
    ]
    return out

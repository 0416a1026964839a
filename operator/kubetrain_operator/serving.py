"""Pure builders of a run's serving objects: the model server Deployment, its Service, a
PodDisruptionBudget and, with spec.serve.autoscaling, a HorizontalPodAutoscaler.

The reconciler applies them once the run has Succeeded, spec.serve.enabled is set and the
gate passed (status.py decides). All four are named `<run>-serve` and built like the Ray
children: standard labels (component `serving`), the `kubetrain.dev/input-hash`
annotation, and an owner reference to the run, so deleting the run deletes the server.

`spec.serve.retain: true` leaves the owner reference out: the serving objects outlive the
TrainingRun and are deleted by hand (`kubectl delete deploy,svc,pdb,hpa -l
app.kubernetes.io/instance=<run>,app.kubernetes.io/component=serving`). The model lives on
the run's storage, so the reconciler also makes the operator-created `<run>-storage` PVC a
dependent of the retained Deployment: garbage collection keeps it until the Deployment goes.

Where the model comes from follows the run's storage; the run folder is the one the
driver reported (status.model.uri), else `<run>-<uid[:8]>` of contract.run_folder:
- A PersistentVolumeClaim: the server mounts `<run folder>/model` read-only (subPath) and
  appends feedback to `<run folder>/feedback/` on the same claim.
- An object store (`s3://`, `gs://`): the server is given the model's URL
  (`<storage uri>/<run folder>/model`, where a folder goes otherwise) and downloads it into
  an emptyDir (`--model-cache`) before /readyz turns ready, with the credentials of
  spec.secrets.objectStore by reference. There is no claim to keep feedback on, so the
  server gets no `--feedback-path` and /v1/feedback answers 404: an emptyDir would lose
  it with the pod. A ModelService's router logs feedback durably.
Other storage URIs (`file://`, a laptop's) are not servable: status.py reports
Serving=False, reason StorageNotServable, and nothing is built.
Every serving object carries the `kubetrain.dev/run-uid` annotation: a retained server has
no owner reference, and the operator touches only objects of its run (ownership.py).

Serving pods carry the standard labels except `kubetrain.dev/run`: that label marks the
Ray pods of a run, which the reconciler lists (and deletes when they belong to another
attempt) and the run's NetworkPolicy isolates. Serving pods are selected by
`app.kubernetes.io/instance=<run>` and `app.kubernetes.io/component=serving`.
"""

from __future__ import annotations

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import (
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_RUN_UID,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_NAME,
    LABEL_RUN,
)
from kubetrain_operator import builders, pods
from kubetrain_operator.builders import Obj, with_input_hash
from kubetrain_operator.names import ChildNames
from kubetrain_operator.settings import OperatorSettings

COMPONENT = "serving"
CONTAINER = "server"
PORT = contract.SERVE_PORT
PORT_NAME = "http"
SERVICE_PORT = 80
# Where the server container mounts the run folder's `model` and `feedback` folders.
MODEL_DIR = f"/{contract.MODEL_DIR}"
FEEDBACK_DIR = f"/{contract.FEEDBACK_DIR}"
FEEDBACK_FILE = f"{FEEDBACK_DIR}/{contract.FEEDBACK_FILE}"
# Object-store storage: the server is given the model's URL in place of a folder, and the
# local folder it downloads the model into. That folder is one level inside the emptyDir:
# the download is staged next to it and moved into place, which a mount point refuses
# (and the root filesystem beside it is read-only).
MODEL_CACHE_OPTION = "--model-cache"
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_MOUNT = "/model-cache"
MODEL_CACHE_DIR = f"{MODEL_CACHE_MOUNT}/{contract.MODEL_DIR}"
# Storage URI schemes a server pod can fetch the model from.
OBJECT_STORE_SCHEMES = ("s3", "gs")
HPA_API_VERSION = "autoscaling/v1"
# Loading a large model from a network volume takes minutes: the startup probe allows
# STARTUP_PERIOD * STARTUP_FAILURES seconds before the kubelet restarts the container.
STARTUP_PERIOD = 5
STARTUP_FAILURES = 180


def service_url(run_name: str, ns: str) -> str:
    """In-cluster base URL of the OpenAI-compatible API."""
    return f"http://{ChildNames(run_name).serve}.{ns}.svc/v1"


def pdb_api_version(served: set[str]) -> str:
    """policy/v1 where the API server serves it (Kubernetes >= 1.21), else policy/v1beta1."""
    return "policy/v1" if "policy/v1" in served else "policy/v1beta1"


def hpa_v2_api_version(served: set[str]) -> str:
    """autoscaling/v2 where the API server serves it (Kubernetes >= 1.23), else
    autoscaling/v2beta2 (same schema): a ModelService variant's HPA scales on a metric."""
    return "autoscaling/v2" if "autoscaling/v2" in served else "autoscaling/v2beta2"


def object_store_uri(run: api.TrainingRun) -> str | None:
    """spec.checkpoint.storage.uri when it names an object store (s3://, gs://)."""
    uri = run.spec.checkpoint.storage.uri
    if uri is not None and uri.partition("://")[0] in OBJECT_STORE_SCHEMES:
        return uri
    return None


def servable(run: api.TrainingRun) -> bool:
    """Whether a model server can reach the run's model: on a PVC it mounts, or on an
    object store it downloads from (not on a `file://` path, which is one machine's)."""
    return builders.storage_claim_name(run) is not None or object_store_uri(run) is not None


def selector(run_name: str) -> dict[str, str]:
    """Labels that select the run's serving pods (immutable in a Deployment)."""
    return {LABEL_NAME: "kubetrain", LABEL_INSTANCE: run_name, LABEL_COMPONENT: COMPONENT}


def pod_labels(run_name: str) -> dict[str, str]:
    labels = builders.labels(run_name, COMPONENT)
    del labels[LABEL_RUN]  # the Ray pods' label: see the module docstring
    return labels


def _run_name(run: api.TrainingRun) -> str:
    if not run.metadata.name:
        raise ValueError("the run has no metadata.name (parse() rejects such runs)")
    return run.metadata.name


def _metadata(run: api.TrainingRun, uid: str, ns: str) -> Obj:
    run_name = _run_name(run)
    metadata: Obj = {
        "name": ChildNames(run_name).serve,
        "namespace": ns,
        "labels": builders.labels(run_name, COMPONENT),
        "annotations": {ANNOTATION_RUN_UID: uid},
    }
    if not run.spec.serve.retain:
        metadata["ownerReferences"] = [builders.owner_reference(run_name, uid)]
    return metadata


def _command(serve: api.ServeSpec, model_url: str | None) -> list[str]:
    """`kubetrain serve`: the mounted model folder with feedback on the claim, or (object
    store) the model's URL to download, without feedback (see the module docstring)."""
    model = [MODEL_DIR] if model_url is None else download_args(model_url)
    tail = ["--feedback-path", FEEDBACK_FILE] if model_url is None else []
    return [
        "kubetrain",
        "serve",
        *model,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        *contract.serve_args(serve.model_dump()),
        *tail,
    ]


def _model_volumes(
    run: api.TrainingRun, folder: str, model_url: str | None
) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) for the model: the run's claim (model read-only, feedback
    writable), or (object store) an emptyDir the server downloads the model into."""
    if model_url is not None:
        return model_cache_volume()
    claim = builders.storage_claim_name(run)
    if claim is None:
        raise ValueError("serving needs the run's storage on a PVC or an object store")
    mounts: list[Obj] = [
        {
            "name": builders.STORAGE_VOLUME,
            "mountPath": MODEL_DIR,
            "subPath": contract.run_path(folder, contract.MODEL_DIR),
            "readOnly": True,
        },
        {
            "name": builders.STORAGE_VOLUME,
            "mountPath": FEEDBACK_DIR,
            "subPath": contract.run_path(folder, contract.FEEDBACK_DIR),
        },
    ]
    return [
        {"name": builders.STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    ], mounts


def download_args(model_url: str) -> list[str]:
    """`kubetrain serve`'s model arguments for a model on an object store: its URL, and the
    emptyDir folder (model_cache_volume) it is downloaded into before /readyz turns ready."""
    return [model_url, MODEL_CACHE_OPTION, MODEL_CACHE_DIR]


def model_cache_volume() -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) of the emptyDir a downloaded model is kept in."""
    # No sizeLimit: the API has no field for it, and a guess would evict large models.
    volumes: list[Obj] = [{"name": MODEL_CACHE_VOLUME, "emptyDir": {}}]
    return volumes, [{"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_MOUNT}]


def probe(path: str, period: int, failures: int, timeout: int) -> Obj:
    """An HTTP probe on the container's `http` port."""
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def model_folder(
    run: api.TrainingRun, uid: str, settings: OperatorSettings, model_uri: str | None
) -> str:
    """The run folder whose `model` is served: the one the run's driver reported exporting
    to (status.model.uri: `<mount>/<folder>/model` on a claim, `<storage uri>/<folder>/model`
    on an object store), else the run's own (contract.run_folder). The report wins so that
    a model exported before run folders were keyed by uid (`<name>/model`) is still served
    after an upgrade."""
    remote = object_store_uri(run)
    root = remote if remote is not None else settings.storage_mount
    prefix = root.rstrip("/") + "/"
    reported = model_uri or ""
    if remote is None:
        reported = reported.removeprefix("file://")
    folder, _, rest = reported.removeprefix(prefix).partition("/")
    is_model = rest.rstrip("/") == contract.MODEL_DIR
    if reported.startswith(prefix) and is_model and folder not in ("", ".", ".."):
        return folder
    return contract.run_folder(_run_name(run), uid)


def build_deployment(
    run: api.TrainingRun,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    model_version: str | None = None,
    model_uri: str | None = None,
) -> Obj:
    """Deployment `<run>-serve`: `kubetrain serve` on the exported model. `model_version`
    (status.model.version) annotates the pod template, so a new model rolls the pods;
    `model_uri` (status.model.uri) says where it is (model_folder)."""
    spec = run.spec
    serve = spec.serve
    run_name = _run_name(run)
    folder = model_folder(run, uid, settings, model_uri)
    remote = object_store_uri(run)
    model_url = None if remote is None else contract.run_url(remote, folder, contract.MODEL_DIR)
    model_volumes, model_mounts = _model_volumes(run, folder, model_url)
    container = pods.container(
        run,
        settings,
        name=CONTAINER,
        command=_command(serve, model_url),
        env=[
            # The root filesystem is read-only; libraries write caches under $HOME.
            {"name": "HOME", "value": "/tmp"},
            # The model is on the volume: never reach out to the Hugging Face Hub.
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "KUBETRAIN_RUN", "value": run_name},
        ],
        ports=[{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        resources=pods.resources(serve.resources.cpu, serve.resources.memory, serve.gpus),
        # /readyz answers 200 once the model is loaded; until then only the startup probe
        # runs, with room for a slow load. /healthz is liveness: the process answers.
        startupProbe=probe("/readyz", STARTUP_PERIOD, STARTUP_FAILURES, timeout=3),
        readinessProbe=probe("/readyz", 5, 3, timeout=3),
        livenessProbe=probe("/healthz", 10, 3, timeout=5),
        volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}, *model_mounts],
    )
    if remote is not None and spec.secrets.object_store is not None:
        container["envFrom"] = pods.object_store_env_from(spec.secrets.object_store)
    volumes = [{"name": "tmp", "emptyDir": {}}, *model_volumes]
    # The training node selector (a GPU product) applies to serving only when it asks for
    # GPUs too. Priority and Kueue are for training.
    pod_spec = pods.pod_spec(
        run, [container], volumes, node_selector=serve.gpus > 0, priority=False
    )
    annotations = pods.scrape_annotations(PORT)
    if model_version:
        annotations[ANNOTATION_MODEL_VERSION] = model_version
    deployment_spec: Obj = {
        "selector": {"matchLabels": selector(run_name)},
        # One extra pod at a time, never one fewer: capacity holds during a rollout.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {"labels": pod_labels(run_name), "annotations": annotations},
            "spec": pod_spec,
        },
    }
    if serve.autoscaling is None:
        # With autoscaling the HPA owns the replica count (k8s.Kube keeps it on updates).
        deployment_spec["replicas"] = serve.replicas
    return with_input_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(run, uid, ns),
            "spec": deployment_spec,
        }
    )


def build_service(run: api.TrainingRun, uid: str, ns: str) -> Obj:
    """ClusterIP Service `<run>-serve`: port 80 to the server's `http` port."""
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(run, uid, ns),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(_run_name(run)),
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


def build_pdb(run: api.TrainingRun, uid: str, ns: str, settings: OperatorSettings) -> Obj:
    """PodDisruptionBudget `<run>-serve`: drains take one server at a time."""
    return with_input_hash(
        {
            "apiVersion": settings.pdb_api_version,
            "kind": "PodDisruptionBudget",
            "metadata": _metadata(run, uid, ns),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(_run_name(run))}},
        }
    )


def build_hpa(run: api.TrainingRun, uid: str, ns: str) -> Obj | None:
    """HorizontalPodAutoscaler `<run>-serve` (autoscaling/v1: served by every Kubernetes
    version kubetrain supports), only with spec.serve.autoscaling."""
    auto = run.spec.serve.autoscaling
    if auto is None:
        return None
    return with_input_hash(
        {
            "apiVersion": HPA_API_VERSION,
            "kind": "HorizontalPodAutoscaler",
            "metadata": _metadata(run, uid, ns),
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": ChildNames(_run_name(run)).serve,
                },
                "minReplicas": auto.min_replicas,
                "maxReplicas": auto.max_replicas,
                "targetCPUUtilizationPercentage": auto.target_cpu_utilization,
            },
        }
    )


def build_serving(
    run: api.TrainingRun,
    uid: str,
    ns: str,
    settings: OperatorSettings,
    model_version: str | None = None,
    model_uri: str | None = None,
) -> list[Obj]:
    """Every serving object, in the order the reconciler applies them."""
    hpa = build_hpa(run, uid, ns)
    return [
        build_deployment(run, uid, ns, settings, model_version, model_uri),
        build_service(run, uid, ns),
        build_pdb(run, uid, ns, settings),
        *([hpa] if hpa is not None else []),
    ]

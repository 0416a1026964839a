"""Pure builders: a parsed TrainingRun in, the Kubernetes objects of its Ray cluster out.

Every function here is pure (no I/O, no clock, no randomness): the same run, uid, namespace,
attempt and settings always give the same dicts, so the reconciler can compare what it
would build with what exists through the `kubetrain.dev/input-hash` annotation. Secrets are
only ever referenced by name; the one secret value that passes through is the Ray token,
which the caller generates once and which lands only in the token Secret.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

import yaml
from kubernetes.utils.quantity import parse_quantity

from kubetrain_api import contract, placement
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import (
    ANNOTATION_INPUT_HASH,
    EXIT_RAY_UNAVAILABLE,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    LABEL_QUEUE,
    LABEL_ROLE,
    LABEL_RUN,
    MANAGED_BY,
    OOM_GUARD_COMMAND,
    ROLE_HEAD,
    ROLE_WORKER,
    WORKER_SLOT_RESOURCE,
)
from kubetrain_api.validation import processes_per_worker
from kubetrain_operator import claims, overrides, pods
from kubetrain_operator.names import ChildNames
from kubetrain_operator.pods import resources
from kubetrain_operator.settings import OperatorSettings

Obj = dict[str, Any]

CONFIG_KEY = "run.yaml"
CONFIG_DIR = "/etc/kubetrain"
TOKEN_KEY = "token"
HF_TOKEN_DIR = "/var/run/secrets/kubetrain/hf"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
TERMINATION_LOG = "/dev/termination-log"
STORAGE_VOLUME = "storage"

# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------


def owner_reference(run_name: str, run_uid: str) -> Obj:
    """Controller reference to the TrainingRun: children go when the run goes."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": run_name,
        "uid": run_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(run_name: str, component: str) -> dict[str, str]:
    """Labels every child carries."""
    return {
        LABEL_NAME: "kubetrain",
        LABEL_INSTANCE: run_name,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: "kubetrain",
        LABEL_RUN: run_name,
    }


def pod_label_selector(run_name: str, attempt: int | None = None) -> str:
    """Label selector for the run's pods, or only those of one attempt."""
    selector = f"{LABEL_RUN}={run_name}"
    return selector if attempt is None else f"{selector},{LABEL_ATTEMPT}={attempt}"


def input_hash(obj: Obj) -> str:
    """sha256 (first 16 hex chars) of the canonical JSON of `obj` without its own hash."""
    body = copy.deepcopy(obj)
    annotations = body.get("metadata", {}).get("annotations")
    if annotations is not None:
        annotations.pop(ANNOTATION_INPUT_HASH, None)
        if not annotations:
            del body["metadata"]["annotations"]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_input_hash(obj: Obj) -> Obj:
    """A copy of `obj` annotated with its input hash."""
    out = copy.deepcopy(obj)
    out.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_INPUT_HASH] = (
        input_hash(obj)
    )
    return out


def _metadata(run: api.TrainingRun, uid: str, ns: str, name: str, component: str) -> Obj:
    run_name = _run_name(run)
    return {
        "name": name,
        "namespace": ns,
        "labels": labels(run_name, component),
        "ownerReferences": [owner_reference(run_name, uid)],
    }


def _run_name(run: api.TrainingRun) -> str:
    if not run.metadata.name:
        raise ValueError("the run has no metadata.name (parse() rejects such runs)")
    return run.metadata.name


# --------------------------------------------------------------------------------------
# Configuration, token, storage, network
# --------------------------------------------------------------------------------------


def run_document(run: api.TrainingRun, ns: str) -> Obj:
    """The resolved run as the driver reads it: defaults filled in, no status, and only
    name and namespace of the metadata (labels and annotations are no input to training)."""
    doc = run.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"status"})
    doc["metadata"] = {"name": _run_name(run), "namespace": ns}
    return doc


def build_config_map(run: api.TrainingRun, uid: str, ns: str) -> Obj:
    """ConfigMap `<run>-config` with `run.yaml`, mounted read-only in every pod."""
    names = ChildNames(_run_name(run))
    text = yaml.safe_dump(run_document(run, ns), sort_keys=False)
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(run, uid, ns, names.config, "config"),
            "data": {CONFIG_KEY: text},
        }
    )


def build_ray_token_secret(run: api.TrainingRun, uid: str, ns: str, token: str) -> Obj:
    """Secret `<run>-ray-token` holding the Ray auth token the caller generated once."""
    names = ChildNames(_run_name(run))
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _metadata(run, uid, ns, names.ray_token, "ray-token"),
            "type": "Opaque",
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
        }
    )


def storage_claim_name(run: api.TrainingRun) -> str | None:
    """The PVC the pods mount: the user's claim, the operator's `<run>-storage`, or None
    when storage is a URI (object store or local path)."""
    pvc = run.spec.checkpoint.storage.pvc
    if pvc is None:
        return None
    return pvc.claim_name or ChildNames(_run_name(run)).storage


def build_storage_pvc(run: api.TrainingRun, uid: str, ns: str) -> Obj | None:
    """PVC `<run>-storage`, only when spec.checkpoint.storage.pvc names no existing claim."""
    pvc = run.spec.checkpoint.storage.pvc
    if pvc is None or pvc.claim_name:
        return None
    spec: Obj = {
        # A named class is the user's shared (RWX) storage, as the API asks for multi-node
        # runs; the cluster's default class is typically node-local (kind, local-path) and
        # offers only ReadWriteOnce, which serves the head and workers on one node.
        "accessModes": ["ReadWriteMany" if pvc.storage_class_name else "ReadWriteOnce"],
        "resources": {"requests": {"storage": str(pvc.size)}},
    }
    if pvc.storage_class_name:
        spec["storageClassName"] = pvc.storage_class_name
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _metadata(run, uid, ns, ChildNames(_run_name(run)).storage, "storage"),
            "spec": spec,
        }
    )


def build_network_policy(
    run: api.TrainingRun, uid: str, ns: str, settings: OperatorSettings
) -> Obj:
    """NetworkPolicy `<run>-ray`: the run's pods talk to each other on any port (Ray); the
    operator (/progress) and the configured Prometheus (/metrics) reach the telemetry port;
    nothing else gets in. Namespaces are selected by labels the installer sets, never by
    `kubernetes.io/metadata.name`, which Kubernetes 1.20 does not have."""
    run_name = _run_name(run)
    own_pods = {"podSelector": {"matchLabels": {LABEL_RUN: run_name}}}
    operator_namespace = settings.operator_namespace_selector or {
        "matchLabels": {"name": settings.operator_namespace}
    }
    telemetry = [
        {
            "namespaceSelector": copy.deepcopy(operator_namespace),
            "podSelector": {"matchLabels": dict(settings.operator_pod_labels)},
        }
    ]
    prometheus = {
        key: copy.deepcopy(selector)
        for key, selector in (
            ("namespaceSelector", settings.prometheus_namespace_selector),
            ("podSelector", settings.prometheus_pod_selector),
        )
        if selector is not None
    }
    if prometheus:
        telemetry.append(prometheus)
    return with_input_hash(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _metadata(run, uid, ns, ChildNames(run_name).network_policy, "network"),
            "spec": {
                "podSelector": {"matchLabels": {LABEL_RUN: run_name}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [own_pods]},
                    {
                        "from": telemetry,
                        "ports": [{"protocol": "TCP", "port": settings.progress_port}],
                    },
                ],
            },
        }
    )


def _head_ports(settings: OperatorSettings) -> list[tuple[str, int]]:
    return [
        ("gcs", settings.ray_gcs_port),
        ("dashboard", settings.ray_dashboard_port),
        ("metrics", settings.progress_port),
    ]


def build_head_service(
    run: api.TrainingRun, uid: str, ns: str, attempt: int, settings: OperatorSettings
) -> Obj:
    """Headless Service `<run>-head`: a stable DNS name for the head of the current attempt.
    It selects that attempt only, so a new attempt's workers never find the previous,
    dying head (the reconciler rewrites the selector when it creates the attempt)."""
    run_name = _run_name(run)
    return with_input_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(run, uid, ns, ChildNames(run_name).head_service, "ray-head"),
            "spec": {
                "clusterIP": "None",
                "selector": {
                    LABEL_RUN: run_name,
                    LABEL_ROLE: ROLE_HEAD,
                    LABEL_ATTEMPT: str(attempt),
                },
                # Workers resolve the head while it starts, before any readiness.
                "publishNotReadyAddresses": True,
                "ports": [
                    {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                    for name, port in _head_ports(settings)
                ],
            },
        }
    )


# --------------------------------------------------------------------------------------
# Pods
# --------------------------------------------------------------------------------------


def _cpu_count(cpu: int | str) -> int:
    """Whole CPUs Ray may schedule on a worker: the quantity rounded down, at least 1."""
    # int() truncates the Decimal; kubernetes ships no type hints.
    return max(1, int(parse_quantity(cpu)))  # type: ignore[no-untyped-call]


def _env(run: api.TrainingRun, attempt: int, role: str, image: str) -> list[Obj]:
    """kubetrain's variables, then the user's merged by name, the later winning: the NCCL
    defaults (GPU workers) < spec.env < spec.podOverrides.<role>.env. Validation keeps
    kubetrain's names out of the user's."""
    names = ChildNames(_run_name(run))
    env: list[Obj] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": names.ray_token, "key": TOKEN_KEY}},
        },
        {"name": "KUBETRAIN_RUN", "value": names.run},
        {"name": "KUBETRAIN_ATTEMPT", "value": str(attempt)},
        # Recorded in each exported model's lineage.json.
        {"name": contract.IMAGE_ENV, "value": image},
    ]
    hf = run.spec.secrets.hugging_face_token
    if hf is not None:
        env.append({"name": "HF_TOKEN_PATH", "value": f"{HF_TOKEN_DIR}/{hf.key}"})
    gpu_worker = role == ROLE_WORKER and run.spec.resources.gpus_per_worker > 0
    defaults = [{"name": k, "value": v} for k, v in placement.NCCL_DEFAULTS] if gpu_worker else []
    # Validation guarantees value xor valueFrom; the wire shape is core/v1's EnvVar.
    override: api.PodOverride = getattr(run.spec.pod_overrides, role)
    user = [
        [var.model_dump(by_alias=True, exclude_none=True) for var in env]
        for env in (run.spec.env, override.env)
    ]
    return env + placement.merged_env(defaults, *user)


def _volumes(run: api.TrainingRun, role: str) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) shared by head and workers; `storage_mount` is added by the caller."""
    res = run.spec.resources
    shm = (
        placement.head_shared_memory(res)
        if role == ROLE_HEAD
        else placement.worker_shared_memory(res)
    )
    volumes: list[Obj] = [
        # The root filesystem is read-only; Ray and Python need these writable.
        {"name": "tmp", "emptyDir": {}},
        {"name": "ray-home", "emptyDir": {}},
        # Ray's object store, NCCL and data loaders use /dev/shm; the container default is
        # 64Mi (sizing rule: placement.shared_memory_size).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "config", "configMap": {"name": ChildNames(_run_name(run)).config}},
    ]
    mounts: list[Obj] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "ray-home", "mountPath": "/home/ray"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    hf = run.spec.secrets.hugging_face_token
    if hf is not None:
        volumes.append(
            {
                "name": "hf-token",
                "secret": {
                    "secretName": hf.name,
                    # Only the named key, readable by the pod's group (fsGroup) alone.
                    "items": [{"key": hf.key, "path": hf.key}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "hf-token", "mountPath": HF_TOKEN_DIR, "readOnly": True})
    return volumes, mounts


def _pod(
    run: api.TrainingRun,
    uid: str,
    ns: str,
    attempt: int,
    settings: OperatorSettings,
    *,
    name: str,
    role: str,
    container: Obj,
) -> Obj:
    spec = run.spec
    res = spec.resources
    component = "ray-head" if role == ROLE_HEAD else "ray-worker"
    metadata = _metadata(run, uid, ns, name, component)
    metadata["labels"] |= {LABEL_ATTEMPT: str(attempt), LABEL_ROLE: role}
    if role == ROLE_HEAD:
        metadata["annotations"] = pods.scrape_annotations(settings.progress_port)
    if res.queue_name:
        metadata["labels"][LABEL_QUEUE] = res.queue_name
        gang_labels, gang_annotations = overrides.gang_metadata(run, uid, attempt)
        metadata["labels"] |= gang_labels
        metadata["annotations"] = metadata.get("annotations", {}) | gang_annotations

    volumes, mounts = _volumes(run, role)
    claim = storage_claim_name(run)
    if claim is not None:
        volumes.append({"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
    else:
        # storage.uri (object store): the run's files live there, and the trainer derives
        # their URL itself (contract.run_url). The pod still needs local scratch at the
        # same mount: downloads (hub models, data), the driver's Ray state and the export
        # staged before upload. Its size is the node's: the API has no field for it yet.
        volumes.append({"name": STORAGE_VOLUME, "emptyDir": {}})
    mounts.append({"name": STORAGE_VOLUME, "mountPath": settings.storage_mount})
    # The claims of the run's pvc:// sources this role reads, read-only.
    extra_volumes, extra_mounts = claims.claim_volumes(spec, role, claim, STORAGE_VOLUME)
    volumes += extra_volumes
    mounts += extra_mounts

    image = run.spec.image or settings.image
    container = pods.container(run, settings, **container, env=_env(run, attempt, role, image))
    container["volumeMounts"] = mounts
    if spec.secrets.object_store is not None:
        container["envFrom"] = pods.object_store_env_from(spec.secrets.object_store)

    # A failed pod ends the attempt; the operator decides about retries.
    pod_spec = pods.pod_spec(run, [container], volumes, restart_policy="Never")
    if res.scheduler_name:
        pod_spec["schedulerName"] = res.scheduler_name
    if role == ROLE_WORKER:
        pod_spec |= overrides.worker_scheduling(run, attempt)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    override: api.PodOverride = getattr(spec.pod_overrides, role)
    return with_input_hash(overrides.apply_override(pod, override, container["name"]))


def build_head_pod(
    run: api.TrainingRun, uid: str, ns: str, attempt: int, settings: OperatorSettings
) -> Obj:
    """Ray head `<run>-a<attempt>-head`: runs the driver (`kubetrain run`), not training."""
    head = run.spec.resources.head
    script = (
        f"ray start --head --port={settings.ray_gcs_port} --dashboard-host=0.0.0.0"
        f" --dashboard-port={settings.ray_dashboard_port}"
        # A head that cannot start Ray is the infrastructure's failure (retried), not exit 1.
        f" --num-cpus=0 --disable-usage-stats || exit {EXIT_RAY_UNAVAILABLE}"
        f" && exec kubetrain run {CONFIG_DIR}/{CONFIG_KEY} --address auto"
        # The run's folder is keyed by its uid (contract.run_folder): --resume continues
        # this run's earlier attempts, never an earlier run of the same name.
        f" --output-dir {settings.storage_mount} --run-uid {uid} --resume"
        f" --metrics-port {settings.progress_port} --metrics-host 0.0.0.0"
        f" --termination-log {TERMINATION_LOG}"
    )
    container = {
        "name": HEAD_CONTAINER,
        # The guard is PID 1: it passes SIGTERM on in every phase (bash, then the driver, as
        # PID 1 would drop it) and ends the container as OOMKilled if Ray's processes are.
        "command": [*OOM_GUARD_COMMAND, "bash", "-c", script],
        # The driver's result summary (JSON: model, final metrics, gate) becomes the
        # container's termination message, which the operator reads from the pod status.
        # File, not FallbackToLogsOnError: log lines never end up in the pod status.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in _head_ports(settings)
        ],
        "resources": resources(head.cpu, head.memory),
        # Ready once Ray's GCS accepts connections: what workers dial first.
        "readinessProbe": {
            "tcpSocket": {"port": "gcs"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
    }
    name = ChildNames(_run_name(run), attempt).head_pod
    return _pod(run, uid, ns, attempt, settings, name=name, role=ROLE_HEAD, container=container)


def build_worker_pods(
    run: api.TrainingRun, uid: str, ns: str, attempt: int, settings: OperatorSettings
) -> list[Obj]:
    """Ray workers `<run>-a<attempt>-worker-<i>`, one per spec.resources.workers."""
    res = run.spec.resources
    names = ChildNames(_run_name(run), attempt)
    head = f"{names.head_host(ns)}:{settings.ray_gcs_port}"
    script = (
        # Wait for the head's GCS first: with restartPolicy Never, a worker that starts
        # before the head would fail and spend one of the run's retries (KubeRay waits too).
        f"until ray health-check --address={head} >/dev/null 2>&1; do sleep 2; done"
        f" && exec ray start --address={head}"
        f" --num-cpus={_cpu_count(res.cpu_per_worker)} --num-gpus={res.gpus_per_worker}"
        # Slots for exactly this pod's share of the ranks (the trainer asks one per rank).
        f""" --resources='{{"{WORKER_SLOT_RESOURCE}": {processes_per_worker(run.spec)}}}'"""
        " --block --disable-usage-stats"
    )
    worker_resources = resources(res.cpu_per_worker, res.memory_per_worker, res.gpus_per_worker)
    for amounts in worker_resources.values():
        # Extended resources (RDMA HCAs, ...): request = limit, as Kubernetes requires.
        amounts |= {name: str(q) for name, q in res.extended_resources_per_worker.items()}
    container = {
        "name": WORKER_CONTAINER,
        # The OOM killer picks a training actor, not the container: the guard ends the
        # container then, so the runtime reports OOMKilled (kubetrain_trainer/oomguard.py).
        "command": [*OOM_GUARD_COMMAND, "bash", "-c", script],
        "resources": worker_resources,
    }
    return [
        _pod(
            run,
            uid,
            ns,
            attempt,
            settings,
            name=names.worker_pod(i),
            role=ROLE_WORKER,
            container=container,
        )
        for i in range(res.workers)
    ]


def build_cluster(
    run: api.TrainingRun,
    uid: str,
    ns: str,
    attempt: int,
    settings: OperatorSettings,
    token: str,
) -> list[Obj]:
    """Every child of one attempt, in the order the reconciler applies them: what pods
    mount or dial exists before the pods."""
    storage = build_storage_pvc(run, uid, ns)
    return [
        build_config_map(run, uid, ns),
        build_ray_token_secret(run, uid, ns, token),
        *([storage] if storage is not None else []),
        build_network_policy(run, uid, ns, settings),
        build_head_service(run, uid, ns, attempt, settings),
        build_head_pod(run, uid, ns, attempt, settings),
        *build_worker_pods(run, uid, ns, attempt, settings),
    ]

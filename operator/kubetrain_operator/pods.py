"""The pod base every kubetrain pod is built on, training (builders.py) and serving
(serving.py) alike: the restricted security context, scheduling (tolerations, node
selector, priority), image pull secrets, the container's image and security, Guaranteed
resources, and the Prometheus scrape annotations. Pure, like the builders.
"""

from __future__ import annotations

from typing import Any

from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import (
    ANNOTATION_SCRAPE,
    ANNOTATION_SCRAPE_PATH,
    ANNOTATION_SCRAPE_PORT,
    METRICS_PATH,
)
from kubetrain_operator.settings import OperatorSettings

Obj = dict[str, Any]

GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS = 1000


def pod_security_context() -> Obj:
    """The restricted Pod Security profile at pod level, shared by every kubetrain pod."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        # Skips the recursive chown of a large checkpoint volume on every pod start.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Obj:
    """The restricted profile per container, plus a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def object_store_env_from(secret: api.SecretRef) -> list[Obj]:
    """The object-store Secret (spec.secrets.objectStore) as the container's environment:
    every key becomes a variable (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, when set,
    AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which boto and s3fs read.
    By reference: the values never pass through the operator. A missing Secret keeps the
    pod from starting (CreateContainerConfigError), rather than running without them."""
    return [{"secretRef": {"name": secret.name}}]


def resources(cpu: int | str, memory: int | str, gpus: int = 0) -> Obj:
    # requests == limits: Guaranteed QoS, so training is the last thing a node evicts.
    amounts = {"cpu": str(cpu), "memory": str(memory)}
    if gpus > 0:
        amounts[GPU_RESOURCE] = str(gpus)
    return {"requests": amounts, "limits": dict(amounts)}


def scrape_annotations(port: int) -> dict[str, str]:
    """Plain Prometheus (no Prometheus Operator) finds a pod's series by these."""
    return {
        ANNOTATION_SCRAPE: "true",
        ANNOTATION_SCRAPE_PORT: str(port),
        ANNOTATION_SCRAPE_PATH: METRICS_PATH,
    }


def image_container(image: str, pull_policy: str, **fields: Any) -> Obj:
    """A restricted container of `image` with `fields` (any owner: a run, a ModelService)."""
    return {
        **fields,
        "image": image,
        "imagePullPolicy": pull_policy,
        "securityContext": container_security_context(),
    }


def container(run: api.TrainingRun, settings: OperatorSettings, **fields: Any) -> Obj:
    """A container of the run's image (or the installation's), restricted, with `fields`."""
    return image_container(run.spec.image or settings.image, run.spec.image_pull_policy, **fields)


def restricted_pod_spec(
    containers: list[Obj],
    volumes: list[Obj],
    pull_secrets: list[api.SecretRef],
    *,
    restart_policy: str | None = None,
) -> Obj:
    """The pod base of every kubetrain pod: no service-account token or service links, the
    restricted security context, and the registry credentials `pull_secrets`."""
    pod: Obj = {}
    if restart_policy is not None:
        pod["restartPolicy"] = restart_policy
    pod |= {
        "automountServiceAccountToken": False,
        # Service env vars for every Service in the namespace are noise, and a leak.
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": containers,
        "volumes": volumes,
    }
    if pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in pull_secrets]
    return pod


def pod_spec(
    run: api.TrainingRun,
    containers: list[Obj],
    volumes: list[Obj],
    *,
    restart_policy: str | None = None,
    node_selector: bool = True,
    priority: bool = True,
) -> Obj:
    """A pod spec with no service-account token or service links, the restricted security
    context, the run's tolerations and pull secrets, and (when asked) its node selector and
    priority class. Tolerations only permit nodes, so every kubetrain pod carries them."""
    spec, res = run.spec, run.spec.resources
    pod = restricted_pod_spec(
        containers, volumes, spec.image_pull_secrets, restart_policy=restart_policy
    )
    pulls = pod.pop("imagePullSecrets", None)
    if node_selector and res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations
        ]
    if priority and res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    if pulls is not None:  # last, as before: the rendered key order stays the same
        pod["imagePullSecrets"] = pulls
    return pod

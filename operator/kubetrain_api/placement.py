"""Placement of a run's Ray pods on a GPU cluster: the rules on `spec.resources`' scheduling
fields and `spec.podOverrides`, the `/dev/shm` sizing rule, and the multi-node storage check.

Pure and light (standard library and the API models only): `validation` turns the
`(path, message)` pairs yielded here into FieldErrors, the operator's builders read the
sizing rule and the reserved names, and the docs quote both.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, get_args

from kubetrain_api import k8s_rules
from kubetrain_api import v1alpha1 as api

Problem = tuple[str, str]

# --------------------------------------------------------------------------------------
# /dev/shm
# --------------------------------------------------------------------------------------

OBJECT_STORE_FRACTION: Final = Decimal("0.3")
"""Ray's default object store size as a share of the memory it sees (the pod's limit); the
object store lives in /dev/shm, and Ray falls back to slower /tmp when /dev/shm is smaller."""
SHM_HEADROOM_BYTES: Final = 1 << 30
"""Beyond the object store: NCCL's shared-memory transport between local ranks, and data
loaders' worker processes."""
_MI = 1 << 20


def quantity_value(quantity: int | str) -> Decimal:
    """A Kubernetes quantity (`16Gi`, `500m`, `1e3`, 4) as a number; ValueError otherwise."""
    return k8s_rules.parse_quantity(quantity)


def shared_memory_size(memory: int | str) -> str:
    """Default size of a pod's /dev/shm for a pod of `memory`: Ray's object store share of
    it plus SHM_HEADROOM_BYTES, rounded up to a whole Mi (e.g. 16Gi -> 5940Mi)."""
    needed = quantity_value(memory) * OBJECT_STORE_FRACTION + SHM_HEADROOM_BYTES
    return f"{math.ceil(needed / _MI)}Mi"


def worker_shared_memory(resources: api.Resources) -> str:
    """/dev/shm of a worker pod: as set, else the default rule on memoryPerWorker."""
    if resources.shared_memory is not None:
        return str(resources.shared_memory)
    return shared_memory_size(resources.memory_per_worker)


def head_shared_memory(resources: api.Resources) -> str:
    """/dev/shm of the head pod: as set, else the default rule on the head's memory."""
    if resources.shared_memory is not None:
        return str(resources.shared_memory)
    return shared_memory_size(resources.head.memory)


# --------------------------------------------------------------------------------------
# NCCL defaults
# --------------------------------------------------------------------------------------

NCCL_DEFAULTS: Final[tuple[tuple[str, str], ...]] = (
    # A pod's cluster network is eth0; secondary (e.g. Multus) interfaces may not route
    # between pods, and NCCL's own pick can land on one. RDMA data paths are not affected
    # (NCCL_IB_* / the HCA), only the socket bootstrap and the TCP fallback.
    ("NCCL_SOCKET_IFNAME", "eth0"),
    ("GLOO_SOCKET_IFNAME", "eth0"),
    # Errors and warnings in the worker logs, without INFO's per-rank topology dumps.
    ("NCCL_DEBUG", "WARN"),
    # A rank whose collective times out (TorchConfig's process-group timeout) aborts the
    # communicator and fails, so the attempt ends and is retried instead of hanging.
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
)
"""Env of GPU worker pods unless the run's env (spec.env, podOverrides.worker.env) sets it."""

# --------------------------------------------------------------------------------------
# reserved names
# --------------------------------------------------------------------------------------

RAY_CONTAINERS: Final = frozenset({"ray-head", "ray-worker"})
"""The containers the operator builds (builders.HEAD_CONTAINER, WORKER_CONTAINER)."""
RESERVED_VOLUMES: Final = frozenset({"tmp", "ray-home", "dshm", "config", "storage", "hf-token"})
"""Volumes the operator builds (and `pvc-*`, the claims of pvc:// sources)."""
RESERVED_VOLUME_PREFIX: Final = "pvc-"
RESTRICTED_VOLUME_TYPES: Final = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim"}
    | {"projected", "secret"}
)
"""The volume types the restricted Pod Security profile admits."""
MOUNTABLE_BUILDER_VOLUMES: Final = frozenset({"storage", "config", "tmp"})
"""Builder volumes an override may mount elsewhere too (e.g. a sidecar reading storage)."""
RESERVED_MOUNT_PATHS: Final = (
    "/tmp",
    "/home/ray",
    "/dev/shm",
    "/etc/kubetrain",
    "/storage",
    "/mnt/pvc",
    "/var/run/secrets",
)
"""Paths the operator mounts (the storage mount is the operator's default, settings
storage_mount); an override may not mount at or below them."""
RESERVED_LABEL_PREFIXES: Final = ("kubetrain.dev/", "app.kubernetes.io/", "kueue.x-k8s.io/")
RESERVED_ANNOTATION_PREFIXES: Final = ("kubetrain.dev/", "kueue.x-k8s.io/", "prometheus.io/")
# Extended resources that have fields of their own, or are not extended resources.
_RESERVED_RESOURCES = ("nvidia.com/gpu",)
_RESERVED_RESOURCE_DOMAINS = ("kubernetes.io/", "requests.")

# Qualified names (label and annotation keys) and label values as the API server checks
# them (minimal local copies; k8s_rules.py has the full rules).
_DNS_LABEL = re.compile(api.DNS_LABEL)
MAX_LOOSE_OBJECT_BYTES: Final = 16 * 1024
"""A bound on each object passed through loosely (a volume, a container, a constraint)."""

# Container securityContext keys a user's init container or sidecar may set: the restricted
# context is applied under them and the rest is the operator's.
_USER_SECURITY_KEYS = frozenset({"capabilities", "runAsUser", "runAsGroup"})


# --------------------------------------------------------------------------------------
# rules (validation.py wraps them into FieldErrors)
# --------------------------------------------------------------------------------------


def problems(spec: api.TrainingRunSpec) -> Iterator[Problem]:
    """Every placement problem of a spec, as (field path, message)."""
    yield from _resource_problems(spec.resources)
    for role in ("head", "worker"):
        override: api.PodOverride = getattr(spec.pod_overrides, role)
        yield from _override_problems(override, role, f"spec.podOverrides.{role}")
    yield from _storage_problems(spec)


def _resource_problems(res: api.Resources) -> Iterator[Problem]:
    base = "spec.resources"
    for name, amount in res.extended_resources_per_worker.items():
        path = f"{base}.extendedResourcesPerWorker.{name}"
        if not re.match(api.EXTENDED_RESOURCE, name) or len(name) > 253:
            yield path, "must be a domain-qualified resource name such as rdma/hca"
        elif name in _RESERVED_RESOURCES:
            yield path, "is gpusPerWorker's; set that instead"
        elif name.startswith(_RESERVED_RESOURCE_DOMAINS):
            yield path, "is not an extended resource (kubernetes.io/ and requests. are reserved)"
        try:
            value = quantity_value(amount)
        except ValueError:
            continue  # the schema's quantity check reports it
        if value <= 0 or value != value.to_integral_value():
            yield path, "must be a whole number > 0 (extended resources are not divisible)"
    for i, constraint in enumerate(res.worker_topology_spread_constraints):
        path = f"{base}.workerTopologySpreadConstraints[{i}]"
        yield from _loose_problems(constraint, path)
        if not isinstance(constraint.get("topologyKey"), str):
            yield (
                f"{path}.topologyKey",
                "required (a node label key such as kubernetes.io/hostname)",
            )
    if res.worker_affinity is not None:
        for key, part in res.worker_affinity.model_dump(by_alias=True, exclude_none=True).items():
            yield from _loose_problems(part, f"{base}.workerAffinity.{key}")


def _loose_problems(obj: Mapping[str, Any], path: str) -> Iterator[Problem]:
    size = len(json.dumps(obj, default=str))
    if size > MAX_LOOSE_OBJECT_BYTES:
        yield path, f"is {size} bytes; the limit is {MAX_LOOSE_OBJECT_BYTES}"


def _override_problems(o: api.PodOverride, role: str, base: str) -> Iterator[Problem]:
    for key, value in o.labels.items():
        path = f"{base}.labels.{key}"
        problems = k8s_rules.check_label_key(key)
        yield from ((path, p) for p in problems)
        if not problems and key.startswith(RESERVED_LABEL_PREFIXES):
            yield path, f"{key} is reserved: kubetrain sets its labels (queue: resources.queueName)"
        yield from ((path, f"value {p}") for p in k8s_rules.check_label_value(value))
    for key in o.annotations:
        path = f"{base}.annotations.{key}"
        problems = k8s_rules.check_label_key(key)
        yield from ((path, p) for p in problems)
        if not problems and key.startswith(RESERVED_ANNOTATION_PREFIXES):
            yield path, f"{key} is reserved: kubetrain sets it"

    volume_names: set[str] = set()
    for i, volume in enumerate(o.volumes):
        path = f"{base}.volumes[{i}]"
        name = volume.get("name")
        yield from _loose_problems(volume, path)
        if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 63:
            yield f"{path}.name", "must be a lowercase DNS label"
            continue
        if name in RESERVED_VOLUMES or name.startswith(RESERVED_VOLUME_PREFIX):
            yield f"{path}.name", f"{name} is one of kubetrain's volumes; choose another name"
        elif name in volume_names:
            yield f"{path}.name", f"duplicate volume {name}"
        volume_names.add(name)
        kinds = sorted(set(volume) - {"name"})
        if len(kinds) != 1 or kinds[0] not in RESTRICTED_VOLUME_TYPES:
            yield (
                path,
                (
                    f"must have exactly one volume type of {sorted(RESTRICTED_VOLUME_TYPES)} "
                    "(the pods run under the restricted Pod Security profile)"
                ),
            )

    mountable = volume_names | MOUNTABLE_BUILDER_VOLUMES
    paths: set[str] = set()
    for i, mount in enumerate(o.volume_mounts):
        path = f"{base}.volumeMounts[{i}]"
        if mount.name not in mountable:
            yield f"{path}.name", f"no volume {mount.name} in {base}.volumes"
        normalized = mount.mount_path.rstrip("/") or "/"
        if _under_reserved(normalized):
            yield f"{path}.mountPath", f"{mount.mount_path} is at or under a path kubetrain mounts"
        elif normalized in paths:
            yield f"{path}.mountPath", f"duplicate mount path {mount.mount_path}"
        paths.add(normalized)

    container_names: set[str] = set()
    for field, containers in (("initContainers", o.init_containers), ("sidecars", o.sidecars)):
        if field == "sidecars" and role == "head" and containers:
            yield (
                f"{base}.sidecars",
                (
                    "the head takes no sidecars: its pod ends when every container does, and "
                    "Kubernetes 1.20 has no native sidecars; use initContainers or the workers"
                ),
            )
            continue
        for i, container in enumerate(containers):
            path = f"{base}.{field}[{i}]"
            yield from _loose_problems(container, path)
            name = container.get("name")
            if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 63:
                yield f"{path}.name", "must be a lowercase DNS label"
            elif name in RAY_CONTAINERS:
                yield (
                    f"{path}.name",
                    (
                        f"{name} is the Ray container: its command, image and security context "
                        "are kubetrain's; add env, volumeMounts or capabilities instead"
                    ),
                )
            elif name in container_names:
                yield f"{path}.name", f"duplicate container {name}"
            else:
                container_names.add(name)
            yield from _container_security_problems(container, f"{path}.securityContext")


def _under_reserved(path: str) -> bool:
    if path == "/":
        return True
    return any(path == r or path.startswith(r + "/") for r in RESERVED_MOUNT_PATHS)


def _container_security_problems(container: Mapping[str, Any], path: str) -> Iterator[Problem]:
    ctx = container.get("securityContext")
    if ctx is None:
        return
    if not isinstance(ctx, Mapping):
        yield path, "must be an object"
        return
    for key in ctx:
        if key not in _USER_SECURITY_KEYS:
            yield (
                f"{path}.{key}",
                (
                    "is kubetrain's: containers run with the restricted security context "
                    "(non-root, no privilege escalation, capabilities dropped, read-only root)"
                ),
            )
    for key in ("runAsUser", "runAsGroup"):
        value = ctx.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            yield f"{path}.{key}", "must be a non-root id (> 0)"
    caps = ctx.get("capabilities")
    if caps is not None:
        allowed = set(get_args(api.Capability))
        if not isinstance(caps, Mapping) or set(caps) - {"add"}:
            yield f"{path}.capabilities", "only `add` may be set; kubetrain drops ALL"
        else:
            for i, cap in enumerate(caps.get("add") or []):
                if cap not in allowed:
                    yield f"{path}.capabilities.add[{i}]", f"must be one of {sorted(allowed)}"


# --------------------------------------------------------------------------------------
# storage across nodes
# --------------------------------------------------------------------------------------


def operator_claim_is_rwo(spec: api.TrainingRunSpec) -> bool:
    """The operator creates the run's claim ReadWriteOnce: a claim it creates with the
    cluster's default class (builders.build_storage_pvc)."""
    pvc = spec.checkpoint.storage.pvc
    return pvc is not None and not pvc.claim_name and not pvc.storage_class_name


def spreads_across_nodes(res: api.Resources) -> bool:
    """The run asks its workers onto different nodes (or zones): pod anti-affinity or a
    topology spread constraint."""
    anti = res.worker_affinity is not None and res.worker_affinity.pod_anti_affinity
    return bool(anti) or bool(res.worker_topology_spread_constraints)


_RWO_ADVICE = (
    "set checkpoint.storage.pvc.storageClassName to a ReadWriteMany class, name an RWX "
    "claim in claimName, or use checkpoint.storage.uri (an object store)"
)


def _storage_problems(spec: api.TrainingRunSpec) -> Iterator[Problem]:
    if operator_claim_is_rwo(spec) and spreads_across_nodes(spec.resources):
        yield (
            "spec.checkpoint.storage.pvc",
            (
                "the claim kubetrain creates with the default class is ReadWriteOnce (one node), "
                "but the workers are spread across nodes: pods on other nodes would wait on "
                f"Multi-Attach forever; {_RWO_ADVICE}"
            ),
        )


def warnings(spec: api.TrainingRunSpec) -> list[Problem]:
    """Accepted but risky: (field path, message). `kubetrain validate` prints them."""
    out: list[Problem] = []
    res = spec.resources
    # GPU runs: the head (no GPU) and the GPU workers rarely share a node. CPU runs on one
    # node (kind, the quickstart) are the RWO claim's intended use and get no warning.
    if operator_claim_is_rwo(spec) and not spreads_across_nodes(res) and res.gpus_per_worker > 0:
        out.append(
            (
                "spec.checkpoint.storage.pvc",
                "the claim kubetrain creates with the default class is ReadWriteOnce: the "
                "head and every worker must land on one node, or the others wait on "
                f"Multi-Attach; for several nodes {_RWO_ADVICE}",
            )
        )
    return out


def merged_env(*layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Env lists merged by name, a later layer's variable replacing an earlier one in place
    (new names go at the end). Pure; used by the builders."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for var in layer:
            merged[str(var["name"])] = dict(var)
    return list(merged.values())

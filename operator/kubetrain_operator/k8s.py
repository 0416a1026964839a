"""Kubernetes I/O for the reconciler: create-or-adopt, delete, list, status, events.

The only module that talks to the API server. Every call is retried on conflicts, throttling
(429, honouring Retry-After), server errors and timeouts, and every mutating call is counted
(`kubetrain_operator_api_calls_total`) so tests can assert that a converged run causes none.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import ANNOTATION_INPUT_HASH
from kubetrain_operator import metrics, ownership

log = logging.getLogger("kubetrain.k8s")
T = TypeVar("T")

# Not 409: the same request would conflict again (a create's AlreadyExists is adopted; a
# stale replace is redone by the next reconcile from a fresh read).
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_ATTEMPTS = 5


# Kinds reached through the generic /apis/<group>/<version>/namespaces/<ns>/<plural> paths,
# which CustomObjectsApi serves for any API group. The typed client has no policy/v1beta1
# (gone from Kubernetes 1.25), which the PodDisruptionBudget needs on older servers; the
# version comes from the object, or the caller, or else the default here.
KINDS = {api.PLURAL: api.KIND, ms.PLURAL: ms.KIND}
GENERIC_KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling/v1", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Job": ("batch/v1", "jobs"),
}


class KubeError(RuntimeError):
    """An API call that failed after its retries, or for good (403, 422, ...)."""


def _retry(call: Callable[[], T], what: str) -> T:
    delay = 0.2
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return call()
        except ApiException as exc:
            metrics.API_ERRORS.labels(code=str(exc.status)).inc()
            if exc.status not in RETRYABLE_STATUS or attempt == MAX_ATTEMPTS:
                raise
            retry_after = (exc.headers or {}).get("Retry-After")
            wait = float(retry_after) if retry_after else delay
        except (urllib3.exceptions.HTTPError, OSError):
            metrics.API_ERRORS.labels(code="connection").inc()
            if attempt == MAX_ATTEMPTS:
                raise
            wait = delay
        log.info("retrying %s in %.1fs (attempt %d)", what, wait, attempt)
        time.sleep(wait)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def _ok_if_missing(call: Callable[[], Any]) -> bool:
    try:
        call()
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: keys gone from `new`
    become null, nested objects recurse, anything else is replaced whole."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            patch[key] = merge_patch(before, value)
        else:
            patch[key] = value
    return patch


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster credentials, else the kubeconfig named by KUBECONFIG, read now (the
    kubernetes package captures the variable when it is imported)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=config
        )
    return config


class Kube:
    """Typed access to what the operator touches."""

    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        self.client = client or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.net = kubernetes.client.NetworkingV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.mutations: Counter[tuple[str, str]] = Counter()  # this client's writes

    @staticmethod
    def from_environment() -> Kube:
        return Kube(kubernetes.client.ApiClient(load_configuration()))

    def _count(self, verb: str, kind: str) -> None:
        self.mutations[(verb, kind)] += 1
        metrics.API_CALLS.labels(verb=verb, resource=kind).inc()

    # Children ---------------------------------------------------------------------------

    def _generic_ops(self, kind: str, api_version: str | None) -> tuple[Any, Any, Any, Any]:
        default, plural = GENERIC_KINDS[kind]
        group, _, version = (api_version or default).rpartition("/")
        custom = self.custom
        return (
            lambda ns, body: custom.create_namespaced_custom_object(
                group, version, ns, plural, body
            ),
            lambda name, ns: custom.get_namespaced_custom_object(group, version, ns, plural, name),
            lambda name, ns, body: custom.replace_namespaced_custom_object(
                group, version, ns, plural, name, body
            ),
            lambda name, ns, **kwargs: custom.delete_namespaced_custom_object(
                group, version, ns, plural, name, **kwargs
            ),
        )

    def _ops(self, kind: str, api_version: str | None = None) -> tuple[Any, Any, Any, Any]:
        """(create, read, replace, delete) for a child kind."""
        if kind in GENERIC_KINDS:
            return self._generic_ops(kind, api_version)
        core, net = self.core, self.net
        table: dict[str, tuple[Any, Any, Any, Any]] = {
            "ConfigMap": (
                core.create_namespaced_config_map,
                core.read_namespaced_config_map,
                core.replace_namespaced_config_map,
                core.delete_namespaced_config_map,
            ),
            "Secret": (
                core.create_namespaced_secret,
                core.read_namespaced_secret,
                core.replace_namespaced_secret,
                core.delete_namespaced_secret,
            ),
            "Service": (
                core.create_namespaced_service,
                core.read_namespaced_service,
                core.replace_namespaced_service,  # keeping the allocated cluster IPs
                core.delete_namespaced_service,
            ),
            "PersistentVolumeClaim": (
                core.create_namespaced_persistent_volume_claim,
                core.read_namespaced_persistent_volume_claim,
                None,  # PVC specs are immutable once bound
                core.delete_namespaced_persistent_volume_claim,
            ),
            "Pod": (
                core.create_namespaced_pod,
                core.read_namespaced_pod,
                None,  # a pod's spec is immutable; a new attempt gets new pods
                core.delete_namespaced_pod,
            ),
            "NetworkPolicy": (
                net.create_namespaced_network_policy,
                net.read_namespaced_network_policy,
                net.replace_namespaced_network_policy,
                net.delete_namespaced_network_policy,
            ),
        }
        return table[kind]

    def ensure(self, obj: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create `obj`, or adopt the existing one (409); replace it only when its input hash
        differs and the kind allows it. `live`, when known, saves the read. An existing
        object that the run of `obj` does not own is never touched: ChildConflict."""
        kind, meta = obj["kind"], obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        create, read, replace, _ = self._ops(kind, obj["apiVersion"])
        if live is None:
            try:
                self._count("create", kind)
                return dict(
                    self.client.sanitize_for_serialization(
                        _retry(lambda: create(ns, obj), f"create {kind} {name}")
                    )
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise
            live = self.client.sanitize_for_serialization(
                _retry(lambda: read(name, ns), f"read {kind} {name}")
            )
        assert live is not None
        ownership.check(obj, live)
        want = meta.get("annotations", {}).get(ANNOTATION_INPUT_HASH)
        have = (live.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_INPUT_HASH)
        if want != have and replace is not None:
            body = {
                **obj,
                "metadata": {**meta, "resourceVersion": live["metadata"]["resourceVersion"]},
            }
            if kind == "Deployment" and "replicas" not in obj["spec"]:
                # An HPA owns the replica count: keep it rather than reset it to 1.
                body["spec"] = {**obj["spec"], "replicas": live["spec"].get("replicas")}
            if kind == "Service":
                # The server allocated these, and an update must repeat them.
                ips = {k: v for k, v in live["spec"].items() if k in ("clusterIP", "clusterIPs")}
                body["spec"] = {**obj["spec"], **ips}
            self._count("replace", kind)
            return dict(
                self.client.sanitize_for_serialization(
                    _retry(lambda: replace(name, ns, body), f"replace {kind} {name}")
                )
            )
        return dict(live)

    def delete(self, kind: str, ns: str, name: str, api_version: str | None = None) -> bool:
        """Delete a child (background propagation); False when it was already gone."""
        _, _, _, delete = self._ops(kind, api_version)
        self._count("delete", kind)
        # The raw answer, not a model: for some kinds (a Service on Kubernetes 1.20) the
        # server answers a delete with a Status the client cannot read as that kind.
        return _ok_if_missing(
            lambda: _retry(
                lambda: delete(name, ns, propagation_policy="Background", _preload_content=False),
                f"delete {kind} {name}",
            )
        )

    def list_pods(self, ns: str, selector: str) -> list[dict[str, Any]]:
        out = _retry(
            lambda: self.core.list_namespaced_pod(ns, label_selector=selector), "list pods"
        )
        return [self.client.sanitize_for_serialization(p) for p in out.items]

    def read(
        self, kind: str, ns: str, name: str, api_version: str | None = None
    ) -> dict[str, Any] | None:
        """A child by name, or None when it does not exist."""
        _, read, _, _ = self._ops(kind, api_version)
        try:
            obj = _retry(lambda: read(name, ns), f"read {kind} {name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.client.sanitize_for_serialization(obj))

    def set_pvc_owners(self, ns: str, name: str, refs: list[dict[str, Any]]) -> None:
        """Replace a PVC's owner references (a merge patch of that field only: PVC specs
        are immutable once bound, so the claim is never replaced)."""
        body = {"metadata": {"ownerReferences": refs}}
        self._count("patch", "PersistentVolumeClaim")
        _retry(
            lambda: self.core.patch_namespaced_persistent_volume_claim(
                name, ns, body, _content_type="application/merge-patch+json"
            ),
            f"patch owners of PersistentVolumeClaim {name}",
        )

    def served_versions(self, group: str) -> set[str]:
        """The `group/version`s the API server serves for `group` (discovery, which every
        authenticated client may read)."""
        groups = _retry(
            lambda: kubernetes.client.ApisApi(self.client).get_api_versions(), "discovery"
        )
        return {
            version.group_version
            for found in groups.groups
            if found.name == group
            for version in found.versions
        }

    def read_secret(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.read("Secret", ns, name)

    def read_config_map(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.read("ConfigMap", ns, name)

    # The TrainingRun ---------------------------------------------------------------------

    def read_run(self, ns: str, name: str) -> dict[str, Any] | None:
        """The run as stored now, or None when it is gone."""
        return self.read_custom(api.PLURAL, ns, name)

    def read_service(self, ns: str, name: str) -> dict[str, Any] | None:
        """The ModelService as stored now, or None when it is gone."""
        return self.read_custom(ms.PLURAL, ns, name)

    def read_custom(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        """One of our custom objects (a TrainingRun, a ModelService), or None."""
        try:
            obj = _retry(
                lambda: self.custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, ns, plural, name
                ),
                f"read {plural} {name}",
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(cast(dict[str, Any], obj))

    def patch_status(
        self,
        ns: str,
        name: str,
        status: dict[str, Any],
        previous: dict[str, Any] | None = None,
        plural: str = api.PLURAL,
    ) -> None:
        """Make the stored status `status`. The API server merges the patch into what it
        has (RFC 7386), so fields `previous` had and `status` lacks are sent as null."""
        self._count("patch", f"{KINDS[plural]}/status")
        body = {"status": merge_patch(previous or {}, status)}
        _retry(
            lambda: self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, ns, plural, name, body
            ),
            f"patch status of {name}",
        )

    def delete_run(self, ns: str, name: str) -> None:
        self._count("delete", "TrainingRun")
        _ok_if_missing(
            lambda: self.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL, name, propagation_policy="Background"
            )
        )

    def event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about the run or ModelService (what `kubectl describe` shows)."""
        meta = run["metadata"]
        now = datetime.now(timezone.utc)
        # A plain dict: the client serializes it as is (its stubs ask for a model).
        body: Any = {
            "metadata": {
                "generateName": f"{meta['name']}.",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": run.get("kind") or api.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "kubetrain-operator"},
            "reportingComponent": "kubetrain-operator",
            "reportingInstance": f"kubetrain-operator-{uuid.getnode():x}",
        }
        self._count("create", "Event")
        try:
            _retry(lambda: self.core.create_namespaced_event(meta["namespace"], body), "post event")
        except ApiException as exc:  # events are best effort; never fail a reconcile on them
            log.warning("could not post event %s: %s", reason, exc.reason)

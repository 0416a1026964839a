"""Leader election on a coordination.k8s.io/v1 Lease (client-go's algorithm).

Why a Lease and not kopf's peering: Leases are served by every Kubernetes the operator
supports (GA since 1.14) and need no extra CRD; kopf's peering is priority-based, and
replicas of one Deployment share a priority, which kopf resolves by pausing them all.

The leader renews the Lease every `retry_period`; a candidate takes it over once it has
seen the same record, unrenewed, for `lease_duration` by its own clock (never comparing
the leader's timestamps with its clock, so clock skew does not matter). Writes carry the
resourceVersion they read, so two candidates cannot both win. A leader that could not
renew for `renew_deadline` stops leading before anyone may take over (`lease_duration` >
`renew_deadline`), and one that shuts down cleanly releases the Lease at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubetrain.leader")


def default_identity(pod_name: str = "") -> str:
    """Unique per process: the pod's name (or the host's) and a random tag."""
    return f"{pod_name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        on_started_leading: Callable[[], None],
        on_stopped_leading: Callable[[], None],
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.api = kubernetes.client.CoordinationV1Api(client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.on_started_leading, self.on_stopped_leading = on_started_leading, on_stopped_leading
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        # Each call is bounded by the retry period, so a leader whose renewals hang notices
        # within renew_deadline + 2 * retry_period, before a standby may take over.
        self.retry_period = retry_period
        self.leading = False
        self._observed: tuple[Any, ...] | None = None  # the record as last seen
        self._observed_at = 0.0  # monotonic time it was first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-elector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning; a leader releases the Lease so a standby takes over at once."""
        self._stop.set()
        self._thread.join(timeout=self.renew_deadline)
        if self.leading:
            self._release()

    def _run(self) -> None:
        renewed = 0.0
        while not self._stop.is_set():
            try:
                ok = self._try_acquire_or_renew()
            except Exception as exc:  # the API server may be away for a while
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                ok = False
            now = time.monotonic()
            if ok:
                renewed = now
                if not self.leading:
                    log.info(
                        "leading as %s (lease %s/%s)", self.identity, self.namespace, self.name
                    )
                    self.leading = True
                    self.on_started_leading()
            elif self.leading and now - renewed >= self.renew_deadline:
                log.warning("lost the lease %s/%s: standing by", self.namespace, self.name)
                self.leading = False
                self.on_stopped_leading()
            self._stop.wait(self.retry_period)

    def _spec(self, acquired: str | None, transitions: int, holder: str | None = None) -> Any:
        now = _micro_time(datetime.now(timezone.utc))
        return {
            "holderIdentity": self.identity if holder is None else holder,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _body(self, spec: Any, resource_version: str | None = None) -> Any:
        """A Lease as a plain dict (the client sends it as is; its stubs want a model)."""
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.retry_period
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api.api_client.sanitize_for_serialization(lease))

    def _try_acquire_or_renew(self) -> bool:
        lease = self._read()
        if lease is None:
            body = self._body(self._spec(None, 0))
            return self._write(
                lambda: self.api.create_namespaced_lease(
                    self.namespace, body, _request_timeout=self.retry_period
                )
            )
        spec, version = lease.get("spec") or {}, lease["metadata"]["resourceVersion"]
        holder = spec.get("holderIdentity") or ""
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        record = (holder, spec.get("renewTime"), duration, version)
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another, renewed within its lease
        mine = holder == self.identity
        acquired = spec.get("acquireTime") if mine else None
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        body = self._body(self._spec(acquired, transitions), version)
        return self._write(
            lambda: self.api.replace_namespaced_lease(
                self.name, self.namespace, body, _request_timeout=self.retry_period
            )
        )

    @staticmethod
    def _write(call: Callable[[], Any]) -> bool:
        try:
            call()
        except ApiException as exc:
            if exc.status in (409, 422):  # another candidate wrote first
                return False
            raise
        return True

    def _release(self) -> None:
        """Hand the Lease back: no holder, expiring in a second (client-go's ReleaseOnCancel)."""
        try:
            lease = self._read()
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            released = self._spec(None, int(spec.get("leaseTransitions") or 0), holder="")
            released["leaseDurationSeconds"] = 1
            body = self._body(released, lease["metadata"]["resourceVersion"])
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except (ApiException, OSError) as exc:
            log.warning("could not release the lease %s/%s: %s", self.namespace, self.name, exc)
        finally:
            self.leading = False

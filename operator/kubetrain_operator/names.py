"""Deterministic names of a TrainingRun's children.

Every name derives from the run name (a DNS-1035 label of at most 40 characters, checked by
validation before anything is built) and, for pods, the attempt number. Deterministic names
make creation idempotent: after an operator restart a create answers 409 instead of making a
second cluster. Each attempt is a new Ray cluster with new pod names, so it never collides
with the terminating pods of the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

# Kubernetes label values, Service names and pod hostnames are DNS labels.
MAX_DNS_LABEL = 63


@dataclass(frozen=True)
class ChildNames:
    """Names of the children of run `run`; `attempt` (1, 2, ...) only matters for pods."""

    run: str
    attempt: int = 0

    @property
    def config(self) -> str:
        """ConfigMap with the resolved run (key `run.yaml`)."""
        return f"{self.run}-config"

    @property
    def head_service(self) -> str:
        """Headless Service in front of the Ray head (stable across attempts)."""
        return f"{self.run}-head"

    @property
    def ray_token(self) -> str:
        """Secret with the Ray authentication token (key `token`)."""
        return f"{self.run}-ray-token"

    @property
    def network_policy(self) -> str:
        """NetworkPolicy that admits only the run's pods and the operator."""
        return f"{self.run}-ray"

    @property
    def storage(self) -> str:
        """PVC the operator creates when spec.checkpoint.storage.pvc has no claimName."""
        return f"{self.run}-storage"

    @property
    def serve(self) -> str:
        """Serving Deployment and Service (a later milestone)."""
        return f"{self.run}-serve"

    @property
    def head_pod(self) -> str:
        """Ray head pod of this attempt."""
        return f"{self._attempt_prefix()}-head"

    def worker_pod(self, index: int) -> str:
        """Ray worker pod `index` (from 0) of this attempt."""
        if index < 0:
            raise ValueError(f"worker index must be >= 0, got {index}")
        return f"{self._attempt_prefix()}-worker-{index}"

    def pod_group(self, uid: str) -> str:
        """Kueue pod group (and Workload) of this attempt: unique per run (its uid) and
        attempt, so neither a re-created run nor a retry meets an earlier group."""
        return f"{self.run}-{uid[:8]}-a{self._attempt_number()}"

    def head_host(self, namespace: str) -> str:
        """DNS name of the head Service, as workers dial it."""
        return f"{self.head_service}.{namespace}.svc"

    def _attempt_prefix(self) -> str:
        return f"{self.run}-a{self._attempt_number()}"

    def _attempt_number(self) -> int:
        if self.attempt < 1:
            raise ValueError(f"pods need an attempt >= 1, got {self.attempt}")
        return self.attempt

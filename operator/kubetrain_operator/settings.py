"""Operator settings: one frozen object, read from the environment once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kubetrain_api.validation import Limits


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class OperatorSettings:
    """What an installation may choose; the Helm chart sets these as env vars."""

    image: str = "ghcr.io/kubetrain/trainer:0.1.0"
    """Trainer image for runs that do not name one."""
    operator_namespace: str = "kubetrain-system"
    """Where the operator runs (its pods are the NetworkPolicy peer of the Ray heads)."""
    operator_pod_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "kubetrain-operator"}
    )
    """Labels of the operator's pods."""
    progress_port: int = 8080
    """Trainer telemetry on the head pod: /metrics and /progress."""
    ray_gcs_port: int = 6379
    ray_dashboard_port: int = 8265
    storage_mount: str = "/storage"
    """Where a run's storage is mounted in its pods."""
    limits: Limits = field(default_factory=Limits)
    """Caps on specs (GPUs per run, spec size, name length)."""
    resync_seconds: float = 10.0
    """Level-based reconcile: every run is recomputed from the cluster this often."""
    progress_timeout_seconds: float = 2.0
    """How long to wait for a head's /progress."""
    progress_host_override: str | None = None
    """Read progress from this host instead of the head pod's IP (tests, port-forwards)."""
    pdb_api_version: str = "policy/v1"
    """API version of the serving PodDisruptionBudget. The operator asks the API server at
    start-up (discovery) and uses policy/v1beta1 where policy/v1 is not served (< 1.21)."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        defaults = cls()
        return cls(
            image=os.environ.get("KUBETRAIN_TRAINER_IMAGE", defaults.image),
            operator_namespace=os.environ.get(
                "KUBETRAIN_OPERATOR_NAMESPACE", defaults.operator_namespace
            ),
            progress_port=_int("KUBETRAIN_PROGRESS_PORT", defaults.progress_port),
            limits=Limits(
                max_gpus_per_run=_int(
                    "KUBETRAIN_MAX_GPUS_PER_RUN", defaults.limits.max_gpus_per_run
                )
            ),
            resync_seconds=float(
                os.environ.get("KUBETRAIN_RESYNC_SECONDS", defaults.resync_seconds)
            ),
            progress_host_override=os.environ.get("KUBETRAIN_PROGRESS_HOST") or None,
        )

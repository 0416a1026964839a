"""Operator settings: one frozen object, read from the environment once at start-up.

Every environment variable the operator reads is read here (`from_env`), except
KUBECONFIG, which follows the Kubernetes client's own convention (k8s.load_configuration),
and POD_NAME for kopf's identity (cli.py; read here too, for the Lease). The Helm chart sets
them on the Deployment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from kubetrain_api import contract
from kubetrain_api.validation import Limits


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _optional_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


LabelSelector = dict[str, Any]
_SELECTOR_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


def _label_selector(name: str, default: LabelSelector | None) -> LabelSelector | None:
    """A Kubernetes LabelSelector as JSON (`{"matchLabels": {...}, "matchExpressions":
    [...]}`), or `null` for none; unset: `default`. Errors name the variable."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name}: not JSON ({exc})") from None
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= {"matchLabels", "matchExpressions"}:
        raise ValueError(f"{name}: a label selector has only matchLabels and matchExpressions")
    labels = value.get("matchLabels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError(f"{name}: matchLabels maps label names to string values")
    for expression in value.get("matchExpressions", []):
        if (
            not isinstance(expression, dict)
            or not isinstance(expression.get("key"), str)
            or expression.get("operator") not in _SELECTOR_OPERATORS
        ):
            raise ValueError(
                f"{name}: each matchExpressions entry needs a key and an operator of "
                f"{sorted(_SELECTOR_OPERATORS)}"
            )
    return value


@dataclass(frozen=True)
class OperatorSettings:
    """What an installation may choose; the Helm chart sets these as env vars."""

    image: str = "ghcr.io/kubetrain/trainer:0.1.0"
    """Trainer image for runs that do not name one."""
    operator_namespace: str = "kubetrain-system"
    """Where the operator runs (its pods are the NetworkPolicy peer of the Ray heads)."""
    operator_pod_labels: dict[str, str] = field(
        default_factory=lambda: {contract.LABEL_NAME: "kubetrain-operator"}
    )
    """Labels of the operator's pods."""
    operator_namespace_selector: LabelSelector | None = None
    """Selects the operator's namespace in the runs' NetworkPolicies; None: the label
    `name: <operator_namespace>`, which the installer sets. Never the automatic
    `kubernetes.io/metadata.name`: Kubernetes 1.20 does not have it (it came in 1.21)."""
    prometheus_namespace_selector: LabelSelector | None = field(
        default_factory=lambda: {"matchLabels": {"name": "monitoring"}}
    )
    """Selects Prometheus' namespace, which the runs' NetworkPolicies admit to the heads'
    metrics port; None: the run's own namespace (as in a NetworkPolicyPeer)."""
    prometheus_pod_selector: LabelSelector | None = field(
        default_factory=lambda: {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    )
    """Selects the Prometheus pods; None: every pod of the selected namespaces. Both
    selectors None: no Prometheus is admitted."""
    progress_port: int = contract.TELEMETRY_PORT
    """Trainer telemetry on the head pod: /metrics and /progress."""
    ray_gcs_port: int = 6379
    ray_dashboard_port: int = 8265
    storage_mount: str = "/storage"
    """Where a run's storage is mounted in its pods."""
    limits: Limits = field(default_factory=Limits)
    """Caps on specs (GPUs per run, spec size, name length)."""
    resync_seconds: float = 10.0
    """Runs that are not finished are recomputed from the cluster this often (progress has
    no watch event); finished runs only on events."""
    workers: int = 8
    """kopf's worker threads for the (blocking) handlers: runs reconciled at once."""
    metrics_port: int | None = None
    """The operator's own Prometheus /metrics (None: not served)."""
    progress_deadline_seconds: float = 2.0
    """Total time for one read of a head's /progress (connect to last byte), so a slow
    head costs a worker thread at most this long."""
    progress_max_bytes: int = 1 << 20
    """Largest /progress answer read (1 MiB); a larger one is refused as no progress."""
    progress_host_override: str | None = None
    """Read progress from this host instead of the head pod's IP (tests, port-forwards)."""
    router_stats_address: str | None = None
    """Read every ModelService router's /stats from this `host:port` instead of its
    Service (tests, port-forwards)."""
    leader_election: bool = False
    """Reconcile only while holding the Lease `lease_name` in `operator_namespace`, so
    several replicas can run (leader.py)."""
    lease_name: str = "kubetrain-operator"
    pod_name: str = ""
    """This replica's pod (POD_NAME, the downward API): its Lease holder identity."""
    lease_duration_seconds: float = 15.0
    """A standby takes over after seeing the Lease unrenewed this long."""
    lease_renew_deadline_seconds: float = 10.0
    """A leader that could not renew this long stops reconciling."""
    lease_retry_period_seconds: float = 2.0
    """How often the leader renews and a standby checks."""
    webhook_port: int | None = None
    """Serve the validating admission webhook (admission.py) over HTTPS on this port; None:
    not served (`kubetrain` local, tests, an installation without the webhook)."""
    webhook_cert_file: str | None = None
    """PEM certificate the webhook serves (the chart mounts its generated Secret); read
    again when it changes, so a renewed Secret needs no restart."""
    webhook_key_file: str | None = None
    """The certificate's PEM private key."""
    pdb_api_version: str = "policy/v1"
    """API version of the serving PodDisruptionBudget. The operator asks the API server at
    start-up (discovery) and uses policy/v1beta1 where policy/v1 is not served (< 1.21)."""
    hpa_api_version: str = "autoscaling/v2"
    """API version of a ModelService variant's HorizontalPodAutoscaler (metrics: CPU or a
    Pods metric). autoscaling/v2beta2 has the same schema, for API servers that do not
    serve v2 (< 1.23); which one is served is the operator's to discover, like the PDB's."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        defaults = cls()
        return cls(
            image=os.environ.get("KUBETRAIN_TRAINER_IMAGE", defaults.image),
            operator_namespace=os.environ.get(
                "KUBETRAIN_OPERATOR_NAMESPACE", defaults.operator_namespace
            ),
            operator_namespace_selector=_label_selector(
                "KUBETRAIN_OPERATOR_NAMESPACE_SELECTOR", defaults.operator_namespace_selector
            ),
            prometheus_namespace_selector=_label_selector(
                "KUBETRAIN_PROMETHEUS_NAMESPACE_SELECTOR", defaults.prometheus_namespace_selector
            ),
            prometheus_pod_selector=_label_selector(
                "KUBETRAIN_PROMETHEUS_POD_SELECTOR", defaults.prometheus_pod_selector
            ),
            progress_port=_int("KUBETRAIN_PROGRESS_PORT", defaults.progress_port),
            progress_deadline_seconds=_float(
                "KUBETRAIN_PROGRESS_DEADLINE_SECONDS", defaults.progress_deadline_seconds
            ),
            progress_max_bytes=_int("KUBETRAIN_PROGRESS_MAX_BYTES", defaults.progress_max_bytes),
            limits=Limits(
                max_gpus_per_run=_int(
                    "KUBETRAIN_MAX_GPUS_PER_RUN", defaults.limits.max_gpus_per_run
                )
            ),
            resync_seconds=_float("KUBETRAIN_RESYNC_SECONDS", defaults.resync_seconds),
            workers=_int("KUBETRAIN_WORKERS", defaults.workers),
            metrics_port=_optional_int("KUBETRAIN_METRICS_PORT"),
            progress_host_override=os.environ.get("KUBETRAIN_PROGRESS_HOST") or None,
            router_stats_address=os.environ.get("KUBETRAIN_ROUTER_STATS_ADDRESS") or None,
            leader_election=os.environ.get("KUBETRAIN_LEADER_ELECTION", "").lower()
            in ("1", "true", "yes"),
            lease_name=os.environ.get("KUBETRAIN_LEASE_NAME", defaults.lease_name),
            pod_name=os.environ.get("POD_NAME", ""),
            lease_duration_seconds=_float(
                "KUBETRAIN_LEASE_DURATION_SECONDS", defaults.lease_duration_seconds
            ),
            lease_renew_deadline_seconds=_float(
                "KUBETRAIN_LEASE_RENEW_DEADLINE_SECONDS", defaults.lease_renew_deadline_seconds
            ),
            lease_retry_period_seconds=_float(
                "KUBETRAIN_LEASE_RETRY_PERIOD_SECONDS", defaults.lease_retry_period_seconds
            ),
            **_webhook(),
        )


def _webhook() -> dict[str, Any]:
    """The webhook's port and TLS files: all three, or none. The API server calls
    webhooks over HTTPS only, so a port without a certificate is a mistake to report."""
    names = ("KUBETRAIN_WEBHOOK_PORT", "KUBETRAIN_WEBHOOK_CERT_FILE", "KUBETRAIN_WEBHOOK_KEY_FILE")
    port, cert, key = (os.environ.get(name) or None for name in names)
    if port is None and cert is None and key is None:
        return {}
    missing = [name for name, value in zip(names, (port, cert, key), strict=True) if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)}: the webhook needs its port, cert and key")
    return {"webhook_port": int(port or 0), "webhook_cert_file": cert, "webhook_key_file": key}

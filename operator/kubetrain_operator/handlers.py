"""kopf handlers: thin. Watch events on runs and on their children go to the
controller's work queue (controller.py), whose workers call `reconcile.reconcile`.

ModelServices are handled alike (`service_event`), through the same queue.

Event-driven: no kopf timer or daemon, so kopf puts no finalizer on runs, and a finished
run costs nothing at steady state. Children are watched with a server-side label
selector (CHILDREN), so the operator streams only its own pods, Deployments and
Services. With leader election (KUBETRAIN_LEADER_ELECTION, leader.py) every replica
watches but only the holder of the Lease reconciles. kopf keeps no bookkeeping of its own
on the runs (no change handlers) and posts no events; the reconciler posts ours.

Every replica, leader or not, answers the API server's admission reviews of runs when the
settings configure the webhook (`validate_run`, admission.py, webhook.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf
import kubernetes
from prometheus_client import start_http_server

from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import LABEL_MANAGED_BY, LABEL_RUN, MANAGED_BY, WEBHOOK_PATH
from kubetrain_operator import admission, metrics, serving, webhook
from kubetrain_operator.controller import Controller
from kubetrain_operator.k8s import Kube, load_configuration
from kubetrain_operator.leader import LeaseElector, default_identity
from kubetrain_operator.settings import OperatorSettings

RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
SERVICES = (api.GROUP, api.VERSION, ms.PLURAL)
# Children whose events re-queue their owner, streamed with a server-side label selector:
# the Ray pods (phases, exit codes: a run's label), and the Deployments (rollout,
# availability) and Services (repaired when deleted) of runs and ModelServices alike
# (everything the operator builds carries the managed-by label), and a ModelService's
# Jobs (a finished evaluation is read at once).
CHILDREN = {
    ("v1", "pods"): LABEL_RUN,
    ("apps", "deployments"): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    ("v1", "services"): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    ("batch", "jobs"): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
}


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches use the same credentials as our client (in-cluster or KUBECONFIG)."""
    return connection_info(load_configuration())


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """The kubernetes client's configuration as kopf's ConnectionInfo."""
    keys = config.api_key or {}
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        token=bearer_token(keys.get("BearerToken") or keys.get("authorization") or ""),
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


def bearer_token(header: str) -> str | None:
    """The token of an Authorization value. The client stores the in-cluster token as
    `bearer <token>` (lower case) and a kubeconfig's as `Bearer <token>`; the scheme is
    case-insensitive (RFC 7235)."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return header.strip() or None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Only event handlers: kopf stores no progress and adds no finalizer. Naming the one
    # that operators with a resync timer put on every run lets kopf remove it.
    settings.persistence.finalizer = "kubetrain.dev/finalizer"
    settings.posting.enabled = False
    settings.watching.server_timeout = 300  # finite watches, reconnected by kopf
    settings.watching.client_timeout = 330
    selectors = getattr(settings.watching, "label_selectors", None)  # newer kopf only
    for child, selector in CHILDREN.items():
        if selectors is not None:  # else kopf filters by the handlers' labels= itself
            selectors[child] = selector  # stream only our children
    ours = OperatorSettings.from_env()
    kube = Kube.from_environment()
    # Asked once: the PodDisruptionBudget API moved to policy/v1 in Kubernetes 1.21, the
    # HorizontalPodAutoscaler's with metrics to autoscaling/v2 in 1.23.
    served = kube.served_versions("policy") | kube.served_versions("autoscaling")
    ours = dataclasses.replace(
        ours,
        pdb_api_version=serving.pdb_api_version(served),
        hpa_api_version=serving.hpa_v2_api_version(served),
    )
    memo.kube, memo.settings = kube, ours
    settings.admission.server = webhook.server(ours)
    memo.controller = Controller(kube, ours, leading=not ours.leader_election)
    memo.controller.start(ours.workers)
    memo.elector = None
    if ours.leader_election:
        memo.elector = LeaseElector(
            kube.client,
            ours.operator_namespace,
            ours.lease_name,
            default_identity(ours.pod_name),
            on_started_leading=memo.controller.start_leading,
            on_stopped_leading=memo.controller.stop_leading,
            lease_duration=ours.lease_duration_seconds,
            renew_deadline=ours.lease_renew_deadline_seconds,
            retry_period=ours.lease_retry_period_seconds,
        )
        memo.elector.start()
    if ours.metrics_port:
        start_http_server(ours.metrics_port, registry=metrics.REGISTRY)
        logging.info("operator metrics on :%s/metrics", ours.metrics_port)


@kopf.on.cleanup()
def shut_down(memo: kopf.Memo, **_: Any) -> None:
    # Reconciles in flight finish first; then the Lease goes: a standby takes over at once.
    if getattr(memo, "controller", None) is not None:
        memo.controller.stop()
    if getattr(memo, "elector", None) is not None:
        memo.elector.stop()


@kopf.on.event(*RESOURCE)
async def run_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.run_event(type, body)


@kopf.on.event(*SERVICES)
async def service_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.service_event(type, body)


@kopf.on.validate(*RESOURCE, id=WEBHOOK_PATH.lstrip("/"), operations=["CREATE", "UPDATE"])
def validate_run(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """The admission webhook: refuse what the operator would fail the run for (admission.py).
    kopf calls it for the main resource only, never for the status subresource; `body` is
    the object to store, `old` (not in kopf's typed protocol) the stored one on an UPDATE."""
    old = kwargs.get("old")
    errors = admission.review(
        dict(old) if old is not None else None, dict(body), memo.settings.limits
    )
    if errors:
        raise kopf.AdmissionError(admission.refusal(errors), code=422)


async def child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.child_event(type, body)


for (_group, _plural), _selector in CHILDREN.items():
    _key, _, _value = _selector.partition("=")
    kopf.on.event(_group, _plural, labels={_key: _value or kopf.PRESENT}, id=f"{_plural}-event")(
        child_event
    )

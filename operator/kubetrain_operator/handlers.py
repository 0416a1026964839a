"""kopf handlers: thin. Each one hands the body to `reconcile.reconcile`.

Change handlers give a prompt reaction; a timer per run reconciles it again every
`KUBETRAIN_RESYNC_SECONDS` (level-based: a missed event only delays). Reconciles of one
run are serialized by a lock, since kopf may run its timer and a change handler at once.
kopf keeps its bookkeeping in annotations under kubetrain.dev and posts no events of its
own; the reconciler posts ours.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from typing import Any

import kopf
import kubernetes
from prometheus_client import start_http_server

from kubetrain_api import v1alpha1 as api
from kubetrain_operator import metrics, serving
from kubetrain_operator.k8s import Kube, load_configuration
from kubetrain_operator.reconcile import reconcile
from kubetrain_operator.settings import OperatorSettings

RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
# The timer's interval is fixed when this module is imported, so it is read here, from the
# same settings (the environment) that configure() reads at start-up.
RESYNC_SECONDS = OperatorSettings.from_env().resync_seconds
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


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
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetrain.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetrain.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "kubetrain.dev/finalizer"
    settings.posting.enabled = False
    settings.watching.server_timeout = 300  # finite watches, reconnected by kopf
    settings.watching.client_timeout = 330
    ours = OperatorSettings.from_env()
    settings.execution.max_workers = ours.workers
    memo.kube = Kube.from_environment()
    # Asked once: the PodDisruptionBudget API moved to policy/v1 in Kubernetes 1.21.
    served = memo.kube.served_versions("policy")
    memo.settings = dataclasses.replace(ours, pdb_api_version=serving.pdb_api_version(served))
    if ours.metrics_port:
        start_http_server(ours.metrics_port, registry=metrics.REGISTRY)
        logging.info("operator metrics on :%s/metrics", ours.metrics_port)


def _reconcile(body: kopf.Body, memo: kopf.Memo) -> None:
    meta = body["metadata"]
    with _locks[meta["uid"]]:
        # The body kopf hands over may predate the reconcile that held the lock (its
        # status writes, the user's latest spec): decide on the run as stored now.
        fresh = memo.kube.read_run(meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
            return
        try:
            delay = reconcile(fresh, memo.kube, memo.settings)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
    if delay is not None:
        raise kopf.TemporaryError("waiting: retry backoff or ttlSecondsAfterFinished", delay=delay)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def on_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.timer(*RESOURCE, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.on.delete(*RESOURCE, optional=True)  # optional: no finalizer just for this
def forget(body: kopf.Body, **_: Any) -> None:
    uid = body["metadata"]["uid"]
    metrics.RUNS.forget(uid)
    _locks.pop(uid, None)

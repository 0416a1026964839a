"""Event-driven reconciling: watch events on runs and their children become keys in a
work queue, which worker threads reconcile.

- A run's own events, and those of the children that carry its `kubetrain.dev/run`
  label (Ray pods, the serving Deployment and Service), queue the run. An event that
  brings nothing new (kopf lists everything again when a watch must restart) is dropped
  by resourceVersion, so a finished run costs nothing at steady state: no timer, no
  request.
- A run that is not finished is queued again `resync_seconds` after each reconcile: the
  head's /progress has no watch event, and deadlines are time. That is also the safety
  net against a lost event while something can still change by itself.
- ttlSecondsAfterFinished is a one-off wake-up at the time it expires.
- A failed reconcile is retried with exponential backoff.
- Without the lease (a standby replica, leader.py), events are remembered but nothing is
  reconciled; the new leader reconciles every run it knows once.

ModelServices go through the same queue (keys carry the kind): their own events, their
children's (label `kubetrain.dev/modelservice`) and those of the TrainingRuns they serve
queue them; one that waits for a run's model or an experiment's counts is queued again
every resync_seconds (modelservice/reconcile.py says when).

No kopf timer or daemon: kopf puts a finalizer on every object that has one, so a run
could not be deleted while the operator is away (uninstalled, or its namespace deleted).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubetrain_api import modelservice as ms
from kubetrain_api import v1alpha1 as api
from kubetrain_api.contract import LABEL_MODELSERVICE, LABEL_RUN
from kubetrain_operator import metrics
from kubetrain_operator.k8s import Kube
from kubetrain_operator.modelservice.reconcile import reconcile_service
from kubetrain_operator.reconcile import reconcile
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import is_terminal
from kubetrain_operator.workqueue import WorkQueue

log = logging.getLogger("kubetrain.controller")

Key = tuple[str, str, str]  # (kind, namespace, name): a TrainingRun's or a ModelService's
MAX_BACKOFF_SECONDS = 60.0


class Controller:
    def __init__(self, kube: Kube, settings: OperatorSettings, leading: bool = True):
        self.kube, self.settings = kube, settings
        self.queue: WorkQueue[Key] = WorkQueue()
        self._lock = threading.Lock()
        self._known: dict[str, Key] = {}  # object uid -> key: what a new leader reconciles
        self._handled: dict[str, str] = {}  # object uid -> resourceVersion last reconciled
        # (namespace, run name) -> the ModelServices that serve that run's model
        self._served_by: dict[tuple[str, str], set[Key]] = {}
        self._seen: dict[str, str] = {}  # child uid -> resourceVersion last queued for
        self._failures: dict[Key, int] = {}
        self._threads: list[threading.Thread] = []
        self.leading = leading
        if not leading:
            self.queue.pause()

    # Events (called on kopf's event loop: quick, no I/O) ---------------------------------

    def run_event(self, type_: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ns = meta["namespace"]
        self._object_event(type_, body, (api.KIND, ns, meta["name"]))
        with self._lock:
            services = list(self._served_by.get((ns, meta["name"]), ()))
        for key in services:  # a served run succeeded, or was replaced
            self.queue.add(key)

    def service_event(self, type_: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (ms.KIND, meta["namespace"], meta["name"])
        with self._lock:
            for users in self._served_by.values():
                users.discard(key)
            if type_ != "DELETED":
                for variant in (body.get("spec") or {}).get("variants") or []:
                    run = ((variant or {}).get("source") or {}).get("trainingRun")
                    if isinstance(run, str):
                        self._served_by.setdefault((key[1], run), set()).add(key)
        self._object_event(type_, body, key)

    def _object_event(self, type_: str | None, body: dict[str, Any], key: Key) -> None:
        uid = body["metadata"]["uid"]
        with self._lock:
            if type_ == "DELETED":
                self._forget(uid, key)
                return
            self._known[uid] = key
            if self._handled.get(uid) == body["metadata"].get("resourceVersion"):
                return  # reconciled as it is now: a re-list after a watch restart
        self.queue.add(key)

    def _forget(self, uid: str, key: Key) -> None:
        """Drop what is kept about a deleted object (the caller holds the lock)."""
        self._known.pop(uid, None)
        self._handled.pop(uid, None)
        if key[0] == api.KIND:
            metrics.RUNS.forget(uid)
        else:
            metrics.SERVICES.forget(key[1], key[2])

    def child_event(self, type_: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(LABEL_RUN):
            key = (api.KIND, meta["namespace"], labels[LABEL_RUN])
        elif labels.get(LABEL_MODELSERVICE):
            key = (ms.KIND, meta["namespace"], labels[LABEL_MODELSERVICE])
        else:
            return
        uid, version = meta["uid"], meta.get("resourceVersion", "")
        with self._lock:
            if type_ == "DELETED":
                self._seen.pop(uid, None)
            elif self._seen.get(uid) == version:
                return
            else:
                self._seen[uid] = version
        self.queue.add(key)

    # Leadership ---------------------------------------------------------------------------

    def start_leading(self) -> None:
        with self._lock:
            self.leading = True
            self._handled.clear()  # another replica may have moved things meanwhile
            keys = set(self._known.values())
        for key in keys:
            self.queue.add(key)
        self.queue.resume()

    def stop_leading(self) -> None:
        """Stop taking keys; reconciles in flight finish (they are short next to the
        margin between the renew deadline and the lease duration)."""
        self.leading = False
        self.queue.pause()

    # Workers ------------------------------------------------------------------------------

    def start(self, workers: int) -> None:
        for i in range(workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                again = self.reconcile(key)
                self._failures.pop(key, None)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                again = min(2.0 ** (failures - 1), MAX_BACKOFF_SECONDS)
                log.exception("reconciling %s %s/%s failed; again in %.0fs", *key, again)
            finally:
                self.queue.done(key)
            if again is not None:
                self.queue.add_after(key, again)

    def reconcile(self, key: Key) -> float | None:
        """Reconcile the run or ModelService as stored now; seconds until it wants another
        look, if ever."""
        kind, ns, name = key
        service = kind == ms.KIND
        body = self.kube.read_service(ns, name) if service else self.kube.read_run(ns, name)
        if body is None:  # its DELETED event may have been lost in a watch restart
            with self._lock:
                for uid in [uid for uid, known in self._known.items() if known == key]:
                    self._forget(uid, key)
            return None
        meta = body["metadata"]
        if service:
            again = reconcile_service(body, self.kube, self.settings)
        else:
            ttl = reconcile(body, self.kube, self.settings)
            finished = is_terminal(body.get("status") or {})
            resync = None if finished else self.settings.resync_seconds
            waits = [t for t in (ttl, resync) if t is not None]
            again = min(waits) if waits else None
        with self._lock:
            if meta["uid"] in self._known:  # not deleted meanwhile
                self._handled[meta["uid"]] = meta["resourceVersion"]
            else:  # deleted during this reconcile, which has just set its metrics again
                self._forget(meta["uid"], key)
        return again

"""The baseline of bench_operator: the least a kopf operator on the TrainingRun CRD can do.

It only sets `status.phase = "Pending"` when a run is created, so the time to first status
measured against it is kopf's own floor (watch, dispatch, one patch). Settings match the
real operator where they change the API traffic: annotation bookkeeping, no kopf events.
Run: `kopf run --standalone --all-namespaces bench/minimal_operator.py`.
"""

from __future__ import annotations

from typing import Any

import kopf

RESOURCE = ("kubetrain.dev", "v1alpha1", "trainingruns")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.posting.enabled = False


@kopf.on.create(*RESOURCE)
def pending(patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "Pending"

"""Where a ModelService variant's model is: resolved from a TrainingRun's status or from the
variant's uri. Pure: the reconciler reads the TrainingRun, this decides what it means.

A TrainingRun's model is served as that run's own server serves it (serving.py): from the
run folder on its claim (mounted read-only, subPath `<run folder>/model`) or from its
object store (downloaded by the engine at start). Only a run that has Succeeded, whose
model was exported and whose evaluation gate did not fail, is servable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetrain_api import contract, validation
from kubetrain_api import modelservice as ms
from kubetrain_operator import builders, serving
from kubetrain_operator.settings import OperatorSettings


@dataclass(frozen=True)
class ModelSource:
    """Where a variant's model is (resolved by the reconciler from a TrainingRun's status or
    from the variant's uri) and the version its responses carry."""

    version: str
    claim: str | None = None
    """PVC holding the model folder: mounted read-only."""
    sub_path: str = ""
    """Folder inside the claim (config.json, weights, tokenizer)."""
    url: str | None = None
    """s3://, gs://, hf:// to download into an emptyDir first, or file:///abs/path (inside
    the image)."""
    object_store_secret: str | None = None
    """Secret whose keys become the engine's environment (s3/gs credentials)."""


@dataclass(frozen=True)
class Resolution:
    """A variant's model, or why there is none yet (`waiting`) or ever (`problem`)."""

    source: ModelSource | None = None
    waiting: str | None = None
    problem: str | None = None

    @property
    def message(self) -> str | None:
        return self.problem or self.waiting


def from_uri(variant: ms.Variant, spec: ms.ModelServiceSpec) -> Resolution:
    """A uri source: `pvc://claim/path` is mounted, anything else is given to the engine."""
    uri = variant.source.uri or ""
    version = variant.source.version or uri.rstrip("/").rsplit("/", 1)[-1] or variant.name
    scheme, _, rest = uri.partition("://")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        return Resolution(ModelSource(version, claim=claim, sub_path=path.strip("/")))
    secret = spec.secrets.object_store
    if scheme not in serving.OBJECT_STORE_SCHEMES or secret is None:
        return Resolution(ModelSource(version, url=uri))
    return Resolution(ModelSource(version, url=uri, object_store_secret=secret.name))


def from_training_run(
    variant: ms.Variant, run_body: dict[str, Any] | None, settings: OperatorSettings
) -> Resolution:
    """A trainingRun source, from the run as stored (None: not found)."""
    name = variant.source.training_run
    if run_body is None:
        return Resolution(waiting=f"TrainingRun {name} not found")
    status = run_body.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Failed":
        return Resolution(problem=f"TrainingRun {name} failed: there is no model to serve")
    if phase != "Succeeded":
        return Resolution(waiting=f"TrainingRun {name} has not succeeded yet (phase {phase})")
    gate = (status.get("evaluation") or {}).get("gate") or {}
    if gate.get("passed") is False:
        return Resolution(problem=f"TrainingRun {name} did not pass its evaluation gate")
    model = status.get("model") or {}
    if not model.get("uri"):
        return Resolution(problem=f"TrainingRun {name} succeeded without exporting a model")
    meta = run_body["metadata"]
    doc = {k: run_body.get(k) for k in ("apiVersion", "kind", "spec")}
    doc["metadata"] = {"name": meta["name"], "namespace": meta.get("namespace")}
    try:
        run = validation.parse(doc, settings.limits)
    except validation.InvalidSpec:
        return Resolution(problem=f"TrainingRun {name} has an invalid spec")
    version = variant.source.version or str(model.get("version") or name)
    folder = serving.model_folder(run, meta["uid"], settings, model.get("uri"))
    remote = serving.object_store_uri(run)
    if remote is not None:
        secret = run.spec.secrets.object_store
        return Resolution(
            ModelSource(
                version,
                url=contract.run_url(remote, folder, contract.MODEL_DIR),
                object_store_secret=secret.name if secret is not None else None,
            )
        )
    claim = builders.storage_claim_name(run)
    if claim is None:
        return Resolution(
            problem=f"TrainingRun {name} keeps its model on local storage (file://), "
            "which no pod can read"
        )
    return Resolution(
        ModelSource(version, claim=claim, sub_path=contract.run_path(folder, contract.MODEL_DIR))
    )

"""Each GPU example has a CPU twin that the end-to-end test runs as written
(tests/e2e/test_examples_e2e.py). The twins stay twins: the same method, storage shape,
source formats and kinds, LoRA use, evaluation and gate metrics, and serving. Only what
cannot run here differs: sizes, GPUs, and the Hub (unreachable; the twins read the same
formats from an object store or a claim)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from kubetrain_api import v1alpha1 as api
from kubetrain_api import validation
from tests.support.runs import ROOT

TWINS = [("pretrain-gpu", "pretrain-cpu"), ("finetune-lora-gpu", "finetune-lora-cpu")]


def load(stem: str) -> api.TrainingRun:
    (doc,) = validation.load_documents((ROOT / "examples" / f"{stem}.yaml").read_text())
    return validation.parse(doc)


def kind(uri: str) -> str:
    """The kind of storage a URI names; the Hub stands in as an object store or a claim."""
    scheme = urlsplit(uri).scheme
    return {"gs": "s3"}.get(scheme, scheme)


def shape(run: api.TrainingRun) -> dict[str, object]:
    spec = run.spec
    storage = spec.checkpoint.storage
    lora = spec.lora
    return {
        "method": spec.method,
        "init": spec.model.init,
        "storage": "pvc" if storage.pvc is not None else kind(storage.uri or ""),
        "storage class": bool(storage.pvc and storage.pvc.storage_class_name),
        "async checkpoints": spec.checkpoint.async_save,
        "formats": [s.format for s in spec.data.sources],
        "fields": [s.fields for s in spec.data.sources],
        "weights": [s.weight for s in spec.data.sources],
        "lora targets": lora.target_modules if lora else None,
        "packing": spec.data.packing,
        "near dedup": spec.data.preprocessing.near_dedup.enabled,
        "eval tasks": [(d.task, d.format, d.fields, d.labels) for d in spec.evaluation.datasets],
        "metrics": spec.evaluation.metrics,
        "gate": [g.metric for g in spec.evaluation.gate],
        "serve": spec.serve.enabled,
        "autoscaling": spec.serve.autoscaling is not None,
        "object store secret": spec.secrets.object_store is not None,
        "activation checkpointing": spec.distributed.activation_checkpointing,
        "queue": spec.resources.queue_name is not None,
    }


@pytest.mark.parametrize(("gpu", "cpu"), TWINS)
def test_the_cpu_twin_has_the_gpu_examples_shape(gpu: str, cpu: str) -> None:
    assert shape(load(cpu)) == shape(load(gpu))


@pytest.mark.parametrize(("gpu", "cpu"), TWINS)
def test_the_twins_read_the_same_kinds_of_source_except_the_hub(gpu: str, cpu: str) -> None:
    gpu_spec, cpu_spec = load(gpu).spec, load(cpu).spec
    gpu_uris = [s.uri for s in gpu_spec.data.sources] + [gpu_spec.model.source]
    cpu_uris = [s.uri for s in cpu_spec.data.sources] + [cpu_spec.model.source]
    for gpu_uri, cpu_uri in zip(gpu_uris, cpu_uris, strict=True):
        if kind(gpu_uri) != "hf":
            assert kind(cpu_uri) == kind(gpu_uri), (gpu_uri, cpu_uri)
        else:
            assert kind(cpu_uri) in {"s3", "pvc"}, cpu_uri


@pytest.mark.parametrize(("gpu", "cpu"), TWINS)
def test_the_cpu_twin_asks_for_no_gpu(gpu: str, cpu: str) -> None:
    spec = load(cpu).spec
    assert spec.resources.gpus_per_worker == 0
    assert spec.serve.gpus == 0
    assert load(gpu).spec.resources.gpus_per_worker > 0

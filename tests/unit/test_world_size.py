"""The world size (training processes) is derived once, from workers x processesPerWorker,
and every consumer agrees: validation's batch rule, the trainer's config and (in
tests/operator/test_builders.py) the worker pods' Ray slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain_api import validation
from kubetrain_trainer.config import resolve

ROOT = Path(__file__).resolve().parents[2]


def example(name: str) -> dict:
    (doc,) = validation.load_documents((ROOT / "examples" / f"{name}.yaml").read_text())
    return doc


def paths(doc: dict) -> list[str]:
    return [e.path for e in validation.validate_document(doc)]


def test_pretrain_gpu_example_trains_with_32_processes(tmp_path: Path) -> None:
    run = validation.parse(example("pretrain-gpu"))  # 4 workers x 8 GPUs
    assert validation.processes_per_worker(run.spec) == 8
    assert validation.data_parallel_size(run.spec) == 32
    config = resolve(run, tmp_path)
    assert config.world_size == 32
    assert config.grad_accum_steps == 512 // (4 * 32)


@pytest.mark.parametrize(
    ("resources", "per_worker", "world"),
    [
        ({"workers": 2}, 1, 2),  # CPU default: one process a pod
        ({"workers": 2, "processesPerWorker": 3, "cpuPerWorker": 3}, 3, 6),
        ({"workers": 3, "gpusPerWorker": 4}, 4, 12),
        ({"workers": 3, "gpusPerWorker": 4, "processesPerWorker": 4}, 4, 12),
    ],
)
def test_world_size_is_workers_times_processes_per_worker(
    tmp_path: Path, resources: dict, per_worker: int, world: int
) -> None:
    doc = example("quickstart")
    doc["spec"]["resources"] = resources
    doc["spec"]["hyperparameters"].update(globalBatchSize=world * 2, microBatchSize=1)
    run = validation.parse(doc)
    assert validation.processes_per_worker(run.spec) == per_worker
    assert resolve(run, tmp_path).world_size == world
    assert resolve(run, tmp_path).grad_accum_steps == 2


def test_batch_rule_counts_processes_per_worker() -> None:
    doc = example("quickstart")
    doc["spec"]["resources"].update(workers=2, processesPerWorker=2, cpuPerWorker=2)
    doc["spec"]["hyperparameters"].update(globalBatchSize=12, microBatchSize=2)
    errors = validation.validate_document(doc)
    assert [str(e) for e in errors] == [
        "spec.hyperparameters.globalBatchSize: must be a multiple of microBatchSize x "
        "data-parallel processes (2 x 4 = 8)"
    ]


def test_processes_per_worker_must_match_gpus() -> None:
    doc = example("pretrain-gpu")
    doc["spec"]["resources"]["processesPerWorker"] = 4
    (error,) = validation.validate_document(doc)
    assert error.path == "spec.resources.processesPerWorker"
    assert "gpusPerWorker (8)" in error.message


def test_processes_per_worker_need_a_cpu_each() -> None:
    doc = example("quickstart")  # cpuPerWorker: 1
    doc["spec"]["resources"]["processesPerWorker"] = 2
    doc["spec"]["hyperparameters"].update(globalBatchSize=32)
    assert paths(doc) == ["spec.resources.processesPerWorker"]
    doc["spec"]["resources"]["cpuPerWorker"] = "2500m"
    assert paths(doc) == []


@pytest.mark.parametrize("value", [0, 65, "2"])
def test_processes_per_worker_is_bounded(value: object) -> None:
    doc = example("quickstart")
    doc["spec"]["resources"]["processesPerWorker"] = value
    assert paths(doc) == ["spec.resources.processesPerWorker"]

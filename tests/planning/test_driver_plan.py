"""The driver plans every run before it prepares data or starts a worker: one that cannot
fit its GPU stops there as the spec's failure, naming the cheapest fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api

pytestmark = pytest.mark.trainer

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "model-configs"


def _config(tmp_path: Path, gpu: str, micro: int) -> object:
    from kubetrain_trainer.config import TrainConfig

    folder = tmp_path / "llama-1b"
    folder.mkdir(exist_ok=True)
    shutil.copy(CONFIGS / "hf/meta-llama/Llama-3.2-1B/config.json", folder / "config.json")
    spec = api.TrainingRunSpec.model_validate(
        {
            "model": {"source": f"file://{folder}"},
            "method": "pretrain",
            "data": {
                "sources": [{"name": "c", "uri": "builtin://quickstart-corpus"}],
                "sequenceLength": 4096,
            },
            "hyperparameters": {"globalBatchSize": micro, "microBatchSize": micro, "maxSteps": 1},
            "resources": {
                "workers": 1,
                "gpusPerWorker": 1,
                "nodeSelector": {"nvidia.com/gpu.product": gpu},
            },
        }
    )
    return TrainConfig(name="big", spec=spec, output_dir=tmp_path, world_size=1, use_gpu=True)


def test_a_run_that_cannot_fit_stops_before_training(tmp_path: Path) -> None:
    from kubetrain_trainer import exits
    from kubetrain_trainer.driver import plan_memory

    logged: list[str] = []
    with pytest.raises(exits.SpecFailure) as failure:
        plan_memory(_config(tmp_path, "Tesla-T4", 4), logged.append)
    message = str(failure.value)
    assert message.startswith("spec.resources: does not fit: the memory plan needs")
    assert "Tesla-T4 has 15.00 GiB; cheapest fix: " in message
    assert logged[0].startswith("memory plan: ")
    assert exits.classify(failure.value)[0] == contract.EXIT_INVALID_SPEC


def test_a_run_that_fits_is_planned_and_goes_on(tmp_path: Path) -> None:
    from kubetrain_trainer.driver import plan_memory

    logged: list[str] = []
    plan = plan_memory(_config(tmp_path, "NVIDIA-H200", 1), logged.append)
    assert plan is not None
    assert plan.verdict == "fits"
    assert logged == [
        f"memory plan: {plan.training.total / 2**30:.2f} GiB per training process, fits in "
        "140.40 GiB (NVIDIA-H200) (kubetrain plan shows the terms)"
    ]


def test_no_config_no_plan(tmp_path: Path) -> None:
    from kubetrain_trainer.config import TrainConfig
    from kubetrain_trainer.driver import plan_memory

    spec = api.TrainingRunSpec.model_validate(
        {
            "model": {"source": f"file://{tmp_path}/absent"},
            "data": {"sources": [{"name": "c", "uri": "builtin://quickstart-corpus"}]},
        }
    )
    config = TrainConfig(name="x", spec=spec, output_dir=tmp_path, world_size=1, use_gpu=False)
    logged: list[str] = []
    assert plan_memory(config, logged.append) is None
    assert logged[0].startswith("memory plan skipped: spec.model.source: cannot read")

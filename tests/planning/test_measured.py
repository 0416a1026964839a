"""The plan against real training steps: kubetrain's own FSDP2 build on gloo processes,
measured by torch's FSDPMemTracker (tests/planning/measure_worker.py). The weights',
gradients' and optimizer state's bytes are exact; the peak is within memory.TOLERANCE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain_api import memory
from kubetrain_api import v1alpha1 as api

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]


def _spec(world: int, seq: int, micro: int, **changes: object) -> api.TrainingRunSpec:
    """A run of `world` processes, micro-batches of `micro` x `seq` tokens, no gradient
    accumulation (the tracker follows one forward per module per step)."""
    body: dict[str, object] = {
        "model": {"source": "builtin://tiny-llama"},
        "method": "pretrain",
        "data": {
            "sources": [{"name": "c", "uri": "builtin://quickstart-corpus"}],
            "sequenceLength": seq,
        },
        "hyperparameters": {
            "globalBatchSize": micro * world,
            "microBatchSize": micro,
            "maxSteps": 2,
        },
        "resources": {"workers": world},
    }
    body.update(changes)
    return api.TrainingRunSpec.model_validate(body)


SHAPES = {
    # Two processes, fp32, 4 blocks: parameters, gradients and moments halve.
    "fsdp2-two-processes": _spec(2, 64, 4),
    # One process, deeper and longer sequences: activations dominate.
    "one-process-6-blocks": _spec(
        1,
        128,
        4,
        model={"source": "builtin://tiny-llama", "configOverrides": {"num_hidden_layers": 6}},
    ),
    # LoRA on a wider Qwen2 with activation checkpointing: adapters train, the base is held.
    "lora-checkpointing": _spec(
        2,
        128,
        4,
        model={
            "source": "builtin://tiny-qwen2",
            "configOverrides": {"hidden_size": 256, "intermediate_size": 704},
        },
        method="sft",
        lora={"rank": 8},
        distributed={"activationCheckpointing": True},
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_matches_measured_steps(shape: str, tmp_path: Path) -> None:
    from kubetrain_trainer import planning

    spec = SHAPES[shape]
    world = spec.resources.workers
    spec_file, out = tmp_path / "spec.json", tmp_path / "measured.json"
    spec_file.write_text(spec.model_dump_json(by_alias=True))
    port = 29600 + list(SHAPES).index(shape)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.planning.measure_worker",
            spec_file,
            out,
            str(world),
            str(port),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    plan, _ = planning.plan_run(spec, tmp_path / "cache")
    t = plan.training
    for rank in json.loads(out.read_text()):
        assert rank["parameters"] == t.parameters
        assert rank["gradients"] == t.gradients
        assert rank["optimizer_state"] == t.optimizer_state
        error = t.total / rank["peak"] - 1
        print(f"{shape}: plan {t.total} measured {rank['peak']} ({error:+.1%})")
        assert abs(error) <= memory.TOLERANCE, (shape, t.total, rank["peak"])

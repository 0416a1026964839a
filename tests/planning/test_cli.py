"""`kubetrain plan` on every example, and `kubetrain validate` judging GPU runs by their
plan: the real command line, as a user runs it."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain_api import validation

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
KUBETRAIN = [sys.executable, "-m", "kubetrain_cli.main"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _kubetrain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KUBETRAIN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )


def _training_specs() -> int:
    """TrainingRuns in the examples, and ModelServices' retraining templates."""
    count = 0
    for file in glob.glob(str(ROOT / "examples" / "*.yaml")):
        for doc in validation.load_documents(validation.read_file(Path(file))):
            if doc.get("kind") == "TrainingRun" or (doc.get("spec") or {}).get("retraining"):
                count += 1
    return count


def test_plan_prints_every_example() -> None:
    files = sorted(glob.glob("examples/*.yaml", root_dir=ROOT))
    result = _kubetrain("plan", *files, "--model-configs", "examples/model-configs")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count(": TrainingRun ") == _training_specs() >= 12
    assert out.count("  peak ") == _training_specs()
    # The GPU examples name their GPU and fit it; the 1B pretraining run names no product.
    assert "GPU: NVIDIA-H100-80GB-HBM3, 79.65 GiB: fits" in out
    assert "1.24B parameters" in out
    assert "product unknown: memory unknown; set resources.gpuMemory" in out


RUN = """
apiVersion: kubetrain.dev/v1alpha1
kind: TrainingRun
metadata: {{name: big}}
spec:
  model: {{source: "hf://meta-llama/Llama-3.2-1B"}}
  method: pretrain
  data:
    sources: [{{name: web, uri: "s3://corpus/web"}}]
    sequenceLength: 4096
  hyperparameters: {{globalBatchSize: {batch}, microBatchSize: {micro}, maxSteps: 10}}
  resources:
    workers: {workers}
    gpusPerWorker: 1
    nodeSelector: {{nvidia.com/gpu.product: {gpu}}}
  distributed: {{activationCheckpointing: true}}
"""


def test_validate_refuses_a_run_that_cannot_fit(tmp_path: Path) -> None:
    run = tmp_path / "big.yaml"
    run.write_text(RUN.format(batch=2, micro=2, workers=1, gpu="Tesla-T4"))
    result = _kubetrain("validate", str(run), "--model-configs", "examples/model-configs")
    assert result.returncode == 1
    assert "TrainingRun big: invalid" in result.stderr
    assert "spec.resources: does not fit: the memory plan needs" in result.stderr
    # Checkpointing is on and a micro-batch of 1 still needs too much: more GPUs, and a
    # global batch that divides over them.
    assert (
        "Tesla-T4 has 15.00 GiB; cheapest fix: set resources.workers: 9 and "
        "hyperparameters.globalBatchSize: 18 (plan 14.9 GiB per GPU)"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    # The fix it names fits.
    run.write_text(RUN.format(batch=18, micro=2, workers=9, gpu="Tesla-T4"))
    fixed = _kubetrain("validate", str(run), "--model-configs", "examples/model-configs")
    assert fixed.returncode == 0, fixed.stderr
    # On an 80 GB GPU it fits as written, and nothing is said.
    run.write_text(RUN.format(batch=2, micro=2, workers=1, gpu="NVIDIA-H100-80GB-HBM3"))
    roomy = _kubetrain("validate", str(run), "--model-configs", "examples/model-configs")
    assert roomy.returncode == 0, roomy.stderr
    assert "memory" not in roomy.stderr


def test_validate_without_a_config_says_so(tmp_path: Path) -> None:
    run = tmp_path / "big.yaml"
    run.write_text(RUN.format(batch=2, micro=2, workers=1, gpu="Tesla-T4"))
    result = _kubetrain("validate", str(run))
    assert result.returncode == 0, result.stderr
    assert "warning: memory plan skipped: spec.model.source: cannot read the config" in (
        result.stderr
    )

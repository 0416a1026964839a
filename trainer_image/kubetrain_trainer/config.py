"""Resolved training configuration: the TrainingRun spec plus what follows from it and from
the machine (world size, device, precision, gradient accumulation, output folders)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetrain_api import contract
from kubetrain_api import v1alpha1 as api
from kubetrain_api.validation import data_parallel_size

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training process needs to know, derived once by the driver."""

    name: str
    spec: api.TrainingRunSpec
    output_dir: Path
    world_size: int
    use_gpu: bool
    remote_root: str | None = None
    """The run's durable root on an object store (kubetrain_trainer.storage), when
    spec.checkpoint.storage.uri names one; `output_dir` is then local scratch."""
    run_uid: str | None = None
    """The TrainingRun's uid (metadata.uid); None for `kubetrain run` on a laptop."""
    namespace: str | None = None

    @property
    def hp(self) -> api.Hyperparameters:
        return self.spec.hyperparameters

    @property
    def micro_batch_size(self) -> int:
        return self.hp.micro_batch_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each process (litgpt derives it the same way)."""
        per_pass = self.hp.micro_batch_size * self.world_size
        if self.hp.global_batch_size % per_pass:
            raise ValueError(
                f"globalBatchSize {self.hp.global_batch_size} is not a multiple of "
                f"microBatchSize x processes ({per_pass})"
            )
        return self.hp.global_batch_size // per_pass

    @property
    def precision(self) -> Precision:
        if self.hp.precision != "auto":
            return self.hp.precision
        return "bf16-mixed" if self.use_gpu else "fp32"

    @property
    def param_dtype(self) -> str:
        """dtype the weights are kept in (FSDP2 mixed precision casts for compute)."""
        if self.spec.model.dtype != "auto":
            return self.spec.model.dtype
        return "float32"  # master weights in fp32; bf16 compute comes from mixed precision

    def total_steps(self, train_sequences: int) -> int:
        """Optimizer steps: maxSteps wins; otherwise epochs over the packed training set."""
        if self.hp.max_steps is not None:
            return self.hp.max_steps
        epochs = self.hp.epochs or 1
        return max(1, epochs * math.ceil(train_sequences / self.hp.global_batch_size))

    # Folders under the run's output directory (a PVC, or runs/<name>/ on a laptop), as
    # kubetrain_api.contract lays them out for the operator and the model server too.
    @property
    def data_dir(self) -> Path:
        return self.output_dir / contract.DATA_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / contract.CHECKPOINT_DIR

    @property
    def checkpoint_root(self) -> str:
        """Where checkpoints go: the object store's `<root>/checkpoints`, else the local
        folder."""
        if self.remote_root:
            return f"{self.remote_root.rstrip('/')}/{contract.CHECKPOINT_DIR}"
        return str(self.checkpoint_dir)

    @property
    def model_dir(self) -> Path:
        return self.output_dir / contract.MODEL_DIR

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / contract.METRICS_FILE


def resolve(
    run: api.TrainingRun,
    output_dir: Path,
    *,
    use_gpu: bool | None = None,
    world_size: int | None = None,
    remote_root: str | None = None,
) -> TrainConfig:
    """Derive the TrainConfig of a validated run. GPUs are used when the spec asks for them,
    unless `use_gpu` says otherwise; `world_size` overrides the process count (local runs)."""
    spec = run.spec
    gpu = spec.resources.gpus_per_worker > 0 if use_gpu is None else use_gpu
    return TrainConfig(
        name=run.metadata.name or "run",
        spec=spec,
        output_dir=Path(output_dir),
        world_size=world_size or data_parallel_size(spec),
        use_gpu=gpu,
        remote_root=remote_root,
        run_uid=run.metadata.uid,
        namespace=run.metadata.namespace,
    )

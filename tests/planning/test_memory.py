"""The plan's arithmetic (kubetrain_api.memory), on a hand-made model size: the terms
follow the sharding, precision and method; the verdict and the cheapest fix."""

from __future__ import annotations

from typing import Any

import pytest

from kubetrain_api import memory
from kubetrain_api import v1alpha1 as api

GIB = memory.GIB

# A 1B-class decoder: 16 blocks of 50M and a 200M root (embeddings + head).
SIZE = memory.ModelSize(
    architecture="LlamaForCausalLM",
    parameters=1_000_000_000,
    trainable_parameters=1_000_000_000,
    root_parameters=200_000_000,
    block_parameters=50_000_000,
    layers=16,
    hidden_size=2048,
    intermediate_size=8192,
    vocab_size=100_000,
    kv_heads=8,
    head_dim=64,
    tensors=[
        memory.TensorGroup(rows=100_000, numel=200_000_000, count=1, trainable=True),
        memory.TensorGroup(rows=2000, numel=50_000_000, count=16, trainable=True),
    ],
)


def spec(**changes: Any) -> api.TrainingRunSpec:
    body: dict[str, Any] = {
        "model": {"source": "builtin://tiny-llama"},
        "data": {"sources": [{"name": "c", "uri": "builtin://quickstart-corpus"}]},
        "hyperparameters": {"globalBatchSize": 8, "microBatchSize": 1, "maxSteps": 1},
        "resources": {
            "workers": 8,
            "gpusPerWorker": 1,
            "nodeSelector": {memory.GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"},
        },
    }
    body.update(changes)
    return api.TrainingRunSpec.model_validate(body)


def test_terms_shard_over_the_world_size() -> None:
    t = memory.plan_training(spec(), SIZE)
    # fp32 weights; 100_000 and 2000 rows split evenly over 8 processes.
    assert t.parameters == 1_000_000_000 * 4 // 8
    assert t.gradients == t.parameters  # no accumulation: sharded
    assert t.optimizer_state == 2 * t.parameters + 4 * 17
    # bf16 compute on GPUs: the root and one block, gathered.
    assert t.gathered_parameters == (200_000_000 + 50_000_000) * 2
    assert t.overhead == memory.CUDA_CONTEXT_BYTES + memory.NCCL_BUFFER_BYTES


def test_padding_follows_fsdp2() -> None:
    odd = SIZE.model_copy(
        update={"tensors": [memory.TensorGroup(rows=10, numel=100, count=1, trainable=True)]}
    )
    # 10 rows over 8 processes: 2 rows each (padded), 10 elements a row, fp32.
    assert memory.plan_training(spec(), odd).parameters == 2 * 10 * 4


def test_accumulation_keeps_whole_gradients() -> None:
    accumulating = spec(hyperparameters={"globalBatchSize": 32, "microBatchSize": 1, "maxSteps": 1})
    t = memory.plan_training(accumulating, SIZE)
    assert t.gradients == 1_000_000_000 * 4  # unsharded float32 until the last micro-batch


def test_ddp_holds_everything() -> None:
    t = memory.plan_training(spec(distributed={"strategy": "ddp"}), SIZE)
    assert t.parameters == 4_000_000_000
    assert t.gradients == 2 * 4_000_000_000  # gradients and DDP's buckets
    assert t.gathered_parameters == 0


def test_low_precision_weights_halve_the_state() -> None:
    bf16 = spec(model={"source": "builtin://tiny-llama", "dtype": "bfloat16"})
    assert memory.plan_training(bf16, SIZE).parameters == 1_000_000_000 * 2 // 8


def test_checkpointing_and_micro_batch_scale_activations() -> None:
    base = memory.plan_training(spec(), SIZE)
    assert base.activations == base.activations_without_checkpointing
    # Checkpointing keeps each block's input and recomputes one block at a time.
    tokens, block = 2048, 2 * (10 * 2048 + 4 * 8192)  # bf16 values per token in a block
    saved = tokens * (15 * block - 16 * 2 * 2048)
    assert base.activations_without_checkpointing - base.activations_with_checkpointing == saved
    doubled = memory.plan_training(
        spec(hyperparameters={"globalBatchSize": 16, "microBatchSize": 2, "maxSteps": 1}), SIZE
    )
    assert doubled.activations == 2 * base.activations
    dpo = memory.plan_training(
        spec(
            method="dpo",
            data={
                "sources": [
                    {"name": "p", "uri": "builtin://quickstart-preferences", "format": "preference"}
                ]
            },
        ),
        SIZE,
    )
    assert dpo.activations == 2 * base.activations  # chosen and rejected in one pass


def test_reference_model_only_without_lora() -> None:
    body = {
        "method": "dpo",
        "data": {
            "sources": [
                {"name": "p", "uri": "builtin://quickstart-preferences", "format": "preference"}
            ]
        },
    }
    full = memory.plan_training(spec(**body), SIZE)
    assert full.reference == full.parameters
    with_lora = memory.plan_training(spec(**body, lora={"rank": 8}), SIZE)
    assert with_lora.reference == 0


def test_serving_replica() -> None:
    s = memory.plan_serving(spec(serve={"gpus": 1, "maxTokens": 1024, "maxConcurrency": 4}), SIZE)
    assert s.weights == 1_000_000_000 * 2
    assert s.kv_cache == 2 * 16 * 8 * 64 * 2 * 1024 * 4
    assert s.total == s.weights + s.kv_cache + memory.CUDA_CONTEXT_BYTES


def test_gpu_memory_from_the_table_or_the_field() -> None:
    assert memory.gpu_memory(spec()) == (81_920 * memory.MIB, "NVIDIA-A100-SXM4-80GB")
    res = spec().resources.model_copy(update={"gpu_memory": "40Gi"})
    assert memory.gpu_memory(spec().model_copy(update={"resources": res})) == (
        40 * GIB,
        "resources.gpuMemory",
    )
    unknown = spec(resources={"workers": 8, "gpusPerWorker": 1})
    assert memory.plan(unknown, SIZE).verdict == "unknown"
    cpu = spec(resources={"workers": 2})
    assert memory.gpu_memory(cpu) == (None, None)


@pytest.mark.parametrize(
    ("total", "verdict"),
    [(80, "fits"), (100, "fits"), (101, "tight"), (133, "tight"), (134, "does-not-fit")],
)
def test_verdict_margin_is_the_tolerance(total: int, verdict: str) -> None:
    assert memory.judge(total, 100) == verdict


def _on(gpu: str, **changes: Any) -> api.TrainingRunSpec:
    resources = {"workers": 1, "gpusPerWorker": 1, "nodeSelector": {memory.GPU_PRODUCT_LABEL: gpu}}
    return spec(resources=resources, **changes)


def test_cheapest_fix_in_order() -> None:
    # Long sequences on one 80 GB GPU: checkpointing alone is enough.
    long = _on(
        "NVIDIA-H100-80GB-HBM3",
        data={
            "sources": [{"name": "c", "uri": "builtin://quickstart-corpus"}],
            "sequenceLength": 8192,
        },
        hyperparameters={"globalBatchSize": 4, "microBatchSize": 4, "maxSteps": 1},
    )
    plan = memory.plan(long, SIZE)
    assert plan.verdict == "tight"
    assert plan.fix is not None
    assert plan.fix.startswith("set distributed.activationCheckpointing: true")
    # Weights and moments alone overflow a 16 GB GPU: LoRA is the first change that fits.
    small = memory.plan(_on("Tesla-T4", method="sft"), SIZE)
    assert small.verdict == "does-not-fit"
    assert small.fix is not None
    assert small.fix.startswith("add lora")
    # Pretraining cannot use LoRA: more GPUs.
    pretrain = memory.plan(_on("Tesla-T4", method="pretrain"), SIZE)
    assert pretrain.fix is not None
    assert pretrain.fix.startswith("set resources.workers: ")
    workers = int(pretrain.fix.split(": ")[1].split(" ")[0])
    assert (
        memory.plan_training(
            _on("Tesla-T4", method="pretrain").model_copy(
                update={"resources": pretrain_resources(workers)}
            ),
            SIZE,
        ).total
        <= 15_360 * memory.MIB
    )
    assert (
        memory.plan_training(
            _on("Tesla-T4", method="pretrain").model_copy(
                update={"resources": pretrain_resources(workers - 1)}
            ),
            SIZE,
        ).total
        > 15_360 * memory.MIB
    )


def pretrain_resources(workers: int) -> api.Resources:
    return api.Resources(
        workers=workers, gpus_per_worker=1, node_selector={memory.GPU_PRODUCT_LABEL: "Tesla-T4"}
    )


def test_a_fitting_plan_has_no_fix() -> None:
    plan = memory.plan(spec(), SIZE)
    assert plan.verdict == "fits"
    assert plan.fix is None

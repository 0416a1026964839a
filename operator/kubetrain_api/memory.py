"""Will it fit? The memory plan of a run, per training process and per serving replica.

Pure arithmetic over two inputs: the spec and the model's `ModelSize` (what accelerate
measures of the model built on the meta device: `kubetrain_trainer.planning`, which needs
torch). This module stays light so that the CLI, the operator and the trainer share one
plan.

How a training process spends memory under FSDP2 (what `FSDPMemTracker` shows of a real
step, and what the terms below follow):
- always held: this rank's shard of the weights as stored (fp32 under `model.dtype: auto`:
  the master weights the optimizer updates) and of AdamW's two moments;
- at the end of the forward pass: the root module's gathered weights (embeddings and head,
  which stay gathered through the backward) and one gathered block, in the compute dtype,
  plus the saved activations of every block and the logits; under gradient accumulation
  also the unsharded gradients of the earlier micro-batches (FSDP2 reduce-scatters only
  on the last one);
- at the optimizer step: the gradient shards, and as much again of temporaries (foreach
  AdamW).
The peak is the held part plus the larger of the last two. Activations follow the usual
per-token count (Korthikanti et al., 2022) for a decoder block with fused attention:
about 10 hidden and 4 intermediate values per token per block in the compute dtype (under
LoRA with dropout, each adapted module's dropped input and mask too), and the logits in
float32 twice (the loss's upcast and log-softmax); a reference model's forward pass adds
its logits while the policy's activations are held. Checked against measured peaks in
tests/planning and tests/trainer/loop (the tolerance below).
"""

from __future__ import annotations

import math
from typing import Final, Literal

from pydantic import Field

from kubetrain_api import v1alpha1 as api
from kubetrain_api.placement import quantity_value
from kubetrain_api.v1alpha1 import ApiModel
from kubetrain_api.validation import data_parallel_size, processes_per_worker

GIB: Final = 1024**3
MIB: Final = 1024**2

# The plan's stated accuracy on the total: measured peaks lie within this share of it
# (tests/planning/test_measured.py). Refusal waits until even the plan's low end does not
# fit, so a run the plan may overestimate is warned about, never refused.
TOLERANCE: Final = 0.25

# The CUDA context and cuBLAS workspace of a process, and NCCL's buffers when there are
# peers: not tensors, so no allocator statistic shows them, but they take GPU memory.
CUDA_CONTEXT_BYTES: Final = 1 * GIB
NCCL_BUFFER_BYTES: Final = 512 * MIB

# The node label GPU feature discovery sets, and total memory of common GPUs as nvidia-smi
# reports it (MiB). `resources.gpuMemory` overrides the table.
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
GPU_MEMORY_MIB: Final[dict[str, int]] = {
    "Tesla-T4": 15_360,
    "Tesla-V100-SXM2-16GB": 16_384,
    "Tesla-V100-SXM2-32GB": 32_768,
    "NVIDIA-A10": 23_028,
    "NVIDIA-A10G": 23_028,
    "NVIDIA-L4": 23_034,
    "NVIDIA-GeForce-RTX-4090": 24_564,
    "NVIDIA-A100-SXM4-40GB": 40_960,
    "NVIDIA-A100-PCIE-40GB": 40_960,
    "NVIDIA-L40S": 46_068,
    "NVIDIA-A100-SXM4-80GB": 81_920,
    "NVIDIA-A100-80GB-PCIe": 81_920,
    "NVIDIA-H100-80GB-HBM3": 81_559,
    "NVIDIA-H100-PCIe": 81_559,
    "NVIDIA-H200": 143_771,
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Rows of a method's micro-batch per sequence of `microBatchSize` (dpo: chosen and
# rejected in one forward pass).
_ROWS = {"dpo": 2}


class TensorGroup(ApiModel):
    """Parameters of one shape: FSDP2 shards each along its first dimension, padded to a
    multiple of the world size."""

    rows: int
    """Size of the first dimension."""
    numel: int
    """Elements of one tensor."""
    count: int
    """Tensors of this shape."""
    trainable: bool
    """Gets a gradient and optimizer state (LoRA: the adapters only)."""


class ModelSize(ApiModel):
    """A model's size, measured on the meta device (no weights loaded): the input of the
    plan, and a contract between `kubetrain_trainer.planning` and this module."""

    architecture: str
    """transformers class name."""
    parameters: int
    """All parameters, shared ones once, adapters included."""
    trainable_parameters: int
    """Parameters that train (all, or the adapters under LoRA)."""
    root_parameters: int
    """Parameters outside the transformer blocks (embeddings, head, final norm): FSDP2's
    root unit, gathered through forward and backward."""
    block_parameters: int
    """Parameters of the largest transformer block (FSDP2's unit of gathering)."""
    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    kv_heads: int
    head_dim: int
    tensors: list[TensorGroup] = Field(default_factory=list)
    """Every parameter, grouped by shape."""


class TrainingPlan(ApiModel):
    """Bytes per training process."""

    parameters: int
    """This process's shard of the weights as stored (the master weights)."""
    gradients: int
    """Shard of the trainable parameters' gradients (unsharded and whole under gradient
    accumulation, which FSDP2 reduces only on the last micro-batch)."""
    optimizer_state: int
    """AdamW's two moments and step counts for this process's trainable shard."""
    gathered_parameters: int
    """Weights gathered for compute in the compute dtype: the root unit and one block."""
    activations: int
    """Saved activations and logits of one micro-batch, as configured."""
    activations_without_checkpointing: int
    """The same without activation checkpointing."""
    activations_with_checkpointing: int
    """The same with activation checkpointing (block inputs, one block recomputed)."""
    reference: int
    """A frozen reference model's shard (dpo, kto, grpo with a KL term; none under LoRA,
    whose reference is the base with adapters off)."""
    overhead: int
    """CUDA context and NCCL buffers (GPU runs)."""
    total: int
    """The expected peak: held parts plus the larger of the forward and the optimizer
    step's transient parts."""


class ServingPlan(ApiModel):
    """Bytes per serving replica."""

    weights: int
    """The model's weights in the serving dtype."""
    kv_cache: int
    """Keys and values for `maxTokens` at `maxConcurrency`."""
    overhead: int
    """CUDA context (GPU replicas)."""
    total: int


class MemoryPlan(ApiModel):
    """Will it fit: the plan, what it is compared with, and the verdict."""

    model: ModelSize
    world_size: int
    precision: Literal["fp32", "bf16-mixed"]
    training: TrainingPlan
    serving: ServingPlan
    gpu_memory: int | None = None
    """Memory of one GPU the workers get, bytes (None: a CPU run, or an unknown product)."""
    gpu_product: str | None = None
    """Where `gpuMemory` came from: a product in the table, or `resources.gpuMemory`."""
    verdict: Literal["fits", "tight", "does-not-fit", "unknown"] = "unknown"
    """fits; tight: the plan exceeds the GPU within its tolerance (may run out of memory);
    does-not-fit: beyond it; unknown: no GPU memory to compare with."""
    fix: str | None = None
    """The cheapest change that makes a tight or failing plan fit."""


def _bytes(dtype: str) -> int:
    return _BYTES.get(dtype, 4)


def on_gpu(spec: api.TrainingRunSpec, gpu: bool | None = None) -> bool:
    """Whether the run trains on GPUs: as the spec asks, unless the trainer knows better
    (`kubetrain run` of a GPU spec on a laptop)."""
    return spec.resources.gpus_per_worker > 0 if gpu is None else gpu


def precision(spec: api.TrainingRunSpec, gpu: bool | None = None) -> Literal["fp32", "bf16-mixed"]:
    """The compute precision the trainer resolves `auto` to (bf16 on GPUs)."""
    p = spec.hyperparameters.precision
    if p == "auto":
        return "bf16-mixed" if on_gpu(spec, gpu) else "fp32"
    return "bf16-mixed" if p != "fp32" else "fp32"


def _shard(group: TensorGroup, world: int, sharded: bool) -> int:
    """Elements one process stores of the group: dim 0 padded to the world size."""
    if not sharded or world == 1:
        return group.numel * group.count
    rows = math.ceil(group.rows / world)
    return rows * (group.numel // max(group.rows, 1)) * group.count


def _tokens(spec: api.TrainingRunSpec) -> int:
    """Tokens of one micro-batch's forward pass: dpo's pairs are two rows, grpo's prompts
    one row per generation, prompts at their longest (sequenceLength) plus the completion."""
    hp, seq = spec.hyperparameters, spec.data.sequence_length
    if spec.method == "grpo" and spec.grpo is not None:
        return hp.micro_batch_size * spec.grpo.generations * (seq + spec.grpo.max_new_tokens)
    return hp.micro_batch_size * _ROWS.get(spec.method, 1) * seq


def _compute_bytes(spec: api.TrainingRunSpec, gpu: bool | None) -> int:
    return 2 if precision(spec, gpu) == "bf16-mixed" else _bytes(stored_dtype(spec))


def _block_bytes(spec: api.TrainingRunSpec, size: ModelSize, compute: int) -> int:
    """Saved activations of one block per token: ~10 hidden and 4 intermediate values,
    and under LoRA with dropout each adapted module's dropped input and its mask."""
    h, i = size.hidden_size, size.intermediate_size
    block = compute * (10 * h + 4 * i)
    lora = spec.lora
    if lora is not None and lora.dropout > 0:
        widths = {"down_proj": i}  # the rest of the usual targets take the hidden state
        block += sum((compute + 1) * widths.get(name, h) for name in lora.target_modules)
    return block


def _activations(
    spec: api.TrainingRunSpec, size: ModelSize, checkpointing: bool, gpu: bool | None
) -> int:
    compute = _compute_bytes(spec, gpu)
    block = _block_bytes(spec, size, compute)
    # Logits in the compute dtype, then the loss's float32 upcast and log-softmax.
    logits = size.vocab_size * (8 if compute == 4 else compute + 8) + 3 * 4 * size.hidden_size
    if checkpointing:
        per_token = size.layers * compute * size.hidden_size + block + logits
    else:
        per_token = size.layers * block + logits
    return _tokens(spec) * per_token


def _reference_pass(spec: api.TrainingRunSpec, size: ModelSize, gpu: bool | None) -> int:
    """The reference model's forward pass (no gradients) runs while the policy's
    activations are held: its logits, and a block's transient values (nothing is saved)."""
    if not _reference_needed(spec):
        return 0
    compute = _compute_bytes(spec, gpu)
    per_token = compute * (size.vocab_size + 2 * size.hidden_size + 2 * size.intermediate_size)
    return _tokens(spec) * per_token


def stored_dtype(spec: api.TrainingRunSpec) -> str:
    """The dtype the weights are kept in (float32 under `auto`)."""
    return "float32" if spec.model.dtype == "auto" else spec.model.dtype


def plan_training(
    spec: api.TrainingRunSpec,
    size: ModelSize,
    *,
    world: int | None = None,
    gpu: bool | None = None,
) -> TrainingPlan:
    """Bytes per training process. `world` and `gpu` default to what the spec asks for."""
    world = world or data_parallel_size(spec)
    sharded = spec.distributed.strategy == "fsdp"
    stored = _bytes(stored_dtype(spec))
    compute = _compute_bytes(spec, gpu)
    groups = size.tensors
    params = sum(_shard(g, world, sharded) for g in groups) * stored
    trainable_shard = sum(_shard(g, world, sharded) for g in groups if g.trainable) * stored
    n_trainable = sum(g.count for g in groups if g.trainable)
    # exp_avg and exp_avg_sq in the weights' dtype, and a float32 step count per tensor.
    optimizer = 2 * trainable_shard + 4 * n_trainable
    accumulation = max(
        1,
        spec.hyperparameters.global_batch_size
        // max(1, spec.hyperparameters.micro_batch_size * world),
    )
    # FSDP2 accumulates unsharded gradients (float32: its reduce dtype) until the last
    # micro-batch; DDP holds whole gradients and as much again in its buckets.
    whole_grads = size.trainable_parameters * max(stored, 4 if sharded else stored)
    if not sharded:
        gradients = 2 * whole_grads
    elif accumulation > 1:
        gradients = whole_grads
    else:
        gradients = trainable_shard
    gathered = (size.root_parameters + size.block_parameters) * compute if sharded else 0
    with_ac = _activations(spec, size, True, gpu)
    without_ac = _activations(spec, size, False, gpu)
    activations = with_ac if spec.distributed.activation_checkpointing else without_ac
    reference = 0
    if _has_reference(spec):
        reference = sum(_shard(g, world, sharded) for g in groups) * stored
    overhead = 0
    if on_gpu(spec, gpu):
        overhead = CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if world > 1 else 0)
    forward = (
        gathered
        + activations
        + _reference_pass(spec, size, gpu)
        + (gradients if accumulation > 1 and sharded else 0)
    )
    step = 2 * gradients
    total = params + optimizer + reference + overhead + max(forward, step)
    return TrainingPlan(
        parameters=params,
        gradients=gradients,
        optimizer_state=optimizer,
        gathered_parameters=gathered,
        activations=activations,
        activations_without_checkpointing=without_ac,
        activations_with_checkpointing=with_ac,
        reference=reference,
        overhead=overhead,
        total=total,
    )


def _reference_needed(spec: api.TrainingRunSpec) -> bool:
    """dpo and kto compare with a reference; grpo only with a KL term (beta > 0)."""
    if spec.method not in ("dpo", "kto", "grpo"):
        return False
    return not (spec.method == "grpo" and spec.grpo is not None and spec.grpo.beta == 0)


def _has_reference(spec: api.TrainingRunSpec) -> bool:
    """A frozen copy of the weights: the reference, unless LoRA's base serves as one."""
    return spec.lora is None and _reference_needed(spec)


def plan_serving(spec: api.TrainingRunSpec, size: ModelSize) -> ServingPlan:
    """The built-in engine (CPU, float32) or vLLM (GPU, bfloat16)."""
    gpu = spec.serve.gpus > 0
    dtype = 2 if gpu else 4
    weights = size.parameters * dtype
    if spec.lora is not None:  # merged into the base on export: the adapters are gone
        weights = (size.parameters - size.trainable_parameters) * dtype
    kv = 2 * size.layers * size.kv_heads * size.head_dim * dtype
    kv_cache = kv * spec.serve.max_tokens * spec.serve.max_concurrency
    overhead = CUDA_CONTEXT_BYTES if gpu else 0
    return ServingPlan(
        weights=weights, kv_cache=kv_cache, overhead=overhead, total=weights + kv_cache + overhead
    )


def gpu_memory(spec: api.TrainingRunSpec) -> tuple[int | None, str | None]:
    """Memory of one worker GPU, and where that number came from."""
    res = spec.resources
    if res.gpus_per_worker == 0:
        return None, None
    if res.gpu_memory is not None:
        return int(quantity_value(res.gpu_memory)), "resources.gpuMemory"
    product = res.node_selector.get(GPU_PRODUCT_LABEL)
    if product in GPU_MEMORY_MIB:
        return GPU_MEMORY_MIB[product] * MIB, product
    return None, product


def judge(total: int, capacity: int | None) -> Literal["fits", "tight", "does-not-fit", "unknown"]:
    if capacity is None:
        return "unknown"
    if total <= capacity:
        return "fits"
    return "tight" if total * (1 - TOLERANCE) <= capacity else "does-not-fit"


def plan(
    spec: api.TrainingRunSpec,
    size: ModelSize,
    *,
    world: int | None = None,
    gpu: bool | None = None,
) -> MemoryPlan:
    """The whole plan, with its verdict and, when it does not fit, the cheapest fix.
    `world` and `gpu` default to what the spec asks for (the trainer passes what it got)."""
    training = plan_training(spec, size, world=world, gpu=gpu)
    capacity, product = gpu_memory(spec) if on_gpu(spec, gpu) else (None, None)
    verdict = judge(training.total, capacity)
    return MemoryPlan(
        model=size,
        world_size=world or data_parallel_size(spec),
        precision=precision(spec, gpu),
        training=training,
        serving=plan_serving(spec, size),
        gpu_memory=capacity,
        gpu_product=product,
        verdict=verdict,
        fix=cheapest_fix(spec, size, capacity) if verdict in ("tight", "does-not-fit") else None,
    )


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def fit_message(plan: MemoryPlan) -> str | None:
    """What `kubetrain validate` and the driver say of a plan that may not or does not
    fit its GPU (field, problem, cheapest fix); None when it fits or cannot be judged."""
    if plan.verdict not in ("tight", "does-not-fit") or plan.gpu_memory is None:
        return None
    what = "may run out of GPU memory" if plan.verdict == "tight" else "does not fit"
    return (
        f"spec.resources: {what}: the memory plan needs {format_bytes(plan.training.total)} "
        f"per GPU, {plan.gpu_product} has {format_bytes(plan.gpu_memory)}; cheapest fix: "
        f"{plan.fix}"
    )


def cheapest_fix(spec: api.TrainingRunSpec, size: ModelSize, capacity: int | None) -> str:
    """The first change, cheapest first, after which the plan fits: recompute activations
    (about a third more compute), a smaller micro-batch (more accumulation steps), LoRA
    (trains adapters only: another method), more GPUs (cost)."""
    if capacity is None:
        return ""

    def fits(candidate: api.TrainingRunSpec) -> int | None:
        total = plan_training(candidate, size).total
        return total if total <= capacity else None

    def gib(n: int) -> str:
        return f"{n / GIB:.1f} GiB"

    dist = spec.distributed
    if not dist.activation_checkpointing:
        candidate = spec.model_copy(
            update={"distributed": dist.model_copy(update={"activation_checkpointing": True})}
        )
        if (total := fits(candidate)) is not None:
            return f"set distributed.activationCheckpointing: true (plan {gib(total)})"
    hp = spec.hyperparameters
    micro = hp.micro_batch_size
    while micro > 1:
        micro //= 2
        candidate = spec.model_copy(
            update={"hyperparameters": hp.model_copy(update={"micro_batch_size": micro})}
        )
        if (total := fits(candidate)) is not None:
            return f"set hyperparameters.microBatchSize: {micro} (plan {gib(total)})"
    if spec.lora is None and spec.method != "pretrain":
        lora = api.LoraSpec()
        candidate = spec.model_copy(update={"lora": lora})
        adapted = _with_lora(size, lora)
        total = plan_training(candidate, adapted).total
        if total <= capacity:
            return f"add lora (rank {lora.rank}; plan {gib(total)})"
    res = spec.resources
    for workers in range(res.workers + 1, 1025):
        # The global batch must stay a multiple of micro-batch x processes.
        per_pass = hp.micro_batch_size * workers * processes_per_worker(spec)
        batch = math.ceil(hp.global_batch_size / per_pass) * per_pass
        candidate = spec.model_copy(
            update={
                "resources": res.model_copy(update={"workers": workers}),
                "hyperparameters": hp.model_copy(update={"global_batch_size": batch}),
            }
        )
        if (total := fits(candidate)) is not None:
            also = (
                f" and hyperparameters.globalBatchSize: {batch}"
                if batch != hp.global_batch_size
                else ""
            )
            return f"set resources.workers: {workers}{also} (plan {gib(total)} per GPU)"
    return "no single change makes it fit: a larger GPU, or a smaller model"


def _with_lora(size: ModelSize, lora: api.LoraSpec) -> ModelSize:
    """The size with adapters on the default targets instead of training everything: an
    estimate (the attention projections of each block, square-ish), for the fix only."""
    per_block = 4 * 2 * lora.rank * size.hidden_size
    adapter = size.layers * per_block
    frozen = [g.model_copy(update={"trainable": False}) for g in size.tensors]
    adapters = TensorGroup(
        rows=lora.rank, numel=lora.rank * size.hidden_size, count=8 * size.layers, trainable=True
    )
    return size.model_copy(
        update={
            "parameters": size.parameters + adapter,
            "trainable_parameters": adapter,
            "tensors": [*frozen, adapters],
        }
    )

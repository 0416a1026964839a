"""TrainingRun API, version v1alpha1 (group kubetrain.dev): the single source of truth.

The CRD schema (`kubetrain crds`), the operator, the trainer and the CLI all read these
models. Field descriptions come from the attribute docstrings, so they show up in
`kubectl explain trainingrun.spec...` and in the generated API reference.

This module must stay light: pydantic and the standard library only (no torch, ray, kopf).
Rules that span several fields live in `validation.py`, because the Kubernetes 1.20 schema
cannot express them and the operator must report them with a field path.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "kubetrain.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "kubetrain.dev/v1alpha1"
KIND: Final = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
SHORT_NAMES = ["tr"]
CATEGORIES = ["kubetrain", "ml"]

# Tiny model configs that need no download; the trainer maps each name to a config.
BUILTIN_MODELS = ("tiny-llama", "tiny-qwen2")
# Small datasets the trainer generates or ships, for the quickstart and tests.
BUILTIN_DATASETS = (
    "quickstart-corpus",
    "quickstart-instructions",
    "quickstart-sentiment",
    "quickstart-preferences",
)

# Kubernetes-style bounds. Every string and list is bounded so that a spec stays small
# (the resolved spec is stored in a ConfigMap) and the API server can cost it.
MAX_NAME = 63
MAX_SHORT = 253
MAX_URI = 2048
MAX_MESSAGE = 32768

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Names of Secrets, ConfigMaps, claims and classes (Kubernetes allows dots in them).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# An env var name as Kubernetes accepts it (C identifier, dots and dashes allowed).
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
URI_SCHEMES = ("hf", "pvc", "s3", "gs", "file", "builtin")
URI = r"^(hf|pvc|s3|gs|file|builtin)://[^\s]+$"
# Kubernetes resource.Quantity, as controller-gen writes it for int-or-string quantities.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

Name = Annotated[str, Field(max_length=MAX_NAME, pattern=DNS_LABEL)]
ObjectName = Annotated[str, Field(max_length=MAX_SHORT, pattern=DNS_SUBDOMAIN)]
ShortText = Annotated[str, Field(max_length=MAX_SHORT)]
Uri = Annotated[str, Field(max_length=MAX_URI, pattern=URI)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must be >= 0")
    elif not re.match(QUANTITY, value):
        raise ValueError("must be a Kubernetes quantity such as 4, 500m, 16Gi")
    return value


# int-or-string the way Kubernetes spells quantities, so `cpu: 4` and `memory: 16Gi` both
# pass the API server and pydantic alike.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "maxLength": 64,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


# --------------------------------------------------------------------------------------
# spec.model, spec.lora
# --------------------------------------------------------------------------------------


class ModelSpec(ApiModel):
    """Which model to train, and how to load it."""

    source: Uri
    """Where the model comes from: `hf://org/name`, `pvc://claim/path` (the claim is mounted
    read-only into the head and worker pods), `s3://bucket/path`, `file:///path`, or
    `builtin://NAME` for a tiny built-in config (tiny-llama, tiny-qwen2) that needs no
    download."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`pretrained` loads the source's weights; `random` builds the model from the source's
    config with fresh weights (pretraining from scratch). Built-in models are always random."""
    revision: ShortText | None = None
    """Hub revision (branch, tag or commit) for `hf://` sources."""
    tokenizer: Uri | None = None
    """Tokenizer location; defaults to the model's own. Built-in models get a tokenizer
    trained on the run's data."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the trained weights (and so the optimizer state) are kept in. `auto` is
    float32 master weights on GPUs and CPUs alike; the compute dtype comes from
    `hyperparameters.precision`. bfloat16/float16 keep low-precision weights (less memory,
    less exact updates)."""
    config_overrides: Annotated[
        dict[str, Any],
        Field(max_length=64),
        WithJsonSchema(
            {"type": "object", "maxProperties": 64, "x-kubernetes-preserve-unknown-fields": True}
        ),
    ] = Field(default_factory=dict)
    """Model config fields to override (e.g. `num_hidden_layers`, `hidden_size` for a
    built-in model, `max_position_embeddings`). Model-shape fields only, with plain values:
    nothing that makes transformers load code or files (`trust_remote_code`, `auto_map`,
    `*_name_or_path`)."""


class LoraSpec(ApiModel):
    """Low-rank adapters through PEFT; merged into the base weights on export."""

    rank: Annotated[int, Field(ge=1, le=1024)] = 16
    """Adapter rank r."""
    alpha: Annotated[float, Field(gt=0, le=4096)] = 32.0
    """Scaling numerator (the update is scaled by alpha / rank)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the adapter input."""
    # pydantic copies mutable defaults per instance, and a literal default shows in the CRD.
    target_modules: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=32)] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    """Module names to adapt."""


# --------------------------------------------------------------------------------------
# spec.data
# --------------------------------------------------------------------------------------

DataFormat = Literal[
    "text",
    "jsonl",
    "parquet",
    "hf-dataset",
    "chat",
    "prompt-response",
    "preference",
    "unpaired-preference",
    "prompt-only",
]
# The formats of preference and reinforcement learning (TRL's dataset types of the same
# names), read from jsonl, parquet or saved datasets; the methods that take each.
PREFERENCE_FORMATS: Final = ("preference", "unpaired-preference", "prompt-only")
TrainingMethod = Literal["pretrain", "sft", "instruction", "dpo", "kto", "grpo"]
METHOD_FORMATS: Final[dict[str, tuple[str, ...]]] = {
    "dpo": ("preference",),
    # A pair gives KTO one desirable and one undesirable example.
    "kto": ("unpaired-preference", "preference"),
    "grpo": ("prompt-only",),
}


class FieldMapping(ApiModel):
    """Which record fields hold the text, for structured formats."""

    text: ShortText = "text"
    """Field with plain text (text, jsonl, parquet, hf-dataset)."""
    prompt: ShortText = "prompt"
    """Field with the prompt (prompt-response)."""
    response: ShortText = "response"
    """Field with the response (prompt-response)."""
    messages: ShortText = "messages"
    """Field with a list of `{role, content}` messages (chat)."""
    label: ShortText = "label"
    """Field with the expected label or answer (evaluation sets); whether the completion
    is desirable, true or false (unpaired-preference); the reference answer that
    exact-match rewards compare with (prompt-only, optional)."""
    chosen: ShortText = "chosen"
    """Field with the preferred completion (preference): text, or a list of messages."""
    rejected: ShortText = "rejected"
    """Field with the dispreferred completion (preference)."""
    completion: ShortText = "completion"
    """Field with the completion (unpaired-preference)."""


class DataSource(ApiModel):
    """One input dataset."""

    name: Name
    """Short name, unique within the run; used in summaries and metrics."""
    uri: Uri
    """Location: `file://`, `pvc://claim/path` (the claim is mounted read-only into the head
    and worker pods), `s3://`, `gs://`, `hf://org/dataset` or `builtin://NAME`
    (quickstart-corpus, quickstart-instructions, quickstart-sentiment, quickstart-preferences)."""
    format: DataFormat = "text"
    """Record format. `preference` (prompt, chosen, rejected), `unpaired-preference`
    (prompt, completion, label true/false) and `prompt-only` (prompt, optional reference
    answer in `label`) are TRL's dataset types, for methods dpo, kto and grpo; a prompt or
    completion is text or a list of `{role, content}` messages."""
    fields: FieldMapping = Field(default_factory=FieldMapping)
    """Field names for structured formats."""
    split: ShortText | None = None
    """Split to read from hub or saved datasets (e.g. `train`)."""
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    """Relative sampling weight when mixing sources."""


class NearDuplicateSpec(ApiModel):
    """MinHash + LSH near-duplicate removal."""

    enabled: bool = True
    """Remove near-duplicates."""
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    """Estimated Jaccard similarity at or above which documents are duplicates."""
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    """MinHash permutations."""
    ngram: Annotated[int, Field(ge=1, le=32)] = 5
    """Word shingle size."""


class Preprocessing(ApiModel):
    """Cleaning, filtering and deduplication, applied in this order before tokenization."""

    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFKC"
    """Unicode normal form."""
    lowercase: bool = False
    """Lowercase all text."""
    collapse_whitespace: bool = True
    """Collapse runs of whitespace."""
    strip_markup: bool = True
    """Remove HTML/XML tags and entities."""
    remove_control_characters: bool = True
    """Remove control characters other than newline and tab."""
    min_chars: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    """Drop documents shorter than this (after cleaning)."""
    max_chars: Annotated[int, Field(ge=1, le=100_000_000)] = 1_000_000
    """Drop documents longer than this."""
    min_words: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Drop documents with fewer words."""
    max_symbol_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    """Drop documents whose share of non-alphanumeric, non-space characters is higher."""
    max_repetition_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    """Drop documents whose share of repeated lines is higher."""
    exact_dedup: bool = True
    """Remove exact duplicates (hash of the normalized text)."""
    near_dedup: NearDuplicateSpec = Field(default_factory=NearDuplicateSpec)
    """Near-duplicate removal."""


class DataSpec(ApiModel):
    """Training data: sources, preprocessing and packing."""

    sources: Annotated[list[DataSource], Field(min_length=1, max_length=64)]
    """Input datasets, mixed by weight."""
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    """Cleaning, filters and deduplication."""
    sequence_length: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    """Tokens per training sequence."""
    packing: bool = True
    """Pack several documents into each sequence."""
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Share of documents held out for validation."""
    max_documents: Annotated[int, Field(ge=1, le=10_000_000_000)] | None = None
    """Cap on documents read per source (handy for smoke tests)."""


# --------------------------------------------------------------------------------------
# spec.hyperparameters
# --------------------------------------------------------------------------------------


class LearningRateSchedule(ApiModel):
    """Learning-rate schedule: linear warmup, then decay."""

    type: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay shape after warmup."""
    warmup_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    """Linear warmup steps from 0 to the peak learning rate."""
    min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """Final learning rate as a fraction of the peak (cosine and linear)."""


class Hyperparameters(ApiModel):
    """Optimization settings. AdamW; gradient accumulation is derived from the batch sizes."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 3e-4
    """Peak learning rate."""
    schedule: LearningRateSchedule = Field(default_factory=LearningRateSchedule)
    """Learning-rate schedule."""
    global_batch_size: Annotated[int, Field(ge=1, le=1_048_576)] = 32
    """Sequences per optimizer step, over all workers."""
    micro_batch_size: Annotated[int, Field(ge=1, le=65_536)] = 4
    """Sequences per forward/backward pass on one worker."""
    epochs: Annotated[int, Field(ge=1, le=10_000)] | None = None
    """Passes over the training data (set this or maxSteps)."""
    max_steps: Annotated[int, Field(ge=1, le=100_000_000)] | None = None
    """Optimizer steps (set this or epochs; wins when both are set)."""
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    """AdamW decoupled weight decay."""
    adam_beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    """AdamW beta1."""
    adam_beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    """AdamW beta2."""
    adam_epsilon: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-8
    """AdamW epsilon."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout probability set on the model config."""
    max_grad_norm: Annotated[float, Field(ge=0.0, le=1e6)] = 1.0
    """Gradient clipping by global norm; 0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = "auto"
    """Compute precision: `auto` is bf16-mixed on GPUs and fp32 on CPUs. bf16-mixed
    computes in bfloat16 under both `fsdp` and `ddp`, with float32 weights unless
    `model.dtype` says otherwise. fp16-mixed is refused: it needs a loss scaler that the
    trainer does not have yet; use bf16-mixed."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 1234
    """Seed for weights, data order and dropout."""


# --------------------------------------------------------------------------------------
# spec.resources, spec.distributed
# --------------------------------------------------------------------------------------


# An extended resource: a domain-qualified name such as `rdma/hca` or `example.com/foo`.
EXTENDED_RESOURCE = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]"
    r"([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# Bounds on the Kubernetes objects the spec passes through loosely (affinity, volumes,
# containers): the API server checks their shape when the operator creates the pods.
MAX_LOOSE_PROPERTIES = 32


def _loose_object(
    required: list[str], max_properties: int = MAX_LOOSE_PROPERTIES
) -> dict[str, Any]:
    """CRD schema of a Kubernetes object kept as given: required keys, bounded width."""
    schema: dict[str, Any] = {
        "type": "object",
        "maxProperties": max_properties,
        "x-kubernetes-preserve-unknown-fields": True,
    }
    if required:
        schema["required"] = required
    return schema


LooseObject = Annotated[dict[str, Any], WithJsonSchema(_loose_object([]))]
# A named object (volume, container): the name is what overrides merge by.
NamedObject = Annotated[dict[str, Any], WithJsonSchema(_loose_object(["name"]))]


class Affinity(ApiModel):
    """Pod affinity, as in core/v1 (each part kept as given, checked by the API server)."""

    node_affinity: LooseObject | None = None
    """core/v1 NodeAffinity."""
    pod_affinity: LooseObject | None = None
    """core/v1 PodAffinity."""
    pod_anti_affinity: LooseObject | None = None
    """core/v1 PodAntiAffinity, e.g. one worker per node."""


class Toleration(ApiModel):
    """A pod toleration, as in core/v1."""

    # A qualified name: a 253-character prefix, '/', a 63-character name.
    key: Annotated[str, Field(max_length=317)] | None = None
    """Taint key to tolerate; empty with operator Exists tolerates everything."""
    operator: Literal["Equal", "Exists"] = "Equal"
    """How key and value are compared."""
    value: ShortText | None = None
    """Taint value (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    """How long a NoExecute taint is tolerated."""


class PodResources(ApiModel):
    """CPU and memory for one pod."""

    cpu: Quantity = "2"
    """CPU request and limit."""
    memory: Quantity = "8Gi"
    """Memory request and limit."""


class Resources(ApiModel):
    """Where and how large the Ray cluster is."""

    workers: Annotated[int, Field(ge=1, le=1024)] = 1
    """Ray worker pods. Training runs `workers x processesPerWorker` processes (the world
    size), the same number on every worker pod and none on the head."""
    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] = 0
    """`nvidia.com/gpu` per worker pod; 0 trains on CPU."""
    gpu_memory: Quantity | None = None
    """Memory of one worker GPU (e.g. `80Gi`), for the memory plan (`kubetrain plan`).
    Unset: looked up by the `nvidia.com/gpu.product` node selector in a table of common
    GPUs (README: Will it fit?)."""
    processes_per_worker: Annotated[int, Field(ge=1, le=64)] | None = None
    """Training processes per worker pod. Unset: one per GPU (`gpusPerWorker`), or 1 on
    CPU. On GPUs it must equal `gpusPerWorker` (one process per GPU)."""
    cpu_per_worker: Quantity = "4"
    """CPU request and limit per worker pod."""
    memory_per_worker: Quantity = "16Gi"
    """Memory request and limit per worker pod."""
    shared_memory: Quantity | None = None
    """Size of the `/dev/shm` memory volume of each Ray pod. Unset: 30% of the pod's memory
    (Ray's default object store, which lives in /dev/shm) plus 1Gi (NCCL's shared-memory
    transport and data loaders), rounded up to a whole Mi. Memory in /dev/shm counts
    against the pod's memory limit."""
    head: PodResources = Field(default_factory=PodResources)
    """Resources of the Ray head pod (runs the driver, not training)."""
    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=MAX_NAME)]], Field(max_length=32)
    ] = Field(default_factory=dict)
    """Node labels the pods must match (e.g. a GPU product label)."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Tolerations for tainted GPU nodes."""
    priority_class_name: ObjectName | None = None
    """PriorityClass of the pods."""
    queue_name: Name | None = None
    """Kueue LocalQueue (set as the `kueue.x-k8s.io/queue-name` label). Every pod of an
    attempt also carries Kueue's pod-group label and total-count annotation, so Kueue
    admits the head and all workers as one unit (gang admission)."""
    scheduler_name: Annotated[str, Field(max_length=MAX_SHORT, pattern=DNS_SUBDOMAIN)] | None = None
    """Scheduler of the Ray pods (e.g. a gang or topology-aware scheduler); the cluster's
    default scheduler when empty."""
    extended_resources_per_worker: Annotated[
        dict[str, Quantity],
        Field(max_length=8),
    ] = Field(default_factory=dict)
    """Extended resources per worker pod, request = limit (e.g. `rdma/hca: 1`). GPUs are
    `gpusPerWorker`; cpu and memory have their own fields."""
    worker_affinity: Affinity | None = None
    """Affinity of the worker pods (core/v1 Affinity). A podAffinity or podAntiAffinity
    term without a labelSelector selects this attempt's workers."""
    worker_topology_spread_constraints: Annotated[
        list[Annotated[dict[str, Any], WithJsonSchema(_loose_object(["topologyKey"], 16))]],
        Field(max_length=8),
    ] = Field(default_factory=list)
    """Topology spread constraints of the worker pods (core/v1 TopologySpreadConstraint).
    One without a labelSelector spreads this attempt's workers."""


class DistributedSpec(ApiModel):
    """How the model is spread over workers."""

    strategy: Literal["fsdp", "ddp"] = "fsdp"
    """`fsdp` shards parameters, gradients and optimizer state (FSDP2); `ddp` replicates
    small models."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """Compile each transformer block with torch.compile."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (less memory, one more all-gather)."""


# --------------------------------------------------------------------------------------
# spec.checkpoint, spec.evaluation, spec.serve, spec.runPolicy
# --------------------------------------------------------------------------------------


class PvcStorage(ApiModel):
    """A PersistentVolumeClaim for checkpoints and the exported model."""

    claim_name: ObjectName | None = None
    """Existing claim to use; when empty the operator creates `<run>-storage`."""
    size: Quantity = "50Gi"
    """Size of the claim the operator creates."""
    storage_class_name: ObjectName | None = None
    """StorageClass of the claim the operator creates (must support ReadWriteMany when
    workers are on several nodes)."""


class CheckpointStorage(ApiModel):
    """Shared storage reachable from every worker. Set `pvc` or `uri`."""

    pvc: PvcStorage | None = None
    """Use a PersistentVolumeClaim."""
    uri: Uri | None = None
    """Use an object store (`s3://`, `gs://`; credentials from `secrets.objectStore`, else
    the pods' ambient ones) or a local path (`file://`, laptop runs; not servable on
    Kubernetes). Training pods keep a local emptyDir for scratch."""


class CheckpointSpec(ApiModel):
    """Distributed checkpoints (torch.distributed.checkpoint), committed atomically."""

    interval_steps: Annotated[int, Field(ge=1, le=10_000_000)] = 500
    """Save every N optimizer steps (and at the end)."""
    keep_last: Annotated[int, Field(ge=1, le=1000)] = 3
    """Committed checkpoints to keep."""
    storage: CheckpointStorage = Field(default_factory=lambda: CheckpointStorage(pvc=PvcStorage()))
    """Where checkpoints and the exported model go."""
    resume: Annotated[
        str, Field(max_length=MAX_URI, pattern=r"^(auto|never|step-[0-9]+|.+://.+)$")
    ] = "auto"
    """`auto` resumes from the latest committed checkpoint, `never` starts fresh, `step-N`
    or a URI picks one. All but a URI look only in this run's own folder (`<name>-<uid[:8]>`,
    so a run re-created under an old name starts afresh); to continue another run, give
    its checkpoint's URI, e.g. `file://` + its `status.checkpoints.latest.path`."""
    async_save: bool = False
    """Save in the background (torch.distributed.checkpoint's async save): each rank copies
    its shard of the trainable weights and optimizer state to host memory at the save step
    and training goes on while the copy is written; the checkpoint commits once the write
    ends, and at most one save is in flight. Costs host memory for that copy (about 3x the
    trainable parameters per rank with AdamW in fp32) and writes with training's bandwidth."""


EvalMetric = Literal["loss", "perplexity", "accuracy", "precision", "recall", "f1", "reward"]


class EvalDataset(ApiModel):
    """A labelled evaluation set (classification-style or exact-answer)."""

    name: Name
    """Short name, unique within the run."""
    uri: Uri
    """Location, as for data sources (a `pvc://` claim is mounted into the worker pods)."""
    format: Literal["jsonl", "parquet", "hf-dataset", "prompt-response"] = "jsonl"
    """Record format."""
    fields: FieldMapping = Field(default_factory=FieldMapping)
    """Field names: `prompt` for the input and `label` for the expected answer."""
    task: Literal["classification", "exact-match", "preference"] = "classification"
    """How predictions are compared with labels. `preference`: rows of prompt, chosen and
    rejected (fields `prompt`, `chosen`, `rejected`); accuracy is the share of pairs whose
    chosen completion the model finds more likely than the rejected one."""
    labels: Annotated[list[ShortText], Field(max_length=1000)] = Field(default_factory=list)
    """Class labels (classification); the model's answer is scored against each."""
    scoring: Literal["generate", "loglikelihood", "loglikelihood-normalized"] | None = None
    """How answers are chosen: `loglikelihood` picks the label the model finds most likely
    (summed token log-probabilities), `loglikelihood-normalized` the same per character of
    the label (lm-evaluation-harness's acc_norm), `generate` compares the greedy answer
    with the label. Default: `loglikelihood` for classification, `generate` for exact-match
    (which has no label list to score)."""


GATE_METRIC = (
    r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?)/)?(loss|perplexity|accuracy|precision|recall|f1|reward)$"
)


class GateThreshold(ApiModel):
    """One condition a finished model must meet to be served."""

    metric: Annotated[str, Field(max_length=MAX_NAME + 12, pattern=GATE_METRIC)]
    """Metric to check: a name from `metrics` (`f1`: the first dataset's for labelled
    metrics), or `DATASET/METRIC` for one evaluation dataset's (`intents/f1`)."""
    min: float | None = None
    """Lowest allowed value."""
    max: float | None = None
    """Highest allowed value."""


class EvaluationSpec(ApiModel):
    """Evaluation during and after training, and the gate to serving."""

    interval_steps: Annotated[int, Field(ge=1, le=10_000_000)] = 500
    """Evaluate every N optimizer steps (and at the end)."""
    datasets: Annotated[list[EvalDataset], Field(max_length=16)] = Field(default_factory=list)
    """Labelled evaluation sets; loss and perplexity use the validation split."""
    metrics: Annotated[list[EvalMetric], Field(min_length=1, max_length=6)] = [
        "loss",
        "perplexity",
    ]
    """Metrics to compute. Under dpo and kto, `loss` is the method's loss on the
    validation split and `perplexity` that of its chosen (desirable) completions. `reward`
    (grpo only, which has no validation loss) is the mean reward of greedy completions of
    the validation prompts."""
    average: Literal["macro", "micro", "weighted", "binary"] = "macro"
    """How precision, recall and F1 average over classes."""
    max_batches: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    """Cap on validation batches per evaluation."""
    gate: Annotated[list[GateThreshold], Field(max_length=16)] = Field(default_factory=list)
    """All must hold for the model to be served; empty passes."""


class Autoscaling(ApiModel):
    """HorizontalPodAutoscaler settings for the serving Deployment."""

    min_replicas: Annotated[int, Field(ge=1, le=100)] = 1
    """Fewest replicas."""
    max_replicas: Annotated[int, Field(ge=1, le=100)] = 4
    """Most replicas."""
    target_cpu_utilization: Annotated[int, Field(ge=1, le=100)] = 70
    """Average CPU utilization (percent of request) to aim for."""


class ServeSpec(ApiModel):
    """Serve the finished model with an OpenAI-compatible API when the gate passes."""

    enabled: bool = False
    """Create a serving Deployment after a successful, gated run."""
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    """Replicas when autoscaling is off."""
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """`nvidia.com/gpu` per replica."""
    resources: PodResources = Field(default_factory=PodResources)
    """CPU and memory per replica."""
    autoscaling: Autoscaling | None = None
    """Scale on load; off when empty."""
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 512
    """Largest `max_tokens` a request may ask for."""
    max_concurrency: Annotated[int, Field(ge=1, le=4096)] = 8
    """Requests generated at once per replica; more wait in a queue."""
    max_queue: Annotated[int, Field(ge=0, le=65_536)] = 32
    """Requests that may wait; beyond this the server answers 429."""
    max_body_bytes: Annotated[int, Field(ge=1024, le=104_857_600)] = 1_048_576
    """Largest request body; larger ones get 413."""
    retain: bool = False
    """Keep the serving objects when the TrainingRun is deleted."""


FailureAction = Literal["FailRun", "Retry", "Ignore"]
FailureReason = Literal[
    "OOMKilled",
    "WorkerFailed",
    "Evicted",
    "Preempted",
    "DisruptionTarget",
    "NodeLost",
    "Shutdown",
    "Terminated",
    "PodDeleted",
    "PodMissing",
]


class ExitCodeMatch(ApiModel):
    """Exit codes of the training driver (the Ray head pod's container): kubetrain's own
    codes (README: Retries), 128 + N after signal N, or your own."""

    operator: Literal["In", "NotIn"]
    """In: the code is one of `values`; NotIn: the driver failed with a code not listed."""
    values: Annotated[
        list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=1, max_length=255)
    ]
    """Exit codes, distinct (0 only with NotIn: exit 0 is success)."""


class FailureRule(ApiModel):
    """What a failed attempt leads to, when it matches; like a Kubernetes Job's
    podFailurePolicy rule. Set exactly one of onExitCodes and onReasons."""

    action: FailureAction
    """FailRun: the run fails at once. Retry: a new attempt, counted against backoffLimit,
    after the backoff. Ignore: a new attempt at once, counted against evictionLimit (as
    preemptions are), never against backoffLimit."""
    on_exit_codes: ExitCodeMatch | None = None
    """Match the driver's exit code."""
    on_reasons: Annotated[list[FailureReason], Field(min_length=1, max_length=16)] | None = None
    """Match why a pod stopped: OOMKilled (a container over its memory limit), WorkerFailed
    (a worker pod stopped), Evicted, Preempted, NodeLost, Shutdown, Terminated (pod
    status reasons), DisruptionTarget (the pod condition), PodDeleted, PodMissing."""


class RunPolicy(ApiModel):
    """Retries, deadlines and clean-up."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Retries after counted failures (infrastructure exit codes, signals, OOM kill, a lost
    worker; see failureRules); the run fails after backoffLimit + 1 such attempts. The one
    count of retries: on Kubernetes Ray Train restarts no workers within an attempt."""
    backoff_seconds: Annotated[int, Field(ge=0, le=3600)] = 10
    """Wait before the first retry; each further counted failure doubles it (0: retry at
    once)."""
    max_backoff_seconds: Annotated[int, Field(ge=0, le=86_400)] = 600
    """The longest wait between retries."""
    failure_rules: Annotated[list[FailureRule], Field(max_length=32)] = Field(default_factory=list)
    """Rules tried in order before the defaults; the first that matches a failed attempt
    decides. Defaults: the driver's user-error codes and other codes 1-127 fail the run;
    its infrastructure codes (20-22), signals (128+), OOMKilled and a lost worker are
    retried (backoffLimit); evictions, preemption and node loss are retried at once
    (evictionLimit)."""
    eviction_limit: Annotated[int, Field(ge=0, le=1000)] = 10
    """Restarts after preemption or eviction (and Ignore rules), counted apart from
    backoffLimit."""
    active_deadline_seconds: Annotated[int, Field(ge=1, le=31_536_000)] | None = None
    """Fail the run with DeadlineExceeded after this many seconds of activity since it
    started (time suspended does not count)."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    """Delete the finished run (and its children) after this long."""
    suspend: bool = False
    """Stop the pods and keep the run; resuming continues from the latest checkpoint."""


# --------------------------------------------------------------------------------------
# spec.env, spec.secrets
# --------------------------------------------------------------------------------------


class KeySelector(ApiModel):
    """A key of a Secret or ConfigMap in the run's namespace, by reference."""

    name: ObjectName
    """Object name."""
    key: ShortText
    """Key within the object."""


class EnvVarSource(ApiModel):
    """Where an env var's value comes from."""

    secret_key_ref: KeySelector | None = None
    """A key of a Secret."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""


class EnvVar(ApiModel):
    """An environment variable for the training pods. Secret values must come from
    `valueFrom.secretKeyRef`, never inline."""

    name: Annotated[str, Field(max_length=MAX_SHORT, pattern=ENV_NAME)]
    """Variable name; RANK, WORLD_SIZE, MASTER_ADDR, RAY_* and KUBETRAIN_* are reserved."""
    value: Annotated[str, Field(max_length=4096)] | None = None
    """Literal value."""
    value_from: EnvVarSource | None = None
    """Value from a Secret or ConfigMap key."""


class SecretRef(ApiModel):
    """A Secret in the run's namespace, by name."""

    name: ObjectName
    """Secret name."""


class Secrets(ApiModel):
    """Credentials, by reference only; values never enter the spec or the status."""

    hugging_face_token: KeySelector | None = None
    """Secret key with a Hugging Face token (mounted as a file, exported as HF_TOKEN_PATH)."""
    object_store: SecretRef | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optional AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION, AWS_SESSION_TOKEN) for `s3://` data, checkpoints and the served
    model; every key becomes an environment variable of the training and serving pods
    (envFrom). Without it the pods use ambient credentials (a node's instance role, or
    workload identity bound to the namespace's default ServiceAccount)."""


# --------------------------------------------------------------------------------------
# spec.podOverrides
# --------------------------------------------------------------------------------------

# Capabilities a cluster may need on the Ray container (IPC_LOCK: RDMA pins memory;
# SYS_NICE: NUMA binding; SYS_RESOURCE: raising memlock limits). Everything else stays
# dropped: the restricted profile is not the user's to remove.
Capability = Literal["IPC_LOCK", "SYS_NICE", "SYS_RESOURCE", "NET_BIND_SERVICE"]
LabelMap = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_NAME)]],
    Field(max_length=32),
]
AnnotationMap = Annotated[
    dict[str, Annotated[str, Field(max_length=4096)]],
    Field(max_length=32),
]


class VolumeMount(ApiModel):
    """A volume mounted into the Ray container, as in core/v1."""

    name: Name
    """A volume of `volumes` (or one of the pod's own: storage, config, tmp)."""
    mount_path: Annotated[str, Field(max_length=1024, pattern=r"^/")]
    """Absolute path in the container."""
    read_only: bool = False
    """Mount read-only."""
    sub_path: Annotated[str, Field(max_length=1024)] | None = None
    """Path within the volume."""


class PodOverride(ApiModel):
    """What is merged over the pods the operator builds for one role. Added, never
    replacing: the Ray container's command, kubetrain's env names, labels, volumes and
    mount paths, and the restricted security context are the operator's (refused here)."""

    labels: LabelMap = Field(default_factory=dict)
    """Extra pod labels (not kubetrain.dev/, app.kubernetes.io/ or kueue.x-k8s.io/ keys)."""
    annotations: AnnotationMap = Field(default_factory=dict)
    """Extra pod annotations (not kubetrain.dev/, kueue.x-k8s.io/ or prometheus.io/ keys)."""
    env: Annotated[list[EnvVar], Field(max_length=64)] = Field(default_factory=list)
    """Env of the Ray container; wins over `spec.env` and kubetrain's NCCL defaults."""
    volumes: Annotated[list[NamedObject], Field(max_length=16)] = Field(default_factory=list)
    """Extra pod volumes (core/v1 Volume), e.g. a host device plugin's socket or a cache."""
    volume_mounts: Annotated[list[VolumeMount], Field(max_length=16)] = Field(default_factory=list)
    """Extra mounts of the Ray container."""
    init_containers: Annotated[list[NamedObject], Field(max_length=8)] = Field(default_factory=list)
    """Init containers (core/v1 Container), run before the Ray container; image defaults
    to the run's, security context to the restricted one."""
    sidecars: Annotated[list[NamedObject], Field(max_length=8)] = Field(default_factory=list)
    """Containers beside the Ray container (workers only: Kubernetes 1.20 has no native
    sidecars, and one on the head would keep it running after the driver exits)."""
    capabilities: Annotated[list[Capability], Field(max_length=4)] = Field(default_factory=list)
    """Linux capabilities added to the Ray container (e.g. IPC_LOCK for RDMA)."""


class PodOverrides(ApiModel):
    """Pod template overrides per role."""

    head: PodOverride = Field(default_factory=PodOverride)
    """Merged over the Ray head pod."""
    worker: PodOverride = Field(default_factory=PodOverride)
    """Merged over every Ray worker pod."""


# --------------------------------------------------------------------------------------
# spec.dpo, spec.kto, spec.grpo: preference and reinforcement learning
# --------------------------------------------------------------------------------------

Beta = Annotated[float, Field(gt=0.0, le=100.0)]


class DpoSpec(ApiModel):
    """Direct Preference Optimization (Rafailov et al. 2023; TRL's `sigmoid` loss)."""

    beta: Beta = 0.1
    """Strength of the pull toward the reference model: higher stays closer to it."""
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    """Assumed share of flipped preference labels (conservative DPO); 0 trusts them all."""


class KtoSpec(ApiModel):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024): desirable and undesirable
    completions, unpaired; the reference point is a KL estimate on mismatched pairs."""

    beta: Beta = 0.1
    """Strength of the pull toward the reference model."""
    desirable_weight: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    """Loss weight of desirable examples (raise it when they are the fewer)."""
    undesirable_weight: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    """Loss weight of undesirable examples."""


RewardType = Literal["exact-match", "regex", "json-schema", "length", "model"]


class RewardSpec(ApiModel):
    """One reward of a sampled completion; a completion's reward is the weighted sum."""

    type: RewardType
    """`exact-match`: 1 when the completion equals the row's reference answer (`label`
    field; whitespace-trimmed, case-insensitive), else 0. `regex`: 1 when `pattern`
    matches somewhere in it. `json-schema`: 1 when it is JSON valid against `jsonSchema`.
    `length`: 1 within `minChars`..`maxChars`, falling linearly to 0 at twice the bound.
    `model`: the score of a sequence-classification model (`model`, a folder)."""
    weight: Annotated[float, Field(ge=-100.0, le=100.0)] = 1.0
    """Weight in the sum (negative penalizes)."""
    pattern: Annotated[str, Field(max_length=1024)] | None = None
    """Regular expression (Python syntax) of `regex`."""
    json_schema: LooseObject | None = None
    """JSON Schema (draft 2020-12) of `json-schema`."""
    min_chars: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    """Shortest completion `length` rewards fully."""
    max_chars: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Longest completion `length` rewards fully."""
    model: Uri | None = None
    """Folder of a transformers sequence-classification model (`model`): `file://`,
    `pvc://`, `s3://`, `gs://` or `hf://`. One label: its logit is the reward; two or
    more: the probability of the last label."""


class GrpoSpec(ApiModel):
    """Group Relative Policy Optimization (Shao et al. 2024; TRL's GRPO with its `dapo`
    token-level loss): per prompt a group of sampled completions, each scored by the
    rewards, its advantage the reward's distance from the group mean in group standard
    deviations; a KL term to the reference keeps the policy near it. `globalBatchSize`
    and `microBatchSize` count prompts."""

    rewards: Annotated[list[RewardSpec], Field(min_length=1, max_length=8)]
    """The rewards, summed with their weights."""
    generations: Annotated[int, Field(ge=2, le=64)] = 4
    """Completions sampled per prompt (the group)."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    """Longest sampled completion, in tokens."""
    temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    """Sampling temperature."""
    beta: Annotated[float, Field(ge=0.0, le=100.0)] = 0.04
    """Weight of the KL term to the reference; 0 drops it (and the reference model)."""
    epsilon: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """Clipping range of the importance ratio."""


# --------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------


class TrainingRunSpec(ApiModel):
    """What to train, on what, how, and what to do with the result."""

    model: ModelSpec
    """The model to train."""
    method: TrainingMethod = "sft"
    """`pretrain` trains on all tokens; `sft` and `instruction` mask the loss on prompts;
    `dpo` learns from preference pairs, `kto` from completions labelled desirable or not,
    `grpo` from rewards of completions it samples (each against a frozen reference: the
    starting model, or the base without adapters under LoRA)."""
    lora: LoraSpec | None = None
    """Train low-rank adapters instead of all weights."""
    dpo: DpoSpec | None = None
    """Settings of method dpo (defaults when empty)."""
    kto: KtoSpec | None = None
    """Settings of method kto (defaults when empty)."""
    grpo: GrpoSpec | None = None
    """Settings of method grpo: its group size, sampling and rewards (required)."""
    data: DataSpec
    """Training data."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Optimization settings."""
    resources: Resources = Field(default_factory=Resources)
    """Cluster size and placement."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Parallelism."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoints."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Evaluation and the serving gate."""
    serve: ServeSpec = Field(default_factory=ServeSpec)
    """Serving of the finished model."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadline, suspension, clean-up."""
    image: Annotated[str, Field(max_length=512, pattern=r"^[^\s]+$")] | None = None
    """Trainer image; defaults to the operator's configured image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy of the training pods."""
    image_pull_secrets: Annotated[list[SecretRef], Field(max_length=8)] = Field(
        default_factory=list
    )
    """Registry credentials, by Secret name."""
    env: Annotated[list[EnvVar], Field(max_length=64)] = Field(default_factory=list)
    """Extra environment variables for the training pods."""
    secrets: Secrets = Field(default_factory=Secrets)
    """Credentials, by reference."""
    pod_overrides: PodOverrides = Field(default_factory=PodOverrides)
    """Extra volumes, env, labels, init containers, sidecars and capabilities merged over
    the Ray pods the operator builds (cluster-specific needs such as RDMA)."""


def reward_models(spec: TrainingRunSpec) -> list[tuple[str, str]]:
    """(field path, uri) of every reward model folder of the run (read by the workers)."""
    rewards = spec.grpo.rewards if spec.grpo is not None else []
    return [(f"spec.grpo.rewards[{i}].model", r.model) for i, r in enumerate(rewards) if r.model]


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------

Phase = Literal[
    "Pending", "Provisioning", "Running", "Evaluating", "Succeeded", "Failed", "Suspended"
]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})

Reason = Annotated[str, Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
Message = Annotated[str, Field(max_length=MAX_MESSAGE)]


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition shape)."""

    type: Annotated[str, Field(max_length=316, pattern=r"^[A-Za-z][A-Za-z0-9]*$")]
    """Condition type, e.g. Validated, ClusterReady, Training, Evaluated, Succeeded, Failed,
    Suspended, Serving, ChildConflict, SpecChangeRefused."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Reason
    """Machine-readable CamelCase reason."""
    message: Message = ""
    """Human-readable detail."""
    last_transition_time: datetime
    """When status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The spec generation this condition was computed from."""


class Progress(ApiModel):
    """Training progress, copied by the operator from the head's progress endpoint."""

    step: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps planned."""
    epoch: Annotated[float, Field(ge=0)] | None = None
    """Fractional epoch."""
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    """Percent of steps done."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    """Training throughput over all workers."""
    mfu: Annotated[float, Field(ge=0)] | None = None
    """Model FLOPs utilization (0-1)."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds to finish training."""
    reward_mean: float | None = None
    """grpo: mean reward of the step's sampled completions."""
    reward_std: Annotated[float, Field(ge=0)] | None = None
    """grpo: their standard deviation."""
    reward_margin: float | None = None
    """dpo, kto: mean implicit reward (beta x log-ratio to the reference) of chosen
    (desirable) minus rejected (undesirable) completions."""
    reward_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """dpo: share of the step's pairs whose chosen completion has the higher implicit
    reward."""
    kl: float | None = None
    """kto, grpo: estimated KL divergence of the policy from the reference."""
    memory_planned_bytes: Annotated[int, Field(ge=0)] | None = None
    """The memory plan's peak per training process (`kubetrain plan`), at the world size
    and precision the trainer runs."""
    memory_peak_bytes: Annotated[int, Field(ge=0)] | None = None
    """The highest peak memory any training process has allocated: the CUDA allocator's
    peak on GPUs; on CPUs, which keep no such statistic, the tensors' memory tracked over
    the attempt's second step (the first with optimizer state)."""
    updated_at: datetime | None = None
    """When these numbers were read."""


class CheckpointRef(ApiModel):
    """A committed checkpoint."""

    step: Annotated[int, Field(ge=0)] | None = None
    """Step it was taken at."""
    path: Annotated[str, Field(max_length=MAX_URI)] | None = None
    """Where it is."""
    time: datetime | None = None
    """When it was committed."""


class CheckpointStatus(ApiModel):
    """Checkpoints the run can resume from."""

    latest: CheckpointRef | None = None
    """Most recent committed checkpoint; retries resume from it."""
    best: CheckpointRef | None = None
    """Checkpoint with the lowest validation loss."""


class GateResult(ApiModel):
    """The serving gate's verdict."""

    passed: bool | None = None
    """True when every threshold holds."""
    failures: Annotated[list[Annotated[str, Field(max_length=MAX_SHORT)]], Field(max_length=16)] = (
        Field(default_factory=list)
    )
    """Thresholds that did not hold, e.g. `perplexity 41.2 > max 30`."""


class EvaluationStatus(ApiModel):
    """Latest evaluation."""

    step: Annotated[int, Field(ge=0)] | None = None
    """Step the metrics were computed at."""
    metrics: Annotated[dict[str, float], Field(max_length=64)] = Field(default_factory=dict)
    """Metric values by name (e.g. `perplexity`, `validation/accuracy`)."""
    gate: GateResult | None = None
    """Gate verdict (final evaluation only)."""


class ModelStatus(ApiModel):
    """The exported model."""

    uri: Annotated[str, Field(max_length=MAX_URI)] | None = None
    """Hugging Face-format folder of the final model."""
    version: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Version label served with every response."""
    generation: Annotated[int, Field(ge=1)] | None = None
    """1 for a model trained from a non-kubetrain source, its parent's + 1 else (the
    model's lineage.json; `kubetrain lineage` prints the chain)."""
    lineage_id: Annotated[str, Field(max_length=80)] | None = None
    """The lineage record's id (a content hash)."""


class ServingStatus(ApiModel):
    """The serving endpoint."""

    service: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Service name."""
    url: Annotated[str, Field(max_length=MAX_URI)] | None = None
    """In-cluster base URL of the OpenAI-compatible API."""
    model_version: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Model version being served."""


class TrainingRunStatus(ApiModel):
    """Observed state, written only by the operator."""

    phase: Phase | None = None
    """One-word summary for `kubectl get`."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The spec generation the status reflects."""
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(default_factory=list)
    """Standard conditions, one per type."""
    attempts: Annotated[int, Field(ge=0)] | None = None
    """Ray clusters started for this run (first try plus retries)."""
    evictions: Annotated[int, Field(ge=0)] | None = None
    """Restarts caused by preemption or eviction."""
    create_failures: Annotated[int, Field(ge=0)] | None = None
    """Refused creates of the current attempt's children in a row (quota, admission); the
    ClusterReady condition says why. Absent once the attempt's pods exist."""
    next_create_time: datetime | None = None
    """While creates are refused: when the operator tries again (exponential backoff)."""
    next_attempt_time: datetime | None = None
    """When the next attempt may start, while a retry backs off after a failure."""
    progress: Progress | None = None
    """Training progress."""
    checkpoints: CheckpointStatus | None = None
    """Committed checkpoints."""
    evaluation: EvaluationStatus | None = None
    """Evaluation results and gate."""
    model: ModelStatus | None = None
    """Exported model."""
    serving: ServingStatus | None = None
    """Serving endpoint."""
    start_time: datetime | None = None
    """When the current attempt's cluster was first requested."""
    suspended_seconds: Annotated[int, Field(ge=0)] | None = None
    """Seconds spent suspended since startTime; activeDeadlineSeconds does not count them."""
    suspend_time: datetime | None = None
    """When the suspension in progress began (absent while not suspended)."""
    completion_time: datetime | None = None
    """When the run reached Succeeded or Failed."""


class ObjectMeta(BaseModel):
    """The parts of metadata kubetrain reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(max_length=MAX_SHORT)] | None = None
    namespace: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class TrainingRun(ApiModel):
    """A training job: data preparation, distributed training, evaluation and serving."""

    api_version: Literal["kubetrain.dev/v1alpha1"] = API_VERSION
    """Always kubetrain.dev/v1alpha1."""
    kind: Literal["TrainingRun"] = KIND
    """Always TrainingRun."""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    """Standard object metadata."""
    spec: TrainingRunSpec
    """Desired run."""
    status: TrainingRunStatus | None = None
    """Observed state."""

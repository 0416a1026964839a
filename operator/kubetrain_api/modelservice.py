"""ModelService API, version v1alpha1 (group kubetrain.dev): model versions served side by
side behind one OpenAI-compatible endpoint, with weighted traffic and an optional A/B
experiment that promotes the winner or rolls back the loser.

A module of its own next to v1alpha1.py (same group and version, same base model and
shared types: names, quantities, pod resources, Secret references, conditions), because
v1alpha1.py is TrainingRun's and long already; the CRD (`kubetrain crds`), the API reference
and `kubetrain validate` read both. Light like v1alpha1: pydantic and the standard library
only. Rules across fields (weights summing to 100, the experiment naming existing variants,
SQLite with one router replica) live in `modelservice_validation.py`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import Field

# The router's contract (routing.py) owns the weight scale, the variant cap and header names.
from kubetrain_api.routing import MAX_VARIANTS, TOTAL_WEIGHT, HeaderName
from kubetrain_api.v1alpha1 import (
    API_VERSION,
    GATE_METRIC,
    MAX_NAME,
    MAX_SHORT,
    MAX_URI,
    ApiModel,
    Condition,
    EvalDataset,
    EvalMetric,
    KeySelector,
    Message,
    Name,
    ObjectMeta,
    ObjectName,
    PodResources,
    Quantity,
    SecretRef,
    Secrets,
    TrainingRunSpec,
    Uri,
)

KIND: Final = "ModelService"
PLURAL = "modelservices"
SINGULAR = "modelservice"
SHORT_NAMES = ["ms"]

MAX_HISTORY = 20
"""Traffic changes kept in status.history (the newest; older ones are dropped)."""
MAX_EVALUATIONS = 20
"""Continuous-evaluation results kept in status.evaluation.results (the newest)."""
MAX_RETRAINING_RUNS = 10
"""Retraining runs remembered in status.retraining.runs (the newest)."""
CRON = r"^(@(yearly|annually|monthly|weekly|daily|hourly)|(\S+\s+){4}\S+)$"
"""Five cron fields (minute hour day-of-month month day-of-week) or a macro; croniter
checks the fields themselves when the operator reads them."""
MAX_SERVICE_NAME = 40
"""A ModelService's name names its router (`<name>-router`), the router's SQLite claim
(`<name>-router-db`) and every variant's Deployment and Service (`<name>-<variant>`)."""
ROUTER_SUFFIX: Final = "router"
"""Variants may not be named `router` or `router-*`: that is the router's child name."""
MAX_DNS_LABEL = 63
"""Service names and label values are DNS labels."""


def router_name(service: str) -> str:
    """Name of the router's Deployment, Service and PodDisruptionBudget."""
    return f"{service}-{ROUTER_SUFFIX}"


def evaluation_job_prefix(service: str) -> str:
    """Continuous-evaluation Jobs are named `<service>-eval-<variant>-<time>`."""
    return f"{service}-eval"


def feedback_job_prefix(service: str) -> str:
    """Feedback-export Jobs are named `<service>-feedback-<time>`."""
    return f"{service}-feedback"


def retraining_run_name(service: str, number: int) -> str:
    """The n-th TrainingRun a ModelService's retraining creates: `<service>-retrain-<n>`."""
    return f"{service}-retrain-{number}"


def router_database_claim_name(service: str) -> str:
    """Name of the PVC holding the router's SQLite database, when the operator creates it."""
    return f"{service}-{ROUTER_SUFFIX}-db"


def variant_name(service: str, variant: str) -> str:
    """Name of a variant's Deployment, Service, HPA and PodDisruptionBudget."""
    return f"{service}-{variant}"


Weight = Annotated[int, Field(ge=0, le=TOTAL_WEIGHT)]
CronSchedule = Annotated[str, Field(max_length=128, pattern=CRON)]
MetricName = Annotated[str, Field(max_length=MAX_NAME + 12, pattern=GATE_METRIC)]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]


# --------------------------------------------------------------------------------------
# spec.variants
# --------------------------------------------------------------------------------------


class VariantSource(ApiModel):
    """The model a variant serves. Set exactly one of trainingRun and uri."""

    training_run: Name | None = None
    """A TrainingRun in the same namespace, by name: the variant serves its exported model
    (`status.model.uri`) once the run has Succeeded, and its `status.model.version` is the
    model version every response carries."""
    uri: Uri | None = None
    """A Hugging Face-format model folder: `hf://org/name`, `s3://bucket/path`,
    `gs://bucket/path`, `pvc://claim/path` (mounted read-only) or `file:///path` (inside the
    serving image). Credentials come from spec.secrets."""
    version: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Model version label served with every response. Default: the TrainingRun's
    `status.model.version`, or the last path segment of the uri."""


class VariantAutoscaling(ApiModel):
    """HorizontalPodAutoscaler of a variant's engine. Scales on CPU (targetCpuUtilization,
    the default at 70%) or on requests in flight per replica (targetConcurrency, the
    engine's `kubetrain_serve_in_flight` gauge, which needs a custom-metrics adapter such
    as prometheus-adapter); set at most one."""

    min_replicas: Annotated[int, Field(ge=1, le=100)] = 1
    """Fewest replicas."""
    max_replicas: Annotated[int, Field(ge=1, le=100)] = 4
    """Most replicas."""
    target_cpu_utilization: Annotated[int, Field(ge=1, le=100)] | None = None
    """Average CPU utilization (percent of the request) to aim for."""
    target_concurrency: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Average requests in flight per replica to aim for."""


Engine = Literal["builtin", "vllm"]


class Variant(ApiModel):
    """One model version behind the service, with its own engine, size and traffic share."""

    name: Name
    """Short name, unique within the service (e.g. `a`, `b`, `candidate`): it names the
    variant's Deployment and Service (`<service>-<name>`), the `variant` of every logged
    response and the Prometheus series. Not `router` or `router-*`."""
    source: VariantSource
    """The model to serve."""
    engine: Engine = "builtin"
    """`builtin`: kubetrain's own server (CPU or GPU, batches concurrent requests); `vllm`:
    vLLM's OpenAI server with continuous batching (GPU variants, `gpus` >= 1)."""
    weight: Weight | None = None
    """Percent of the traffic this variant gets (an integer; the weights of all variants sum
    to 100). May be left out with a single variant, which then gets all of it. The
    operator may shift traffic after an experiment's decision; status.variants[].weight
    shows what the router applies now."""
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    """Engine replicas when autoscaling is off."""
    autoscaling: VariantAutoscaling | None = None
    """Scale on load; off when empty."""
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """`nvidia.com/gpu` per replica."""
    resources: PodResources = Field(default_factory=PodResources)
    """CPU and memory per replica."""
    image: Annotated[str, Field(max_length=512, pattern=r"^[^\s]+$")] | None = None
    """Serving image of this variant (e.g. one with vLLM); defaults to spec.image."""
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 512
    """Largest `max_tokens` a request may ask for."""
    max_concurrency: Annotated[int, Field(ge=1, le=4096)] = 8
    """Requests generated at once per replica; more wait in a queue."""
    max_queue: Annotated[int, Field(ge=0, le=65_536)] = 32
    """Requests that may wait per replica; beyond this the engine answers 429."""


# --------------------------------------------------------------------------------------
# spec.router
# --------------------------------------------------------------------------------------


class StickyKey(ApiModel):
    """What keeps a user on one variant: requests with the same key go to the same
    variant (a hash of the key against the weights). Requests without a key are assigned
    at random, one by one."""

    source: Literal["user", "header"] = "user"
    """`user`: the request body's OpenAI `user` field; `header`: the request header
    `header`."""
    header: HeaderName | None = None
    """Header name that carries the key (with source `header`), e.g. `X-User-Id`."""


class SqliteDatabase(ApiModel):
    """A SQLite file on a PersistentVolumeClaim: one writer, so one router replica."""

    claim_name: ObjectName | None = None
    """Existing claim to use; when empty the operator creates `<service>-router-db`."""
    size: Quantity = "1Gi"
    """Size of the claim the operator creates."""
    storage_class_name: ObjectName | None = None
    """StorageClass of the claim the operator creates."""


class PostgresDatabase(ApiModel):
    """A PostgreSQL database shared by every router replica."""

    dsn_secret_ref: KeySelector
    """Secret key holding the connection string (`postgresql://user:password@host/db`).
    Never inline: the DSN carries a password."""


class RouterDatabase(ApiModel):
    """Where the router logs every request and response and keeps the feedback. Set
    exactly one of sqlite and postgres."""

    sqlite: SqliteDatabase | None = None
    """SQLite on a volume (single router replica)."""
    postgres: PostgresDatabase | None = None
    """PostgreSQL (any number of router replicas)."""


class RouterSpec(ApiModel):
    """The router: the service's stable endpoint, which splits traffic by weight, logs
    requests and responses, and takes feedback (`POST /v1/feedback`)."""

    replicas: Annotated[int, Field(ge=1, le=100)] = 1
    """Router replicas (more than one needs a postgres database)."""
    resources: PodResources = Field(default_factory=lambda: PodResources(cpu="1", memory="1Gi"))
    """CPU and memory per router replica. Default: 1 CPU, 1Gi."""
    sticky_key: StickyKey = Field(default_factory=StickyKey)
    """What keeps a user on one variant."""
    database: RouterDatabase = Field(
        default_factory=lambda: RouterDatabase(sqlite=SqliteDatabase())
    )
    """Request/response log and feedback store. Default: SQLite on a 1Gi claim."""


# --------------------------------------------------------------------------------------
# spec.experiment
# --------------------------------------------------------------------------------------

PrimaryMetric = Literal["positiveFeedbackRate", "errorRate", "latency"]
DecisionAction = Literal["promote", "rollback", "none"]


class Guardrails(ApiModel):
    """Limits that end the experiment at once, before the minimum sample count: the
    treatment is rolled back when it breaks one (unless onDecision is `none`)."""

    max_error_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """The 5xx rate the treatment may not exceed, judged by the lower end of its Wilson
    interval at `confidence` (so a few early errors do not trip it)."""
    max_latency_increase: Annotated[float, Field(ge=0.0, le=100.0)] = 0.2
    """How much the treatment's p95 latency may exceed the control's, as a fraction (0.2:
    20% slower)."""
    min_requests: Annotated[int, Field(ge=1, le=10_000_000)] = 20
    """Requests per variant before a guardrail may act."""
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    """Confidence of the error-rate interval."""


class ExperimentSpec(ApiModel):
    """An A/B test of `treatment` against `control` with always-valid sequential statistics
    (mSPRT, docs/experiments.md): the operator looks at the counts continuously and the
    false-positive rate still holds at `alpha`."""

    control: Name
    """The variant in place now (a name in spec.variants)."""
    treatment: Name
    """The challenger (a name in spec.variants)."""
    primary_metric: PrimaryMetric = "positiveFeedbackRate"
    """What decides: `positiveFeedbackRate` (share of rated responses rated positive; higher
    is better), `errorRate` (share of requests answered 5xx; lower is better) or `latency`
    (share of requests slower than latencyThresholdSeconds; lower is better)."""
    latency_threshold_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] | None = None
    """With primaryMetric `latency`: a request slower than this counts against its
    variant."""
    min_samples_per_variant: Annotated[int, Field(ge=1, le=100_000_000)] = 100
    """Samples (rated responses, or requests) each variant needs before any decision."""
    alpha: Annotated[float, Field(gt=0.0, le=0.5)] = 0.05
    """Significance level: the false-positive rate kept under continuous monitoring."""
    minimum_detectable_effect: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05
    """Smallest difference of rates worth detecting (absolute, e.g. 0.05 = 5 points); sets
    the test's mixing variance, so the test is most powerful at this difference."""
    guardrails: Guardrails = Field(default_factory=Guardrails)
    """Error-rate and latency limits that act at once."""
    on_decision: DecisionAction = "promote"
    """What the operator does with a decision: `promote`: the winner gets 100% of the
    traffic (the treatment is promoted, or the service rolls back to the control);
    `rollback`: only roll back (to the control, on a loss or a broken guardrail), and
    leave a winning treatment's promotion to a person; `none`: report only."""


# --------------------------------------------------------------------------------------
# spec.evaluation: continuous evaluation of the served models
# --------------------------------------------------------------------------------------


class RegressionSpec(ApiModel):
    """When a variant's evaluation counts as a regression."""

    metric: MetricName
    """The metric watched, as in a TrainingRun's gate: `accuracy`, `perplexity` (the
    held-out text's) or `DATASET/METRIC` (`intents/f1`)."""
    max_drop: Annotated[float, Field(ge=0.0, le=1e9)] = 0.05
    """How much worse than the variant's first result (its baseline, taken when the model
    began serving) a result may be: lower for accuracy, precision, recall and F1, higher
    for loss and perplexity (absolute units of the metric)."""
    on_regression: Literal["none", "rollback"] = "none"
    """`rollback`: a regressed experiment treatment (or retraining challenger) loses at once
    and its traffic goes back to the control; `none`: report (condition, metric, alert)."""


def _default_evaluation_metrics() -> list[EvalMetric]:
    return ["accuracy"]


class ServiceEvaluationSpec(ApiModel):
    """Continuous evaluation: on a schedule, a Job per variant (the trainer image, the same
    evaluation code as training) scores the variant's model on labelled data sets and
    held-out text; results go to status.evaluation and Prometheus."""

    schedule: CronSchedule
    """When to evaluate, cron syntax in UTC (`0 * * * *`: hourly). A time missed while the
    operator was away runs once."""
    datasets: Annotated[list[EvalDataset], Field(max_length=16)] = Field(default_factory=list)
    """Labelled evaluation sets (classification or exact-match), as in a TrainingRun."""
    held_out: Uri | None = None
    """Held-out text (JSONL with a `text` field, or plain text) for loss and perplexity."""
    metrics: Annotated[list[EvalMetric], Field(min_length=1, max_length=6)] = Field(
        default_factory=_default_evaluation_metrics
    )
    """Metrics to compute: loss and perplexity on held_out, the labelled ones per data
    set."""
    average: Literal["macro", "micro", "weighted", "binary"] = "macro"
    """How precision, recall and F1 average over classes."""
    max_batches: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    """Cap on held-out batches per evaluation."""
    regression: RegressionSpec | None = None
    """When a result counts as a regression; none: results are only recorded."""
    resources: PodResources = Field(default_factory=lambda: PodResources(cpu="1", memory="2Gi"))
    """CPU and memory of each evaluation Job. Default: 1 CPU, 2Gi."""
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """`nvidia.com/gpu` per evaluation Job."""
    active_deadline_seconds: Annotated[int, Field(ge=30, le=86_400)] = 1800
    """An evaluation Job running longer than this is stopped and counted as failed."""


# --------------------------------------------------------------------------------------
# spec.retraining: new model versions from feedback
# --------------------------------------------------------------------------------------


class MetricThreshold(ApiModel):
    """A continuous-evaluation metric of the champion and the value that triggers."""

    metric: MetricName
    """The metric (see spec.evaluation)."""
    value: float
    """Retrain when the champion's latest result is below this (above it for loss and
    perplexity)."""


class RetrainingTriggers(ApiModel):
    """What starts a retraining run; any one suffices. The event triggers (feedback,
    metric, drift) wait cooldownSeconds after the last run."""

    schedule: CronSchedule | None = None
    """Cron, in UTC: retrain at these times."""
    starting_deadline_seconds: Annotated[int, Field(ge=1, le=31_536_000)] | None = None
    """A schedule time missed by more than this is skipped, not run late."""
    min_new_feedback: Annotated[int, Field(ge=1, le=100_000_000)] | None = None
    """Retrain once this many feedback records arrived since the last run."""
    metric_below: MetricThreshold | None = None
    """Retrain when the champion's continuous evaluation falls past a threshold."""
    drift_above: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Retrain when the champion's prompt drift (unigram Jensen-Shannon divergence of live
    prompts against its training data) exceeds this."""
    cooldown_seconds: Annotated[int, Field(ge=0, le=31_536_000)] = 3600
    """Event triggers wait this long after the last retraining run started."""


class FeedbackSnapshots(ApiModel):
    """Where the operator writes the router's feedback as data set snapshots (`kubetrain
    feedback export` in a Job) before each retraining run."""

    destination: Uri
    """Snapshots folder: `pvc://claim/path` (mounted read-write into the export Job, read
    only into the run) or `s3://bucket/path` (credentials from spec.secrets)."""
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    """Sampling weight of the snapshot's SFT examples among the template's sources."""
    resources: PodResources = Field(default_factory=lambda: PodResources(cpu="500m", memory="1Gi"))
    """CPU and memory of the export Job."""


class ChallengerSpec(ApiModel):
    """How a retrained model joins the service."""

    name: Name = "challenger"
    """Variant name the retrained model is served under (not one of spec.variants)."""
    traffic_percent: Annotated[int, Field(ge=1, le=99)] = 20
    """Share of the traffic it gets while the experiment runs; the champion keeps the
    rest."""
    resources: PodResources | None = None
    """Engine CPU and memory; default: the champion variant's."""


class TrainingRunTemplate(ApiModel):
    """The TrainingRun each retraining creates."""

    labels: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=32)] = (
        Field(default_factory=dict)
    )
    """Labels of the created runs (the operator adds its own)."""
    spec: TrainingRunSpec
    """The run's spec. The operator sets `model.source` to the champion's model (training
    continues from it) and adds the feedback snapshot to `data.sources`; everything else is
    used as written."""


class RetrainingSpec(ApiModel):
    """Retraining: when a trigger fires, export the feedback as a snapshot, train a new
    version from the champion on the template's data plus the snapshot, and, once it
    passes its gate, serve it as the challenger in an experiment against the champion."""

    variant: Name | None = None
    """The champion variant (a name in spec.variants); default: the only variant."""
    template: TrainingRunTemplate
    """The TrainingRun to create."""
    triggers: RetrainingTriggers
    """When to retrain."""
    feedback: FeedbackSnapshots
    """Where feedback snapshots go."""
    challenger: ChallengerSpec = Field(default_factory=ChallengerSpec)
    """How the retrained model is served while it is tested."""
    concurrency_policy: Literal["Forbid", "Replace"] = "Forbid"
    """A trigger while a retraining run is active (or its challenger is still being
    tested): `Forbid` waits, `Replace` deletes that run (and challenger) and starts anew."""
    successful_runs_history_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Succeeded retraining runs kept (besides the ones whose models serve)."""
    failed_runs_history_limit: Annotated[int, Field(ge=0, le=100)] = 1
    """Failed retraining runs kept."""
    suspend: bool = False
    """Start no new retraining runs (the one running goes on)."""


# --------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------


class ModelServiceSpec(ApiModel):
    """Named model variants behind one endpoint, their traffic, and an optional experiment."""

    variants: Annotated[list[Variant], Field(min_length=1, max_length=MAX_VARIANTS)]
    """The model versions served, each with its traffic weight."""
    router: RouterSpec = Field(default_factory=RouterSpec)
    """The router in front of the variants."""
    experiment: ExperimentSpec | None = None
    """Compare two variants and act on the result; none: a fixed split. With retraining,
    its control is the champion variant and its treatment the challenger's name; left
    out, a challenger is tested with the defaults."""
    evaluation: ServiceEvaluationSpec | None = None
    """Evaluate the served models on a schedule; none: no continuous evaluation."""
    retraining: RetrainingSpec | None = None
    """Train new versions from feedback and test them against the champion; none: no
    retraining."""
    image: Annotated[str, Field(max_length=512, pattern=r"^[^\s]+$")] | None = None
    """Image of the router and of the variants that set none; defaults to the operator's
    configured serving image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy of the router and the engines."""
    image_pull_secrets: Annotated[list[SecretRef], Field(max_length=8)] = Field(
        default_factory=list
    )
    """Registry credentials, by Secret name."""
    secrets: Secrets = Field(default_factory=Secrets)
    """Credentials for the variants' model sources (Hugging Face token, object store), by
    reference."""


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------


class Interval(ApiModel):
    """A confidence interval."""

    lower: float | None = None
    """Lower bound."""
    upper: float | None = None
    """Upper bound."""


class VariantStatus(ApiModel):
    """One variant as the operator sees it."""

    name: Name
    """Variant name."""
    weight: Weight | None = None
    """Percent of the traffic the router gives it now."""
    model_uri: Annotated[str, Field(max_length=MAX_URI)] | None = None
    """The model folder it serves (resolved from a TrainingRun)."""
    model_version: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Model version its responses carry."""
    ready: bool | None = None
    """Whether it has a ready replica and its model is resolved."""
    replicas: Count | None = None
    """Engine replicas wanted."""
    ready_replicas: Count | None = None
    """Engine replicas ready."""
    requests: Count | None = None
    """Requests routed to it (from the router's counts)."""
    errors: Count | None = None
    """5xx answers among them."""
    message: Annotated[str, Field(max_length=MAX_SHORT)] | None = None
    """Why it is not ready, e.g. `TrainingRun chat-b has not succeeded yet`."""
    generation: Annotated[int, Field(ge=1)] | None = None
    """Its model's generation, from the model's lineage."""
    drift: DriftStatus | None = None
    """Its live prompts against its training data."""


class RouterStatus(ApiModel):
    """The router."""

    service: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Service name of the endpoint."""
    url: Annotated[str, Field(max_length=MAX_URI)] | None = None
    """In-cluster base URL of the OpenAI-compatible API."""
    replicas: Count | None = None
    """Router replicas wanted."""
    ready_replicas: Count | None = None
    """Router replicas ready."""


class VariantResult(ApiModel):
    """One variant's numbers on the primary metric."""

    name: Name
    """Variant name."""
    # Not `n`: YAML 1.1 readers (kubectl's among them) take a bare n for false.
    samples: Count
    """Samples (rated responses, or requests): the statistics' n."""
    successes: Count
    """Samples that count for the metric (positive ratings; errors; slow requests)."""
    rate: Rate
    """successes / samples."""
    interval: Interval | None = None
    """Wilson interval of the rate at 1 - alpha (descriptive: a fixed-n interval)."""
    requests: Count | None = None
    """All requests (for the guardrails)."""
    errors: Count | None = None
    """5xx answers among them."""
    latency_p95_seconds: Annotated[float, Field(ge=0.0)] | None = None
    """p95 request latency."""


Decision = Literal["Collecting", "Undecided", "Promote", "Rollback"]


class ExperimentStatus(ApiModel):
    """The experiment's latest look: numbers, decision and why."""

    control: Name | None = None
    """The control variant."""
    treatment: Name | None = None
    """The treatment variant."""
    variants: Annotated[list[VariantResult], Field(max_length=2)] = Field(default_factory=list)
    """Control and treatment, in that order."""
    difference: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None
    """rate(treatment) - rate(control)."""
    difference_interval: Interval | None = None
    """Always-valid confidence sequence of the difference at 1 - alpha."""
    p_value: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Always-valid p-value of the latest look."""
    decision: Decision | None = None
    """`Collecting` (below the minimum samples), `Undecided` (no significant difference
    yet), `Promote` (the treatment won) or `Rollback` (the control won, or a guardrail
    broke). Kept once taken: the experiment stops at its decision."""
    winner: Name | None = None
    """The variant the decision favours."""
    reason: Message | None = None
    """Why, in words with the numbers."""
    guardrail_breach: Annotated[str, Field(max_length=1024)] | None = None
    """The guardrail the treatment broke, if any."""
    applied: bool | None = None
    """Whether the operator shifted traffic on the decision (onDecision allows it)."""
    start_time: datetime | None = None
    """When this experiment began: only responses logged since count. A new control or
    treatment starts a new experiment."""
    decision_time: datetime | None = None
    """When the decision was taken."""
    last_look_time: datetime | None = None
    """When the counts were last read."""
    looks: Count | None = None
    """Looks taken so far."""


class VariantWeight(ApiModel):
    """A variant's share of the traffic."""

    name: Name
    """Variant name."""
    weight: Weight
    """Percent of the traffic."""


class TrafficChange(ApiModel):
    """One change of the traffic split."""

    time: datetime
    """When the router was given the new weights."""
    weights: Annotated[list[VariantWeight], Field(max_length=MAX_VARIANTS)]
    """The new split."""
    cause: Literal["Spec", "Promote", "Rollback", "Guardrail", "Regression", "Challenger"]
    """`Spec` (created or edited), `Promote`/`Rollback` (an experiment's decision),
    `Guardrail` (a broken guardrail rolled back), `Regression` (continuous evaluation
    rolled back) or `Challenger` (a retrained model joined)."""
    reason: Annotated[str, Field(max_length=1024)] = ""
    """Detail, e.g. the decision's reason."""


class DriftStatus(ApiModel):
    """Live prompts against the model's training data (the router's recent log)."""

    unigram_jsd: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Jensen-Shannon divergence (base 2) of the word distributions."""
    length_psi: Annotated[float, Field(ge=0.0)] | None = None
    """Population stability index of the prompt lengths."""
    prompts: Count | None = None
    """Live prompts compared."""
    drifted: bool | None = None
    """Either score above its alert threshold."""


class EvaluationResult(ApiModel):
    """One continuous evaluation of one variant's model."""

    variant: Name
    """Variant name."""
    model_version: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """The model version evaluated."""
    time: datetime
    """When the evaluation finished."""
    metrics: Annotated[dict[str, float], Field(max_length=64)] = Field(default_factory=dict)
    """Metric values (`perplexity`, `intents/accuracy`, ...)."""
    job: Annotated[str, Field(max_length=MAX_SHORT)] | None = None
    """The Job that computed them."""
    error: Annotated[str, Field(max_length=1024)] | None = None
    """Why the evaluation failed (then metrics is empty)."""


class ServiceEvaluationStatus(ApiModel):
    """Continuous evaluation."""

    last_schedule_time: datetime | None = None
    """The latest schedule time evaluations were started for."""
    next_schedule_time: datetime | None = None
    """The next one."""
    active: Annotated[list[Annotated[str, Field(max_length=MAX_SHORT)]], Field(max_length=16)] = (
        Field(default_factory=list)
    )
    """Evaluation Jobs running now."""
    results: Annotated[list[EvaluationResult], Field(max_length=MAX_EVALUATIONS)] = Field(
        default_factory=list
    )
    """Results, oldest first; the newest 20 are kept."""
    regressed: Annotated[list[Name], Field(max_length=MAX_VARIANTS)] = Field(default_factory=list)
    """Variants whose latest result is a regression."""


class ServedModel(ApiModel):
    """A model version the retraining loop knows."""

    training_run: Name | None = None
    """The TrainingRun that made it (none: the spec variant's own source)."""
    model_uri: Annotated[str, Field(max_length=MAX_URI)] | None = None
    """Its model folder."""
    model_version: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    """Its version label."""
    generation: Annotated[int, Field(ge=1)] | None = None
    """Its generation (1: trained from a non-kubetrain model; parent's + 1)."""


class FeedbackSnapshotStatus(ApiModel):
    """A feedback snapshot a retraining run trained on."""

    id: Annotated[str, Field(max_length=MAX_NAME)]
    """Snapshot id (the folder under the destination)."""
    uri: Annotated[str, Field(max_length=MAX_URI)]
    """The snapshot folder."""
    sha256: Annotated[str, Field(max_length=80)] | None = None
    """Content hash of its files."""
    sft: Count | None = None
    """SFT examples (from corrections)."""
    preferences: Count | None = None
    """Preference pairs."""
    binary: Count | None = None
    """Binary-labelled examples."""


class RetrainingRunStatus(ApiModel):
    """One retraining run."""

    name: Name
    """The TrainingRun."""
    start_time: datetime
    """When the operator created it."""
    reasons: Annotated[list[Annotated[str, Field(max_length=MAX_SHORT)]], Field(max_length=8)] = (
        Field(default_factory=list)
    )
    """The triggers that fired."""
    snapshot: FeedbackSnapshotStatus | None = None
    """The feedback snapshot it trained on."""
    outcome: (
        Literal[
            "Exporting", "Training", "Challenging", "Promoted", "RolledBack", "Failed", "Replaced"
        ]
        | None
    ) = None
    """Where it stands: exporting feedback, training, served as the challenger, then
    promoted, rolled back, failed (training or its gate) or replaced by a newer run."""
    message: Annotated[str, Field(max_length=1024)] | None = None
    """Detail of the outcome."""


class RetrainingStatus(ApiModel):
    """The retraining loop."""

    champion: ServedModel | None = None
    """The model the champion variant serves now (after promotions, the latest winner)."""
    challenger: ServedModel | None = None
    """The retrained model under test, while there is one."""
    retiring: ServedModel | None = None
    """The challenger after the decision, still served until the router has stopped
    sending it traffic (after a promotion: until the champion variant serves its model)."""
    runs: Annotated[list[RetrainingRunStatus], Field(max_length=MAX_RETRAINING_RUNS)] = Field(
        default_factory=list
    )
    """Retraining runs, oldest first; the newest 10 are kept."""
    new_feedback: Count | None = None
    """Rated responses in the router's log since the latest retraining run began (or
    since the service was created), at the latest look."""
    last_run_time: datetime | None = None
    """When the latest retraining run was started."""
    next_schedule_time: datetime | None = None
    """The schedule trigger's next time."""
    export_job: Annotated[str, Field(max_length=MAX_SHORT)] | None = None
    """The feedback-export Job running now."""


class ModelServiceStatus(ApiModel):
    """Observed state, written only by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The spec generation the status reflects."""
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(default_factory=list)
    """Standard conditions, one per type: Ready, RouterReady, VariantsReady, Promoted,
    RolledBack, Regressed, Drifted, Retraining."""
    variants_ready: Annotated[str, Field(max_length=16)] | None = None
    """Ready variants over all, e.g. `2/2` (for `kubectl get`)."""
    traffic: Annotated[str, Field(max_length=MAX_SHORT)] | None = None
    """The split the router applies now, e.g. `a=50,b=50` (for `kubectl get`)."""
    variants: Annotated[list[VariantStatus], Field(max_length=MAX_VARIANTS)] = Field(
        default_factory=list
    )
    """Per variant: weight, model, readiness and counts."""
    router: RouterStatus | None = None
    """The router and the service's endpoint."""
    experiment: ExperimentStatus | None = None
    """The experiment's numbers and decision."""
    history: Annotated[list[TrafficChange], Field(max_length=MAX_HISTORY)] = Field(
        default_factory=list
    )
    """Traffic changes, oldest first; the operator keeps the newest 20."""
    evaluation: ServiceEvaluationStatus | None = None
    """Continuous evaluation: results per model version, regressions."""
    retraining: RetrainingStatus | None = None
    """The retraining loop: champion, challenger, runs."""
    generation: Annotated[int, Field(ge=1)] | None = None
    """The champion model's generation (for `kubectl get`)."""


class ModelService(ApiModel):
    """Model versions served side by side behind one OpenAI-compatible endpoint, with
    weighted traffic and an optional A/B experiment that promotes or rolls back."""

    api_version: Literal["kubetrain.dev/v1alpha1"] = API_VERSION
    """Always kubetrain.dev/v1alpha1."""
    kind: Literal["ModelService"] = KIND
    """Always ModelService."""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    """Standard object metadata."""
    spec: ModelServiceSpec
    """Desired service."""
    status: ModelServiceStatus | None = None
    """Observed state."""


def weights(spec: ModelServiceSpec) -> dict[str, int]:
    """The split the spec asks for, variant name -> percent (a single variant without a
    weight gets 100; a variant without one among several gets 0, which validation
    refuses)."""
    if len(spec.variants) == 1 and spec.variants[0].weight is None:
        return {spec.variants[0].name: TOTAL_WEIGHT}
    return {v.name: v.weight or 0 for v in spec.variants}


def traffic_summary(split: dict[str, int]) -> str:
    """status.traffic's text for a split: `a=50,b=50`."""
    return ",".join(f"{name}={weight}" for name, weight in split.items())

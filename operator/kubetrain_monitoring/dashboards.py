"""The kubetrain dashboards: Training, Fleet, Operator, Serving (serving.py) and Experiments
(experiments.py).

Series and where they come from:
- `kubetrain_operator_*`: the operator's /metrics (one per installation).
- `kubetrain_trainer_*`: each run's Ray head pod (/metrics on its `metrics` port). The run's
  name is a label of `kubetrain_trainer_run_info` only, so per-run panels join it in by
  scrape target (`on(job, instance)`), which works with a PodMonitor and with plain
  annotation-based scraping alike.
- `kubetrain_serve_*`: each serving pod; `kubetrain_serve_model_info{model, version}` names
  the run (the model id) and the model version it serves, joined the same way.

`namespace` is the Kubernetes namespace target label that both the Prometheus Operator and
the usual pod-annotation scrape configs attach.
"""

from __future__ import annotations

from kubetrain_monitoring.experiments import experiments
from kubetrain_monitoring.grafana import (
    GRID_WIDTH,
    QUANTILES,
    RATE,
    Json,
    Panel,
    Row,
    Target,
    dashboard,
    query_variable,
    stat,
)
from kubetrain_monitoring.serving import serving

# ---------------------------------------------------------------------------- training

RUN_INFO = 'kubetrain_trainer_run_info{namespace=~"$namespace", run=~"$run"}'
CURRENT_PHASE = "(kubetrain_trainer_phase == 1)"


def per_run(expr: str) -> str:
    """`expr` (trainer series) with the run's name joined in, filtered by $namespace/$run."""
    return f"({expr}) * on(job, instance) group_left(run) {RUN_INFO}"


def per_run_row(expr: str) -> str:
    """per_run plus the current phase as a label: every query of a table then has the same
    labels, so Grafana's merge puts one run on one row."""
    return f"{per_run(expr)} * on(job, instance) group_left(phase) {CURRENT_PHASE}"


ETA = (
    "(kubetrain_trainer_total_steps - kubetrain_trainer_step)"
    " / (deriv(kubetrain_trainer_step[10m]) > 0)"
)
PROGRESS = "100 * kubetrain_trainer_step / kubetrain_trainer_total_steps"


def _organize(rename: dict[str, str]) -> tuple[Json, ...]:
    """Merge instant table queries into one row per series, hide the target labels."""
    return (
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True, "job": True, "instance": True, "pod": True},
                "renameByName": rename,
            },
        },
    )


def _unit(column: str, unit: str) -> Json:
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [{"id": "unit", "value": unit}],
    }


def _runs_table(title: str, row: str, width: int = 24) -> Panel:
    columns = {
        "Value #A": "Progress",
        "Value #B": "Step",
        "Value #C": "Total steps",
        "Value #D": "ETA",
        "Value #E": "Loss",
        "Value #F": "Tokens/s",
        "Value #G": "Checkpoint age",
    }
    exprs = (
        PROGRESS,
        "kubetrain_trainer_step",
        "kubetrain_trainer_total_steps",
        ETA,
        "kubetrain_trainer_loss",
        "kubetrain_trainer_tokens_per_second",
        "kubetrain_trainer_checkpoint_age_seconds",
    )
    row_of = per_run_row if row == "run" else _all_runs_row
    return Panel(
        title,
        tuple(Target(row_of(e), instant=True, table=True) for e in exprs),
        kind="table",
        width=width,
        height=7,
        description="One row per training run: phase, progress, ETA (from the step rate "
        "over the last 10 minutes), latest loss, throughput and the age of the newest "
        "committed checkpoint.",
        transformations=_organize(columns),
        overrides=(
            _unit("Progress", "percent"),
            _unit("ETA", "s"),
            _unit("Checkpoint age", "s"),
            _unit("Tokens/s", "short"),
        ),
    )


def _series(name: str, *properties: tuple[str, object], regex: bool = False) -> Json:
    """A field override of the series named `name` (a regular expression with regex)."""
    return {
        "matcher": {"id": "byRegexp" if regex else "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in properties],
    }


REWARD_COLOR = ("color", {"mode": "fixed", "fixedColor": "green"})


def _preference_and_rl(run: str) -> list[Panel | Row]:
    """Numbers of the methods that learn from preferences or rewards: absent (no data) for
    the others."""
    mean, std = "kubetrain_trainer_reward_mean", "kubetrain_trainer_reward_std"
    return [
        Row("Preference and RL"),
        Panel(
            "Reward: $run",
            (
                Target(per_run(mean), "mean"),
                Target(per_run(f"{mean} + {std}"), "mean + std"),
                Target(per_run(f"{mean} - {std}"), "mean - std"),
            ),
            description="grpo: mean reward of each step's sampled completions, with a band "
            "of one standard deviation (the spread the group advantages are scaled by; a "
            "band that shrinks to nothing leaves no signal to learn from). One panel per run.",
            # A band is filled between two named series, so each run gets its own panel.
            repeat="run",
            width=GRID_WIDTH,
            overrides=(
                _series("mean", REWARD_COLOR, ("custom.fillOpacity", 0), ("custom.lineWidth", 2)),
                _series(
                    "mean + std",
                    REWARD_COLOR,
                    ("custom.lineWidth", 0),
                    ("custom.fillOpacity", 20),
                    ("custom.fillBelowTo", "mean - std"),
                ),
                _series(
                    "mean - std",
                    REWARD_COLOR,
                    ("custom.lineWidth", 0),
                    ("custom.fillOpacity", 0),
                    ("custom.hideFrom", {"legend": True, "tooltip": False, "viz": False}),
                ),
            ),
        ),
        Panel(
            "Reward margin and accuracy",
            (
                Target(per_run("kubetrain_trainer_reward_margin"), f"{run} margin"),
                Target(per_run("kubetrain_trainer_reward_accuracy"), f"{run} accuracy"),
            ),
            description="dpo, kto: mean implicit reward (beta x log-ratio to the reference) "
            "of chosen (desirable) minus rejected (undesirable) completions; dpo: the share "
            "of pairs whose chosen completion has the higher implicit reward (right axis).",
            overrides=(
                _series(
                    ".* accuracy",
                    ("unit", "percentunit"),
                    ("min", 0),
                    ("max", 1),
                    ("custom.axisPlacement", "right"),
                    regex=True,
                ),
            ),
        ),
        Panel(
            "KL to the reference",
            (Target(per_run("kubetrain_trainer_kl"), run),),
            description="kto, grpo: estimated KL divergence of the policy from the frozen "
            "reference model (the starting model, or the base without adapters under LoRA). "
            "A steady climb is the policy drifting from where it started.",
        ),
    ]


def training() -> Json:
    run = "{{run}}"
    items: list[Panel | Row] = [
        _runs_table("Runs", "run"),
        Row("Model quality"),
        Panel(
            "Loss",
            (
                Target(per_run("kubetrain_trainer_loss"), f"{run} train"),
                Target(
                    per_run('kubetrain_trainer_eval{metric="loss"}'), f"{run} eval {{{{dataset}}}}"
                ),
            ),
            description="Training loss (mean over ranks, latest step) and the loss of the "
            "latest evaluation on the validation split or a labelled dataset.",
        ),
        Panel(
            "Evaluation metrics",
            (
                Target(
                    per_run('kubetrain_trainer_eval{metric!="loss"}'),
                    f"{run} {{{{metric}}}} {{{{dataset}}}}",
                ),
            ),
            description="Latest evaluation: perplexity, and accuracy/precision/recall/F1 "
            "for labelled datasets. Each value holds until the next evaluation.",
        ),
        *_preference_and_rl(run),
        Row("Optimization"),
        Panel(
            "Learning rate",
            (Target(per_run("kubetrain_trainer_learning_rate"), run),),
            width=8,
        ),
        Panel(
            "Gradient norm",
            (Target(per_run("kubetrain_trainer_grad_norm"), run),),
            description="Global gradient norm before clipping.",
            width=8,
        ),
        Panel(
            "Progress",
            (Target(per_run(PROGRESS), run),),
            unit="percent",
            width=8,
        ),
        Row("Throughput"),
        Panel(
            "Tokens/s",
            (Target(per_run("kubetrain_trainer_tokens_per_second"), run),),
            description="Training tokens per second over all workers.",
            width=8,
        ),
        Panel(
            "MFU",
            (Target(per_run("kubetrain_trainer_mfu"), run),),
            unit="percentunit",
            description="Model FLOPs utilization against the devices' published peak "
            "(on CPU: a measured matmul ceiling).",
            width=8,
        ),
        Panel(
            "ETA",
            (Target(per_run(ETA), run),),
            unit="s",
            description="Remaining steps over the step rate of the last 10 minutes.",
            width=8,
        ),
        Panel(
            "Memory: planned vs measured peak",
            (
                Target(per_run("kubetrain_trainer_memory_planned_bytes"), f"{run} planned"),
                Target(
                    f"max by (run) ({per_run('kubetrain_trainer_memory_peak_bytes')})",
                    f"{run} measured (busiest rank)",
                ),
            ),
            unit="bytes",
            description="Per training process: the memory plan's peak (kubetrain plan, at "
            "the world size and precision the run got) and the highest peak a rank has "
            "allocated (GPU: the CUDA allocator's peak; CPU: tensors tracked over the "
            "attempt's second step). A measured line above the planned one by more than a "
            "quarter means the plan misses something this model does.",
            width=24,
        ),
        Row("Checkpoints and data"),
        Panel(
            "Checkpoint age",
            (Target(per_run("kubetrain_trainer_checkpoint_age_seconds"), run),),
            unit="s",
            description="Seconds since the newest committed checkpoint; a retry resumes "
            "from it, so this is the work a failure would lose.",
            width=8,
        ),
        Panel(
            "Checkpoint save time",
            (Target(per_run("kubetrain_trainer_checkpoint_duration_seconds"), run),),
            unit="s",
            width=8,
        ),
        Panel(
            "Data preparation",
            (
                Target(
                    f"sum by (run, stage, outcome) ({per_run('kubetrain_trainer_data_documents')})",
                    instant=True,
                    table=True,
                ),
            ),
            kind="table",
            description="Documents in, kept and dropped (by reason) per preparation stage.",
            width=8,
            transformations=_organize({"Value": "Documents"}),
        ),
    ]
    variables = [
        query_variable(
            "namespace", "Namespace", "label_values(kubetrain_trainer_run_info, namespace)"
        ),
        query_variable(
            "run",
            "Run",
            'label_values(kubetrain_trainer_run_info{namespace=~"$namespace"}, run)',
        ),
    ]
    return dashboard(
        "kubetrain-training",
        "kubetrain / Training",
        "Per-run training: loss and evaluation curves, rewards, margins and KL of the "
        "preference and RL methods, learning rate, throughput, MFU, gradient norm, "
        "checkpoints and progress.",
        items,
        variables,
    )


# ---------------------------------------------------------------------------- fleet

OP = 'namespace=~"$namespace"'
ACTIVE = 'phase=~"Running|Evaluating"'
QUEUED = 'phase=~"Pending|Provisioning"'


def _all_runs_row(expr: str) -> str:
    """Like per_run_row, for every run whatever the variables say."""
    return (
        f"({expr}) * on(job, instance) group_left(run) kubetrain_trainer_run_info"
        f" * on(job, instance) group_left(phase) {CURRENT_PHASE}"
    )


def fleet() -> Json:
    gpus_description = (
        "GPUs requested by runs that are training or evaluating (workers x gpusPerWorker, "
        "from kubetrain_operator_run_gpus). Requested, not measured: kubetrain exports no "
        "per-device utilization."
    )
    items: list[Panel | Row] = [
        stat("Active runs", f"sum(kubetrain_operator_runs{{{OP}, {ACTIVE}}})"),
        stat(
            "Queued runs",
            f"sum(kubetrain_operator_runs{{{OP}, {QUEUED}}})",
            "Runs waiting for their Ray cluster: Pending or Provisioning.",
        ),
        stat("Failed runs", f'sum(kubetrain_operator_runs{{{OP}, phase="Failed"}})'),
        stat("Succeeded runs", f'sum(kubetrain_operator_runs{{{OP}, phase="Succeeded"}})'),
        stat(
            "GPUs in use", f"sum(kubetrain_operator_run_gpus{{{OP}, {ACTIVE}}})", gpus_description
        ),
        stat(
            "GPU-hours (time range)",
            f"sum(sum_over_time(kubetrain_operator_run_gpus{{{OP}, {ACTIVE}}}[$__range:1m])) / 60",
            gpus_description + " Summed over the dashboard's time range at 1-minute resolution.",
        ),
        Panel(
            "Runs by phase",
            (Target(f"sum by (phase) (kubetrain_operator_runs{{{OP}}})", "{{phase}}"),),
            stacked=True,
            description="TrainingRuns the operator reconciles, by status.phase.",
        ),
        Panel(
            "Queue",
            (
                Target(
                    "sum by (phase) "
                    f'(kubetrain_operator_runs{{{OP}, phase=~"Pending|Provisioning|Suspended"}})',
                    "{{phase}}",
                ),
            ),
            stacked=True,
            description="Runs not training: waiting for pods (Pending, Provisioning) or suspended.",
        ),
        Panel(
            "Failures and retries",
            (
                Target(f'sum(kubetrain_operator_runs{{{OP}, phase="Failed"}})', "failed runs"),
                Target(
                    f"sum by (cause) (increase(kubetrain_operator_retries_total{{{OP}}}[{RATE}]))",
                    "retries: {{cause}}",
                ),
            ),
            description="Runs in phase Failed, and Ray clusters recreated after a retryable "
            "failure (each retry resumes from the latest checkpoint).",
        ),
        Panel(
            "GPUs requested by phase",
            (Target(f"sum by (phase) (kubetrain_operator_run_gpus{{{OP}}})", "{{phase}}"),),
            stacked=True,
            description=gpus_description,
        ),
        Panel(
            "Training throughput by run",
            (
                Target(
                    "sum by (namespace, run) (kubetrain_trainer_tokens_per_second"
                    " * on(job, instance) group_left(run) kubetrain_trainer_run_info)",
                    "{{namespace}}/{{run}}",
                ),
            ),
            description="Tokens/s of every run whose head is scraped (all namespaces).",
        ),
        Panel(
            "MFU by run",
            (
                Target(
                    "max by (namespace, run) (kubetrain_trainer_mfu"
                    " * on(job, instance) group_left(run) kubetrain_trainer_run_info)",
                    "{{namespace}}/{{run}}",
                ),
            ),
            unit="percentunit",
        ),
        _runs_table("Training runs (all namespaces)", "all"),
    ]
    variables = [
        query_variable(
            "namespace", "Operator namespace", "label_values(kubetrain_operator_runs, namespace)"
        ),
    ]
    return dashboard(
        "kubetrain-fleet",
        "kubetrain / Fleet",
        "All TrainingRuns: phases, queue, failures and retries, GPUs requested and "
        "GPU-hours, throughput per run.",
        items,
        variables,
    )


# ---------------------------------------------------------------------------- operator


def operator() -> Json:
    buckets = f"kubetrain_operator_reconcile_duration_seconds_bucket{{{OP}}}"
    items: list[Panel | Row] = [
        stat("Runs tracked", f"sum(kubetrain_operator_runs{{{OP}}})"),
        stat(
            "Reconciles/s",
            f"sum(rate(kubetrain_operator_reconcile_duration_seconds_count{{{OP}}}[{RATE}]))",
            unit="ops",
        ),
        stat(
            "Reconcile p99",
            f"histogram_quantile(0.99, sum by (le) (rate({buckets}[{RATE}])))",
            unit="s",
        ),
        stat(
            "Reconcile errors (1h)",
            f"sum(increase(kubetrain_operator_reconcile_errors_total{{{OP}}}[1h]))",
        ),
        stat(
            "API errors (1h)",
            f"sum(increase(kubetrain_operator_api_errors_total{{{OP}}}[1h]))",
        ),
        stat(
            "Retries (1h)",
            f"sum(increase(kubetrain_operator_retries_total{{{OP}}}[1h]))",
        ),
        Panel(
            "Reconcile rate",
            (
                Target(
                    f"sum(rate(kubetrain_operator_reconcile_duration_seconds_count{{{OP}}}[{RATE}]))",
                    "reconciles",
                ),
                Target(
                    f"sum(rate(kubetrain_operator_reconcile_errors_total{{{OP}}}[{RATE}]))",
                    "errors",
                ),
            ),
            unit="ops",
            description="Reconciles of one TrainingRun per second (watch events, and the "
            "resync of unfinished runs), and those that raised (retried with backoff).",
        ),
        Panel(
            "Reconcile latency",
            (
                *(
                    Target(
                        f"histogram_quantile({q}, sum by (le) (rate({buckets}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in QUANTILES
                ),
                Target(
                    f"sum(rate(kubetrain_operator_reconcile_duration_seconds_sum{{{OP}}}[{RATE}]))"
                    " / sum(rate("
                    f"kubetrain_operator_reconcile_duration_seconds_count{{{OP}}}[{RATE}]))",
                    "mean",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Kubernetes API writes",
            (
                Target(
                    "sum by (verb, resource) "
                    f"(rate(kubetrain_operator_api_calls_total{{{OP}}}[{RATE}]))",
                    "{{verb}} {{resource}}",
                ),
            ),
            unit="ops",
            description="Mutating API calls by verb and kind; a converged run makes none.",
        ),
        Panel(
            "Kubernetes API errors",
            (
                Target(
                    f"sum by (code) (rate(kubetrain_operator_api_errors_total{{{OP}}}[{RATE}]))",
                    "{{code}}",
                ),
            ),
            unit="ops",
            description="Failed API calls by HTTP status ('connection' when none came "
            "back); 409, 429 and 5xx are retried.",
        ),
        Panel(
            "Run retries",
            (
                Target(
                    f"sum by (cause) (increase(kubetrain_operator_retries_total{{{OP}}}[{RATE}]))",
                    "{{cause}}",
                ),
            ),
            description="Ray clusters recreated after a failure, by cause.",
        ),
        Panel(
            "Runs by phase",
            (Target(f"sum by (phase) (kubetrain_operator_runs{{{OP}}})", "{{phase}}"),),
            stacked=True,
        ),
    ]
    variables = [
        query_variable(
            "namespace", "Operator namespace", "label_values(kubetrain_operator_runs, namespace)"
        ),
    ]
    return dashboard(
        "kubetrain-operator",
        "kubetrain / Operator",
        "Health of the kubetrain operator: reconcile rate, latency and errors, Kubernetes "
        "API writes, errors and retries.",
        items,
        variables,
    )


# name -> dashboard JSON; the name is the file (and ConfigMap key) `<name>.json`.
DASHBOARDS: dict[str, Json] = {
    "training": training(),
    "fleet": fleet(),
    "operator": operator(),
    "serving": serving(),
    "experiments": experiments(),
}

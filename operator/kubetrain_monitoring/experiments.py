"""The Experiments dashboard: ModelServices' traffic per variant, the A/B experiment's
numbers and decisions, its guardrails, and the served models' quality (continuous
evaluation per model version, feedback, prompt drift).

Two sources:
- the router (`kubetrain_route_*`, one series set per router pod, labelled by `variant`);
  `kubetrain_route_model_info{model}` names the service (its model name, the ModelService's
  name), joined in by scrape target like the serving dashboard's model_info;
- the operator (`kubetrain_modelservice_*`, `kubetrain_experiment_*`), labelled with the
  ModelService's own `namespace` and `modelservice` (scraped with honor_labels), from its
  latest status: applied weights, the rates with their intervals, p-value and decision,
  evaluation results and prompt drift.
"""

from __future__ import annotations

from kubetrain_monitoring.grafana import (
    RATE,
    Json,
    Panel,
    Row,
    Target,
    dashboard,
    query_variable,
    stat,
)

# kubetrain_api.modelservice.Decision, in its order (the operator exports the index);
# written out because this package imports nothing of ours at run time, and checked
# against the API by tests/monitoring/test_dashboards.py.
DECISIONS: tuple[str, ...] = ("Collecting", "Undecided", "Promote", "Rollback")
DECISION_COLORS = {"Collecting": "blue", "Undecided": "yellow", "Promote": "green"}

ROUTER_INFO = 'kubetrain_route_model_info{namespace=~"$namespace", model=~"$modelservice"}'
SERVICE = 'namespace=~"$namespace", modelservice=~"$modelservice"'
GUARDRAIL_QUANTILE = 0.95  # the guardrail compares p95 latencies (Guardrails.maxLatencyIncrease)


def per_service(expr: str) -> str:
    """`expr` (router series) with the service's name (`model`) joined in, filtered by
    $namespace/$modelservice."""
    return f"({expr}) * on(job, instance) group_left(model) {ROUTER_INFO}"


def _by_variant(selector: str, by: str = "model, variant") -> str:
    return f"sum by ({by}) ({per_service(f'rate({selector}[{RATE}])')})"


def decision_code() -> str:
    """The current decision as a number (its index in Decision) per service, for a state
    timeline whose value mappings name it: the decision series are one-hot, so the sum of
    each times its index is the current one's index."""
    terms = " or ".join(
        f'kubetrain_experiment_decision{{{SERVICE}, decision="{d}"}} * {i}'
        for i, d in enumerate(DECISIONS)
    )
    return f"sum by (namespace, modelservice) ({terms})"


def experiments() -> Json:
    variant = "{{model}} {{variant}}"
    service_variant = "{{modelservice}} {{variant}}"
    requests = "kubetrain_route_requests_total"
    errors_5xx = f'{requests}{{code=~"5.."}}'
    latency = "kubetrain_route_request_duration_seconds_bucket"
    decision_names = {
        str(i): {"text": d, "color": DECISION_COLORS.get(d, "red"), "index": i}
        for i, d in enumerate(DECISIONS)
    }
    items: list[Panel | Row] = [
        stat("Requests/s", f"sum({per_service(f'rate({requests}[{RATE}])')})", unit="reqps"),
        stat(
            "p-value",
            f"max(kubetrain_experiment_p_value{{{SERVICE}}})",
            "Always-valid p-value of the latest look: it may be watched continuously.",
        ),
        stat(
            "Difference",
            f"max(kubetrain_experiment_difference{{{SERVICE}}})",
            "rate(treatment) - rate(control) on the primary metric.",
            unit="percentunit",
        ),
        stat("Looks", f"max(kubetrain_experiment_looks{{{SERVICE}}})"),
        stat(
            "Variants ready",
            f"sum(kubetrain_modelservice_variant_ready{{{SERVICE}}})",
            "Variants with a ready replica and a resolved model.",
        ),
        stat(
            "Feedback (time range)",
            f"sum({per_service('increase(kubetrain_route_feedback_total[$__range])')})",
            "Ratings stored through the router's POST /v1/feedback.",
        ),
        Row("Traffic"),
        Panel(
            "Requests by variant",
            (Target(_by_variant(requests), variant),),
            unit="reqps",
            stacked=True,
            description="Generation requests the router sent to each variant.",
        ),
        Panel(
            "Traffic weights",
            (
                Target(f"kubetrain_modelservice_variant_weight{{{SERVICE}}}", service_variant),
                Target(
                    f"max by (model, variant) ({per_service('kubetrain_route_weight')})",
                    f"{variant} (router)",
                ),
            ),
            unit="percent",
            description="Percent of the traffic per variant: as the operator applied it "
            "(status.variants[].weight), and as the router pods hold it.",
        ),
        Panel(
            "Weights timeline",
            (Target(f"kubetrain_modelservice_variant_weight{{{SERVICE}}}", service_variant),),
            kind="state-timeline",
            unit="percent",
            width=16,
            description="Each variant's weight over time: a promotion or rollback shows as "
            "a step to 100 or 0.",
        ),
        Panel(
            "Last traffic change",
            (
                Target(
                    "max by (modelservice, cause) "
                    f"(kubetrain_modelservice_last_traffic_change_timestamp_seconds{{{SERVICE}}})"
                    " * 1000",
                    instant=True,
                    table=True,
                ),
            ),
            kind="table",
            unit="dateTimeAsIso",
            width=8,
            description="When the split last changed, by cause: Spec (created or edited), "
            "Promote, Rollback (a decision) or Guardrail.",
            transformations=(
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True},
                        "renameByName": {"Value": "Time", "modelservice": "Service"},
                    },
                },
            ),
        ),
        Row("Experiment"),
        Panel(
            "Primary metric by variant",
            (
                Target(f"kubetrain_experiment_rate{{{SERVICE}}}", f"{service_variant} rate"),
                Target(f"kubetrain_experiment_rate_lower{{{SERVICE}}}", f"{service_variant} lower"),
                Target(f"kubetrain_experiment_rate_upper{{{SERVICE}}}", f"{service_variant} upper"),
            ),
            unit="percentunit",
            description="The primary metric's rate per variant (e.g. positive feedback) "
            "with its Wilson interval at 1 - alpha.",
        ),
        Panel(
            "Difference and confidence sequence",
            (
                Target(f"kubetrain_experiment_difference{{{SERVICE}}}", "{{modelservice}}"),
                Target(
                    f"kubetrain_experiment_difference_lower{{{SERVICE}}}",
                    "{{modelservice}} lower",
                ),
                Target(
                    f"kubetrain_experiment_difference_upper{{{SERVICE}}}",
                    "{{modelservice}} upper",
                ),
            ),
            unit="percentunit",
            description="rate(treatment) - rate(control) and its always-valid confidence "
            "sequence: a decision comes when it leaves zero.",
        ),
        Panel(
            "p-value",
            (Target(f"kubetrain_experiment_p_value{{{SERVICE}}}", "{{modelservice}}"),),
            description="Always-valid p-value of each look; it only falls, and the "
            "experiment decides when it drops below alpha.",
        ),
        Panel(
            "Samples by variant",
            (
                Target(f"kubetrain_experiment_samples{{{SERVICE}}}", f"{service_variant} samples"),
                Target(
                    f"kubetrain_experiment_successes{{{SERVICE}}}",
                    f"{service_variant} successes",
                ),
            ),
            description="Samples (rated responses, or requests) and those that count for "
            "the metric; no decision before the minimum samples per variant.",
        ),
        Panel(
            "Decision timeline",
            (Target(decision_code(), "{{modelservice}}"),),
            kind="state-timeline",
            width=24,
            height=5,
            mappings=({"type": "value", "options": decision_names},),
            description="Collecting (below the minimum samples), Undecided, then Promote "
            "or Rollback (kept once taken).",
        ),
        Row("Guardrails"),
        Panel(
            "5xx ratio by variant",
            (
                Target(
                    f"({_by_variant(errors_5xx)} or 0 * {_by_variant(requests)})"
                    f" / {_by_variant(requests)}",
                    variant,
                ),
            ),
            unit="percentunit",
            description="Share of routed requests answered 5xx; the treatment is rolled "
            "back when its rate is surely above maxErrorRate.",
        ),
        Panel(
            f"Latency p{round(GUARDRAIL_QUANTILE * 100)} by variant",
            (
                Target(
                    f"histogram_quantile({GUARDRAIL_QUANTILE}, "
                    f"{_by_variant(latency, 'le, model, variant')})",
                    variant,
                ),
            ),
            unit="s",
            description="Request to last byte through the router; the treatment is rolled "
            "back when it is slower than the control by more than maxLatencyIncrease.",
        ),
        Panel(
            "Router errors by reason",
            (
                Target(
                    _by_variant("kubetrain_route_errors_total", "model, variant, reason"),
                    f"{variant} {{{{reason}}}}",
                ),
            ),
            unit="reqps",
            description="Routed requests that failed: upstream_5xx, connect, timeout, stream.",
        ),
        Row("Model quality"),
        Panel(
            "Continuous evaluation",
            (
                Target(
                    f"kubetrain_modelservice_evaluation_metric{{{SERVICE}}}",
                    "{{modelservice}} {{variant}} {{model_version}} {{metric}}",
                ),
            ),
            width=24,
            description="Each variant's latest continuous evaluation (spec.evaluation) by "
            "model version and metric: a new model version starts a new line, so the "
            "history shows each version against the one before.",
        ),
        Panel(
            "Feedback by variant",
            (
                Target(
                    "sum by (model, variant, rating) "
                    f"({per_service(f'rate(kubetrain_route_feedback_total[{RATE}])')})",
                    f"{variant} {{{{rating}}}}",
                ),
            ),
            unit="ops",
            width=8,
            description="Ratings stored per second through the router, by the rated "
            "response's variant and the rating (down, neutral, up): the raw material of "
            "retraining and of the positive-feedback metric.",
        ),
        Panel(
            "Prompt drift: words",
            (
                Target(
                    f'kubetrain_modelservice_prompt_drift{{{SERVICE}, measure="unigram_jsd"}}',
                    service_variant,
                ),
            ),
            width=8,
            description="Jensen-Shannon divergence (0 to 1) between the words of each "
            "variant's latest prompts (up to 500) and its model's training data; above "
            "about 0.1 the prompts are on other topics (KubetrainPromptDrift).",
        ),
        Panel(
            "Prompt drift: lengths",
            (
                Target(
                    f'kubetrain_modelservice_prompt_drift{{{SERVICE}, measure="length_psi"}}',
                    service_variant,
                ),
            ),
            width=8,
            description="Population stability index of the prompts' lengths against the "
            "training texts': below 0.1 stable, above 0.25 a real shift.",
        ),
    ]
    variables = [
        query_variable(
            "namespace", "Namespace", "label_values(kubetrain_route_model_info, namespace)"
        ),
        query_variable(
            "modelservice",
            "ModelService",
            'label_values(kubetrain_route_model_info{namespace=~"$namespace"}, model)',
        ),
    ]
    return dashboard(
        "kubetrain-experiments",
        "kubetrain / Experiments",
        "ModelServices: traffic per variant, the A/B experiment's rates with intervals, "
        "p-value and decision timeline, the guardrails (5xx ratio, p95 latency), and model "
        "quality (continuous evaluation, feedback, prompt drift).",
        items,
        variables,
    )

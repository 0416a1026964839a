"""The Serving dashboard: the OpenAI-compatible model servers (`kubetrain_serve_*`), one
series set per serving pod, named by `kubetrain_serve_model_info{model, version}`. See
dashboards.py for how the series are joined."""

from __future__ import annotations

from kubetrain_monitoring.grafana import (
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

# ---------------------------------------------------------------------------- serving

MODEL_INFO = 'kubetrain_serve_model_info{namespace=~"$namespace", model=~"$run"}'
API = 'endpoint=~"/v1/.*"'
GENERATE = 'endpoint=~"/v1/(chat/)?completions"'


def per_model(expr: str) -> str:
    """`expr` (serving series) with the served run's name (`model`) and version joined in,
    filtered by $namespace/$run."""
    return f"({expr}) * on(job, instance) group_left(model, version) {MODEL_INFO}"


def _rate(selector: str, by: str) -> str:
    return f"sum by ({by}) ({per_model(f'rate({selector}[{RATE}])')})"


def _quantile(q: float, metric: str, by: str = "model") -> str:
    return f"histogram_quantile({q}, {_rate(metric, f'le, {by}')})"


def serving() -> Json:
    model = "{{model}}"
    requests = f"kubetrain_serve_requests_total{{{API}}}"
    errors_5xx = f'kubetrain_serve_requests_total{{{API}, code=~"5.."}}'
    latency = f"kubetrain_serve_request_duration_seconds_bucket{{{GENERATE}}}"
    ttft = "kubetrain_serve_time_to_first_token_seconds_bucket"
    items: list[Panel | Row] = [
        stat("Requests/s", f"sum({per_model(f'rate({requests}[{RATE}])')})", unit="reqps"),
        stat(
            "5xx ratio",
            f"sum({per_model(f'rate({errors_5xx}[{RATE}])')})"
            f" / sum({per_model(f'rate({requests}[{RATE}])')})",
            "Share of API requests answered with a 5xx (the serving alert's measure).",
            unit="percentunit",
        ),
        stat("Latency p90", f"histogram_quantile(0.9, {_rate(latency, 'le')})", unit="s"),
        stat("TTFT p90", f"histogram_quantile(0.9, {_rate(ttft, 'le')})", unit="s"),
        stat("Serving pods", f"count({MODEL_INFO})", "Model server pods scraped."),
        stat(
            "Feedback (time range)",
            f"sum({per_model('increase(kubetrain_serve_feedback_total[$__range])')})",
            "Ratings stored through POST /v1/feedback.",
        ),
        Panel(
            "Requests by code",
            (Target(_rate(requests, "model, code"), f"{model} {{{{code}}}}"),),
            unit="reqps",
            description="API requests (/v1/*) answered, by HTTP status.",
        ),
        Panel(
            "Errors by code",
            (
                Target(
                    _rate(
                        f'kubetrain_serve_requests_total{{{API}, code=~"[45].."}}',
                        "model, endpoint, code",
                    ),
                    f"{model} {{{{endpoint}}}} {{{{code}}}}",
                ),
            ),
            unit="reqps",
            description="API requests (/v1/*) refused or failed: bad input (400), too large "
            "(413), overload (429), loading or draining (503), server faults (500).",
        ),
        Panel(
            "Request latency",
            tuple(Target(_quantile(q, latency), f"{model} p{round(q * 100)}") for q in QUANTILES),
            unit="s",
            description="Completions and chat completions, request to last byte.",
        ),
        Panel(
            "Time to first token",
            tuple(Target(_quantile(q, ttft), f"{model} p{round(q * 100)}") for q in QUANTILES),
            unit="s",
            description="Request to the first generated token, queueing included.",
        ),
        Panel(
            "Generated tokens/s",
            (Target(_rate("kubetrain_serve_generated_tokens_total", "model"), model),),
        ),
        Panel(
            "In flight and queued",
            (
                Target(
                    f"sum by (model) ({per_model('kubetrain_serve_in_flight')})",
                    f"{model} in flight",
                ),
                Target(
                    f"sum by (model) ({per_model('kubetrain_serve_queue_depth')})",
                    f"{model} queued",
                ),
            ),
            description="Requests generating now, and waiting for a generation slot (over "
            "the queue limit they get 429).",
        ),
        Panel(
            "Feedback",
            (
                Target(
                    "sum by (model, rating) "
                    f"({per_model(f'increase(kubetrain_serve_feedback_total[{RATE}])')})",
                    f"{model} {{{{rating}}}}",
                ),
            ),
            description="Ratings (up/down) stored per interval.",
        ),
        Panel(
            "Serving pods by version",
            (Target(f"count by (model, version) ({MODEL_INFO})", "{{version}}"),),
            stacked=True,
            description="Pods per model version: a rolling update shows as one version "
            "replacing the other.",
        ),
    ]
    variables = [
        query_variable(
            "namespace", "Namespace", "label_values(kubetrain_serve_model_info, namespace)"
        ),
        query_variable(
            "run",
            "Run",
            'label_values(kubetrain_serve_model_info{namespace=~"$namespace"}, model)',
        ),
    ]
    return dashboard(
        "kubetrain-serving",
        "kubetrain / Serving",
        "OpenAI-compatible model servers: requests, latency and time to first token, "
        "tokens/s, errors by code, feedback, in-flight requests and queue depth.",
        items,
        variables,
    )

"""`kubetrain_route_*` Prometheus metrics, per variant, in a registry of the router's own.
Labels are bounded: `variant` is a configured variant's name (or `other`), `endpoint` one
of the two generation routes, `code` an HTTP status, `rating` down/neutral/up, `measure`
unigram_jsd or length_psi."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATING_LABELS = {-1: "down", 0: "neutral", 1: "up"}


class RouteMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kubetrain_route_requests",
            "Generation requests routed, by variant and the status the client got",
            ["variant", "endpoint", "code"],
            registry=r,
        )
        self.errors = Counter(
            "kubetrain_route_errors",
            "Routed requests that failed (5xx to the client): upstream_5xx, connect, "
            "timeout, stream (the engine's stream broke or reported an error)",
            ["variant", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "kubetrain_route_request_duration_seconds",
            "Time from request to the last byte of the response, streams included",
            ["variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "kubetrain_route_feedback",
            "Feedback stored, by the rated response's variant and the rating",
            ["variant", "rating"],
            registry=r,
        )
        self.weight = Gauge(
            "kubetrain_route_weight",
            "Percent of the traffic per variant now",
            ["variant"],
            registry=r,
        )
        # Names the service (the config's `model`, a ModelService's name): dashboards join
        # it in by scrape target, as they do kubetrain_serve_model_info.
        self.model_info = Gauge(
            "kubetrain_route_model_info",
            "1, labelled with the service's model name this router serves",
            ["model"],
            registry=r,
        )
        self.log_failures = Counter(
            "kubetrain_route_log_failures",
            "Responses served but not logged (the store failed); feedback on them is refused",
            registry=r,
        )
        self.prompt_drift = Gauge(
            "kubetrain_route_prompt_drift",
            "Prompt drift of the variant's latest prompts from its model's training data: "
            "unigram_jsd (Jensen-Shannon divergence of words), length_psi (stability index "
            "of lengths); set when /stats computes it, absent without a training summary",
            ["variant", "measure"],
            registry=r,
        )
        self.config_reloads = Counter(
            "kubetrain_route_config_reloads",
            "Configuration file changes seen: applied, or refused (the old one stays)",
            ["result"],
            registry=r,
        )

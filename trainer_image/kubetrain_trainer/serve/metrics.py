"""`kubetrain_serve_*` Prometheus metrics, in a registry of the app's own (two apps in one
process, as in tests, never collide). Labels are bounded: the endpoint is one of the known
routes or `other`, the code an HTTP status, the rating `up` or `down`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from kubetrain_api.routing import DRIFT_SUMMARY_PATH

ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/feedback",
    DRIFT_SUMMARY_PATH,
    "/healthz",
    "/readyz",
    "/metrics",
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def endpoint_label(path: str) -> str:
    """The route a path belongs to, or `other` (unknown paths must not mint new series)."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


class ServeMetrics:
    def __init__(self, model: str = "", version: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Which run's model this server answers for: dashboards join on it by target.
        self.model = Info("kubetrain_serve_model", "The served model", registry=r)
        self.model.info({"model": model, "version": version})
        self.requests = Counter(
            "kubetrain_serve_requests", "HTTP requests answered", ["endpoint", "code"], registry=r
        )
        self.request_duration = Histogram(
            "kubetrain_serve_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "kubetrain_serve_time_to_first_token_seconds",
            "Time from request to the first generated token, queueing included",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "kubetrain_serve_generated_tokens", "Completion tokens generated", registry=r
        )
        self.in_flight = Gauge("kubetrain_serve_in_flight", "Requests generating now", registry=r)
        self.queue_depth = Gauge(
            "kubetrain_serve_queue_depth", "Requests waiting for a generation slot", registry=r
        )
        self.feedback = Counter(
            "kubetrain_serve_feedback", "Feedback records stored", ["rating"], registry=r
        )

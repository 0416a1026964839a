"""The router's contracts (`kubetrain route`): its configuration, which the operator writes
into a ConfigMap and the router re-reads when the file changes (weights shift without a
restart), the headers on every routed response, and the `GET /stats` answer the operator
reads. Light like the rest of kubetrain_api: pydantic, PyYAML and the standard library.

The configuration file is YAML or JSON, camelCase like the CRDs:

    model: chat             # the service's model name (GET /v1/models, requests' `model`)
    salt: chat              # mixed into the sticky hash; changing it reshuffles every user
    stickyHeader: X-User-Id # optional; without it the body's `user` field is the key
    callerHeader: X-Kubetrain-Caller   # who rates, on POST /v1/feedback
    variants:
      - {name: a, url: "http://chat-a:8000", modelVersion: run-a-step100, weight: 50}
      - {name: b, url: "http://chat-b:8000", modelVersion: run-b-step100, weight: 50}
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from kubetrain_api.v1alpha1 import MAX_NAME, MAX_SHORT, ApiModel, Name

ROUTER_PORT: Final = 8000
"""The router's HTTP port: OpenAI API, `/v1/feedback`, `/stats`, probes and `/metrics`."""
HEALTH_PATH: Final = "/healthz"
"""Liveness: 200 while the process serves HTTP."""
READY_PATH: Final = "/readyz"
"""Readiness: 200 once the configuration is loaded and the store is open."""
STATS_PATH: Final = "/stats"
"""Per-variant counts for the experiment (`RouterStats`); `?since=<Unix seconds>` and
`?slowerThan=<seconds>` (count the responses slower than that)."""
CONFIG_FILE: Final = "router.yaml"
"""The key of the router's ConfigMap, mounted as `<folder>/router.yaml`."""
STORE_ENV: Final = "KUBETRAIN_ROUTER_STORE"
"""The environment variable holding the store's target (a PostgreSQL DSN from a Secret,
or a SQLite file path), so the password never appears on a command line."""

HEADER_RESPONSE_ID: Final = "x-kubetrain-response-id"
"""On every routed response: the response id (also the body's `id`), for feedback."""
HEADER_VARIANT: Final = "x-kubetrain-variant"
"""On every routed response: the variant that answered."""
HEADER_MODEL_VERSION: Final = "x-kubetrain-model-version"
"""On every routed response: the model version of that variant."""

TOTAL_WEIGHT: Final = 100
"""Weights are integer percentages; the sticky hash picks a bucket in 0..99."""
MAX_VARIANTS: Final = 8
MAX_MODEL_VERSION = 256  # the store's column
# An HTTP header name (RFC 9110 token).
HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
HTTP_URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"

HeaderName = Annotated[str, Field(max_length=128, pattern=HEADER_NAME)]


class RouteVariant(ApiModel):
    """One upstream engine (an OpenAI-compatible server) and its share of the traffic."""

    name: Name
    """Variant name: logged with every response and used as a Prometheus label."""
    url: Annotated[str, Field(max_length=MAX_SHORT, pattern=HTTP_URL)]
    """Base URL of the engine, without `/v1` (e.g. `http://chat-a:8000`)."""
    model_version: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_VERSION)]
    """The model version its responses carry (logged, and in `x-kubetrain-model-version`)."""
    weight: Annotated[int, Field(ge=0, le=TOTAL_WEIGHT)]
    """Percent of the traffic."""
    upstream_model: Annotated[str, Field(min_length=1, max_length=MAX_SHORT)] | None = None
    """The `model` the engine expects in a request (vLLM's served model name); when
    empty the router leaves `model` out and the engine serves its one model."""


class RouterConfig(ApiModel):
    """Everything the router needs besides its store."""

    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
    """The service's model name: what `GET /v1/models` lists and requests may name."""
    variants: Annotated[list[RouteVariant], Field(min_length=1, max_length=MAX_VARIANTS)]
    """The variants, in order: cumulative weights in this order map buckets to variants."""
    salt: Annotated[str, Field(max_length=MAX_NAME)] = ""
    """Mixed into the sticky hash (default: the model name), so two services split one
    user population independently."""
    sticky_header: HeaderName | None = None
    """Header carrying the sticky user key; without it, the body's `user` field."""
    caller_header: HeaderName = "X-Kubetrain-Caller"
    """Header naming who rates on `POST /v1/feedback` (else the body's `caller` or
    `user`)."""

    @model_validator(mode="after")
    def _weights(self) -> RouterConfig:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variants: duplicate names {duplicates}")
        total = sum(v.weight for v in self.variants)
        if total != TOTAL_WEIGHT:
            raise ValueError(f"variants: weights sum to {total}, must be {TOTAL_WEIGHT}")
        return self

    @property
    def hash_salt(self) -> str:
        return self.salt or self.model

    def weights(self) -> dict[str, int]:
        return {v.name: v.weight for v in self.variants}


class RouterConfigError(ValueError):
    """A configuration the router refuses; the message names the field."""


def parse_router_config(text: str | bytes, source: str = "router config") -> RouterConfig:
    """The configuration in `text` (YAML or JSON), or RouterConfigError naming the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RouterConfigError(f"{source}: not YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RouterConfigError(f"{source}: must be a mapping with `model` and `variants`")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise RouterConfigError(f"{source}: {problems}") from None


def _problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {message}" if where else message


def dump_router_config(config: RouterConfig) -> str:
    """The file the operator writes (YAML, camelCase), which `parse_router_config` reads."""
    return yaml.safe_dump(
        config.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False
    )


class VariantDriftReport(BaseModel):
    """A variant's prompt drift in `GET /stats`: its latest logged prompts (at most
    MAX_DRIFT_PROMPTS since `since`) against the training summary its engine serves at
    DRIFT_SUMMARY_PATH. The scores are None when there were too few prompts to compare."""

    unigram_jsd: float | None = None
    length_psi: float | None = None
    prompts: int = 0
    drifted: bool = False


class VariantCountsReport(BaseModel):
    """One variant's numbers in `GET /stats` (the store's `VariantCounts`)."""

    requests: int
    errors: int
    n: int
    successes: int
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    slow: int = 0
    drift: VariantDriftReport | None = None
    """None when the variant's engine serves no training summary (or is unreachable)."""


class RouterStats(BaseModel):
    """`GET /stats`: per variant, the counts of the responses logged since `since`
    (Unix seconds; all when None), from the shared store, so every replica answers alike.
    At most `MAX_STATS_VARIANTS` variants (the configured ones first)."""

    since: float | None = None
    backend: str
    weights: dict[str, int]
    variants: dict[str, VariantCountsReport]


MAX_STATS_VARIANTS: Final = 32
MAX_DRIFT_PROMPTS: Final = 500
"""Prompt drift compares at most this many of a variant's latest prompts."""
DRIFT_SUMMARY_PATH: Final = "/v1/training-summary"
"""On an engine (`kubetrain serve`): the served model's training summary, or 404."""

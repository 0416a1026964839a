"""Reading a router's `GET /stats` (kubetrain_api.routing.RouterStats): bounded like a
head's /progress (progress.fetch: one deadline, a size cap, no proxies or redirects), and
parsed strictly, since a decision is taken on these numbers. Anything wrong is a reason in
words, never an exception.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import datetime

from pydantic import ValidationError

from kubetrain_api import modelservice as ms
from kubetrain_api.routing import STATS_PATH, RouterStats
from kubetrain_operator.modelservice import build
from kubetrain_operator.progress import fetch
from kubetrain_operator.settings import OperatorSettings


def router_address(service: str, ns: str, settings: OperatorSettings) -> tuple[str, int]:
    """The router's (host, port): its Service (DNS name and port), or the settings'
    override (tests, port-forwards)."""
    override = settings.router_stats_address
    if override:
        host, _, port = override.rpartition(":")
        return host, int(port)
    return f"{ms.router_name(service)}.{ns}.svc", build.SERVICE_PORT


def stats_path(since: datetime, slower_than: float | None) -> str:
    query = {"since": f"{since.timestamp():.3f}"}
    if slower_than is not None:
        query["slowerThan"] = repr(float(slower_than))
    return f"{STATS_PATH}?{urllib.parse.urlencode(query)}"


def read_stats(
    service: str,
    ns: str,
    settings: OperatorSettings,
    since: datetime,
    slower_than: float | None = None,
) -> tuple[RouterStats | None, str | None]:
    """(counts, None), or (None, why they could not be read)."""
    host, port = router_address(service, ns, settings)
    body = fetch(
        host,
        port,
        settings.progress_deadline_seconds,
        settings.progress_max_bytes,
        path=stats_path(since, slower_than),
    )
    if body is None:
        return None, f"the router {host}:{port} did not answer {STATS_PATH} (in time and size)"
    try:
        return RouterStats.model_validate(json.loads(body)), None
    except (ValueError, ValidationError, RecursionError) as exc:
        return None, f"the router's {STATS_PATH} answer is malformed: {str(exc)[:200]}"

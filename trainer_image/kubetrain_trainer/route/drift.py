"""Prompt drift per variant for `GET /stats`: the variant's latest logged prompts (at most
MAX_DRIFT_PROMPTS since the window's start, chats reduced to their user turns) against the
training summary the variant's engine serves (`GET /v1/training-summary`, exported with
the model), scored by feedback.drift.compare.

/stats must stay fast (the operator reads it under a 2 s deadline), so:
- a summary is fetched once per (engine URL, model version) with a short timeout and a
  size cap, and kept; an engine without one (404, vLLM, unreachable, malformed) is asked
  again only after UNAVAILABLE_RETRY_S, and its variant has no drift, which is no error;
- a result is kept RESULT_TTL_S per (variant, model version, window start);
- /stats waits at most DRIFT_BUDGET_S for a computation; one that takes longer finishes
  in the background and the next /stats reports it.
Each computed score is also the gauge `kubetrain_route_prompt_drift{variant,measure}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from kubetrain_api.routing import (
    DRIFT_SUMMARY_PATH,
    MAX_DRIFT_PROMPTS,
    RouteVariant,
    VariantDriftReport,
)

from ..feedback.drift import MIN_LIVE_TEXTS, DriftError, TrainingSummary, compare
from ..feedback.prompts import prompt_words
from .metrics import RouteMetrics

log = logging.getLogger(__name__)

SUMMARY_TIMEOUT_S = 1.0
MAX_SUMMARY_BYTES = 4 * 2**20  # the engine's own cap on what it serves
UNAVAILABLE_RETRY_S = 60.0
RESULT_TTL_S = 30.0
DRIFT_BUDGET_S = 1.0
MAX_CACHED = 256
MEASURES = ("unigram_jsd", "length_psi")

Prompts = Callable[[str, float | None, int], Awaitable[list[str]]]


class DriftMonitor:
    def __init__(self, metrics: RouteMetrics, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.clock = clock
        # (url, model version) -> (when fetched, summary or None when unavailable)
        self._summaries: dict[tuple[str, str], tuple[float, TrainingSummary | None]] = {}
        # (variant, model version, since) -> (when computed, report)
        self._results: dict[tuple[str, str, float | None], tuple[float, Any]] = {}
        self._running: dict[tuple[str, str, float | None], asyncio.Task[Any]] = {}

    async def report(
        self,
        variant: RouteVariant,
        since: float | None,
        client: httpx.AsyncClient,
        prompts: Prompts,
    ) -> VariantDriftReport | None:
        """The variant's drift in the window from `since`; None when it cannot be known
        (no summary, the store failed) or not within DRIFT_BUDGET_S."""
        key = (variant.name, variant.model_version, since)
        cached = self._results.get(key)
        if cached is not None and self.clock() - cached[0] < RESULT_TTL_S:
            return cached[1]  # type: ignore[no-any-return]
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._compute(key, variant, since, client, prompts))
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), DRIFT_BUDGET_S)
        except asyncio.TimeoutError:
            log.info("drift of %s: still computing, reported on a later /stats", variant.name)
            return None

    def forget(self, variant: str) -> None:
        """A variant left the configuration: its gauges go."""
        for measure in MEASURES:
            with contextlib.suppress(KeyError):  # never set
                self.metrics.prompt_drift.remove(variant, measure)

    async def _compute(
        self,
        key: tuple[str, str, float | None],
        variant: RouteVariant,
        since: float | None,
        client: httpx.AsyncClient,
        prompts: Prompts,
    ) -> VariantDriftReport | None:
        report = None
        try:
            summary = await self._summary(variant, client)
            if summary is not None:
                logged = await prompts(variant.name, since, MAX_DRIFT_PROMPTS)
                report = await asyncio.to_thread(score, summary, logged)
        except Exception:  # drift is an extra: /stats answers without it
            log.exception("drift of %s could not be computed", variant.name)
            return None  # not cached: the next /stats tries again
        _put(self._results, key, (self.clock(), report))
        if report is None or report.unigram_jsd is None or report.length_psi is None:
            self.forget(variant.name)
        else:
            self.metrics.prompt_drift.labels(variant.name, "unigram_jsd").set(report.unigram_jsd)
            self.metrics.prompt_drift.labels(variant.name, "length_psi").set(report.length_psi)
        return report

    async def _summary(
        self, variant: RouteVariant, client: httpx.AsyncClient
    ) -> TrainingSummary | None:
        key = (variant.url, variant.model_version)
        cached = self._summaries.get(key)
        if cached is not None and (
            cached[1] is not None or self.clock() - cached[0] < UNAVAILABLE_RETRY_S
        ):
            return cached[1]
        summary = await fetch_summary(client, variant.url)
        _put(self._summaries, key, (self.clock(), summary))
        return summary


async def fetch_summary(client: httpx.AsyncClient, url: str) -> TrainingSummary | None:
    """The engine's training summary, or None (logged) when it has none or cannot give
    one within SUMMARY_TIMEOUT_S and MAX_SUMMARY_BYTES."""
    where = url.rstrip("/") + DRIFT_SUMMARY_PATH

    async def read() -> bytes | None:
        async with client.stream("GET", where) as response:
            if response.status_code != 200:
                log.info("drift: %s answered %d, no drift", where, response.status_code)
                return None
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_SUMMARY_BYTES:
                    log.warning("drift: %s is over %d bytes", where, MAX_SUMMARY_BYTES)
                    return None
            return bytes(body)

    try:
        body = await asyncio.wait_for(read(), SUMMARY_TIMEOUT_S)
        return None if body is None else TrainingSummary.from_dict(json.loads(body))
    except (asyncio.TimeoutError, httpx.HTTPError) as exc:
        log.info("drift: %s unavailable (%s)", where, type(exc).__name__)
    except (ValueError, DriftError) as exc:
        log.warning("drift: %s is not a training summary: %s", where, exc)
    return None


def score(summary: TrainingSummary, prompts: list[str]) -> VariantDriftReport:
    """The logged `prompts` against `summary`; no scores below MIN_LIVE_TEXTS prompts."""
    texts = [prompt_words(p) for p in prompts]
    if len(texts) < MIN_LIVE_TEXTS:
        return VariantDriftReport(prompts=len(texts))
    found = compare(summary, texts)
    return VariantDriftReport(
        unigram_jsd=found.unigram_jsd,
        length_psi=found.length_psi,
        prompts=len(texts),
        drifted=found.drifted,
    )


def _put(cache: dict[Any, Any], key: Any, value: Any) -> None:
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > MAX_CACHED:
        cache.pop(next(iter(cache)))  # the oldest entry

"""Prompt drift in the router's /stats and /metrics, end to end: a real `kubetrain route`
process logs the prompts it routes to three variants of a small fake engine; `a` and `b`
serve the training summary of one topic (GET /v1/training-summary), `c` has none. `a`'s
users ask about that topic (as chats, reduced to their user turns), `b`'s about another,
at greater length; `c` gets no drift, which is no error."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kubetrain_api.routing import DRIFT_SUMMARY_PATH, RouterStats
from kubetrain_trainer.feedback.drift import summarize
from kubetrain_trainer.route import drift
from kubetrain_trainer.route.assign import choose
from kubetrain_trainer.route.drift import score
from kubetrain_trainer.route.metrics import RouteMetrics
from tests.route.conftest import SERVICE, router, variant, write_config
from tests.route.test_router import metric, stats

GARDEN = [
    "tomato",
    "basil",
    "soil",
    "water",
    "seed",
    "leaf",
    "root",
    "sun",
    "compost",
    "prune",
    "harvest",
    "rose",
]
TRAVEL = [
    "flight",
    "hotel",
    "passport",
    "visa",
    "luggage",
    "airport",
    "train",
    "ticket",
    "border",
    "museum",
    "beach",
]
FILLER = ["how", "do", "i", "my", "the", "a", "for", "with", "when", "should"]


def sentences(topic: list[str], n: int, length: int, seed: int) -> list[str]:
    """`n` texts of about `length` words (half to one and a half times), 60 % on `topic`."""
    rng = random.Random(seed)
    return [
        " ".join(
            rng.choice(topic if rng.random() < 0.6 else FILLER)
            for _ in range(rng.randint(length // 2, length * 3 // 2))
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def fake_engines() -> Iterator[tuple[str, dict[str, int]]]:
    """One server, three engines by path prefix: /a and /b serve the garden summary, /c
    answers 404 there; every completion is a one-word answer. Counts summary fetches."""
    summary = summarize(sentences(GARDEN, 2000, 8, seed=1)).to_dict()
    fetched = {"a": 0, "b": 0, "c": 0}

    async def training_summary(request: Request) -> Response:
        engine = request.path_params["engine"]
        fetched[engine] += 1
        if engine == "c":
            error = {"message": "no summary", "type": "invalid_request_error", "code": None}
            return JSONResponse({"error": error}, status_code=404)
        return JSONResponse(summary)

    async def generate(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        choice = {"index": 0, "finish_reason": "stop"}
        choice |= {"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        return JSONResponse({"id": "x", "object": "x", "choices": [choice], "usage": usage})

    app = Starlette(
        routes=[
            Route("/{engine}" + DRIFT_SUMMARY_PATH, training_summary),
            Route("/{engine}/v1/completions", generate, methods=["POST"]),
            Route("/{engine}/v1/chat/completions", generate, methods=["POST"]),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", fetched
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_stats_report_drift_per_variant(
    fake_engines: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    base, fetched = fake_engines
    variants = [variant(name, f"{base}/{name}", w) for name, w in (("a", 34), ("b", 33), ("c", 33))]
    config_path = tmp_path / "router.yaml"
    config = write_config(config_path, variants)
    users: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    for i in range(2000):
        name = choose(f"u{i}", config.hash_salt, config.variants).name
        if len(users[name]) < 80:
            users[name].append(f"u{i}")
    garden = sentences(GARDEN, 80, 8, seed=2)
    travel = sentences(TRAVEL, 80, 24, seed=3)

    with router(config_path, str(tmp_path / "router.db"), tmp_path) as r:

        def ask(job: tuple[str, str, str]) -> None:
            name, user, text = job
            if name == "a":  # a chat: only the user's turn is compared
                system = {"role": "system", "content": "you are the passport visa desk"}
                body = {"messages": [system, {"role": "user", "content": text}], "user": user}
                path = "/v1/chat/completions"
            else:
                body, path = {"prompt": text, "user": user}, "/v1/completions"
            answer = httpx.post(f"{r.base_url}{path}", json={"model": SERVICE, **body}, timeout=20)
            assert answer.status_code == 200, answer.text

        jobs = [("a", u, t) for u, t in zip(users["a"], garden, strict=True)]
        jobs += [("b", u, t) for u, t in zip(users["b"], travel, strict=True)]
        jobs += [("c", u, "tomato seed") for u in users["c"]]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, jobs))

        report = stats(r)
        parsed = RouterStats.model_validate(report)  # as the operator reads it
        a, b = parsed.variants["a"].drift, parsed.variants["b"].drift
        assert a is not None
        assert b is not None
        assert a.prompts == b.prompts == 80
        assert not a.drifted, a
        assert b.drifted, b
        assert a.unigram_jsd is not None
        assert b.unigram_jsd is not None
        assert a.unigram_jsd < 0.1 < b.unigram_jsd
        assert b.length_psi is not None
        assert b.length_psi > 1
        assert parsed.variants["c"].drift is None
        assert report["variants"]["c"]["drift"] is None

        jsd = metric(r, "kubetrain_route_prompt_drift", variant="b", measure="unigram_jsd")
        assert jsd == pytest.approx(b.unigram_jsd)
        assert metric(r, "kubetrain_route_prompt_drift", variant="a", measure="length_psi") > 0
        assert (
            'variant="c"'
            not in httpx.get(f"{r.base_url}/metrics").text.split("kubetrain_route_prompt_drift")[-1]
        )

        # A window that starts later has its own, empty sample; the summaries stay cached.
        later = httpx.get(f"{r.base_url}/stats", params={"since": time.time() + 60}).json()
        assert later["variants"] == {}
        assert stats(r)["variants"]["b"]["drift"] == report["variants"]["b"]["drift"]
        assert fetched == {"a": 1, "b": 1, "c": 1}


def test_too_few_prompts_have_no_scores() -> None:
    summary = summarize(sentences(GARDEN, 200, 8, seed=1))
    few = score(summary, [json.dumps([{"role": "user", "content": "tomato"}])] * 10)
    assert (few.prompts, few.unigram_jsd, few.length_psi, few.drifted) == (10, None, None, False)


def test_summaries_are_bounded_and_an_unavailable_one_is_asked_again_later(monkeypatch) -> None:
    """Oversized, malformed or slow summaries give no drift; a missing one is asked for
    again only after UNAVAILABLE_RETRY_S; a good one once per model version."""
    summary = summarize(sentences(GARDEN, 200, 8, seed=1)).to_dict()
    answers = {
        "/big": httpx.Response(200, content=b" " * (drift.MAX_SUMMARY_BYTES + 1)),
        "/bad": httpx.Response(200, json={"version": 99}),
        "/none": httpx.Response(404, json={"error": {"message": "no"}}),
        "/good": httpx.Response(200, json=summary),
    }
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        engine = request.url.path.removesuffix(DRIFT_SUMMARY_PATH)
        asked.append(engine)
        if engine == "/slow":
            await asyncio.sleep(drift.SUMMARY_TIMEOUT_S + 1)
        return answers.get(engine, httpx.Response(500))

    now = [0.0]
    monitor = drift.DriftMonitor(RouteMetrics(), clock=lambda: now[0])
    monkeypatch.setattr(drift, "DRIFT_BUDGET_S", drift.SUMMARY_TIMEOUT_S + 2)

    async def prompts(variant: str, since: float | None, limit: int) -> list[str]:
        assert limit == 500
        return sentences(GARDEN, 60, 8, seed=2)

    async def look(engine: str, version: str = "v1") -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            v = variant(engine, f"http://engine/{engine}", 100).model_copy(
                update={"model_version": version}
            )
            return await monitor.report(v, None, client, prompts)

    for engine in ("big", "bad", "slow", "none"):
        assert asyncio.run(look(engine)) is None, engine
    found = asyncio.run(look("good"))
    assert found is not None
    now[0] += drift.RESULT_TTL_S + 1  # results expire, summaries stay
    assert asyncio.run(look("good")) == found
    assert asyncio.run(look("none")) is None
    assert asked.count("/good") == 1
    assert asked.count("/none") == 1
    now[0] += drift.UNAVAILABLE_RETRY_S
    asyncio.run(look("none"))
    asyncio.run(look("good", "v2"))  # a new model version: its summary is fetched
    assert asked.count("/none") == 2
    assert asked.count("/good") == 2

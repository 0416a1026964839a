"""Admission under load: `maxConcurrency` generating, `maxQueue` waiting, the rest refused
at once with 429 and Retry-After; never a 5xx. And the token budget rules."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kubetrain_trainer.serve.errors import ApiError
from kubetrain_trainer.serve.limits import Admission, completion_budget
from kubetrain_trainer.serve.metrics import ServeMetrics
from tests.serve.conftest import LiveServer, error_of

SLOW = {"prompt": "the", "max_tokens": 300, "temperature": 0}  # ~1 s of generation


def test_a_burst_beyond_concurrency_and_queue_gets_429s(tight_server: LiveServer) -> None:
    """max_concurrency=1, max_queue=1: of 6 simultaneous slow requests, 1 generates, 1 waits
    and 4 are refused; those admitted finish with every token."""

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{tight_server.base_url}/v1/completions", json=SLOW, timeout=120)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(call, range(6)))

    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert error_of(response)["code"] == "rate_limit_exceeded"
        else:
            assert response.json()["usage"]["completion_tokens"] == SLOW["max_tokens"]


def test_streams_hold_their_slot_until_they_end(tight_server: LiveServer) -> None:
    gauge = tight_server.model_server.metrics.registry.get_sample_value
    with (
        httpx.Client(base_url=tight_server.base_url, timeout=120) as first,
        first.stream("POST", "/v1/completions", json={**SLOW, "stream": True}) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(lines)  # generating now
        assert gauge("kubetrain_serve_in_flight") == 1
        assert [line for line in lines if line][-1] == "data: [DONE]"
    tight_server.wait_until(lambda: gauge("kubetrain_serve_in_flight") == 0)


def test_a_client_that_leaves_mid_stream_frees_its_slot(tight_server: LiveServer) -> None:
    gauge = tight_server.model_server.metrics.registry.get_sample_value
    long = {**SLOW, "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(base_url=tight_server.base_url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=long) as stream,
    ):
        next(stream.iter_lines())
    # 1000 tokens take several seconds; the slot must come back long before that.
    tight_server.wait_until(lambda: gauge("kubetrain_serve_in_flight") == 0, timeout=2)


def test_admission_counts_and_refuses() -> None:
    async def scenario() -> list[str]:
        metrics = ServeMetrics()
        admission = Admission(max_concurrency=2, max_queue=1, metrics=metrics)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def request() -> None:
            try:
                async with admission.slot():
                    outcomes.append("admitted")
                    await release.wait()
            except ApiError as exc:
                outcomes.append(str(exc.status))

        tasks = [asyncio.create_task(request()) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert metrics.registry.get_sample_value("kubetrain_serve_in_flight") == 2
        assert metrics.registry.get_sample_value("kubetrain_serve_queue_depth") == 1
        release.set()
        await asyncio.gather(*tasks)
        assert metrics.registry.get_sample_value("kubetrain_serve_in_flight") == 0
        return outcomes

    assert sorted(asyncio.run(scenario())) == ["429", "429", "admitted", "admitted", "admitted"]


@pytest.mark.parametrize(
    ("prompt", "requested", "expected"),
    [
        (10, 5, 5),  # fits
        (10, None, 100),  # up to the cap
        (1000, None, 24),  # up to the context
        (10, 100, 100),  # exactly the cap
    ],
)
def test_completion_budget(prompt: int, requested: int | None, expected: int) -> None:
    assert completion_budget(prompt, requested, cap=100, context=1024, prompt_param="p") == expected


@pytest.mark.parametrize(
    ("prompt", "requested", "code"),
    [
        (10, 101, "invalid_value"),
        (1000, 30, "context_length_exceeded"),
        (1024, None, "context_length_exceeded"),
    ],
)
def test_completion_budget_refuses(prompt: int, requested: int | None, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        completion_budget(prompt, requested, cap=100, context=1024, prompt_param="p")
    assert caught.value.status == 400
    assert caught.value.detail.code == code


# ---- spec.serve -> the server's options: one source (ServeSpec), mapped one to one ----


def test_every_serve_limit_is_a_serve_spec_field_and_a_create_app_keyword() -> None:
    import inspect

    from kubetrain_api import contract
    from kubetrain_api.v1alpha1 import ServeSpec
    from kubetrain_trainer.serve.app import create_app

    keywords = inspect.signature(create_app).parameters
    for field in contract.SERVE_LIMITS:
        assert field in ServeSpec.model_fields
        assert keywords[field].default == getattr(ServeSpec(), field)


def test_the_operators_serve_args_parse_back_to_the_spec_values() -> None:
    from kubetrain_api import contract
    from kubetrain_api.v1alpha1 import ServeSpec
    from kubetrain_trainer.serve.__main__ import build_parser

    spec = ServeSpec(max_tokens=7, max_concurrency=3, max_queue=0, max_body_bytes=2048)
    args = build_parser().parse_args(["/model", *contract.serve_args(spec.model_dump())])
    assert {f: getattr(args, f) for f in contract.SERVE_LIMITS} == {
        f: getattr(spec, f) for f in contract.SERVE_LIMITS
    }
    defaults = build_parser().parse_args(["/model"])
    assert {f: getattr(defaults, f) for f in contract.SERVE_LIMITS} == {
        f: getattr(ServeSpec(), f) for f in contract.SERVE_LIMITS
    }

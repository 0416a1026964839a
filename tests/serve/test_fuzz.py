"""Schemathesis fuzzes the generation endpoints from the app's own OpenAPI schema, with
valid and invalid bodies: every answer is below 500 and every refusal is OpenAI-shaped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.serve.conftest import LiveServer, running

OPERATIONS = [
    ("/v1/completions", "POST"),
    ("/v1/chat/completions", "POST"),
    ("/v1/feedback", "POST"),
]


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # A small cap keeps each generated request to a few tokens.
    feedback = tmp_path_factory.mktemp("fuzz") / "feedback.jsonl"
    with running(model_dir, max_tokens=4, feedback_path=feedback) as live:
        yield live


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_fuzzing_finds_no_server_error(
    fuzz_server: LiveServer, path: str, method: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    strategy = schema[path][method].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,  # the same examples on every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzz_server.base_url, timeout=30)
        assert response.status_code < 500, (case.body, response.status_code, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error)

    check()

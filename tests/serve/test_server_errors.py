"""A genuine server bug is the one thing that may answer 500: logged with its traceback,
in OpenAI's error shape, and the server keeps serving. In a stream that already said 200,
it arrives as an `error` event."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kubetrain_trainer.serve.engine import TransformersEngine
from tests.serve.conftest import error_of, running


def _broken_prefill(*_: object) -> object:
    raise RuntimeError("boom: a bug in generation")


def test_a_bug_is_a_logged_500_and_the_server_carries_on(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kubetrain_trainer.serve")
    with running(model_dir) as live, live.client() as http:
        monkeypatch.setattr(TransformersEngine, "_prefill", _broken_prefill)
        failed = http.post("/v1/completions", json={"prompt": "hi"})
        with http.stream("POST", "/v1/completions", json={"prompt": "hi", "stream": True}) as s:
            events = [line for line in s.iter_lines() if line]
            streamed_status = s.status_code
        monkeypatch.undo()
        recovered = http.post("/v1/completions", json={"prompt": "hi"})

    assert failed.status_code == 500
    assert error_of(failed)["type"] == "server_error"
    assert "boom" not in failed.text  # internals stay in the log
    assert failed.headers["x-request-id"]
    assert streamed_status == 200
    (event,) = events
    assert json.loads(event.removeprefix("data: "))["error"]["type"] == "server_error"
    assert recovered.status_code == 200
    logged = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(logged) == 2

"""Probes and shutdown: not ready (503) until the model is loaded, live all along; on
SIGTERM the requests in flight finish before the process exits; a model that cannot be
loaded stops the server instead of leaving it unready forever."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kubetrain_trainer.serve.engine import TransformersEngine
from tests.serve.conftest import error_of, start_server

ROOT = Path(__file__).resolve().parents[2]
LONG = {"prompt": "the", "max_tokens": 300, "temperature": 0}


def test_not_ready_until_the_model_is_loaded(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = threading.Event()
    real_load = TransformersEngine.load.__func__

    def gated_load(cls: type[TransformersEngine], *args: object) -> TransformersEngine:
        assert loaded.wait(30)
        return real_load(cls, *args)

    monkeypatch.setattr(TransformersEngine, "load", classmethod(gated_load))
    live = start_server(model_dir, ready=False)
    try:
        with live.client() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert error_of(ready)["code"] == "model_loading"
            assert int(ready.headers["retry-after"]) >= 1
            assert http.get("/healthz").status_code == 200
            refused = http.post("/v1/completions", json={"prompt": "hi"})
            assert refused.status_code == 503
            assert error_of(refused)["code"] == "model_loading"
            assert http.get("/v1/models").status_code == 200  # known before the weights

            loaded.set()
            live.wait_ready()
            assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
    finally:
        loaded.set()
        live.stop()


def test_sigterm_lets_the_request_in_flight_finish(model_dir: Path) -> None:
    live = start_server(model_dir)
    gauge = live.model_server.metrics.registry.get_sample_value
    result: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: result.append(
            httpx.post(f"{live.base_url}/v1/completions", json=LONG, timeout=60)
        )
    )
    request.start()
    live.wait_until(lambda: gauge("kubetrain_serve_in_flight") == 1)

    live.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls

    # Not ready from the signal on, then not accepting at all; the request carries on.
    probes: list[int | None] = []

    def probe() -> bool:
        try:
            probes.append(httpx.get(f"{live.base_url}/readyz", timeout=5).status_code)
        except httpx.HTTPError:
            probes.append(None)
        return probes[-1] is None

    live.wait_until(probe, timeout=10)
    assert set(probes[:-1]) <= {503}
    request.join(timeout=60)
    live.thread.join(timeout=60)
    assert not live.thread.is_alive()
    (response,) = result
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == LONG["max_tokens"]


def test_a_model_that_cannot_load_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    live = start_server(tmp_path, ready=False)
    live.thread.join(timeout=30)
    assert not live.thread.is_alive(), "the server kept running without a model"
    assert live.model_server.load_error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_container_entry_point_drains_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    """`python -m kubetrain_trainer.serve` as the pod runs it: a stream that is running when
    SIGTERM arrives still ends with [DONE], then the process exits."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer.serve", str(model_dir), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server not ready"
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        events = []
        with httpx.stream(
            "POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=60
        ) as stream:
            for line in stream.iter_lines():
                if not line:
                    continue
                if not events:
                    proc.send_signal(signal.SIGTERM)
                events.append(line.removeprefix("data: "))
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "Waiting for connections to close" in (tmp_path / "server.log").read_text()

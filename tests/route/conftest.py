"""Real processes for the router's tests: two `kubetrain serve` engines on the tiny model
of tests/serve (A and B), routers as `kubetrain route` processes (uvicorn, as the pod runs
them) and, for failures and timing only, a stub engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubetrain_api.routing import STORE_ENV, RouterConfig, RouteVariant, dump_router_config
from tests.serve.conftest import model_dir  # noqa: F401  (the tiny exported model)

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "chat"
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """A child process serving HTTP on `base_url`; its output goes to `log`."""

    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.output()}"
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(name: str, argv: list[str], log_dir: Path, port: int, **env: str) -> Process:
    log = log_dir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_cli.main", *argv],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    return Process(name, proc, f"http://127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def engines(
    model_dir: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Process]]:
    """Two real model servers, `a` and `b`, on the tiny model (started together)."""
    logs = tmp_path_factory.mktemp("engines")
    started: dict[str, Process] = {}
    try:
        for name in ("a", "b"):
            port = free_port()
            argv = ["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
            started[name] = spawn(f"engine-{name}", [*argv, "--log-level", "warning"], logs, port)
        for process in started.values():
            process.wait_ready()
        yield started
    finally:
        for process in started.values():
            process.stop()


def variant(name: str, url: str, weight: int) -> RouteVariant:
    return RouteVariant(name=name, url=url, model_version=f"{name}-version-1", weight=weight)


def write_config(path: Path, variants: list[RouteVariant], **fields: Any) -> RouterConfig:
    config = RouterConfig(model=SERVICE, variants=variants, **fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_router_config(config))
    tmp.replace(path)  # atomic, as the kubelet swaps a ConfigMap's files
    return config


@contextlib.contextmanager
def router(config: Path, store: str, log_dir: Path, name: str = "router") -> Iterator[Process]:
    """`kubetrain route` as its pod runs it, the store's target in the environment."""
    port = free_port()
    argv = ["route", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--reload-interval", "0.2", "--max-body-bytes", "65536", "--log-level", "warning"]
    process = spawn(name, argv, log_dir, port, **{STORE_ENV: store})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@dataclass
class StubEngine:
    """An engine that answers every generation with 500, as a crashed model would; but a
    streamed completion of the prompt `hold` sends its first event, then waits for
    `release` before it finishes (so a test can tell relaying from buffering)."""

    base_url: str
    release: threading.Event


@pytest.fixture(scope="module")
def stub_engine() -> Iterator[StubEngine]:
    release = threading.Event()

    async def held() -> AsyncIterator[bytes]:
        def event(text: str, finish: str | None = None) -> bytes:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            chunk = {"id": "stub-1", "object": "text_completion", "choices": [choice]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        yield event("first")
        while not release.is_set():
            await asyncio.sleep(0.01)
        yield event(" second", "stop")
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        yield f"data: {json.dumps({'id': 'stub-1', 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def generate(request: Request) -> Response:
        body = await request.json()
        if body.get("prompt") == "hold" and body.get("stream"):
            return StreamingResponse(held(), media_type="text/event-stream")
        error = {"message": "CUDA error: an illegal memory access", "type": "server_error"}
        return JSONResponse({"error": error}, status_code=500)

    app = Starlette(routes=[Route(p, generate, methods=["POST"]) for p in _GENERATION])
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
        yield StubEngine(f"http://127.0.0.1:{sock.getsockname()[1]}", release)
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=10)


_GENERATION = ("/v1/completions", "/v1/chat/completions")

"""Fixtures for the model server: one tiny exported model per session (random weights, a
tokenizer trained here; a few seconds) and real uvicorn servers on free loopback ports, so
the official `openai` client, streaming and the admission limits run as in production."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from kubetrain_api import v1alpha1 as api
from kubetrain_trainer.data import train_tokenizer
from kubetrain_trainer.export import export_model
from kubetrain_trainer.models import build_model
from kubetrain_trainer.serve import build_server
from kubetrain_trainer.serve.app import ModelServer

RUN_NAME = "tiny-chat"
RUN_STEP = 7
MODEL_VERSION = f"{RUN_NAME}-step{RUN_STEP}"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "kubernetes schedules pods onto nodes with free gpus",
    "a small model learns to continue plain text",
    "héllo wörld, naïve café — ünïcode text for the byte-level tokenizer 🚀",
] * 16


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama (context 1024) with a trained tokenizer, exported as the trainer does."""
    root = tmp_path_factory.mktemp("serve-model")
    tokenizer = train_tokenizer(CORPUS, vocab_size=384)
    torch.manual_seed(0)
    model = build_model(
        api.ModelSpec(source="builtin://tiny-llama"),
        vocab_size=len(tokenizer),
        dropout=0.0,
        dtype="float32",
        cache_dir=root / "cache",
    )
    run_info = {"name": RUN_NAME, "step": RUN_STEP, "metrics": {"loss": 5.9}}
    return export_model(model, tokenizer, root / "model", run_info)


@dataclass
class LiveServer:
    server: uvicorn.Server
    thread: threading.Thread
    base_url: str

    @property
    def model_server(self) -> ModelServer:
        return self.server.model_server  # type: ignore[attr-defined]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)

    def wait_until(self, condition: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting for the server"
            time.sleep(0.01)

    def wait_ready(self) -> None:
        self.wait_until(lambda: httpx.get(f"{self.base_url}/readyz").status_code == 200)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not stop"


def start_server(model_dir: Path, *, ready: bool = True, **options: Any) -> LiveServer:
    """A real uvicorn server for the model on a free port, in a background thread."""
    server = build_server(model_dir, "127.0.0.1", 0, log_level="warning", **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the port is known before the server runs (or stops)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}")
    live.wait_until(lambda: server.started or not thread.is_alive())
    if ready:
        live.wait_ready()
    return live


@contextlib.contextmanager
def running(model_dir: Path, **options: Any) -> Iterator[LiveServer]:
    live = start_server(model_dir, **options)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def feedback_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.jsonl"


@pytest.fixture(scope="session")
def server(model_dir: Path, feedback_file: Path) -> Iterator[LiveServer]:
    """Default limits (those of `ServeSpec`), feedback on."""
    with running(model_dir, feedback_path=feedback_file) as live:
        yield live


@pytest.fixture(scope="session")
def tight_server(model_dir: Path) -> Iterator[LiveServer]:
    """One generation at a time, one waiting, small bodies: for the admission tests."""
    with running(
        model_dir, max_concurrency=1, max_queue=1, max_body_bytes=2048, max_tokens=1000
    ) as live:
        yield live


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a response, after checking its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    return error

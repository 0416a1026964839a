"""Bad input is a 4xx with OpenAI's error body, never a 500 (RELIABILITY.md 10)."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from tests.serve.conftest import LiveServer, error_of

OK = {"prompt": "hello", "max_tokens": 2}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 150  # > 1024 tokens

COMPLETIONS, CHAT, FEEDBACK = "/v1/completions", "/v1/chat/completions", "/v1/feedback"


def case(
    name: str,
    body: Any,
    status: int = 400,
    param: str | None = None,
    path: str = COMPLETIONS,
    method: str = "POST",
) -> Any:
    """One bad request: a dict body is sent as JSON, a string as raw bytes."""
    return pytest.param(method, path, body, status, param, id=name)


CASES = [
    case("malformed JSON", '{"prompt": "hi",'),
    case("JSON not an object", "[1, 2]"),
    case("empty body", ""),
    case("missing prompt", {"max_tokens": 2}, param="prompt"),
    case("prompt of wrong type", {"prompt": 42}, param="prompt"),
    case("two prompts", {"prompt": ["a", "b"]}, param="prompt"),
    case("max_tokens a string", {**OK, "max_tokens": "5"}, param="max_tokens"),
    case("max_tokens zero", {**OK, "max_tokens": 0}, param="max_tokens"),
    case("max_tokens negative", {**OK, "max_tokens": -3}, param="max_tokens"),
    case("max_tokens huge", {**OK, "max_tokens": 10**12}, param="max_tokens"),
    case("temperature too high", {**OK, "temperature": 2.5}, param="temperature"),
    case("temperature negative", {**OK, "temperature": -0.1}, param="temperature"),
    case("temperature NaN", '{"prompt": "a", "temperature": NaN}', param="temperature"),
    case("top_p over 1", {**OK, "top_p": 1.5}, param="top_p"),
    case("top_p negative", {**OK, "top_p": -1}, param="top_p"),
    case("n over the limit", {**OK, "n": 9}, param="n"),
    case("n zero", {**OK, "n": 0}, param="n"),
    case("presence_penalty over 2", {**OK, "presence_penalty": 2.5}, param="presence_penalty"),
    case("frequency_penalty a string", {**OK, "frequency_penalty": "1"}, param="frequency_penalty"),
    case("logprobs over 20", {**OK, "logprobs": 21}, param="logprobs"),
    case("logit_bias key not a token id", {**OK, "logit_bias": {"fox": 1}}, param="logit_bias"),
    case("logit_bias value over 100", {**OK, "logit_bias": {"5": 101}}, param="logit_bias"),
    case(
        "logit_bias token outside the vocabulary",
        {**OK, "logit_bias": {"99999": 1}},
        param="logit_bias",
    ),
    case(
        "logit_bias too many entries",
        {**OK, "logit_bias": {str(i): 1 for i in range(301)}},
        param="logit_bias",
    ),
    case("best_of other than n", {**OK, "best_of": 2}, param="best_of"),
    case("echo with logprobs", {**OK, "echo": True, "logprobs": 1}, param="echo"),
    case(
        "json response_format",
        {**OK, "response_format": {"type": "json_object"}},
        param="response_format",
    ),
    case("suffix", {**OK, "suffix": "end"}, param="suffix"),
    case("stop list too long", {**OK, "stop": list("abcde")}, param="stop"),
    case("empty stop string", {**OK, "stop": ""}, param="stop"),
    case("seed beyond 64 bits", {**OK, "seed": 2**70}, param="seed"),
    case("stream not a bool", {**OK, "stream": "yes"}, param="stream"),
    case("unknown parameter", {**OK, "temprature": 1}, param="temprature"),
    case("prompt longer than the context", {"prompt": LONG_PROMPT}, param="prompt"),
    case("unknown model", {**OK, "model": "gpt-4"}, 404, "model"),
    case("body too large", {"prompt": "x" * 1_100_000}, 413),
    case("missing messages", {"max_tokens": 2}, param="messages", path=CHAT),
    case("empty messages", {"messages": []}, param="messages", path=CHAT),
    case(
        "bad role",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        param="messages[0].role",
        path=CHAT,
    ),
    case(
        "message without content",
        {"messages": [{"role": "user"}]},
        param="messages[0].content",
        path=CHAT,
    ),
    case(
        "content of wrong type",
        {"messages": [{"role": "user", "content": 7}]},
        param="messages[0].content",
        path=CHAT,
    ),
    case(
        "chat max_tokens over the cap",
        {**CHAT_OK, "max_tokens": 100_000},
        param="max_tokens",
        path=CHAT,
    ),
    case(
        "chat over the context",
        {**CHAT_OK, "messages": [{"role": "user", "content": LONG_PROMPT}]},
        param="messages",
        path=CHAT,
    ),
    case("chat tools", {**CHAT_OK, "tools": []}, param="tools", path=CHAT),
    case(
        "chat top_logprobs over 20",
        {**CHAT_OK, "logprobs": True, "top_logprobs": 21},
        param="top_logprobs",
        path=CHAT,
    ),
    case(
        "chat top_logprobs without logprobs",
        {**CHAT_OK, "top_logprobs": 2},
        param="top_logprobs",
        path=CHAT,
    ),
    case(
        "feedback bad rating", {"response_id": "cmpl-x", "rating": 5}, param="rating", path=FEEDBACK
    ),
    case(
        "feedback unknown id",
        {"response_id": "cmpl-unknown", "rating": "up"},
        404,
        "response_id",
        path=FEEDBACK,
    ),
    case("unknown endpoint", {"input": "hi"}, 404, path="/v1/embeddings"),
    case("wrong method", None, 405, method="GET"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), CASES)
def test_bad_input_is_refused_with_an_openai_error(
    server: LiveServer, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    content = json.dumps(body) if isinstance(body, dict) else body
    with server.client() as http:
        response = http.request(
            method, path, content=content, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param
    assert response.headers["x-request-id"]


def test_context_errors_say_so(server: LiveServer) -> None:
    with server.client() as http:
        response = http.post("/v1/completions", json={"prompt": LONG_PROMPT})
    assert error_of(response)["code"] == "context_length_exceeded"


def test_declared_oversized_body_is_refused_before_it_is_sent(tight_server: LiveServer) -> None:
    """Content-Length alone decides: the answer comes though the body never does."""
    host, port = tight_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999\r\n\r\n{"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            assert data, f"connection closed after {reply!r}"
            reply += data
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_chunked_oversized_body_is_counted_as_it_arrives(tight_server: LiveServer) -> None:
    """No Content-Length (chunked): the bytes read decide."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    with tight_server.client() as http:
        response = http.post(
            "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"

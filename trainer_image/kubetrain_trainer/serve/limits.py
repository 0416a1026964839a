"""Admission and size limits, from `spec.serve` (`ServeSpec`): at most `maxConcurrency`
generations at once, at most `maxQueue` more waiting (beyond that 429 with Retry-After),
bodies up to `maxBodyBytes` (413), and prompt + completion within the model's context.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RETRY_AFTER_S, ApiError
from .metrics import ServeMetrics


class Admission:
    """A semaphore of `max_concurrency` slots with a bounded line in front of it. A request
    that finds every slot busy and the line full is refused at once (429) rather than left
    to time out: the client, or a load balancer, can go elsewhere."""

    def __init__(self, max_concurrency: int, max_queue: int, metrics: ServeMetrics) -> None:
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_queue = max_queue
        self._waiting = 0
        self._metrics = metrics

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        self._metrics.in_flight.inc()
        try:
            yield
        finally:
            self._metrics.in_flight.dec()
            self._slots.release()

    async def _acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: returns without suspending
            return
        if self._waiting >= self._max_queue:
            raise ApiError(
                429,
                "The server is at capacity (all generation slots busy and the queue full); "
                "retry later.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._waiting += 1
        self._metrics.queue_depth.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._metrics.queue_depth.dec()


def completion_budget(
    prompt_tokens: int,
    requested: int | None,
    *,
    cap: int,
    context: int,
    prompt_param: str,
    default: int | None = None,
) -> int:
    """The number of tokens to generate: `requested` when it fits under the server's cap
    and, with the prompt, in the context. A request that names none gets `default` (or
    else the cap), shortened to what fits: it asked for nothing it could be refused."""
    if requested is not None and requested > cap:
        raise ApiError(
            400,
            f"max_tokens is too large: {requested}. This server allows at most {cap} "
            "completion tokens.",
            param="max_tokens",
            code="invalid_value",
        )
    room = context - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        asked = prompt_tokens + (requested or 1)
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{asked} tokens ({prompt_tokens} in the {prompt_param}, {asked - prompt_tokens} "
            "in the completion). Please reduce the length of the prompt or max_tokens.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is not None:
        return requested
    return min(default or cap, cap, room)


class BodyLimitMiddleware:
    """Refuse bodies over `max_body_bytes` with 413 before anything parses them: at once
    when Content-Length says so, else as soon as the bytes read pass the limit (chunked
    bodies carry no length). Accepted bodies are small enough to hold and are replayed to
    the app; the connection of a refused one is closed, since its body was not read."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            413,
            f"Request body is larger than this server's limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the buffered body once, then the client's own messages
    (so disconnects still reach a streaming response)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay

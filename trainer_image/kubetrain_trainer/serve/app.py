"""The OpenAI-compatible HTTP API of an exported model: `create_app` builds it, `serve` runs
it under uvicorn until SIGTERM, then finishes the requests in flight.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
`GET /v1/models[/{id}]`, `POST /v1/feedback`, `GET /healthz` (liveness), `GET /readyz`
(200 once the model is loaded, 503 while loading or draining), `GET /metrics`.

Choices where OpenAI leaves room: a request's `model` may be omitted or name the served
model, any other name is a 404 `model_not_found`; invalid requests are 400 (never 422);
`max_tokens` defaults to 16 for completions (as OpenAI) and to whatever fits under the
server's cap and the context for chat; every response carries `X-Request-Id` (the response
id on generation endpoints) and `X-Model-Version`, which bodies repeat as
`system_fingerprint`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetrain_api import contract
from kubetrain_api.v1alpha1 import ServeSpec

from .engine import ModelInfo, Sampling, Step, TransformersEngine
from .errors import ApiError, install_handlers, unavailable
from .feedback import FeedbackStore, ResponseLog
from .limits import Admission, BodyLimitMiddleware, completion_budget
from .metrics import ServeMetrics, endpoint_label
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorDetail,
    ErrorResponse,
    FeedbackReceipt,
    FeedbackRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)

log = logging.getLogger(__name__)

# Kubernetes' default termination grace period is 30 s; leave a little for the exit itself.
GRACEFUL_SHUTDOWN_S = 25.0
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_ID_PREFIXES = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 429, 503)
}


class ModelServer:
    """The state behind the routes: model info, the engine once loaded, limits, feedback."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_tokens: int,
        max_concurrency: int,
        max_queue: int,
        feedback_path: Path | None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.info = ModelInfo.read(self.model_dir)
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.metrics = ServeMetrics(self.info.id, self.info.version)
        self.admission = Admission(max_concurrency, max_queue, self.metrics)
        self.responses = ResponseLog()
        self.feedback = FeedbackStore(feedback_path) if feedback_path is not None else None
        self.engine: TransformersEngine | None = None
        self.load_error: str | None = None
        self.draining = False
        self.on_load_failure: Callable[[], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the model off the event loop, so probes answer while it loads."""
        try:
            self.engine = await asyncio.to_thread(
                TransformersEngine.load, self.model_dir, self.max_concurrency
            )
        except Exception as exc:
            log.exception("could not load the model from %s", self.model_dir)
            self.load_error = f"{type(exc).__name__}: {exc}"
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        log.info("serving %s (version %s)", self.info.id, self.info.version)

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(self.load())
        try:
            yield
        finally:
            self.draining = True
            loading.cancel()  # a load still running is abandoned with the process
            if self.engine is not None:
                await asyncio.to_thread(self.engine.close)

    def ready_engine(self) -> TransformersEngine:
        if self.draining:
            raise unavailable("The server is shutting down; retry.", "shutting_down")
        if self.engine is None:
            if self.load_error is not None:
                raise unavailable(f"The model failed to load: {self.load_error}", "model_error")
            raise unavailable("The model is still loading; retry.", "model_loading")
        return self.engine

    # -- routes ---------------------------------------------------------------------------

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> dict[str, str]:
        self.ready_engine()
        return {"status": "ready", "model": self.info.id, "version": self.info.version}

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self) -> ModelList:
        return ModelList(data=[self._card()])

    async def get_model(self, model_id: str) -> ModelCard:
        self._check_model(model_id, param=None)
        return self._card()

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        engine = self.ready_engine()
        self._check_model(body.model)
        prompt_ids = await asyncio.to_thread(engine.encode_prompt, body.prompt_text())
        return await self._respond(request, body, prompt_ids, body.max_tokens, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        engine = self.ready_engine()
        self._check_model(body.model)
        messages = [m.for_template() for m in body.messages]
        try:
            prompt_ids = await asyncio.to_thread(engine.encode_chat, messages)
        except TemplateError as exc:
            message = f"The chat template rejected the messages: {exc}"
            raise ApiError(400, message, param="messages") from exc
        return await self._respond(request, body, prompt_ids, body.token_limit(), chat=True)

    async def post_feedback(self, body: FeedbackRequest) -> JSONResponse:
        if self.feedback is None:
            raise ApiError(404, "Feedback is not enabled on this server.", code="not_found")
        version = self.responses.version_of(body.response_id)
        if version is None:
            raise ApiError(
                404,
                f"No recent response with id '{body.response_id}'.",
                param="response_id",
                code="response_not_found",
            )
        record = await asyncio.to_thread(
            self.feedback.append, body, model=self.info.id, model_version=version
        )
        self.metrics.feedback.labels(body.rating).inc()
        receipt = FeedbackReceipt(
            id=record["id"],
            response_id=body.response_id,
            model_version=version,
            created=record["created"],
        )
        return JSONResponse(receipt.model_dump(mode="json"), status_code=201)

    # -- generation -----------------------------------------------------------------------

    async def _respond(
        self,
        request: Request,
        body: SamplingRequest,
        prompt_ids: list[int],
        requested: int | None,
        *,
        chat: bool,
    ) -> Response:
        engine = self.ready_engine()
        budget = completion_budget(
            len(prompt_ids),
            requested,
            cap=self.max_tokens,
            context=engine.context_length,
            prompt_param="messages" if chat else "prompt",
            default=None if chat else COMPLETION_DEFAULT_MAX_TOKENS,
        )
        sampling = Sampling(
            max_tokens=budget,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
        )
        reply = _Reply(
            id=request.state.request_id,
            created=int(time.time()),
            info=self.info,
            prompt_tokens=len(prompt_ids),
            chat=chat,
            started=request.state.started,
        )
        if body.stream:
            slot = AsyncExitStack()
            await slot.enter_async_context(self.admission.slot())  # 429 here, before any byte
            self.responses.remember(reply.id, self.info.version)
            events = self._events(reply, engine.stream(prompt_ids, sampling), body.include_usage())
            return _ReleasingStream(events, release=slot.aclose)
        async with self.admission.slot():
            text, last = await self._collect(reply, engine.stream(prompt_ids, sampling))
        self.responses.remember(reply.id, self.info.version)
        return JSONResponse(reply.final(text, last).model_dump(mode="json"))

    async def _collect(self, reply: _Reply, steps: AsyncIterator[Step]) -> tuple[str, Step]:
        pieces: list[str] = []
        async with aclosing(steps):
            async for step in steps:
                self._observe(reply, step)
                pieces.append(step.text)
        return "".join(pieces), step

    async def _events(
        self, reply: _Reply, steps: AsyncIterator[Step], include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: text chunks, a chunk with the finish
        reason, optionally one with usage, then `[DONE]`. A failure after the 200 went out
        can only be told in the stream: an `error` event, as OpenAI does."""
        try:
            if reply.chat:
                yield _sse(reply.chunk(Delta(role="assistant", content="")))
            async with aclosing(steps):
                async for step in steps:
                    self._observe(reply, step)
                    if step.text:
                        yield _sse(reply.chunk(step.text))
                    if step.finish_reason is not None:
                        yield _sse(reply.chunk(None, step.finish_reason))
                        last = step
            if include_usage:
                yield _sse(reply.usage_chunk(last))
            yield "data: [DONE]\n\n"
        except Exception:
            log.exception("generation failed after the response started")
            message = "The server had an error while generating."
            detail = ErrorDetail(message=message, type="server_error")
            yield _sse(ErrorResponse(error=detail))

    def _observe(self, reply: _Reply, step: Step) -> None:
        if step.completion_tokens == 1:
            self.metrics.time_to_first_token.observe(time.perf_counter() - reply.started)
        self.metrics.generated_tokens.inc()  # per token: streams cut short count too

    # -- helpers --------------------------------------------------------------------------

    def _card(self) -> ModelCard:
        return ModelCard(id=self.info.id, created=self.info.created)

    def _check_model(self, name: str | None, param: str | None = "model") -> None:
        if name is not None and name != self.info.id:
            raise ApiError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.info.id}'.",
                param=param,
                code="model_not_found",
            )


class _Reply:
    """The parts of one response that every body and chunk repeats."""

    def __init__(
        self,
        *,
        id: str,
        created: int,
        info: ModelInfo,
        prompt_tokens: int,
        chat: bool,
        started: float,
    ) -> None:
        self.id = id
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.started = started
        self.head = {
            "id": id,
            "created": created,
            "model": info.id,
            "system_fingerprint": info.version,
        }

    def usage(self, last: Step) -> Usage:
        prompt, done = self.prompt_tokens, last.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)

    def final(self, text: str, last: Step) -> BaseModel:
        reason = last.finish_reason or "length"
        if self.chat:
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)
            return ChatCompletion(**self.head, choices=[choice], usage=self.usage(last))
        choices = [CompletionChoice(text=text, finish_reason=reason)]
        return Completion(**self.head, choices=choices, usage=self.usage(last))

    def chunk(self, content: str | Delta | None, finish_reason: str | None = None) -> BaseModel:
        if self.chat:
            delta = content if isinstance(content, Delta) else Delta(content=content)
            choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(**self.head, choices=[choice])
        choices = [CompletionChoice(text=content or "", finish_reason=finish_reason)]
        return Completion(**self.head, choices=choices)

    def usage_chunk(self, last: Step) -> BaseModel:
        if self.chat:
            return ChatCompletionChunk(**self.head, choices=[], usage=self.usage(last))
        return Completion(**self.head, choices=[], usage=self.usage(last))


def _sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


class _ReleasingStream(StreamingResponse):
    """An event stream that gives its generation slot back when it ends, however it ends
    (finished, failed, client gone)."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


class _Edge:
    """Outermost: gives each request its id, stamps `X-Request-Id` and `X-Model-Version`
    on the response, counts and times it (to its last byte, streams included), and turns
    an unexpected exception into a logged OpenAI-shaped 500."""

    def __init__(self, app: ASGIApp, server: ModelServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        request_id = f"{_ID_PREFIXES.get(path, 'req')}-{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started)
        status = 0

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                headers["X-Model-Version"] = self.server.info.version
            await send(message)

        try:
            await self.app(scope, receive, stamped)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], path)
            if status:
                raise  # the response started: all that is left is to drop the connection
            error = ApiError(
                500, "The server had an error while processing your request.", type="server_error"
            )
            await error.response()(scope, receive, stamped)
        finally:
            endpoint = endpoint_label(path)
            metrics = self.server.metrics
            metrics.requests.labels(endpoint, str(status or 500)).inc()
            metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)


_LIMITS = ServeSpec()  # the defaults of spec.serve's limits


def create_app(
    model_dir: Path,
    *,
    max_tokens: int = _LIMITS.max_tokens,
    max_concurrency: int = _LIMITS.max_concurrency,
    max_queue: int = _LIMITS.max_queue,
    max_body_bytes: int = _LIMITS.max_body_bytes,
    feedback_path: Path | None = None,
) -> FastAPI:
    """The API for the exported model in `model_dir`, with `spec.serve`'s limits. The model
    loads in the background once the app starts (`/readyz` says when); feedback is stored
    in `feedback_path` (JSONL), or refused (404) without one."""
    server = ModelServer(
        model_dir,
        max_tokens=max_tokens,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        feedback_path=feedback_path,
    )
    app = FastAPI(
        title="kubetrain model server",
        version=server.info.version,
        lifespan=server.lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.model_server = server
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(_Edge, server=server)
    get, post = app.get, app.post
    get("/healthz")(server.healthz)
    get("/readyz", responses={503: {"model": ErrorResponse}})(server.readyz)
    get("/metrics", response_class=Response)(server.prometheus)
    get("/v1/models")(server.list_models)
    get("/v1/models/{model_id}", responses={404: {"model": ErrorResponse}})(server.get_model)
    post("/v1/completions", response_model=Completion, responses=_ERRORS)(server.completions)
    post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)(
        server.chat_completions
    )
    post("/v1/feedback", status_code=201, response_model=FeedbackReceipt, responses=_ERRORS)(
        server.post_feedback
    )
    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, but on SIGTERM/SIGINT the app turns not-ready (and refuses new generations
    with 503) at once, while uvicorn stops accepting and waits for requests in flight."""

    def __init__(self, config: uvicorn.Config, server: ModelServer) -> None:
        super().__init__(config)
        self.model_server = server

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.model_server.draining = True
        super().handle_exit(sig, frame)


def build_server(
    model_dir: Path,
    host: str = "0.0.0.0",
    port: int = contract.SERVE_PORT,
    *,
    graceful_timeout_s: float = GRACEFUL_SHUTDOWN_S,
    log_level: str = "info",
    **limits: Any,
) -> uvicorn.Server:
    """A uvicorn server for `create_app(model_dir, **limits)` that drains gracefully and
    stops when the model cannot be loaded. `server.run()` serves until a signal."""
    app = create_app(model_dir, **limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_timeout_s,
        lifespan="on",
    )
    server = _DrainingServer(config, app.state.model_server)

    def stop() -> None:
        server.should_exit = True

    app.state.model_server.on_load_failure = stop
    return server


def serve(
    model_dir: Path, host: str = "0.0.0.0", port: int = contract.SERVE_PORT, **options: Any
) -> None:
    """Serve until SIGTERM, then finish the requests in flight (up to `graceful_timeout_s`).
    Exits with status 1 when the model cannot be loaded, so the pod restarts visibly."""
    server = build_server(model_dir, host, port, **options)
    server.run()
    if server.model_server.load_error is not None:
        raise SystemExit(1)

"""The OpenAI-compatible HTTP API of an exported model: `create_app` builds it, `serve` runs
it under uvicorn until SIGTERM, then finishes the requests in flight.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
`GET /v1/models[/{id}]`, `POST /v1/feedback`, `GET /v1/training-summary` (the training
texts' drift summary exported with the model; 404 without one), `GET /healthz` (liveness),
`GET /readyz` (200 once the model is loaded, 503 while loading or draining), `GET /metrics`.

Choices where OpenAI leaves room: a request's `model` may be omitted or name the served
model, any other name is a 404 `model_not_found`; invalid requests are 400 (never 422);
`max_tokens` defaults to 16 for completions (as OpenAI) and to whatever fits under the
server's cap and the context for chat; `n` choices are generated one after another on the
request's one admission slot (streamed choice by choice, each chunk with its `index`);
logprobs are the model's own (log-softmax before penalties, bias and temperature); every
response carries `X-Request-Id` (the response id on generation endpoints) and
`X-Model-Version`, which bodies repeat as `system_fingerprint`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
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
from kubetrain_api.routing import DRIFT_SUMMARY_PATH
from kubetrain_api.v1alpha1 import ServeSpec

from .engine import LoggedToken, ModelInfo, Sampling, Step, TransformersEngine
from .errors import ApiError, install_handlers, unavailable
from .feedback import FeedbackStore, ResponseLog
from .limits import Admission, BodyLimitMiddleware, completion_budget
from .metrics import ServeMetrics, endpoint_label
from .schemas import (
    SEED_MAX,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorDetail,
    ErrorResponse,
    FeedbackReceipt,
    FeedbackRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    TopLogprob,
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
        self.training_summary = read_training_summary(self.model_dir)
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
        if body.best_of is not None and body.best_of != body.n:
            message = "best_of must equal n: this server does not rank choices."
            raise ApiError(400, message, param="best_of", code="invalid_value")
        if body.echo and body.logprobs is not None:
            message = "echo with logprobs is not supported (no prompt log-probabilities)."
            raise ApiError(400, message, param="echo", code="invalid_value")
        prompt = body.prompt_text()
        prompt_ids = await asyncio.to_thread(engine.encode_prompt, prompt)
        return await self._respond(
            request,
            body,
            prompt_ids,
            body.max_tokens,
            chat=False,
            top_logprobs=body.logprobs,
            echo=prompt if body.echo else "",
        )

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        engine = self.ready_engine()
        self._check_model(body.model)
        messages = [m.for_template() for m in body.messages]
        try:
            prompt_ids = await asyncio.to_thread(engine.encode_chat, messages)
        except TemplateError as exc:
            message = f"The chat template rejected the messages: {exc}"
            raise ApiError(400, message, param="messages") from exc
        if body.top_logprobs is not None and not body.logprobs:
            message = "top_logprobs needs logprobs set to true."
            raise ApiError(400, message, param="top_logprobs", code="invalid_value")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await self._respond(
            request, body, prompt_ids, body.token_limit(), chat=True, top_logprobs=top
        )

    async def get_training_summary(self) -> JSONResponse:
        if self.training_summary is None:
            message = "This model was exported without a training summary."
            raise ApiError(404, message, code="training_summary_not_found")
        return JSONResponse(self.training_summary)

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
        top_logprobs: int | None,
        echo: str = "",
    ) -> Response:
        engine = self.ready_engine()
        _check_sampling(body, engine.vocab_size)
        budget = completion_budget(
            len(prompt_ids),
            requested,
            cap=self.max_tokens,
            context=engine.context_length,
            prompt_param="messages" if chat else "prompt",
            default=None if chat else COMPLETION_DEFAULT_MAX_TOKENS,
        )
        base = Sampling(
            max_tokens=budget,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.token_bias(),
            logprobs=top_logprobs,
        )
        samplings = [replace(base, seed=_nth_seed(body.seed, i)) for i in range(body.n)]
        reply = _Reply(
            id=request.state.request_id,
            created=int(time.time()),
            info=self.info,
            prompt_tokens=len(prompt_ids),
            chat=chat,
            started=request.state.started,
            echo=echo,
            with_logprobs=top_logprobs is not None,
        )
        # The n choices are generated one after another on the request's one slot.
        if body.stream:
            slot = AsyncExitStack()
            await slot.enter_async_context(self.admission.slot())  # 429 here, before any byte
            self.responses.remember(reply.id, self.info.version)
            events = self._events(reply, engine, prompt_ids, samplings, body.include_usage())
            return _ReleasingStream(events, release=slot.aclose)
        async with self.admission.slot():
            choices = [
                await self._collect(reply, i, engine.stream(prompt_ids, sampling))
                for i, sampling in enumerate(samplings)
            ]
        self.responses.remember(reply.id, self.info.version)
        return JSONResponse(reply.final(choices).model_dump(mode="json"))

    async def _collect(self, reply: _Reply, index: int, steps: AsyncIterator[Step]) -> _Choice:
        choice = _Choice(index)
        async with aclosing(steps):
            async for step in steps:
                self._observe(reply, step, index)
                choice.add(step)
        return choice

    async def _events(
        self,
        reply: _Reply,
        engine: TransformersEngine,
        prompt_ids: list[int],
        samplings: list[Sampling],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: per choice (`index`), text chunks (with
        their tokens' logprobs when asked) and a chunk with the finish reason; optionally
        one with usage, then `[DONE]`. A failure after the 200 went out can only be told in
        the stream: an `error` event, as OpenAI does."""
        try:
            choices = []
            for index, sampling in enumerate(samplings):
                choice = _Choice(index)
                if reply.chat:
                    yield _sse(reply.chunk(index, Delta(role="assistant", content="")))
                elif reply.echo:
                    yield _sse(reply.chunk(index, reply.echo))
                offset = len(reply.echo)
                steps = engine.stream(prompt_ids, sampling)
                async with aclosing(steps):
                    async for step in steps:
                        self._observe(reply, step, index)
                        choice.add(step)
                        logged = [step.logprobs] if step.logprobs is not None else []
                        if step.text or logged:
                            logprobs = reply.logprobs(logged, offset) if logged else None
                            yield _sse(reply.chunk(index, step.text, logprobs=logprobs))
                            offset += sum(len(t.token) for t in logged)
                        if step.finish_reason is not None:
                            yield _sse(reply.chunk(index, None, step.finish_reason))
                choices.append(choice)
            if include_usage:
                yield _sse(reply.usage_chunk(choices))
            yield "data: [DONE]\n\n"
        except Exception:
            log.exception("generation failed after the response started")
            message = "The server had an error while generating."
            detail = ErrorDetail(message=message, type="server_error")
            yield _sse(ErrorResponse(error=detail))

    def _observe(self, reply: _Reply, step: Step, index: int) -> None:
        if step.completion_tokens == 1 and index == 0:
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


def _check_sampling(body: SamplingRequest, vocab_size: int) -> None:
    """What the schema cannot check alone: values that depend on the model, and the
    parameters accepted in shape but implemented only in part."""
    if body.response_format is not None and body.response_format.type != "text":
        message = (
            f"response_format type '{body.response_format.type}' is not supported: this "
            "server has no constrained (JSON) decoding; use {'type': 'text'}."
        )
        raise ApiError(400, message, param="response_format", code="unsupported_value")
    for token, _ in body.token_bias():
        if token >= vocab_size:
            message = (
                f"logit_bias names token {token}, but the model's vocabulary has {vocab_size}."
            )
            raise ApiError(400, message, param="logit_bias", code="invalid_value")


def _nth_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: seed + index, wrapped into the 64-bit range torch takes."""
    if seed is None:
        return None
    nth = seed + index
    return nth - 2**64 if nth > SEED_MAX else nth


@dataclass
class _Choice:
    """One choice as its steps arrive: text, the last step, each token's logprobs."""

    index: int
    pieces: list[str] = field(default_factory=list)
    tokens: list[LoggedToken] = field(default_factory=list)
    last: Step | None = None

    def add(self, step: Step) -> None:
        self.pieces.append(step.text)
        if step.logprobs is not None:
            self.tokens.append(step.logprobs)
        self.last = step

    @property
    def completion_tokens(self) -> int:
        return self.last.completion_tokens if self.last is not None else 0

    @property
    def finish_reason(self) -> str:
        return (self.last.finish_reason if self.last is not None else None) or "length"


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
        echo: str = "",
        with_logprobs: bool = False,
    ) -> None:
        self.id = id
        self.chat = chat
        self.echo = echo
        self.with_logprobs = with_logprobs
        self.prompt_tokens = prompt_tokens
        self.started = started
        self.head = {
            "id": id,
            "created": created,
            "model": info.id,
            "system_fingerprint": info.version,
        }

    def usage(self, choices: list[_Choice]) -> Usage:
        prompt, done = self.prompt_tokens, sum(c.completion_tokens for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)

    def logprobs(self, tokens: list[LoggedToken], offset: int) -> ChatLogprobs | CompletionLogprobs:
        """The tokens' logprobs in the endpoint's shape; completions' `text_offset` counts
        characters of the choice's text from `offset` on."""
        if self.chat:
            content = [
                ChatTokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.token.encode()),
                    top_logprobs=[
                        TopLogprob(token=text, logprob=value, bytes=list(text.encode()))
                        for text, value in t.top
                    ],
                )
                for t in tokens
            ]
            return ChatLogprobs(content=content)
        offsets, tops = [], []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.token)
            top: dict[str, float] = {}
            for text, value in t.top:  # most likely first: keep it when two decode alike
                top.setdefault(text, value)
            tops.append(top)
        return CompletionLogprobs(
            tokens=[t.token for t in tokens],
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=tops,
            text_offset=offsets,
        )

    def final(self, choices: list[_Choice]) -> BaseModel:
        if self.chat:
            chat_choices = [
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content="".join(c.pieces)),
                    logprobs=self._logprobs_of(c),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ]
            return ChatCompletion(**self.head, choices=chat_choices, usage=self.usage(choices))
        text_choices = [
            CompletionChoice(
                index=c.index,
                text=self.echo + "".join(c.pieces),
                logprobs=self._logprobs_of(c),
                finish_reason=c.finish_reason,
            )
            for c in choices
        ]
        return Completion(**self.head, choices=text_choices, usage=self.usage(choices))

    def _logprobs_of(self, choice: _Choice) -> ChatLogprobs | CompletionLogprobs | None:
        if not self.with_logprobs:
            return None
        return self.logprobs(choice.tokens, len(self.echo))

    def chunk(
        self,
        index: int,
        content: str | Delta | None,
        finish_reason: str | None = None,
        *,
        logprobs: ChatLogprobs | CompletionLogprobs | None = None,
    ) -> BaseModel:
        if self.chat:
            delta = content if isinstance(content, Delta) else Delta(content=content)
            choice = ChatChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
            )
            return ChatCompletionChunk(**self.head, choices=[choice])
        text = content if isinstance(content, str) else ""
        choices = [
            CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)
        ]
        return Completion(**self.head, choices=choices)

    def usage_chunk(self, choices: list[_Choice]) -> BaseModel:
        if self.chat:
            return ChatCompletionChunk(**self.head, choices=[], usage=self.usage(choices))
        return Completion(**self.head, choices=[], usage=self.usage(choices))


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
# A summary holds the top few thousand words: tens of KiB. More is not one of ours.
MAX_TRAINING_SUMMARY_BYTES = 4 * 2**20


def read_training_summary(model_dir: Path) -> dict[str, Any] | None:
    """The model folder's training summary (contract.TRAINING_SUMMARY_FILE) as JSON, read
    once at start; None when there is none, and when it is too large or not a JSON object
    (logged: drift is then unavailable, serving is not affected)."""
    path = Path(model_dir) / contract.TRAINING_SUMMARY_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TRAINING_SUMMARY_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("training summary %s unreadable: %s", path, exc)
        return None
    if len(raw) > MAX_TRAINING_SUMMARY_BYTES:
        log.warning("training summary %s: over %d bytes, ignored", path, MAX_TRAINING_SUMMARY_BYTES)
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        log.warning("training summary %s: not JSON (%s), ignored", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("training summary %s: not a JSON object, ignored", path)
        return None
    return data


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
    get(DRIFT_SUMMARY_PATH, responses={404: {"model": ErrorResponse}})(server.get_training_summary)
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

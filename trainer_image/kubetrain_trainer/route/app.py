"""The router (`kubetrain route`): one OpenAI-compatible endpoint in front of a
ModelService's variants.

Endpoints: `POST /v1/completions` and `POST /v1/chat/completions` (proxied to the variant
the sticky split picks, streams passed through event by event), `GET /v1/models[/{id}]`
(the service's model name), `POST /v1/feedback`, `GET /stats` (per-variant counts and
prompt drift (route/drift.py) for the operator), `GET /healthz`, `GET /readyz`, `GET /metrics`.

Every routed response carries `x-kubetrain-response-id` (also the body's `id`, which the
router mints and writes over the engine's), `x-kubetrain-variant` and
`x-kubetrain-model-version`; the body's `model` is the service's model name. Each
exchange is logged in the store (SQLite or PostgreSQL) from a thread pool, never on the
event loop, before the response ends: the non-streamed
body is sent once logged, a stream's final `data: [DONE]` once logged. So a client that
has its whole answer can rate it through any replica at once. If the store fails the
answer is still served (counted in `kubetrain_route_log_failures`); ratings of it are then
refused with 404.

Engine failures: a 5xx from the engine becomes 502 (503 stays 503, with Retry-After), a
refused connection 502, a timeout 504, all OpenAI-shaped and logged as errors of the
variant; a stream that breaks or reports an error after its 200 went out ends with an
`error` event and is logged as 502. The engine's 4xx answers pass through as they are. A
client that leaves mid-stream is logged with status 499 (not an error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetrain_api.routing import (
    HEADER_MODEL_VERSION,
    HEADER_RESPONSE_ID,
    HEADER_VARIANT,
    MAX_STATS_VARIANTS,
    ROUTER_PORT,
    RouterConfig,
    RouterConfigError,
    RouterStats,
    RouteVariant,
    VariantCountsReport,
    parse_router_config,
)
from kubetrain_api.v1alpha1 import ServeSpec

from ..serve.errors import RETRY_AFTER_S, ApiError, install_handlers, unavailable
from ..serve.schemas import ModelCard, ModelList
from .assign import choose
from .drift import DriftMonitor
from .exchange import Exchange, ask_for_logprobs, hide_logprobs, prompt_text, says_nothing
from .metrics import RATING_LABELS, RouteMetrics
from .store import MAX_USER_KEY_CHARS, FeedbackRefused, Store, StoreError, UnknownResponse

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 25.0  # within Kubernetes' default 30 s termination grace period
RELOAD_INTERVAL_S = 2.0
UPSTREAM_TIMEOUT_S = 600.0  # the longest pause between two bytes of an engine's answer
UPSTREAM_CONNECT_TIMEOUT_S = 5.0
# Idle upstream connections are dropped before the engines' own keep-alive timeout
# (uvicorn's, for both the built-in engine and vLLM: 5 s), so the router never sends on a
# connection the engine is closing at that moment (a lost request, answered 502).
UPSTREAM_KEEPALIVE_S = 2.0
STORE_WORKERS = 8
# A rating with the largest correction (16,384 characters, up to 4 bytes each) and room.
MAX_FEEDBACK_BODY_BYTES = 80 * 1024
CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer ended
_ROUTES = {"/v1/completions": ("cmpl", False), "/v1/chat/completions": ("chatcmpl", True)}
_FEEDBACK_FIELDS = {"response_id", "rating", "label", "correction", "caller", "user"}


class Router:
    """The state behind the routes: the configuration (re-read when its file changes), the
    store, the engines' HTTP client, the metrics."""

    def __init__(
        self,
        config: RouterConfig,
        store: Store,
        *,
        config_path: Path | None = None,
        config_bytes: bytes | None = None,
        max_body_bytes: int = ServeSpec().max_body_bytes,
        upstream_timeout_s: float = UPSTREAM_TIMEOUT_S,
        reload_interval_s: float = RELOAD_INTERVAL_S,
    ) -> None:
        self.store = store
        self.config_path = config_path
        self._config_bytes = config_bytes
        self.max_body_bytes = max_body_bytes
        self.upstream_timeout_s = upstream_timeout_s
        self.reload_interval_s = reload_interval_s
        self.metrics = RouteMetrics()
        self.drift = DriftMonitor(self.metrics)
        self.known_variants: set[str] = set()
        self.config = config
        self._apply(config)
        self.started = int(time.time())
        self.draining = False
        self.client: httpx.AsyncClient | None = None
        self.executor = ThreadPoolExecutor(STORE_WORKERS, thread_name_prefix="route-store")

    # -- configuration --------------------------------------------------------------------

    def _apply(self, config: RouterConfig) -> None:
        self.metrics.model_info.clear()  # the model name may change with the config
        self.metrics.model_info.labels(config.model).set(1)
        self.config = config
        for name in self.known_variants - set(config.weights()):
            self.metrics.weight.remove(name)
            self.drift.forget(name)
        for name, weight in config.weights().items():
            self.metrics.weight.labels(name).set(weight)
        self.known_variants |= set(config.weights())

    async def reload(self) -> None:
        """Re-read the file; apply it when it changed and is valid, else keep the old one."""
        if self.config_path is None:
            return
        try:
            text = await asyncio.to_thread(self.config_path.read_bytes)
        except OSError as exc:
            log.warning("cannot read %s (keeping the current config): %s", self.config_path, exc)
            return
        if text == self._config_bytes:
            return
        self._config_bytes = text  # a bad file is reported once, not every interval
        try:
            config = parse_router_config(text, str(self.config_path))
        except RouterConfigError as exc:
            log.error("refused the new config (keeping the current one): %s", exc)
            self.metrics.config_reloads.labels("refused").inc()
            return
        self._apply(config)
        self.metrics.config_reloads.labels("applied").inc()
        log.info("config applied: weights %s", config.weights())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                await self.reload()
            except Exception:  # the watcher must outlive any surprise
                log.exception("config reload failed")

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(self.upstream_timeout_s, connect=UPSTREAM_CONNECT_TIMEOUT_S)
        limits = httpx.Limits(
            max_connections=1024,
            max_keepalive_connections=256,
            keepalive_expiry=UPSTREAM_KEEPALIVE_S,
        )
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        watcher = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            self.draining = True
            watcher.cancel()
            await self.client.aclose()
            self.executor.shutdown(wait=True)  # the logs of the last answers reach the store

    async def _in_store(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    # -- small routes ---------------------------------------------------------------------

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> dict[str, Any]:
        if self.draining:
            raise unavailable("The router is shutting down; retry.", "shutting_down")
        return {"status": "ready", "model": self.config.model, "weights": self.config.weights()}

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.model, created=self.started)])

    async def get_model(self, model_id: str) -> ModelCard:
        if model_id != self.config.model:
            raise _model_not_found(model_id, self.config.model, param=None)
        return ModelCard(id=self.config.model, created=self.started)

    async def stats(self, request: Request) -> JSONResponse:
        """Per-variant counts since `?since=` (Unix seconds), configured variants first;
        `?slowerThan=` (seconds) also counts the responses slower than that."""
        since = _number_param(request, "since", "Unix seconds")
        slower_than = _number_param(request, "slowerThan", "seconds")
        try:
            counts = await self._in_store(self.store.variant_counts, since, slower_than)
        except Exception as exc:
            log.exception("stats: the store failed")
            raise unavailable(f"The store is unavailable: {type(exc).__name__}", "store") from exc
        configured = list(self.config.weights())
        order = configured + sorted(set(counts) - set(configured))
        variants = {
            name: VariantCountsReport(**counts[name].to_dict())
            for name in order[:MAX_STATS_VARIANTS]
            if name in counts
        }
        await self._add_drift(variants, since)
        report = RouterStats(
            since=since,
            backend=self.store.backend,
            weights=self.config.weights(),
            variants=variants,
        )
        return JSONResponse(report.model_dump(mode="json"))

    async def _add_drift(
        self, variants: dict[str, VariantCountsReport], since: float | None
    ) -> None:
        """Each configured variant's prompt drift (route/drift.py), computed together."""
        client = self.client
        if client is None:  # not started (no lifespan): no engine to ask
            return
        configured = [v for v in self.config.variants if v.name in variants]

        async def prompts(variant: str, since: float | None, limit: int) -> list[str]:
            found: list[str] = await self._in_store(
                self.store.recent_prompts, variant, since, limit
            )
            return found

        found = await asyncio.gather(
            *(self.drift.report(v, since, client, prompts) for v in configured)
        )
        for v, drift in zip(configured, found, strict=True):
            variants[v.name].drift = drift

    async def feedback(self, request: Request) -> JSONResponse:
        body = _json_object(await _read_body(request, MAX_FEEDBACK_BODY_BYTES))
        unknown = sorted(set(body) - _FEEDBACK_FIELDS)
        if unknown:
            message = f"Unrecognized request argument supplied: {unknown[0]}"
            raise ApiError(400, message, param=unknown[0])
        caller = request.headers.get(self.config.caller_header) or body.get("caller")
        caller = caller or body.get("user")
        if not caller:
            message = (
                f"Who rates is required: the {self.config.caller_header} header, or `caller` "
                "(or `user`) in the body."
            )
            raise ApiError(400, message, param="caller", code="missing_caller")
        try:
            receipt = await self._in_store(
                self.store.add_feedback,
                body.get("response_id"),
                caller=caller,
                rating=body.get("rating"),
                label=body.get("label"),
                correction=body.get("correction"),
            )
        except FeedbackRefused as exc:
            raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from None
        except UnknownResponse as exc:
            message = f"No logged response has id {exc.response_id!r}."
            raise ApiError(404, message, param="response_id", code="response_not_found") from None
        except Exception as exc:
            log.exception("feedback: the store failed")
            raise unavailable(f"The store is unavailable: {type(exc).__name__}", "store") from exc
        label = receipt.variant if receipt.variant in self.known_variants else "other"
        self.metrics.feedback.labels(label, RATING_LABELS[receipt.rating]).inc()
        answer = {
            "id": receipt.id,
            "object": "feedback",
            "response_id": receipt.response_id,
            "variant": receipt.variant,
            "model_version": receipt.model_version,
            "rating": receipt.rating,
            "revision": receipt.revision,
            "replaced": not receipt.created,
            "created": int(receipt.created_at),
        }
        return JSONResponse(answer, status_code=201 if receipt.created else 200)

    # -- routing --------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._route(request, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._route(request, "/v1/chat/completions")

    async def _route(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        created_at = time.time()
        if self.draining:
            raise unavailable("The router is shutting down; retry.", "shutting_down")
        body = _json_object(await _read_body(request, self.max_body_bytes))
        config = self.config  # one config for the whole request, even across a reload
        model = body.get("model")
        if model is not None and model != config.model:
            raise _model_not_found(model, config.model, param="model")
        key = request.headers.get(config.sticky_header) if config.sticky_header else None
        if key is None and isinstance(body.get("user"), str):
            key = body["user"]
        variant = choose(key, config.hash_salt, config.variants)
        prefix, chat = _ROUTES[path]
        call = _Call(
            router=self,
            service_model=config.model,
            variant=variant,
            endpoint=path,
            response_id=f"{prefix}-{uuid.uuid4().hex}",
            started=started,
            created_at=created_at,
            prompt=prompt_text(body, chat=chat),
            user_key=_loggable_key(key),
            exchange=Exchange(chat=chat),
        )
        stream = body.get("stream") is True
        upstream_body = dict(body)
        upstream_body.pop("model", None)
        if variant.upstream_model is not None:
            upstream_body["model"] = variant.upstream_model
        # The log's uncertainty needs token logprobs; the client gets only what it asked for.
        call.hide_logprobs = ask_for_logprobs(upstream_body, chat=chat)
        hide_usage = False
        if stream:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Usage is asked for the log and left out of the client's stream.
                upstream_body["stream_options"] = {**(options or {}), "include_usage": True}
                hide_usage = True
        assert self.client is not None
        upstream_request = self.client.build_request(
            "POST",
            variant.url.rstrip("/") + path,
            content=json.dumps(upstream_body).encode(),
            headers={"content-type": "application/json", "x-request-id": call.response_id},
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.TimeoutException as exc:
            return await call.fail(504, "timeout", f"did not answer in time ({exc!r})")
        except httpx.HTTPError as exc:
            return await call.fail(502, "connect", f"could not be reached ({exc!r})")
        if stream and upstream.status_code == 200:
            return StreamingResponse(
                call.relay(upstream, hide_usage),
                media_type="text/event-stream",
                headers={**call.headers(), "cache-control": "no-cache"},
            )
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            return await call.fail(502, "stream", f"broke off its answer ({exc!r})")
        finally:
            await upstream.aclose()
        return await call.answer(upstream, content)


class _Call:
    """One routed request: its variant, id and timing; turns the engine's answer into the
    client's, logs it and counts it."""

    def __init__(
        self,
        *,
        router: Router,
        service_model: str,
        variant: RouteVariant,
        endpoint: str,
        response_id: str,
        started: float,
        created_at: float,
        prompt: str,
        user_key: str | None,
        exchange: Exchange,
    ) -> None:
        self.router = router
        self.service_model = service_model
        self.variant = variant
        self.endpoint = endpoint
        self.response_id = response_id
        self.started = started
        self.created_at = created_at
        self.prompt = prompt
        self.user_key = user_key
        self.exchange = exchange
        self.hide_logprobs = False  # the engine was asked for logprobs the client was not

    def headers(self) -> dict[str, str]:
        return {
            HEADER_RESPONSE_ID: self.response_id,
            HEADER_VARIANT: self.variant.name,
            HEADER_MODEL_VERSION: self.variant.model_version,
        }

    async def answer(self, upstream: httpx.Response, content: bytes) -> Response:
        """A whole answer of the engine: a success (the id rewritten), its 4xx as is, or a
        5xx as 502/503."""
        status = upstream.status_code
        if status >= 500:
            retry = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
            detail = _error_message(content)
            return await self.fail(
                503 if status == 503 else 502,
                "upstream_5xx",
                f"answered {status}" + (f": {detail}" if detail else ""),
                headers=retry,
            )
        if status >= 400:
            await self.finish(status, content.decode(errors="replace"))
            media = upstream.headers.get("content-type", "application/json")
            return Response(content, status, headers=self.headers(), media_type=media)
        try:
            body = json.loads(content)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return await self.fail(502, "upstream_5xx", "answered 200 with a body that is not JSON")
        body["id"], body["model"] = self.response_id, self.service_model
        self.exchange.add_completion(body)
        if self.hide_logprobs:
            hide_logprobs(body)
        await self.finish(200, self.exchange.text())
        return JSONResponse(body, headers=self.headers())

    async def fail(
        self, status: int, reason: str, what: str, headers: dict[str, str] | None = None
    ) -> Response:
        message = f"Variant {self.variant.name!r} {what}."
        self.router.metrics.errors.labels(self.variant.name, reason).inc()
        await self.finish(status, message)
        error = ApiError(status, message, type="server_error", code="upstream_error")
        response: Response = error.response()
        response.headers.update({**self.headers(), **(headers or {})})
        return response

    async def relay(self, upstream: httpx.Response, hide_usage: bool) -> AsyncIterator[bytes]:
        """The engine's server-sent events, one by one as they arrive, with our id; the
        text, usage and logprobs noted on the way. `[DONE]` goes out once logged."""
        status, done = 200, False
        data: list[str] = []
        try:
            async for line in upstream.aiter_lines():
                if line:
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif not line.startswith(":"):
                        data.append("")  # event/id fields: nothing to relay
                    continue
                if not data:
                    continue
                payload = "\n".join(data)
                data = []
                if payload == "[DONE]":
                    done = True
                    continue
                event, failed = self._event(payload, hide_usage)
                if failed:
                    status = 502
                if event is not None:
                    yield event
            if not done and status == 200:
                status = 502
                self.router.metrics.errors.labels(self.variant.name, "stream").inc()
                yield _error_event("The engine's stream ended before it finished.")
        except httpx.HTTPError as exc:
            status = 502
            self.router.metrics.errors.labels(self.variant.name, "stream").inc()
            log.warning("variant %s: stream broke: %r", self.variant.name, exc)
            yield _error_event("The engine's stream broke off.")
        except (asyncio.CancelledError, GeneratorExit):  # the client left: log, don't wait
            self._log_soon(CLIENT_CLOSED)
            raise
        except Exception:
            log.exception("relaying variant %s's stream failed", self.variant.name)
            self._log_soon(500)
            raise
        finally:
            await upstream.aclose()
        await self.finish(status, self.exchange.text())
        if done:
            yield b"data: [DONE]\n\n"

    def _event(self, payload: str, hide_usage: bool) -> tuple[bytes | None, bool]:
        """The event to relay for one `data:` payload (None: leave it out) and whether it
        reports an error."""
        try:
            chunk = json.loads(payload)
        except ValueError:
            return f"data: {payload}\n\n".encode(), False
        if not isinstance(chunk, dict):
            return f"data: {payload}\n\n".encode(), False
        if "error" in chunk:
            self.router.metrics.errors.labels(self.variant.name, "stream").inc()
            return f"data: {payload}\n\n".encode(), True
        self.exchange.add_chunk(chunk)
        if hide_usage and not chunk.get("choices") and chunk.get("usage") is not None:
            return None, False
        if hide_usage:
            chunk.pop("usage", None)
        if self.hide_logprobs:
            hide_logprobs(chunk)
            if says_nothing(chunk, chat=self.exchange.chat):
                return None, False
        chunk["id"], chunk["model"] = self.response_id, self.service_model
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode(), False

    def _record(self, status: int, response: str) -> dict[str, Any]:
        x = self.exchange
        return {
            "id": self.response_id,
            "variant": self.variant.name,
            "model_version": self.variant.model_version,
            "prompt": self.prompt,
            "response": response,
            "latency_s": max(0.0, time.perf_counter() - self.started),
            "prompt_tokens": x.prompt_tokens,
            "completion_tokens": x.completion_tokens,
            "mean_logprob": x.mean_logprob(),
            "user_key": self.user_key,
            "status": status,
            "created_at": self.created_at,
        }

    def _count(self, status: int, latency_s: float) -> None:
        metrics = self.router.metrics
        metrics.requests.labels(self.variant.name, self.endpoint, str(status)).inc()
        metrics.latency.labels(self.variant.name).observe(latency_s)

    async def finish(self, status: int, response: str) -> None:
        """Log the exchange (in the store's threads) and count it."""
        record = self._record(status, response)
        self._count(status, record["latency_s"])
        try:
            await self.router._in_store(_log_record, self.router.store, record)
        except Exception:
            self.router.metrics.log_failures.inc()
            log.exception("could not log response %s", self.response_id)

    def _log_soon(self, status: int) -> None:
        record = self._record(status, self.exchange.text())
        self._count(status, record["latency_s"])
        try:
            future = self.router.executor.submit(_log_record, self.router.store, record)
        except RuntimeError:  # the pool is shut down: the process is exiting
            self.router.metrics.log_failures.inc()
            return

        def done(f: Any) -> None:
            if f.exception() is not None:
                self.router.metrics.log_failures.inc()
                log.error("could not log response %s: %s", self.response_id, f.exception())

        future.add_done_callback(done)


def _log_record(store: Store, record: dict[str, Any]) -> None:
    response_id = record.pop("id")
    store.record_response(response_id, **record)


# -- helpers ----------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (at once when Content-Length says so,
    else as soon as the bytes read pass it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than this router's limit of {limit} bytes.",
        code="request_too_large",
        headers={"Connection": "close"},
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _model_not_found(name: object, served: str, *, param: str | None) -> ApiError:
    return ApiError(
        404,
        f"The model '{str(name)[:100]}' does not exist; this service serves '{served}'.",
        param=param,
        code="model_not_found",
    )


def _loggable_key(key: str | None) -> str | None:
    """The user key as the log keeps it (the whole key decides the variant)."""
    if not key:
        return None
    key = key[:MAX_USER_KEY_CHARS]
    return None if any(ch < " " or ch == "\x7f" for ch in key) else key


def _error_message(content: bytes) -> str:
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return content[:200].decode(errors="replace").strip()
    return str(message)[:200]


def _error_event(message: str) -> bytes:
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(error)}\n\n".encode()


# -- app and server ---------------------------------------------------------------------


def create_app(router: Router) -> FastAPI:
    app = FastAPI(
        title="kubetrain router",
        lifespan=router.lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.router = router
    install_handlers(app)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # A bug, not the client's fault nor an engine's: logged, answered OpenAI-shaped.
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        message = "The router had an error while processing your request."
        response: Response = ApiError(500, message, type="server_error").response()
        return response

    get, post = app.get, app.post
    get("/healthz")(router.healthz)
    get("/readyz")(router.readyz)
    get("/metrics", response_class=Response)(router.prometheus)
    get("/stats")(router.stats)
    get("/v1/models")(router.list_models)
    get("/v1/models/{model_id}")(router.get_model)
    post("/v1/completions")(router.completions)
    post("/v1/chat/completions")(router.chat_completions)
    post("/v1/feedback")(router.feedback)
    return app


class _DrainingServer(uvicorn.Server):
    """On SIGTERM the router turns not-ready and refuses new requests at once, while
    uvicorn finishes those in flight."""

    def __init__(self, config: uvicorn.Config, router: Router) -> None:
        super().__init__(config)
        self.router = router

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.router.draining = True
        super().handle_exit(sig, frame)


def load_config(path: Path) -> tuple[RouterConfig, bytes]:
    """The configuration file's content, parsed (RouterConfigError naming the field)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RouterConfigError(f"{path}: cannot read the config: {exc.strerror}") from None
    return parse_router_config(text, str(path)), text


def build_server(
    router: Router,
    host: str = "0.0.0.0",
    port: int = ROUTER_PORT,
    *,
    graceful_timeout_s: float = GRACEFUL_SHUTDOWN_S,
    log_level: str = "info",
) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(router),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(graceful_timeout_s),
        lifespan="on",
    )
    return _DrainingServer(config, router)


__all__ = ["Router", "StoreError", "build_server", "create_app", "load_config"]


def _number_param(request: Request, name: str, meaning: str) -> float | None:
    """A finite number from the query string, None when absent, else a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{name} must be {meaning} (>= 0), got {raw[:40]!r}", param=name)
    return value

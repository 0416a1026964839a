"""Every error as OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, so the
official clients raise their typed exceptions (`BadRequestError`, `RateLimitError`, ...).

Invalid requests are 400 as OpenAI answers them (malformed JSON and schema errors alike,
never FastAPI's 422), with `param` naming the offending field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import UNSUPPORTED, ErrorDetail, ErrorResponse

# Seconds a client should wait before retrying an overloaded or not-yet-ready server.
RETRY_AFTER_S = 1

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


class ApiError(Exception):
    """An answer other than success, raised anywhere in a request and rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.detail, self.headers)


def error_response(
    status: int, detail: ErrorDetail, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=detail).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(message: str, code: str) -> ApiError:
    return ApiError(
        503,
        message,
        type="service_unavailable_error",
        code=code,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem pydantic found, worded for an API user."""
    first: dict[str, Any] = exc.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return ApiError(400, f"We could not parse the JSON body of your request: {reason}")
    param = _param(first["loc"])
    if param is None:
        return ApiError(400, f"The request body must be a JSON object ({first['msg']}).")
    if first["type"] == "extra_forbidden" and param in UNSUPPORTED:
        return ApiError(400, f"Unsupported parameter '{param}': {UNSUPPORTED[param]}.", param=param)
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    return ApiError(400, f"Invalid value for '{param}': {first['msg']}", param=param)


def _param(loc: tuple[str | int, ...]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`. Union member tags that
    pydantic adds to the location (`str`, `list[str]`, `TextPart`) are left out."""
    parts = [p for p in loc[1:] if isinstance(p, int) or _is_field_name(p)]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or None


def _is_field_name(part: str) -> bool:
    return part.isidentifier() and part.islower() and part not in _TYPE_NAMES


def install_handlers(app: FastAPI) -> None:
    """OpenAI-shaped bodies for our errors, validation errors and routing errors (404,
    405). Anything else is a server bug, caught and logged by the edge middleware."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"Unknown endpoint: {request.method} {request.url.path}"
        detail = ErrorDetail(
            message=message,
            type="invalid_request_error",
            code=_HTTP_CODES.get(exc.status_code),
        )
        return error_response(exc.status_code, detail, dict(exc.headers or {}))

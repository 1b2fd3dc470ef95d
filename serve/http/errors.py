"""The API's one error shape, ``{"error": {"code", "message"}}`` with stable codes, for our own
refusals, FastAPI's validation errors and Starlette's; and the body limit, which answers 413
before a request body is read."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """A refusal the caller sees as is. Backends raise it too: a model not served, a full queue
    and a replica gone are theirs to know."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a body that is not UTF-8) in the API's error shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse(error_body("invalid_request", f"{where}: {first.get('msg', exc)}"), 422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class BodyLimit:
    """413 for a declared body over the limit (``app.state.max_body_bytes``), before anything
    reads it. A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs a task and a
    stream per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = getattr(scope["app"].state, "max_body_bytes", None) if "app" in scope else None
        if scope["type"] == "http" and limit:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _too_large(f"request body is {int(length)} bytes; the limit is {limit}")(scope, receive, send)
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # No length declared (chunked): read up to the limit here, then hand the body on.
                messages, size = [], 0
                while True:
                    message = await receive()
                    messages.append(message)
                    size += len(message.get("body", b""))
                    if size > limit:
                        await _too_large(f"request body is over the limit of {limit} bytes")(scope, receive, send)
                        return
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        break
                replay = iter(messages)

                async def receive_again() -> dict[str, Any]:
                    return next(replay, None) or await receive()

                await self.app(scope, receive_again, send)
                return
        await self.app(scope, receive, send)


def _too_large(message: str) -> JSONResponse:
    return JSONResponse(error_body("body_too_large", message), 413)

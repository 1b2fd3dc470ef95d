"""The API's one error shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}`` with
stable codes, for our own refusals, FastAPI's validation errors, Starlette's and unexpected failures, so OpenAI
clients raise their own error classes with our message; and the body limit, which answers 413
before a request body is read."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


# OpenAI's error types by status; its clients pick their exception class by the status alone.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A refusal the caller sees as is. Backends raise it too: a model not served, a full queue
    and a replica gone are theirs to know. ``param``: the request field at fault, if one is."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers or {}, param


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status, headers=headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a body that is not UTF-8) in the API's error shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422, or 400 under ``/v1/``, where clients expect OpenAI's status for a bad request."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())]
    where = ".".join(loc)
    param = ".".join(loc[1:]) if loc[:1] == ["body"] and len(loc) > 1 else None
    status = 400 if "/v1/" in request.url.path else 422
    return error_response(status, "invalid_request", f"{where}: {first.get('msg', exc)}", param)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """Anything else (a bug, a call into a replica that failed in a way no backend names) is still a 500
    in the API's shape, so a client's error handling sees ``server_error`` rather than a bare text body.
    Its text stays in the server's log, where Starlette sends the exception after this answer: it may
    name internals."""
    message = f"internal error ({type(exc).__name__}); the server log has the details"
    return error_response(500, "internal_error", message)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _unexpected)
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
    return error_response(413, "body_too_large", message)


def migration_running(exc: Exception, retry_after_s: int) -> ApiError:
    """A write refused while a migration copies the collection: temporary, so a 503 that says when to retry."""
    return ApiError(503, "migration_running", str(exc), {"Retry-After": str(retry_after_s)})

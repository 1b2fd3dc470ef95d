"""API keys and CORS for the HTTP API, as plain ASGI middleware.

Keys are bearer tokens (``Authorization: Bearer KEY``, what the ``openai`` client sends) with
a read or a write scope. Writes (adding and deleting items, bulk jobs, migrations) need a write key; reads
(encoding, search, models, metrics, objects) are open unless ``open_reads`` is off. With no
key configured the API is open, as a local tool bound to 127.0.0.1 is; SECURITY.md says when
that is not enough.

Every key is compared with ``hmac.compare_digest`` and all keys are always compared, so the
time taken says nothing about which key, or how much of one, matched. Keys live in
``SecretStr`` settings and are never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from mmembed.serve.http.errors import error_response

Scope = Literal["open", "read", "write"]

# Always open: probes, the page's own files and the API description. Objects are open too:
# their keys are SHA-256 content hashes, unguessable links like presigned S3 URLs, which the
# page's <img> and <audio> tags fetch without headers.
OPEN_PATHS = ("/healthz", "/readyz", "/", "/docs", "/openapi.json")
OPEN_PREFIXES = ("/ui/", "/objects/")


def required_scope(method: str, path: str) -> Scope:
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or method == "OPTIONS":
        return "open"
    if path in ("/ingest", "/jobs", "/migrations") or path.startswith(("/jobs/", "/migrations/")):
        return "write"
    if (path == "/items" or path.startswith("/items/")) and method in ("POST", "PUT", "PATCH", "DELETE"):
        return "write"
    return "read"


@dataclass(frozen=True)
class ApiKeys:
    read: tuple[bytes, ...] = ()
    write: tuple[bytes, ...] = ()
    open_reads: bool = True

    @classmethod
    def from_strings(cls, read: Sequence[str], write: Sequence[str], open_reads: bool) -> ApiKeys:
        return cls(tuple(k.encode() for k in read if k), tuple(k.encode() for k in write if k), open_reads)

    @property
    def enabled(self) -> bool:
        return bool(self.read or self.write)

    def scope_of(self, token: bytes) -> Scope | None:
        """The best scope ``token`` holds, comparing it with every key in constant time."""
        is_write = any([hmac.compare_digest(token, key) for key in self.write])  # a list: no short circuit
        is_read = any([hmac.compare_digest(token, key) for key in self.read])
        return "write" if is_write else "read" if is_read else None

    def denial(self, method: str, path: str, authorization: bytes) -> JSONResponse | None:
        """The 401/403 answer for a request that lacks the scope its route needs, else None."""
        need = required_scope(method, path)
        if not self.enabled or need == "open" or (need == "read" and self.open_reads):
            return None
        scheme, _, token = authorization.partition(b" ")
        have = self.scope_of(token.strip()) if scheme.lower() == b"bearer" and token.strip() else None
        if have is None:
            message = "this endpoint needs an API key: send `Authorization: Bearer KEY`"
            return error_response(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="mmembed"'})
        if need == "write" and have != "write":
            return error_response(403, "forbidden", "this endpoint changes the catalogue and needs a write key")
        return None


class RequireKey:
    """Answers 401/403 before the route runs. The keys come from ``app.state.api_keys``,
    which the ingress sets from the settings of its replica."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        keys: ApiKeys | None = getattr(scope["app"].state, "api_keys", None) if "app" in scope else None
        if scope["type"] == "http" and keys is not None:
            root, path = scope.get("root_path", ""), scope["path"]
            path = path[len(root) :] if root and path.startswith(root) else path  # the route below the mount point
            denied = keys.denial(scope["method"], path or "/", dict(scope["headers"]).get(b"authorization", b""))
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Cors:
    """Cross-origin access only for the origins configured (``app.state.cors_origins``);
    none by default, so a web page elsewhere cannot drive this API from a user's browser."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cors: CORSMiddleware | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        origins = getattr(scope["app"].state, "cors_origins", ()) if "app" in scope else ()
        if scope["type"] == "http" and origins:
            if self.cors is None:
                self.cors = CORSMiddleware(
                    self.app,
                    allow_origins=list(origins),
                    allow_methods=["*"],
                    allow_headers=["authorization", "content-type"],
                )
            await self.cors(scope, receive, send)
            return
        await self.app(scope, receive, send)

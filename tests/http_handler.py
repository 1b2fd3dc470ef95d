"""The base of the tests' small local HTTP sites: answers, redirects, no access log, and no
traceback when a client hangs up at its size cap."""

from __future__ import annotations

import contextlib
from http.server import BaseHTTPRequestHandler
from typing import Any


class SiteHandler(BaseHTTPRequestHandler):
    def _send(self, status: int, body: bytes, ctype: str | None = None) -> None:
        self.send_response(status)
        if ctype is not None:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, to: str) -> None:
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # the client stopped reading at its size cap
            super().handle()

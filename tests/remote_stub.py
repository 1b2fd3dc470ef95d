"""A real local embedding provider for the remote-encoder tests: an HTTP server on 127.0.0.1
that speaks OpenAI's ``/embeddings`` and Cohere's ``/v1/embed``, enforces its own requests- and
tokens-per-window limits (429 + Retry-After when exceeded, and it records that it happened),
and injects faults on a schedule: 429s, 500s, answers slower than the client's timeout, and
connections dropped without an answer.

It keeps its own books, so tests assert on what the provider saw rather than on what the
client believes: each call's size and tokens, the most requests in flight at once, how often
a limit was exceeded, and how many times each text was embedded and delivered.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

MAX_INPUTS = {"openai": 2048, "cohere": 96}


def stub_tokens(text: str) -> int:
    """The stub's own tokenizer: words plus one start token. The client's estimate (UTF-8 bytes
    + 2) is never below it, as a conservative estimate must not be below a real tokenizer."""
    return len(text.split()) + 1


def stub_vector(text: str, dim: int) -> np.ndarray:
    """Deterministic, not unit length (the client normalises)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32) * 3.0


@dataclass
class Call:
    at: float
    shape: str  # "openai" | "cohere"
    texts: list[str]
    tokens: int
    outcome: str  # ok | 429 | 500 | slow | drop | over_limit | rejected | unauthorized | too_many_inputs


@dataclass
class StubProvider:
    dim: int = 16
    rpm: int | None = None  # requests per window
    tpm: int | None = None  # tokens per window (stub_tokens)
    window_s: float = 60.0
    faults: dict[int, str] = field(default_factory=dict)  # accepted request number (0-based) -> fault
    key: str | None = "stub-secret-key"
    delay_s: float = 0.0  # every answer takes this long (lets requests overlap)
    slow_s: float = 5.0  # a "slow" fault answers after this (or when the stub stops)
    retry_after_s: float = 0.3  # what an injected 429 asks for
    reject: frozenset[str] = frozenset()  # texts answered with 400 (whatever call they are in)
    answer_dim: int | None = None  # answer vectors of this size instead (a misconfigured client)
    count: Callable[[str], int] = stub_tokens  # the provider's tokenizer, for its tpm and its billing

    def __post_init__(self) -> None:
        self.calls: list[Call] = []
        self.delivered: Counter[str] = Counter()  # text -> times embedded in a 200 that was not late
        self.over_limit = 0  # requests the stub's own rpm/tpm had to refuse
        self.max_in_flight = 0
        self.retry_after_gaps: list[float] = []  # after each injected 429: seconds until the next request
        self._in_flight = 0
        self._accepted = 0
        self._window: list[tuple[float, int]] = []  # (arrival, tokens) of accepted requests
        self._last_429: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> StubProvider:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def config(self, name: str = "stub", kind: str = "openai", **overrides: Any) -> dict[str, Any]:
        """A remote model configuration pointing at this stub (the key from STUB_API_KEY)."""
        base = self.url + ("/v1" if kind == "openai" else "")
        return {
            "name": name,
            "kind": kind,
            "base_url": base,
            "model": f"stub-{kind}",
            "dim": self.dim,
            "api_key_env": "STUB_API_KEY" if self.key else None,
            "rate_window_s": self.window_s,
            "rpm": self.rpm,
            "tpm": self.tpm,
            **overrides,
        }

    # --- books ------------------------------------------------------------------------------

    def ok_calls(self) -> list[Call]:
        return [c for c in self.calls if c.outcome == "ok"]

    def max_in_any_window(self) -> tuple[int, int]:
        """The most requests and tokens the stub accepted within any window_s, by arrival time."""
        accepted = sorted((c.at, c.tokens) for c in self.calls if c.outcome not in ("over_limit", "unauthorized"))
        most_requests = most_tokens = 0
        for i, (start, _) in enumerate(accepted):
            inside = [t for at, t in accepted[i:] if at < start + self.window_s]
            most_requests, most_tokens = max(most_requests, len(inside)), max(most_tokens, sum(inside))
        return most_requests, most_tokens

    # --- serving ----------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with stub._lock:
                    stub._in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub._in_flight)
                try:
                    stub._answer(self, body)
                finally:
                    with stub._lock:
                        stub._in_flight -= 1

        return Handler

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client already gave up (a slow answer)
            h.close_connection = True

    def _answer(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        now = time.monotonic()
        shape = "cohere" if h.path.split("?")[0].endswith("/v1/embed") else "openai"
        texts = body.get("texts") if shape == "cohere" else body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        tokens = sum(self.count(t) for t in texts)

        def record(outcome: str) -> None:
            self.calls.append(Call(now, shape, texts, tokens, outcome))

        if self.key and h.headers.get("authorization") != f"Bearer {self.key}":
            with self._lock:
                record("unauthorized")
            self._send(h, 401, {"error": {"message": f"bad key {h.headers.get('authorization')}"}})
            return
        with self._lock:
            if self._last_429 is not None:
                self.retry_after_gaps.append(now - self._last_429)
                self._last_429 = None
            self._window = [(at, t) for at, t in self._window if at > now - self.window_s]
            over = (self.rpm is not None and len(self._window) + 1 > self.rpm) or (
                self.tpm is not None and sum(t for _, t in self._window) + tokens > self.tpm
            )
            if over:
                self.over_limit += 1
                record("over_limit")
                wait = self._window[0][0] + self.window_s - now if self._window else self.window_s
            else:
                self._window.append((now, tokens))
                number = self._accepted
                self._accepted += 1
                fault = self.faults.get(number)
                if fault == "429":
                    self._last_429 = now
        if over:
            self._send(h, 429, {"error": {"message": "rate limit exceeded"}}, {"retry-after": f"{wait:.3f}"})
            return
        if len(texts) > MAX_INPUTS[shape] or not texts:
            with self._lock:
                record("too_many_inputs")
            self._send(h, 400, {"error": {"message": f"{len(texts)} inputs; at most {MAX_INPUTS[shape]}"}})
            return
        if fault == "drop":
            with self._lock:
                record("drop")
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("429", "500"):
            with self._lock:
                record(fault)
            headers = {"retry-after": str(self.retry_after_s)} if fault == "429" else {}
            self._send(h, int(fault), {"error": {"message": f"injected {fault}"}}, headers)
            return
        if fault == "slow":
            with self._lock:
                record("slow")
            self._stop.wait(self.slow_s)
            self._send(h, 200, self._payload(shape, texts, tokens))  # too late: not counted as delivered
            return
        if self.reject & set(texts):
            with self._lock:
                record("rejected")
            self._send(h, 400, {"error": {"message": "input refused by content policy"}})
            return
        if self.delay_s:
            self._stop.wait(self.delay_s)
        with self._lock:
            record("ok")
            self.delivered.update(texts)
        self._send(h, 200, self._payload(shape, texts, tokens))

    def _payload(self, shape: str, texts: list[str], tokens: int) -> dict[str, Any]:
        dim = self.answer_dim or self.dim
        vectors = [stub_vector(t, dim).tolist() for t in texts]
        if shape == "cohere":
            return {"id": "stub", "embeddings": {"float": vectors}, "meta": {"billed_units": {"input_tokens": tokens}}}
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in reversed(list(enumerate(vectors)))]
        return {
            "object": "list",
            "data": data,
            "model": "stub",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

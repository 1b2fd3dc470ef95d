"""Client-side rate limits: stay under a provider's requests- and tokens-per-minute before it
says no, and cap the requests in flight.

Each budget is a token bucket whose tokens come back exactly one window after the request that
spent them *finished* (a sliding-window bucket). A classic bucket that refills continuously
lets through up to twice its capacity in one window (a full bucket, then the refill), which
a provider counting a sliding minute answers with 429s; this one never has more than the limit
in any window, whether the provider counts a sliding window or a refilling bucket. Tokens are
charged when a request is admitted and their window starts when its answer arrives, so a slow
request's arrival at the provider can never fall outside the window the client accounted it in.

One limiter per encoder, so per process: several replicas or ray encoder actors each need their
share of the provider's limit (divide rpm/tpm between them).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass
class _Spend:
    requests: int
    tokens: int
    at: float = math.inf  # when the request finished; inf while it is in flight


class WindowBucket:
    """The spends of the last ``window`` seconds of one budget (requests or tokens)."""

    def __init__(self, limit: int, window: float, attr: str) -> None:
        self.limit, self.window, self.attr = limit, window, attr

    def wait(self, log: list[_Spend], amount: int, now: float) -> float:
        """Seconds until ``amount`` more fits (0: now; inf: only once an in-flight request ends).
        More than the whole limit at once (one huge call) waits for an empty window and runs alone."""
        amount = min(amount, self.limit)
        live = [s for s in log if s.at > now - self.window]
        used = sum(getattr(s, self.attr) for s in live)
        if used + amount <= self.limit:
            return 0.0
        for s in sorted(live, key=lambda s: s.at):
            used -= getattr(s, self.attr)
            if used + amount <= self.limit:
                return s.at + self.window - now
        return math.inf


@dataclass
class Ticket:
    spend: _Spend
    waited_s: float = 0.0


@dataclass
class RateLimiter:
    """``rpm``/``tpm``: requests and tokens per ``window_s`` (None: no limit); ``concurrency``:
    requests in flight. ``clock`` and ``sleep`` are injectable so tests need not wait for minutes."""

    rpm: int | None
    tpm: int | None
    window_s: float = 60.0
    concurrency: int = 4
    clock: Clock = time.monotonic
    sleep: Callable[[float], None] | None = None  # None: wait on a condition, woken when a request ends
    _log: list[_Spend] = field(default_factory=list, init=False, repr=False)
    _paused_until: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._buckets = [
            WindowBucket(limit, self.window_s, attr)
            for limit, attr in ((self.rpm, "requests"), (self.tpm, "tokens"))
            if limit
        ]

    def _wait(self, tokens: int, now: float) -> float:
        self._log[:] = [s for s in self._log if s.at > now - self.window_s]
        waits = [b.wait(self._log, 1 if b.attr == "requests" else tokens, now) for b in self._buckets]
        return max([self._paused_until - now, 0.0, *waits])

    def acquire(self, tokens: int) -> Ticket:
        """Block until one request of ``tokens`` fits every budget, then charge it."""
        started = self.clock()
        with self._cond:
            while (wait := self._wait(tokens, self.clock())) > 0:
                if self.sleep is None:
                    self._cond.wait(None if math.isinf(wait) else wait)
                else:
                    self._cond.release()
                    try:
                        self.sleep(1.0 if math.isinf(wait) else wait)
                    finally:
                        self._cond.acquire()
            spend = _Spend(1, tokens)
            self._log.append(spend)
        return Ticket(spend, self.clock() - started)

    def settle(self, ticket: Ticket) -> None:
        """The request ended (answered, failed or timed out): its window starts now."""
        with self._cond:
            ticket.spend.at = self.clock()
            self._cond.notify_all()

    def pause(self, seconds: float) -> None:
        """The provider said wait (429 with Retry-After): no request of this limiter starts sooner."""
        with self._cond:
            self._paused_until = max(self._paused_until, self.clock() + seconds)
            self._cond.notify_all()

    @contextmanager
    def request(self, tokens: int) -> Iterator[Ticket]:
        """A concurrency slot, then the rate budget; both are given back however the request ends."""
        with self._slots:
            ticket = self.acquire(tokens)
            try:
                yield ticket
            finally:
                self.settle(ticket)

"""Which provider failures are worth another try, and how long to wait before it.

Retried: 429 (rate limited), 408, 5xx, timeouts, refused or dropped connections and garbled
200s. Not retried: other 4xx (the request itself is wrong; the client isolates the bad input).
The wait is exponential backoff with full jitter (so many clients that failed together do
not retry together), and never shorter than the provider's ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529})
MAX_RETRY_AFTER_S = 600.0


class Retryable(Exception):
    """A failure another try may fix; ``retry_after`` is the provider's own wait, if it gave one."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Rejected(Exception):
    """The provider refused the request itself (a 4xx other than 429/408): trying again is pointless."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def retry_after(headers: httpx.Headers, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the provider asked for: OpenAI's ``retry-after-ms``, else ``Retry-After`` as seconds
    (fractions accepted) or an HTTP date. Capped, so a bad header cannot park a job for a day."""
    try:
        if "retry-after-ms" in headers:
            return min(float(headers["retry-after-ms"]) / 1000, MAX_RETRY_AFTER_S)
        if "retry-after" in headers:
            value = headers["retry-after"].strip()
            try:
                return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                return min(max(email.utils.parsedate_to_datetime(value).timestamp() - now(), 0.0), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return None
    return None


def classify(response: httpx.Response) -> Exception | None:
    """None for a 2xx; otherwise the exception that says whether to try again."""
    if response.is_success:
        return None
    detail = response.text[:300].replace("\n", " ")
    message = f"HTTP {response.status_code}: {detail}"
    if response.status_code in RETRY_STATUSES or response.status_code >= 500:
        return Retryable(message, response.status_code, retry_after(response.headers))
    return Rejected(message, response.status_code)


def transport_error(exc: httpx.HTTPError) -> Retryable:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    return Retryable(f"{kind}: {type(exc).__name__}: {exc}")


class WaitBackoffOrRetryAfter:
    """Full-jitter exponential backoff, but at least the provider's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.backoff = wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None) or 0.0
        return max(float(asked), self.backoff(state))


def retrying(
    attempts: int,
    initial: float,
    maximum: float,
    sleep: Callable[[float], Any] = time.sleep,
    before_sleep: Callable[[RetryCallState], Any] | None = None,
) -> Retrying:
    return Retrying(
        retry=retry_if_exception_type(Retryable),
        stop=stop_after_attempt(attempts),
        wait=WaitBackoffOrRetryAfter(initial, maximum),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )

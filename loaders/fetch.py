"""Fetching media by URL: bounded in time, size and redirects, confined by an address policy, one
typed error per URL.

URLs come from remote clients (the API) and from job sources, so a fetch must not become a way
into the server's own network (SSRF). Every connection goes through ``loaders.url_policy``: the
host is resolved, every address it resolves to is checked against the ``UrlPolicy`` (strict by
default: public addresses only), and the connection is made to the checked address itself, so a
DNS answer that changes in between cannot redirect it. Redirects are followed here, by hand, one
request at a time, so each hop's URL is checked too (scheme, credentials) and its connection goes
through the same policy; a hop that points inward fails with ``url_forbidden_address`` before
anything is sent there.

Limits (``FetchLimits``): connect and read timeouts for each request, optionally a deadline for the
whole fetch (a server that drips bytes just under the read timeout), a byte cap enforced while
streaming (a missing or lying ``Content-Length`` changes nothing), and a redirect count. ``fetch``
also checks the content type against the kind of media wanted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from mmembed.loaders.url_policy import STRICT_POLICY, AsyncPolicyClient, FetchError, PolicyClient, UrlPolicy, check_url

__all__ = ["ACCEPTED_TYPES", "STRICT_POLICY", "FetchError", "FetchLimits", "UrlPolicy", "fetch", "fetch_sync"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class FetchLimits:
    """How far a fetch may go. ``total_timeout_s`` (None: no deadline) bounds the whole fetch,
    redirects and body included; the connect and read timeouts bound each step of it. ``policy``
    says which addresses may be reached (default: public ones only)."""

    max_bytes: int = 50_000_000
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    max_redirects: int = 3
    total_timeout_s: float | None = None
    policy: UrlPolicy = STRICT_POLICY


ACCEPTED_TYPES = {"image": ("image/",), "audio": ("audio/", "video/webm", "video/mp4", "application/ogg")}


async def fetch(url: str, kind: str, limits: FetchLimits = FetchLimits()) -> bytes:
    """The body of ``url``, checked to be ``kind`` ("image" or "audio") by its content type
    (``application/octet-stream`` passes: the decoder sniffs the bytes anyway), or a FetchError."""
    first = check_url(url)
    deadline = _deadline(limits)
    async with AsyncPolicyClient(limits.policy, timeout=_timeout(limits)) as client:
        target = first
        for hop in range(limits.max_redirects + 1):
            with _errors(target, hop):
                async with client.stream("GET", target) as response:
                    following = _redirect(first, target, response, hop, limits)
                    if following is None:
                        body = _Body(target, response, kind, limits, deadline)
                        async for chunk in response.aiter_bytes():
                            body.add(chunk)
                        return body.bytes()
            target = following
    raise AssertionError("unreachable: the last hop returns or raises")


def fetch_sync(
    url: str, limits: FetchLimits = FetchLimits(), kind: str | None = None, client: PolicyClient | None = None
) -> bytes:
    """``fetch`` for synchronous code (job workers). ``kind`` None skips the content-type check.
    ``client`` lets a caller reuse connections across URLs; it must be a ``PolicyClient`` made with
    ``limits.policy`` (the policy is enforced by the client's connections, so the two must agree)."""
    if client is None:
        with PolicyClient(limits.policy) as own:
            return fetch_sync(url, limits, kind, own)
    if not isinstance(client, PolicyClient):
        raise TypeError(f"fetch_sync needs a loaders.url_policy.PolicyClient, not {type(client).__name__}")
    if client.policy != limits.policy:
        raise ValueError(f"fetch_sync: the client's policy ({client.policy}) is not limits.policy ({limits.policy})")
    first = check_url(url)
    deadline = _deadline(limits)
    target = first
    for hop in range(limits.max_redirects + 1):
        with _errors(target, hop), client.stream("GET", target, timeout=_timeout(limits)) as response:
            following = _redirect(first, target, response, hop, limits)
            if following is None:
                body = _Body(target, response, kind, limits, deadline)
                for chunk in response.iter_bytes():
                    body.add(chunk)
                return body.bytes()
        target = following
    raise AssertionError("unreachable: the last hop returns or raises")


# ---------------------------------------------------------------------------------------------
# What the sync and async loops share


def _timeout(limits: FetchLimits) -> httpx.Timeout:
    return httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)


def _deadline(limits: FetchLimits) -> float | None:
    return None if limits.total_timeout_s is None else time.monotonic() + limits.total_timeout_s


def _redirect(
    first: httpx.URL, url: httpx.URL, response: httpx.Response, hop: int, limits: FetchLimits
) -> httpx.URL | None:
    """The URL ``response`` redirects to, checked like the first one, or None if it is no redirect
    (a 3xx without ``Location`` then fails as a status)."""
    location = response.headers.get("location")
    if response.status_code not in REDIRECT_STATUSES or not location:
        return None
    if hop >= limits.max_redirects:
        raise FetchError(f"{first} redirected more than {limits.max_redirects} times", "url_redirects")
    try:
        following = url.join(location)  # relative locations are relative to the URL that answered
    except httpx.InvalidURL as exc:
        raise FetchError(f"{url} redirected to an invalid URL", "url_invalid") from exc
    return check_url(following)


class _Body:
    """The response checked before its body is read, then the body, counted as it arrives."""

    def __init__(
        self, url: httpx.URL, response: httpx.Response, kind: str | None, limits: FetchLimits, deadline: float | None
    ) -> None:
        if not response.is_success:
            raise FetchError(f"{url} answered HTTP {response.status_code}", "url_status")
        if kind is not None:
            ctype = response.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
            if not (ctype.startswith(ACCEPTED_TYPES[kind]) or ctype == "application/octet-stream"):
                raise FetchError(f"{url} is {ctype}, not {kind}", "url_wrong_type")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(f"{url} is {declared} bytes, over the {limits.max_bytes}-byte limit", "url_too_large")
        self.url, self.limits, self.deadline = url, limits, deadline
        self.data = bytearray()
        self._check_deadline()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limits.max_bytes:  # a missing or lying Content-Length
            raise FetchError(f"{self.url} sent more than {self.limits.max_bytes} bytes", "url_too_large")
        self._check_deadline()

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise FetchError(f"{self.url} took longer than {self.limits.total_timeout_s:g} s", "url_timeout")

    def bytes(self) -> bytes:
        return bytes(self.data)


@contextlib.contextmanager
def _errors(url: httpx.URL, hop: int) -> Iterator[None]:
    """httpx's exceptions as FetchErrors; a refusal at a redirect hop says that it was one."""
    try:
        yield
    except FetchError as exc:
        if hop and exc.code in ("url_forbidden_address", "url_dns"):
            raise FetchError(f"redirected to {url.host}: {exc}", exc.code) from exc
        raise
    except httpx.TimeoutException as exc:
        raise FetchError(f"{url} timed out ({type(exc).__name__})", "url_timeout") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"{url} is unreachable: {type(exc).__name__}: {exc}", "url_unreachable") from exc
    except httpx.InvalidURL as exc:
        raise FetchError(f"{str(url)[:80]!r} is not a valid URL: {exc}", "url_invalid") from exc

"""Fetching media by URL: bounded in time, size and redirects, one typed error per URL.

What this does not yet do is refuse private, loopback and metadata addresses (SSRF);
until it does, serve URL inputs only to trusted clients (the security issue adds the
address policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx


class FetchError(ValueError):
    code = "url_error"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 50_000_000
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    max_redirects: int = 3


ACCEPTED_TYPES = {"image": ("image/",), "audio": ("audio/", "video/webm", "video/mp4", "application/ogg")}


async def fetch(url: str, kind: str, limits: FetchLimits = FetchLimits()) -> bytes:
    """The body of ``url``, checked to be ``kind`` ("image" or "audio") by its content type
    (``application/octet-stream`` passes: the decoder sniffs the bytes anyway)."""
    if not url.startswith(("http://", "https://")):
        raise FetchError(f"only http(s) URLs are fetched, not {url[:40]!r}", "url_scheme")
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    try:
        async with (
            httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=limits.max_redirects) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise FetchError(f"{url} answered HTTP {response.status_code}", "url_status")
            ctype = response.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
            if not (ctype.startswith(ACCEPTED_TYPES[kind]) or ctype == "application/octet-stream"):
                raise FetchError(f"{url} is {ctype}, not {kind}", "url_wrong_type")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise FetchError(f"{url} is {declared} bytes, over the {limits.max_bytes}-byte limit", "url_too_large")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limits.max_bytes:  # a missing or lying Content-Length
                    raise FetchError(f"{url} sent more than {limits.max_bytes} bytes", "url_too_large")
            return bytes(body)
    except httpx.TooManyRedirects as exc:
        raise FetchError(f"{url} redirected more than {limits.max_redirects} times", "url_redirects") from exc
    except httpx.TimeoutException as exc:
        raise FetchError(f"{url} timed out ({type(exc).__name__})", "url_timeout") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"{url} is unreachable: {type(exc).__name__}: {exc}", "url_unreachable") from exc

"""A text encoder whose forward pass is an HTTP API: the same Encoder interface as a local model,
so bulk jobs and the server use it by name.

``encode_prepared`` splits a batch into calls within the provider's limits (inputs and tokens
per call), sends them concurrently under the rate limiter, retries what may succeed later, and
returns per-item results: items of a call that failed past its retry budget come back with a
``provider_failed`` error (bulk jobs put them in the dead-letter store), an input the provider
refuses is found by halving its call and comes back alone as ``provider_rejected``, and
everything else gets its vector. Only what no retry can fix for any item (a refused API key, a
provider answering vectors of the wrong size) raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr

from mmembed.encoders.base import (
    Encoder,
    EncoderError,
    InputError,
    ItemResult,
    Limits,
    Modality,
    Prepared,
    l2_normalise,
)
from mmembed.encoders.config import RemoteModelConfig
from mmembed.encoders.remote.costs import CostMeter, Usage, estimate, usd
from mmembed.encoders.remote.providers import BadResponse, endpoint, limits, parse_response, request_body
from mmembed.encoders.remote.rate_limit import RateLimiter
from mmembed.encoders.remote.retry import Rejected, Retryable, classify, retrying, transport_error
from mmembed.encoders.remote.tokens import TokenCounter


class ProviderFailed(InputError):
    """The provider did not embed this item within the retry budget; trying later may work."""

    code = "provider_failed"


class ProviderRejected(InputError):
    """The provider refused this one input (a 4xx for a call holding only it)."""

    code = "provider_rejected"


class DimensionMismatch(EncoderError):
    code = "dimension_mismatch"


@dataclass
class RemoteText:
    """A prepared input: the text as it will be sent and its counted tokens. ``len`` is the
    token count, which is what the server's batcher weighs text items by."""

    text: str
    tokens: int

    def __len__(self) -> int:
        return self.tokens


class RemoteEncoder(Encoder[str]):
    modality = Modality.TEXT

    def __init__(
        self,
        config: RemoteModelConfig,
        counter: TokenCounter,
        *,
        api_key: SecretStr | None,
        usd_per_million: float | None,
        policy: str = "truncate",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.model, self.config, self.dim, self.counter, self.policy = config.name, config, config.dim, counter, policy
        self.provider_limits = limits(config)
        self.limits = Limits(max_tokens=self.provider_limits.max_tokens)
        self.call_tokens = min(self.provider_limits.max_call_tokens, config.tpm or self.provider_limits.max_call_tokens)
        self.meter = CostMeter(usd_per_million)
        self.limiter = RateLimiter(config.rpm, config.tpm, config.rate_window_s, config.concurrency, clock)
        self.url = endpoint(config)
        self._key, self._sleep = api_key, sleep
        self._http = httpx.Client(
            timeout=config.timeout_s, follow_redirects=False, limits=httpx.Limits(max_connections=config.concurrency)
        )

    def __repr__(self) -> str:
        return f"RemoteEncoder({self.model!r}, {self.config.kind} {self.url}, dim={self.dim})"

    # --- preprocess: count, then fit or refuse ----------------------------------------------

    def preprocess(self, item: str) -> Prepared:
        text, info = self.counter.fit(item, self.provider_limits.max_tokens, self.policy, self.model)
        return Prepared(RemoteText(text, info["tokens"]), info)

    def calls(self, texts: Sequence[RemoteText]) -> list[list[int]]:
        """Indexes of ``texts`` grouped into calls of at most ``max_inputs`` inputs and
        ``call_tokens`` tokens, in order."""
        out: list[list[int]] = []
        tokens = 0
        for i, t in enumerate(texts):
            if not out or len(out[-1]) >= self.provider_limits.max_inputs or tokens + t.tokens > self.call_tokens:
                out.append([])
                tokens = 0
            out[-1].append(i)
            tokens += t.tokens
        return out

    def estimate(self, texts: Sequence[str]) -> dict[str, Any]:
        """What embedding ``texts`` would cost, counted as they would be sent: over-long texts at the
        limit (truncated) or not at all (refused), per the token policy."""
        limit = self.provider_limits.max_tokens
        counts = [self.counter.count(t) for t in texts]
        counts = [c for c in counts if c <= limit] if self.policy == "error" else [min(c, limit) for c in counts]
        return estimate(counts, self.meter.usd_per_million, self.counter.method)

    # --- encode -----------------------------------------------------------------------------

    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        results = self.encode_prepared(batch)
        for r in results:
            if r.error is not None:
                raise r.error
        return np.stack([r.vector for r in results]) if results else np.zeros((0, self.dim), np.float32)

    def encode_prepared(self, batch: Sequence[Prepared]) -> list[ItemResult]:
        texts: list[RemoteText] = [p.data for p in batch]
        groups = self.calls(texts)
        outcomes: list[np.ndarray | InputError | None] = [None] * len(texts)
        usage = Usage()
        if groups:
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(groups))) as pool:
                futures = [(g, pool.submit(self._call, [texts[i] for i in g])) for g in groups]
                for group, future in futures:
                    vectors, call_usage = future.result()  # a DimensionMismatch or refused key raises here
                    usage = usage + call_usage
                    for i, v in zip(group, vectors, strict=True):
                        outcomes[i] = v
        self.meter.batch_done(usage)
        batch_info = {"batch_tokens": usage.tokens_billed, "batch_usd": usage.usd}
        results = []
        for p, outcome in zip(batch, outcomes, strict=True):
            info = p.info | batch_info
            if isinstance(outcome, InputError):
                results.append(ItemResult(error=outcome, info=info))
            else:
                results.append(ItemResult(outcome, info=info))
        return results

    def _call(self, texts: list[RemoteText]) -> tuple[list[np.ndarray | InputError], Usage]:
        """One call's vectors (or each item's error) and what it cost."""
        usage = Usage()
        tokens = sum(t.tokens for t in texts)
        try:
            matrix, billed = self._send([t.text for t in texts], tokens, usage)
        except Retryable as exc:
            usage.failed_calls, usage.failed_inputs = 1, len(texts)
            self.meter.add(usage)
            error = ProviderFailed(f"{self.model}: gave up after {self.config.max_attempts} tries: {exc}")
            return [error] * len(texts), usage
        except Rejected as exc:
            if exc.status in (401, 403):
                raise EncoderError(
                    f"{self.model}: the provider refused the API key "
                    f"(from {self.config.api_key_env or 'no variable'}): {exc}"
                ) from None
            if len(texts) == 1:
                usage.failed_calls, usage.failed_inputs = 1, 1
                self.meter.add(usage)
                return [ProviderRejected(f"{self.model}: {exc}")], usage
            self.meter.add(usage)
            half = len(texts) // 2  # find the input it refuses; the others still get embedded
            left, left_usage = self._call(texts[:half])
            right, right_usage = self._call(texts[half:])
            return left + right, usage + left_usage + right_usage
        usage.calls, usage.inputs, usage.tokens_counted = 1, len(texts), tokens
        usage.tokens_billed = tokens if billed is None else billed
        usage.usd = usd(usage.tokens_billed, self.meter.usd_per_million)
        self.meter.add(usage)
        return list(matrix), usage

    def _send(self, texts: list[str], tokens: int, usage: Usage) -> tuple[np.ndarray, int | None]:
        body = request_body(self.config, texts)

        def attempt() -> tuple[np.ndarray, int | None]:
            with self.limiter.request(tokens) as ticket:
                usage.throttled_s += ticket.waited_s
                try:
                    response = self._http.post(self.url, json=body, headers=self._headers(), params=self.config.query)
                except httpx.HTTPError as exc:
                    raise transport_error(exc) from None
                error = classify(response)
                if isinstance(error, Retryable) and error.status == 429 and error.retry_after:
                    self.limiter.pause(error.retry_after)  # every request of this encoder waits, not only this one
                if error is not None:
                    raise self._scrub(error)
                try:
                    vectors, billed = parse_response(self.config, response.json(), len(texts))
                    matrix = np.asarray(vectors, dtype=np.float32)
                except (ValueError, BadResponse) as exc:
                    raise Retryable(f"bad response: {exc}") from None
            if matrix.ndim != 2 or matrix.shape[1] != self.dim:
                raise DimensionMismatch(
                    f"{self.model}: the provider answered vectors of shape {matrix.shape[1:]}, the configuration "
                    f"says dim={self.dim}; fix the remote model's dim (vectors already stored are {self.dim}-d)"
                )
            if not np.isfinite(matrix).all():
                raise Retryable("bad response: non-finite vector values")
            return l2_normalise(matrix), billed

        def count_retry(_: object) -> None:
            usage.retries += 1

        return retrying(
            self.config.max_attempts, self.config.backoff_s, self.config.backoff_max_s, self._sleep, count_retry
        )(attempt)

    def _headers(self) -> dict[str, str]:
        if self._key is None:
            return {}
        scheme = f"{self.config.auth_scheme} " if self.config.auth_scheme else ""
        return {self.config.auth_header: scheme + self._key.get_secret_value()}

    def _scrub(self, error: Exception) -> Exception:
        """A provider may echo the key in its error text; it never reaches a message or a log."""
        if self._key is not None and self._key.get_secret_value() in str(error):
            error.args = (str(error).replace(self._key.get_secret_value(), "***"),)
        return error

    def close(self) -> None:
        self._http.close()

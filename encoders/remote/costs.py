"""What remote embeddings cost: tokens and estimated dollars per batch and per run.

Prices come from configuration (``mmembed.encoders.config.DEFAULT_PRICES``, ``MMEMBED_REMOTE_PRICES``
or a model's own ``usd_per_million_tokens``). Before a run, costs are estimated from counted
tokens (an upper bound where the count is the estimate); after it, from the tokens the
provider reported billing, or the counted ones where it reported none.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any


def usd(tokens: int, usd_per_million: float | None) -> float:
    return tokens * (usd_per_million or 0.0) / 1_000_000


@dataclass
class Usage:
    """Totals over some calls: one batch, one run, or the encoder's life."""

    calls: int = 0  # successful calls
    inputs: int = 0  # inputs embedded
    tokens_counted: int = 0  # by our counter, before sending
    tokens_billed: int = 0  # as the provider reported (counted where it did not say)
    usd: float = 0.0
    retries: int = 0  # failed attempts that were tried again
    failed_calls: int = 0  # calls that failed past their retry budget or were refused
    failed_inputs: int = 0
    throttled_s: float = 0.0  # waiting for the rate limits

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CostMeter:
    """Thread-safe running totals of one encoder, and its recent batches."""

    def __init__(self, usd_per_million: float | None) -> None:
        self.usd_per_million = usd_per_million
        self.total = Usage()
        self.batches: deque[Usage] = deque(maxlen=1000)
        self._lock = threading.Lock()

    def add(self, usage: Usage) -> None:
        with self._lock:
            self.total = self.total + usage

    def batch_done(self, usage: Usage) -> None:
        with self._lock:
            self.batches.append(usage)

    def snapshot(self) -> Usage:
        with self._lock:
            return Usage(**asdict(self.total))


def estimate(counts: Iterable[int], usd_per_million: float | None, method: str) -> dict[str, Any]:
    """The plan's figure for texts already counted."""
    counts = list(counts)
    tokens = sum(counts)
    return {
        "texts": len(counts),
        "tokens": tokens,
        "usd": usd(tokens, usd_per_million),
        "usd_per_million": usd_per_million,
        "token_count": method,
    }


def price_text(usd_per_million: float | None) -> str:
    return f"${usd_per_million}/1M tokens" if usd_per_million is not None else "no price configured"


def plan_line(name: str, c: dict[str, Any]) -> str:
    """One line of a bulk job's plan: what a remote model is expected to cost."""
    audio = c.get("transcripts_not_counted", 0)
    more = f", plus the transcripts of {audio} audio items (not yet known)" if audio else ""
    return (
        f"  remote {name}: {c['texts']} texts, {c['tokens']} tokens ({c['token_count']}), "
        f"${c['usd']:.6f} at {price_text(c['usd_per_million'])}{more}"
    )


def summary_line(name: str, c: dict[str, Any]) -> str:
    """One line of a bulk job's summary: what a remote model did cost, and how it went."""
    return (
        f"  remote {name}: {c['calls']} calls, {c['inputs']} texts, {c['tokens_billed']} tokens billed, "
        f"${c['usd']:.6f} at {price_text(c['usd_per_million'])}; {c['retries']} retries, "
        f"{c['failed_inputs']} texts failed, {c['throttled_s']:.1f} s throttled"
    )

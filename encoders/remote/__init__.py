"""Remote embedding providers: OpenAI-compatible and Cohere-style HTTP APIs as text encoders.

Modules: ``providers`` (request/response shapes and per-call limits), ``tokens`` (counting
before sending), ``rate_limit`` (rpm/tpm buckets and the concurrency cap), ``retry`` (what to
retry and how long to wait), ``costs`` (tokens and dollars), ``presets`` (names and defaults),
``encoder`` (the Encoder). They use an HTTP client; nothing here serves HTTP.
"""

from __future__ import annotations

from mmembed.config import RemoteModelConfig, Settings
from mmembed.encoders.base import ModelNotAvailable
from mmembed.encoders.remote.costs import CostMeter, Usage
from mmembed.encoders.remote.encoder import (
    DimensionMismatch,
    ProviderFailed,
    ProviderRejected,
    RemoteEncoder,
    RemoteText,
)
from mmembed.encoders.remote.presets import builtin_names, remote_config
from mmembed.encoders.remote.tokens import TokenCounter, counter_for


def price_for(config: RemoteModelConfig, settings: Settings) -> float | None:
    if config.usd_per_million_tokens is not None:
        return config.usd_per_million_tokens
    return settings.remote_price(config.model)


def load_remote(config: RemoteModelConfig, settings: Settings) -> RemoteEncoder:
    """The encoder for a configured remote model. Nothing is downloaded; a key the configuration
    names but the environment lacks is an error now, not a 401 per request later."""
    key = settings.secret_from_env(config.api_key_env) if config.api_key_env else None
    if config.api_key_env and key is None:
        raise ModelNotAvailable(f"remote model {config.name!r} needs an API key in the environment variable "
                                f"{config.api_key_env}")  # fmt: skip
    return RemoteEncoder(config, counter_for(config, settings), api_key=key,
                         usd_per_million=price_for(config, settings), policy=settings.token_policy)  # fmt: skip


__all__ = [
    "CostMeter",
    "DimensionMismatch",
    "ProviderFailed",
    "ProviderRejected",
    "RemoteEncoder",
    "RemoteText",
    "TokenCounter",
    "Usage",
    "builtin_names",
    "counter_for",
    "load_remote",
    "price_for",
    "remote_config",
]

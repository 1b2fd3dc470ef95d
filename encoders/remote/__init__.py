"""Remote embedding providers: OpenAI-compatible and Cohere-style HTTP APIs as text encoders.

Modules: ``providers`` (request/response shapes and per-call limits), ``tokens`` (counting
before sending), ``rate_limit`` (rpm/tpm buckets and the concurrency cap), ``retry`` (what to
retry and how long to wait), ``costs`` (tokens and dollars), ``presets`` (names and defaults),
``encoder`` (the Encoder). They use an HTTP client; nothing here serves HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmembed.encoders.base import Encoder, Modality, ModelNotAvailable
from mmembed.encoders.config import DEFAULT_PRICES, ModelsConfig, RemoteModelConfig
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

if TYPE_CHECKING:
    import torch

    from mmembed.encoders.registry import ModelSpec


def price_for(remote: RemoteModelConfig, config: ModelsConfig) -> float | None:
    if remote.usd_per_million_tokens is not None:
        return remote.usd_per_million_tokens
    return config.remote_price(remote.model)


def load_remote(remote: RemoteModelConfig, config: ModelsConfig) -> RemoteEncoder:
    """The encoder for a configured remote model. Nothing is downloaded; a key the configuration
    names but the environment lacked when the configuration was resolved (``config.api_keys``)
    is an error now, not a 401 per request later."""
    key = config.api_key(remote.api_key_env) if remote.api_key_env else None
    if remote.api_key_env and key is None:
        raise ModelNotAvailable(
            f"remote model {remote.name!r} needs an API key in the environment variable {remote.api_key_env}"
        )
    return RemoteEncoder(
        remote,
        counter_for(remote, config),
        api_key=key,
        usd_per_million=price_for(remote, config),
        policy=config.token_policy,
    )


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    """The remote family's loader: the provider has the weights, so ``weights`` is always None."""
    remote = remote_config(spec.name, config)
    if remote is None:
        raise ModelNotAvailable(f"{spec.name!r} is not a configured remote model")
    return {Modality.TEXT: load_remote(remote, config)}


__all__ = [
    "DEFAULT_PRICES",
    "CostMeter",
    "DimensionMismatch",
    "ProviderFailed",
    "ProviderRejected",
    "RemoteEncoder",
    "RemoteModelConfig",
    "RemoteText",
    "TokenCounter",
    "Usage",
    "builtin_names",
    "counter_for",
    "load_model",
    "load_remote",
    "price_for",
    "remote_config",
]

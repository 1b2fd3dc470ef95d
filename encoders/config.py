"""What the encoders are configured with, and nothing more.

Only entry points (the command line, the Serve app, job runners, evaluation) read
``mmembed.config.Settings``; they hand the encoders this small frozen object instead
(``Settings.models_config()``), so the encoders never learn about HTTP, stores or jobs and
can be driven by any caller that builds one. This module imports no torch: ``mmembed.config``
imports it for ``RemoteModelConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

TokenPolicy = Literal["truncate", "error"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
RemoteKind = Literal["openai", "cohere"]

# USD per million input tokens, by the provider's model name (list prices, November 2026).
# ``MMEMBED_REMOTE_PRICES`` overrides or extends them; a remote model's own ``usd_per_million_tokens`` wins.
DEFAULT_PRICES: dict[str, float] = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
    "embed-english-v3.0": 0.10,
    "embed-multilingual-v3.0": 0.10,
    "embed-english-light-v3.0": 0.10,
    "embed-multilingual-light-v3.0": 0.10,
}

# Defaults of the built-in ``openai:MODEL`` and ``cohere:MODEL`` names. Rate limits are the lowest
# paid tiers' (OpenAI tier 1; a Cohere trial key): raise them in a configured model to match your
# account. Here rather than in ``remote.presets`` because the settings resolve these keys too.
PROVIDERS: dict[str, dict[str, Any]] = {
    "openai": {
        "base_url": "https://api.openai.com/v1",
        "api_key_env": "OPENAI_API_KEY",
        "rpm": 3000,
        "tpm": 1_000_000,
    },
    "cohere": {"base_url": "https://api.cohere.com", "api_key_env": "COHERE_API_KEY", "rpm": 100},
}


class RemoteModelConfig(BaseModel):
    """One embedding model behind an HTTP API: an OpenAI-compatible ``/embeddings`` (OpenAI,
    Azure OpenAI, another mmembed server) or a Cohere-style ``/v1/embed``. Used by name like a
    local model (``mmembed ingest --model NAME``, a served model's ``name``). The key itself is
    never configuration: ``api_key_env`` names the environment variable that holds it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registry name, e.g. 'azure:embed-small' or 'team-mmembed'.")
    kind: RemoteKind = Field(default="openai", description="Request/response shape: openai or cohere.")
    base_url: str = Field(
        description="e.g. https://api.openai.com/v1 (POST {base_url}/embeddings) or "
        "https://api.cohere.com (POST {base_url}/v1/embed)."
    )
    model: str = Field(description="The provider's model name, sent in every request and used for prices.")
    dim: int = Field(ge=1, description="Vector size; a provider answering another size is an error.")
    api_key_env: str | None = Field(default=None, description="Env var holding the API key; None: no auth.")
    auth_header: str = Field(default="Authorization", description="Azure OpenAI: 'api-key'.")
    auth_scheme: str = Field(default="Bearer", description="Prefix of the key in auth_header; '' for none.")
    query: dict[str, str] = Field(default_factory=dict, description="Query parameters, e.g. Azure's api-version.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens per input; default: the provider's.")
    max_inputs: int | None = Field(default=None, ge=1, description="Inputs per call; default 2048 (openai), 96.")
    max_call_tokens: int | None = Field(default=None, ge=1, description="Tokens per call; default: the provider's.")
    rpm: int | None = Field(default=None, ge=1, description="Requests per rate window; None: unlimited.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per rate window; None: unlimited.")
    rate_window_s: float = Field(default=60.0, gt=0, description="The window rpm/tpm count over (a minute).")
    concurrency: int = Field(default=4, ge=1, description="Requests in flight at once, per process.")
    timeout_s: float = Field(default=30.0, gt=0, description="Per request; a timeout is retried.")
    max_attempts: int = Field(default=6, ge=1, description="Tries per call before its items fail.")
    backoff_s: float = Field(default=0.5, gt=0, description="First backoff; doubles per try, with full jitter.")
    backoff_max_s: float = Field(default=30.0, gt=0, description="Longest single backoff.")
    tokenizer: str = Field(
        default="auto",
        description="'auto' (tiktoken's encoding for OpenAI models where its file is on disk, else the estimate), "
        "'estimate', a tiktoken encoding name, or a path to a .tiktoken file.",
    )
    usd_per_million_tokens: float | None = Field(default=None, ge=0, description="Price; default: the price table.")
    input_type: str = Field(default="search_document", description="Cohere's input_type.")


@dataclass(frozen=True)
class ModelsConfig:
    """Everything the encoders read, resolved once by an entry point.

    Remote providers' API keys are resolved here too (``api_keys``, by the name of the
    environment variable a remote model's ``api_key_env`` gives): ``Settings.models_config()``
    reads them from the environment along with the rest of the configuration, so the encoders
    never read the environment themselves and a key only ever travels as a ``SecretStr``."""

    models_path: Path
    device: str = "auto"
    precision: Precision = "auto"
    allow_downloads: bool = False
    token_policy: TokenPolicy = "truncate"
    trace_text: bool = True
    max_image_pixels: int = 64_000_000
    max_audio_seconds: float = 600.0
    max_audio_bytes: int = 100_000_000
    whisper_beam_size: int = 5
    whisper_language: str | None = None
    remote_models: Mapping[str, RemoteModelConfig] = field(default_factory=dict)
    remote_prices: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    remote_tokenizer_dir: Path | None = None
    tiktoken_cache_dir: Path | None = None  # where tiktoken cached the encoding files it downloaded
    api_keys: Mapping[str, SecretStr] = field(default_factory=dict, repr=False)

    def remote_price(self, model: str) -> float | None:
        """USD per million tokens for a provider's model name, or None when no table names it."""
        return self.remote_prices.get(model)

    def api_key(self, variable: str) -> SecretStr | None:
        return self.api_keys.get(variable)

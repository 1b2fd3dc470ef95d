"""All configuration in one typed place.

Every field can be set by an environment variable (``MMEMBED_`` + the field name in
capitals, e.g. ``MMEMBED_MODELS_DIR``) or passed explicitly; the Serve config YAML feeds
the same fields. Nothing else in the project reads the environment.

Only entry points read ``Settings`` (the command line, the Serve app builder, the job runner,
eval); they hand the layers below the small typed configs those declare (``models_config()``,
``vectors_config()``, ``objects_config()``, ``cache_config()``, ``url_policy()``), so a layer
can be used, and tested, without this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The encoders own their configuration types; this module (the only reader of the environment)
# fills them. ``mmembed.encoders.config`` imports no torch, so neither does this import.
from mmembed.encoders.config import (
    DEFAULT_PRICES,
    PROVIDERS,
    ModelsConfig,
    RemoteKind,
    RemoteModelConfig,
    TokenPolicy,
)
from mmembed.loaders.images import DecodeLimits
from mmembed.store.config import CacheConfig, IndexConfig, ObjectsConfig, VectorsConfig

if TYPE_CHECKING:
    from mmembed.loaders.url_policy import UrlPolicy

__all__ = ["DEFAULT_PRICES", "RemoteKind", "RemoteModelConfig", "Settings", "TokenPolicy", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMEMBED_", extra="ignore")

    data_dir: Path = Field(default=Path("~/.mmembed"), description="Root for models, vectors and objects.")
    serve_ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="How HTTP reaches the API in a Ray cluster mmembed starts: haproxy (HAProxy in front of the "
        "ingress replicas' own HTTP servers, with Serve's throughput-optimized mode) or proxy (Serve's Python "
        "proxy actor). A cluster joined with --address keeps what it was started with.",
    )
    models_dir: Path | None = Field(default=None, description="Where all model weights live; default DATA_DIR/models.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="auto: bf16 on CUDA where supported, else fp16 on CUDA; on CPU bf16 where it has native bf16 "
        "(AVX-512 BF16 or AMX: 2-4.6x fp32, cosine to fp32 >= 0.9999), else fp32. fp32 gives exact vectors.",
    )
    allow_downloads: bool = Field(
        default=True, description="Fetch hub weights on first use. Off: a missing model is an error naming the fix."
    )
    token_policy: TokenPolicy = Field(default="truncate", description="Over-long text: truncate (reported) or error.")
    trace_text: bool = Field(
        default=True,
        description="On CPU, run text towers (sentence-transformers, transformers' CLIP) as frozen TorchScript "
        "graphs: no GIL per op, 1.16x the eager forward for MiniLM (1.09x CLIP texts), the same vectors (cosine "
        ">= 0.99999). A model that does not trace, or whose graph disagrees with eager, stays eager.",
    )
    max_image_pixels: int = Field(default=64_000_000, description="Decompression-bomb guard for decoded images.")
    max_image_bytes: int = Field(default=50_000_000, description="Largest encoded image accepted.")
    max_audio_seconds: float = Field(default=600.0, description="Longest audio clip accepted (decoding stops there).")
    max_audio_bytes: int = Field(default=100_000_000, description="Largest encoded audio file accepted.")
    whisper_beam_size: int = Field(default=5, description="Beam width for transcripts; 1 is greedy (faster, worse).")
    whisper_language: str | None = Field(default=None, description="Force a language code; default: detect per clip.")

    # Vector store: the embedded Qdrant engine under DATA_DIR/vectors, unless a server URL is given.
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server or cluster URL (or ':memory:'); unset: embedded Qdrant Edge."
    )
    qdrant_api_key: str | None = Field(default=None, description="API key for the Qdrant server.")
    collection: str = Field(default="catalog", description="Collection (Edge: shard folder) holding catalogue items.")
    hnsw_m: int = Field(default=IndexConfig.m, ge=4, description="HNSW edges per node (new collections).")
    hnsw_ef_construct: int = Field(
        default=IndexConfig.ef_construct, ge=4, description="HNSW build beam (new collections)."
    )
    hnsw_ef: int = Field(default=IndexConfig.ef, ge=1, description="HNSW search beam: higher finds more, slower.")
    vector_quantization: Literal["none", "int8"] = Field(
        default=IndexConfig.quantization, description="int8: quantised vectors in RAM, rescored (new collections)."
    )
    index_min_points: int = Field(
        default=IndexConfig.min_points, ge=0, description="Collections this large get an HNSW index after a bulk job."
    )
    index_segment_points: int = Field(
        default=IndexConfig.segment_points,
        ge=1024,
        description="Embedded engine: points per sealed, indexed segment (new collections).",
    )
    # Object store: a local folder under DATA_DIR/objects, unless an S3 bucket is given.
    s3_bucket: str | None = Field(default=None, description="Store objects in this S3 bucket instead of locally.")
    s3_prefix: str = Field(default="mmembed/", description="Key prefix for objects in the bucket.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, SeaweedFS).")
    s3_region: str | None = Field(default=None, description="S3 region; unset: boto3's default.")
    s3_public_base_url: str | None = Field(
        default=None, description="Public HTTP base for a public bucket; unset: presigned GET URLs."
    )
    s3_presign_seconds: int = Field(default=3600, description="Lifetime of presigned object URLs.")

    # Embedding cache: SQLite under DATA_DIR by default, Redis by URL, or off.
    cache_url: str = Field(default="sqlite", description="'sqlite' (DATA_DIR/cache.sqlite), 'redis://...', or 'off'.")
    cache_ttl_seconds: float | None = Field(default=None, description="Entries older than this are misses.")
    cache_max_entries: int | None = Field(default=5_000_000, description="Per model; least recently used go first.")

    # Fetching image and audio URLs (loaders/url_policy.py): public addresses only, unless allowed.
    fetch_allow_private: bool = Field(
        default=False,
        description="Fetch from loopback, private, link-local and metadata addresses too (trusted networks only).",
    )
    fetch_allow_hosts: str = Field(
        default="",
        description="Hosts, IPs or CIDR networks URLs may name despite the address policy, "
        "comma-separated (e.g. 'minio.internal,10.1.0.0/16').",
    )

    ingest_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders the server's bulk jobs (POST /ingest) may read local files from, "
        "comma-separated; default DATA_DIR. The command line reads anywhere.",
    )
    max_concurrent_jobs: int = Field(default=2, ge=1, description="Bulk jobs a server runs at once; more get 429.")

    # Access control (serve/http/auth.py). No keys: the API is open, as a local tool on 127.0.0.1 is.
    api_keys_write: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys that may add, delete and ingest (and read); comma-separated."
    )
    api_keys_read: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys that may only read (encode, search); comma-separated."
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of `write:KEY` / `read:KEY` lines (a mounted secret). Prefer it to the "
        "inline keys where settings travel through Ray, whose runtime-env logs print environment variables.",
    )
    open_reads: bool = Field(default=True, description="With keys configured: reads need no key unless this is off.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Web origins allowed to call the API from a browser; none by default."
    )

    # Remote embedding providers (encoders/remote): more models by name, prices, tokenizer files.
    remote_models: list[RemoteModelConfig] = Field(
        default_factory=list,
        description="Remote models as a JSON list of objects (the RemoteModelConfig fields), besides the "
        "built-in openai:MODEL and cohere:MODEL names.",
    )
    remote_models_file: Path | None = Field(
        default=None, description="A YAML or JSON file with a list of remote models (same fields)."
    )
    remote_prices: dict[str, float] = Field(
        default_factory=dict, description="USD per million tokens by provider model name, over the built-in table."
    )
    remote_tokenizer_dir: Path | None = Field(
        default=None,
        description="Folder of tiktoken files (cl100k_base.tiktoken) for exact token counts offline; "
        "tiktoken's own cache is used too.",
    )

    @field_validator("api_keys_write", "api_keys_read", "cors_origins", "ingest_roots", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    def server_ingest_roots(self) -> tuple[str, ...]:
        return tuple(str(p.expanduser()) for p in self.ingest_roots or [self.data_dir])

    def url_policy(self) -> UrlPolicy:
        from mmembed.loaders.url_policy import UrlPolicy  # httpx and friends: only for what fetches URLs

        return UrlPolicy(self.fetch_allow_private, self.fetch_allow_hosts)

    def api_keys(self) -> tuple[list[str], list[str]]:
        """(read keys, write keys): the inline ones plus those of ``api_keys_file``."""
        read = [k.get_secret_value() for k in self.api_keys_read]
        write = [k.get_secret_value() for k in self.api_keys_write]
        if self.api_keys_file is not None:
            for number, line in enumerate(self.api_keys_file.expanduser().read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                scope, _, key = line.partition(":")
                if scope.strip() not in ("read", "write") or not key.strip():
                    raise ValueError(f"{self.api_keys_file}:{number}: expected `read:KEY` or `write:KEY`")
                (read if scope.strip() == "read" else write).append(key.strip())
        return read, write

    def all_remote_models(self) -> dict[str, RemoteModelConfig]:
        """``remote_models`` plus those of ``remote_models_file``, by name."""
        models = list(self.remote_models)
        if self.remote_models_file is not None:
            import yaml  # YAML is a superset of JSON: one reader for both

            raw = yaml.safe_load(self.remote_models_file.expanduser().read_text()) or []
            raw = raw.get("remote_models", []) if isinstance(raw, dict) else raw
            models += [RemoteModelConfig.model_validate(m) for m in raw]
        return {m.name: m for m in models}

    def remote_price(self, model: str) -> float | None:
        """USD per million tokens for a provider's model name, or None when no table names it."""
        return {**DEFAULT_PRICES, **self.remote_prices}.get(model)

    def decode_limits(self, image_sizes: Iterable[int | None] = ()) -> DecodeLimits:
        """How images are decoded for models with these input sides, on every path (an encoder
        deployment, a bulk job's workers): JPEGs at the smallest DCT scale that still covers the
        largest side, so a 640x480 photo for a 224 px model decodes at 320x240, half the time. One
        rule for both paths, so a one-model job computes the vector the server would, and the cache
        they share holds it."""
        sides = [s for s in image_sizes if s]
        draft = max(sides) if sides else DecodeLimits.draft_size
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, draft_size=draft)

    def models_config(self) -> ModelsConfig:
        """What the encoders need, resolved now: the remote models file is read and the API keys
        every remote model names (built-in providers' included) are taken from the environment."""
        remote = self.all_remote_models()
        variables = {p["api_key_env"] for p in PROVIDERS.values()} | {
            m.api_key_env for m in remote.values() if m.api_key_env
        }
        keys = {v: key for v in sorted(variables) if (key := self.secret_from_env(v)) is not None}
        return ModelsConfig(
            models_path=self.models_path,
            device=self.device,
            precision=self.precision,
            allow_downloads=self.allow_downloads,
            token_policy=self.token_policy,
            trace_text=self.trace_text,
            max_image_pixels=self.max_image_pixels,
            max_audio_seconds=self.max_audio_seconds,
            max_audio_bytes=self.max_audio_bytes,
            whisper_beam_size=self.whisper_beam_size,
            whisper_language=self.whisper_language,
            remote_models=remote,
            remote_prices={**DEFAULT_PRICES, **self.remote_prices},
            remote_tokenizer_dir=self.remote_tokenizer_dir.expanduser() if self.remote_tokenizer_dir else None,
            tiktoken_cache_dir=self.tiktoken_cache_dir(),
            api_keys=keys,
        )

    @staticmethod
    def secret_from_env(variable: str) -> SecretStr | None:
        """A remote provider's API key, read from the variable its configuration names. Read
        here, with the rest of the environment, and kept a SecretStr so no repr or log shows it."""
        value = os.environ.get(variable, "").strip()
        return SecretStr(value) if value else None

    @staticmethod
    def tiktoken_cache_dir() -> Path:
        """Where tiktoken keeps the encoding files it has downloaded (its own variables, its default)."""
        import tempfile

        folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        return Path(folder) if folder else Path(tempfile.gettempdir()) / "data-gym-cache"

    def vectors_config(self) -> VectorsConfig:
        index = IndexConfig(
            self.hnsw_m,
            self.hnsw_ef_construct,
            self.hnsw_ef,
            self.vector_quantization,
            self.index_min_points,
            self.index_segment_points,
        )
        return VectorsConfig(self.vectors_path, self.collection, self.qdrant_url, self.qdrant_api_key, index)

    def objects_config(self) -> ObjectsConfig:
        return ObjectsConfig(
            self.objects_path,
            self.s3_bucket,
            self.s3_prefix,
            self.s3_endpoint_url,
            self.s3_region,
            self.s3_public_base_url,
            self.s3_presign_seconds,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            self.cache_url, self.data_dir.expanduser() / "cache.sqlite", self.cache_ttl_seconds, self.cache_max_entries
        )

    @property
    def vectors_path(self) -> Path:
        return self.data_dir.expanduser() / "vectors"

    @property
    def objects_path(self) -> Path:
        return self.data_dir.expanduser() / "objects"

    @property
    def models_path(self) -> Path:
        return (self.models_dir or self.data_dir / "models").expanduser()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

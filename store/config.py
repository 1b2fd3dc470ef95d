"""What the storage layer needs to know, and nothing else: entry points build these from
``mmembed.config.Settings`` (``settings.vectors_config()`` and friends) and hand them down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VectorsConfig:
    path: Path  # the embedded engine's folder of shards (one per collection)
    collection: str
    qdrant_url: str | None = None  # a Qdrant server, or ":memory:"; None: the embedded engine
    qdrant_api_key: str | None = None


@dataclass(frozen=True)
class ObjectsConfig:
    path: Path  # the local object folder, used when no bucket is named
    s3_bucket: str | None = None
    s3_prefix: str = "mmembed/"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_public_base_url: str | None = None
    s3_presign_seconds: int = 3600


@dataclass(frozen=True)
class CacheConfig:
    url: str  # "sqlite", "redis://...", or "off"
    sqlite_path: Path
    ttl_seconds: float | None = None
    max_entries: int | None = None

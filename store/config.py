"""What the storage layer needs to know, and nothing else: entry points build these from
``mmembed.config.Settings`` (``settings.vectors_config()`` and friends) and hand them down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class IndexConfig:
    """The approximate index a collection searches with, as measured on a million demo-clip points by
    ``bench/bulk_scale.py`` (docs/benchmarks.md, "Scale: a million items": ef=128 gave recall@10 1.0 at 0.64 ms p50
    over 990k points, int8 quantization 0.91). Graph and segment settings apply to collections created with them;
    ``ef`` and rescoring apply to every search."""

    m: int = 16  # HNSW edges per node
    ef_construct: int = 100  # HNSW build beam
    ef: int = 128  # search beam: recall against latency (0: the backend's default)
    quantization: Literal["none", "int8"] = "none"  # "int8": scalar-quantised copies in RAM, rescored
    min_points: int = 20_000  # below this a collection is searched exactly and a job builds no index
    # Points per sealed segment of the embedded engine: a job indexes each segment as it fills, so
    # building costs the same per point at any size and memory holds one segment being built.
    segment_points: int = 65_536


@dataclass(frozen=True)
class VectorsConfig:
    path: Path  # the embedded engine's folder of shards (one per collection)
    collection: str
    qdrant_url: str | None = None  # a Qdrant server, or ":memory:"; None: the embedded engine
    qdrant_api_key: str | None = None
    index: IndexConfig = field(default_factory=IndexConfig)


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

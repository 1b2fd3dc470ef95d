"""The ray engine of bulk ingest (``IngestOptions(engine="ray")``): the same job as the local engine, with
reading, decoding and the forward passes spread over a Ray cluster by Ray Data.

    planned items -> map_batches(decode_batch): CPU tasks read, hash, decode and preprocess
                  -> map_batches(EncodeBatches): a fixed pool of encoder actors (num_gpus each) encodes
                  -> iter_batches in this process -> Ingest._write_batch

Only the two middle stages move. Planning, the write step (objects, points, retries, dead letters),
checkpoints and the job record stay in the driving process, in the very code the local engine runs, and
the actors encode with the same ``BatchEncoder`` (the one item step, ``mmembed.embedding``, over the
actor's own models): both engines write the same points for the same input.

Workers rebuild what they need from plain data (model names, settings, limits, the cache's address), never
from pickled models or open connections. Rows carry the job's Python objects (a ``SourceItem`` with free-form
``meta``, a ``Loaded`` with tensors of any shape and the raw bytes, vectors by name) pickled into binary
columns: Arrow cannot type them, and a pickle gives the next stage exactly the objects the local engine
would have had.

Ray Data fuses the two stages into the actors when they ask for the same resources (no GPUs): on a
CPU-only cluster each encoder actor then also decodes, so ``ray_encoders`` sets the parallelism of both.
With ``num_gpus_per_encoder`` > 0 the decode tasks run apart, on any CPU of the cluster.

The embedding cache is opened in each actor from the driver's cache's address, so hits skip the forward
pass as in the local engine; a SQLite cache is a file per machine, so a cluster wants Redis.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

from mmembed.config import Settings
from mmembed.contracts import ItemOutcome
from mmembed.encoders.remote.costs import Usage
from mmembed.jobs.dataset import Loaded
from mmembed.jobs.encode import BatchEncoder, EncodedBatch, LoadedModels, Loading, unchanged_content
from mmembed.loaders.sources import SourceItem
from mmembed.store.cache import CacheStats, EmbeddingCache, RedisCache, SqliteCache
from mmembed.store.catalog import Catalog
from mmembed.store.vectors import point_id

# Enough blocks for every CPU of a large cluster to get decode work, few enough that per-block
# scheduling stays negligible: a job of a million items gets blocks of about a thousand.
MAX_BLOCKS = 1024
log = logging.getLogger(__name__)
CACHE_COUNTS = tuple(f.name for f in dataclasses.fields(CacheStats))


@dataclass(frozen=True)
class CacheAddress:
    """Where the driver's embedding cache lives, so each encoder actor opens the same one."""

    kind: str  # "sqlite" | "redis"
    location: str  # an absolute file path, or a redis:// URL
    ttl_seconds: float | None
    max_entries: int | None
    prefix: str = ""  # Redis key prefix

    @classmethod
    def of(cls, cache: EmbeddingCache) -> CacheAddress:
        if isinstance(cache, SqliteCache):
            return cls("sqlite", str(cache.path.resolve()), cache.ttl_seconds, cache.max_entries)
        if isinstance(cache, RedisCache):
            return cls("redis", cache.url, cache.ttl_seconds, cache.max_entries, cache.prefix)
        raise ValueError(
            f"the ray engine opens the embedding cache again in each encoder actor and knows SQLite and Redis "
            f"caches, not {type(cache).__name__}"
        )

    def open(self) -> EmbeddingCache:
        if self.kind == "sqlite":
            return SqliteCache(Path(self.location), self.ttl_seconds, self.max_entries)
        return RedisCache(self.location, self.ttl_seconds, self.max_entries, self.prefix)


_MODELS: dict[tuple[tuple[str, ...], str], LoadedModels] = {}


def process_models(names: tuple[str, ...], settings: Settings) -> LoadedModels:
    """The job's models, loaded once per worker process: Ray reuses a worker for many decode tasks, so
    they load their preprocessors once, and a fused decode-and-encode actor shares one copy."""
    key = (names, settings.model_dump_json())
    if key not in _MODELS:
        _MODELS[key] = LoadedModels(names, settings)
    return _MODELS[key]


def decode_batch(batch: dict[str, np.ndarray], loading: Loading) -> dict[str, np.ndarray]:
    """Stage 1, CPU tasks: read, hash, decode and preprocess each item as a DataLoader worker of the local
    engine does (a ``SourceDataset`` built here), keeping the bytes read for the object the driver stores."""
    items: list[SourceItem] = [_unpickled(row) for row in batch["item"]]
    dataset = loading.dataset(items, process_models(loading.models, loading.settings))
    loaded = [dataclasses.replace(dataset[n], index=int(index)) for n, index in enumerate(batch["index"])]
    return batch | {"loaded": _pickled(loaded)}


class EncodeBatches:
    """Stage 2, the actor pool: each actor loads the job's models and opens the cache once, then runs the
    local engine's encode step on its batches. Items whose content the store already holds (``stored_hash``)
    skip it, as they do in the local engine. Per-batch figures (encode seconds, cache counts) ride on a
    batch's first row, zero on the others, so the driver's sums are right however it re-batches rows."""

    def __init__(self, models: tuple[str, ...], settings: Settings, cache: CacheAddress | None) -> None:
        self.cache = cache.open() if cache is not None else None
        self.encoder = BatchEncoder(process_models(models, settings), self.cache)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded: list[Loaded] = [_unpickled(row) for row in batch["loaded"]]
        items = {b.index: _unpickled(row) for b, row in zip(loaded, batch["item"], strict=True)}
        unchanged = [unchanged_content(b, str(h) or None) for b, h in zip(loaded, batch["stored_hash"], strict=True)]
        fresh = [b for b, same in zip(loaded, unchanged, strict=True) if not same]
        before = dataclasses.replace(self.cache.stats) if self.cache is not None else CacheStats()
        encoded = self.encoder.encode_batch(fresh, [], items)
        after = self.cache.stats if self.cache is not None else CacheStats()
        out = {
            "index": batch["index"],
            # The preprocessed tensors have served their purpose: only the bytes travel on to the driver.
            "loaded": _pickled([dataclasses.replace(b, prepared=None) for b in loaded]),
            "unchanged": np.array(unchanged, dtype=bool),
            "result": _pickled([encoded.results.get(b.index) for b in loaded]),
            "encode_s": _on_first_row(encoded.encode_s, len(loaded)),
            "remote_usage": _pickled([encoded.remote_usage] + [{}] * (len(loaded) - 1)),  # on the first row too
            "node": np.array([self.node] * len(loaded), dtype=object),
        }
        for name in CACHE_COUNTS:
            out[f"cache_{name}"] = _on_first_row(getattr(after, name) - getattr(before, name), len(loaded))
        return out


@dataclass(frozen=True)
class RayJob:
    """What the engine needs of a job (``Ingest`` builds it), so the engine knows nothing of ``Ingest``."""

    models: tuple[str, ...]
    batch_size: int
    encoders: int  # encoder actors, each with its own copy of the job's models
    num_gpus_per_encoder: float
    encoder_resources: dict[str, float]
    loading: Loading
    settings: Settings
    catalog: Catalog
    cache: EmbeddingCache | None


@contextmanager
def ray_batches(job: RayJob, todo: list[SourceItem], progress: bool = True) -> Iterator[Iterator[EncodedBatch]]:
    """The encoded batches of ``todo``, for ``Ingest.run`` to write. Connects to the Ray cluster this
    process already has (a Serve replica's, a test's) or starts one as ``ray.init()`` would (``RAY_ADDRESS``
    names a cluster), and shuts down only one it started."""
    started_here = not ray.is_initialized()
    if started_here:
        ray.init()
    if warning := shared_state_warning(job.cache, sum(1 for node in ray.nodes() if node["Alive"])):
        log.warning(warning)
    batches = _batches(job, todo, progress)
    try:
        yield batches
    finally:
        batches.close()  # a run that stopped early stops the dataset's execution too
        if started_here:
            ray.shutdown()


def _batches(job: RayJob, todo: list[SourceItem], progress: bool) -> Generator[EncodedBatch, None, None]:
    if not todo:
        return
    stored = _stored_hashes(job.catalog, todo)
    rows = [
        {"index": n, "item": pickle.dumps(item), "stored_hash": stored.get(point_id(item.uri), "")}
        for n, item in enumerate(todo)
    ]
    blocks = min(MAX_BLOCKS, math.ceil(len(rows) / job.batch_size))
    # Decoding needs no accelerator: its models load on the CPU whatever the job's device.
    loading = dataclasses.replace(job.loading, settings=job.loading.settings.model_copy(update={"device": "cpu"}))
    cache = CacheAddress.of(job.cache) if job.cache is not None else None
    dataset = (
        ray.data.from_items(rows, override_num_blocks=blocks)
        .map_batches(decode_batch, fn_kwargs={"loading": loading}, batch_size=job.batch_size)
        .map_batches(
            EncodeBatches,
            fn_constructor_kwargs={"models": job.models, "settings": _encoder_settings(job), "cache": cache},
            batch_size=job.batch_size,
            compute=ray.data.ActorPoolStrategy(size=job.encoders),
            num_gpus=job.num_gpus_per_encoder,
            resources=job.encoder_resources or None,
        )
    )
    dataset.context.enable_progress_bars = progress  # the driver's own bar counts written items
    for batch in dataset.iter_batches(batch_size=job.batch_size, batch_format="numpy"):
        if job.cache is not None:
            for name in CACHE_COUNTS:
                setattr(job.cache.stats, name, getattr(job.cache.stats, name) + int(batch[f"cache_{name}"].sum()))
        yield _encoded(batch)


def _encoded(batch: dict[str, np.ndarray]) -> EncodedBatch:
    loaded: list[Loaded] = [_unpickled(row) for row in batch["loaded"]]
    results: list[ItemOutcome | None] = [_unpickled(row) for row in batch["result"]]
    fresh, unchanged, by_index = [], [], {}
    usage: dict[str, Usage] = {}
    for row in batch["remote_usage"]:
        for name, used in _unpickled(row).items():
            usage[name] = usage.get(name, Usage()) + used
    for b, same, result in zip(loaded, batch["unchanged"], results, strict=True):
        if same:
            unchanged.append(b)
        else:
            fresh.append(b)
            by_index[b.index] = result
    nodes = dict(Counter(str(node) for node in batch["node"]))
    return EncodedBatch(fresh, unchanged, by_index, float(batch["encode_s"].sum()), usage, nodes)


def shared_state_warning(cache: EmbeddingCache | None, nodes: int) -> str | None:
    """A SQLite cache is a file on one machine: on a cluster each node's actors would open a file of
    their own, so content embedded on one node is embedded again on the next. Redis is one cache for all."""
    if isinstance(cache, SqliteCache) and nodes > 1:
        return (
            f"the embedding cache is a SQLite file ({cache.path}) and this Ray cluster has {nodes} nodes: each node "
            "has its own file, so a node misses what another embedded; set MMEMBED_CACHE_URL=redis://... to share one"
        )
    return None


def _encoder_settings(job: RayJob) -> Settings:
    """Ray hides no GPU from an actor that reserved none, so "auto" there means the CPU: an actor never
    takes a GPU the scheduler has not given it. A device named outright is the operator's call."""
    settings = job.settings
    if job.num_gpus_per_encoder == 0 and settings.device == "auto":
        return settings.model_copy(update={"device": "cpu"})
    return settings


def _stored_hashes(catalog: Catalog, todo: Sequence[SourceItem]) -> dict[str, str]:
    """Content hash of the point each item already has, read once up front: the local engine reads them
    batch by batch, which gives the same answers, since in one run only that item's batch writes its point."""
    ids = [point_id(i.uri) for i in todo]
    stored: dict[str, str] = {}
    for start in range(0, len(ids), 512):
        for item_id, payload in catalog.payloads(ids[start : start + 512]).items():
            if payload.get("content_hash"):
                stored[item_id] = payload["content_hash"]
    return stored


def _on_first_row(value: float | int, rows: int) -> np.ndarray:
    column = np.zeros(rows, dtype=np.float64 if isinstance(value, float) else np.int64)
    if rows:
        column[0] = value
    return column


def _pickled(objects: Sequence[Any]) -> np.ndarray:
    column = np.empty(len(objects), dtype=object)
    column[:] = [pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL) for o in objects]
    return column


def _unpickled(data: bytes) -> Any:
    return pickle.loads(data)  # our own rows, written by this job's workers

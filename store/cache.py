"""The embedding cache: a vector computed once is never computed again for the same bytes and model.

An entry is keyed by what determines the vector (the content's bytes, the model's name and its
version) and lives in a namespace per model, so a model can be dropped or resized on its own.
SQLite on disk is the default because it needs no service; Redis serves several machines at
once. A cache is an optimisation, never a dependency: when its backend fails, lookups are
misses and writes are dropped, one warning is logged, and the caller's run goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mmembed.contracts import Query
from mmembed.store.config import CacheConfig

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Stored vectors are little-endian float32 whatever the machine, so a cache file or a Redis
# shared by several machines reads back the same numbers everywhere.
STORED_DTYPE = np.dtype("<f4")
# Version of the key scheme: changing how keys are made must never let old entries answer new keys.
# v2: media keyed by its content hash, one entry for the API and bulk jobs (v1 keyed the API's raw bytes).
KEY_SCHEME = b"mmembed-cache-key-v2"
# SQLite allows 32,766 parameters per statement; chunks keep every statement well under that.
SQLITE_CHUNK = 500
SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS embeddings (
        model TEXT NOT NULL,
        key TEXT NOT NULL,
        vector BLOB NOT NULL,
        dim INTEGER NOT NULL,
        created REAL NOT NULL,
        last_used REAL NOT NULL,
        PRIMARY KEY (model, key)
    )""",
    # key breaks ties, so eviction order is deterministic and needs no sort.
    "CREATE INDEX IF NOT EXISTS embeddings_lru ON embeddings (model, last_used, key)",
    "CREATE TABLE IF NOT EXISTS model_counts (model TEXT PRIMARY KEY, entries INTEGER NOT NULL)",
    """CREATE TRIGGER IF NOT EXISTS embeddings_inserted AFTER INSERT ON embeddings BEGIN
        INSERT INTO model_counts (model, entries) VALUES (NEW.model, 1)
        ON CONFLICT (model) DO UPDATE SET entries = entries + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS embeddings_deleted AFTER DELETE ON embeddings BEGIN
        UPDATE model_counts SET entries = entries - 1 WHERE model = OLD.model;
    END""",
)
ACCEPTED_URLS = "'off', 'sqlite', 'sqlite:///ABSOLUTE/PATH.sqlite', 'redis://HOST:PORT/DB' or 'rediss://...'"


def cache_key(content: bytes | str, model: str, version: str) -> str:
    """The key of one item's vector. Media is keyed by its SHA-256, the content hash a bulk job
    computes as it reads a file and stores in the item's payload, so the bytes of one file share
    one entry whether a job or the API embedded them (``media_key``). Text is tagged apart: a
    caller embeds text and the raw bytes of a file differently even when their bytes agree; a
    search ``Query`` apart from stored text, since a model with prompts embeds the two differently."""
    if isinstance(content, str):
        return _key(b"query" if isinstance(content, Query) else b"text", content.encode("utf-8"), model, version)
    return media_key(hashlib.sha256(content).hexdigest(), model, version)


def media_key(content_hash: str, model: str, version: str) -> str:
    """The key of media whose SHA-256 (hex) is already known: a job's items, a stored point."""
    return _key(b"sha256", bytes.fromhex(content_hash), model, version)


def _key(tag: bytes, data: bytes, model: str, version: str) -> str:
    """Every part is length-prefixed so no two different (content, model, version) triples hash the
    same bytes ('ab' + 'c' vs 'a' + 'bc')."""
    digest = hashlib.sha256()
    for part in (KEY_SCHEME, tag, data, model.encode("utf-8"), version.encode("utf-8")):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0  # calls served without the backend (it failed or is being given time to recover)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"hit_rate": self.hit_rate}


def _to_stored(vector: np.ndarray) -> bytes:
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"cache entries are 1-d vectors, got shape {array.shape}")
    return array.astype(STORED_DTYPE, copy=False).tobytes()


def _from_stored(data: bytes) -> np.ndarray | None:
    """None for a value that cannot be a vector (truncated, or written by something else): a miss."""
    if not data or len(data) % STORED_DTYPE.itemsize:
        return None
    # astype copies: the caller gets a writable native-order array that aliases nothing of ours.
    return np.frombuffer(data, dtype=STORED_DTYPE).astype(np.float32)


def _unique(keys: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class EmbeddingCache(ABC):
    """Backends implement the storage; this class keeps the counts and the degrade-on-failure policy."""

    def __init__(self, ttl_seconds: float | None, max_entries: int | None, clock: Clock) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds}")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 or None, got {max_entries}")
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self.clock = clock
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._failing = False

    @abstractmethod
    def get_many(self, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Only the hits, as float32 1-d arrays; a hit counts as a use for LRU, an expired entry is a miss."""

    @abstractmethod
    def put_many(self, model: str, entries: Mapping[str, np.ndarray]) -> None:
        """Stores float32, then evicts the model's least recently used entries beyond max_entries."""

    # count and clear raise on backend errors: they answer an operator, who must know when they failed.
    @abstractmethod
    def count(self, model: str) -> int: ...

    @abstractmethod
    def clear(self, model: str | None = None) -> None:
        """One model's namespace, or (None) every entry this cache holds."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, *, hits: int = 0, misses: int = 0, puts: int = 0, evictions: int = 0, errors: int = 0) -> None:
        with self._stats_lock:
            self.stats.hits += hits
            self.stats.misses += misses
            self.stats.puts += puts
            self.stats.evictions += evictions
            self.stats.errors += errors

    def _backend_failed(self, operation: str, error: Exception) -> None:
        """One warning per outage, not one per call: a bulk job would otherwise log thousands."""
        with self._stats_lock:
            self.stats.errors += 1
            first = not self._failing
            self._failing = True
        if first:
            logger.warning(
                "embedding cache %s failed (%s: %s); carrying on without the cache until it answers again",
                operation,
                type(error).__name__,
                error,
            )

    def _backend_answered(self) -> None:
        if self._failing:
            with self._stats_lock:
                recovered, self._failing = self._failing, False
            if recovered:
                logger.info("embedding cache answers again")


class SqliteCache(EmbeddingCache):
    """One file, shared safely by threads (one connection behind a lock) and by processes (SQLite's
    file locks, WAL so readers do not wait for a writer, and a busy timeout instead of failing).

    Every call is one ``BEGIN IMMEDIATE`` transaction because every call writes (a hit updates its
    ``last_used``); taking the write lock up front avoids the deadlock SQLite reports at once, busy
    timeout or not, when two readers both try to upgrade. Entry counts per model are kept by triggers
    in ``model_counts``, so the size cap costs one row read, not a count over millions of rows.
    """

    def __init__(
        self,
        path: Path,
        ttl_seconds: float | None = None,
        max_entries: int | None = None,
        *,
        clock: Clock = time.time,
        busy_timeout_seconds: float = 10.0,
    ) -> None:
        super().__init__(ttl_seconds, max_entries, clock)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit mode: transactions are begun explicitly, as BEGIN IMMEDIATE.
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is safe from corruption in WAL mode; a power cut can lose the last entries, which a cache can spare.
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction() as db:
            for statement in SQLITE_SCHEMA:
                db.execute(statement)

    def _transaction(self) -> _SqliteTransaction:
        return _SqliteTransaction(self._db, self._lock)

    def get_many(self, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = _unique(keys)
        if not wanted:
            return {}
        now = self.clock()
        hits: dict[str, np.ndarray] = {}
        try:
            with self._transaction() as db:
                stale: list[str] = []
                for chunk in _chunks(wanted, SQLITE_CHUNK):
                    marks = ",".join("?" * len(chunk))
                    rows = db.execute(
                        f"SELECT key, vector, dim, created FROM embeddings WHERE model = ? AND key IN ({marks})",
                        (model, *chunk),
                    )
                    for key, blob, dim, created in rows:
                        vector = _from_stored(blob)
                        if self._expired(created, now) or vector is None or vector.shape[0] != dim:
                            stale.append(key)
                        else:
                            hits[key] = vector
                for chunk in _chunks(stale, SQLITE_CHUNK):
                    marks = ",".join("?" * len(chunk))
                    db.execute(f"DELETE FROM embeddings WHERE model = ? AND key IN ({marks})", (model, *chunk))
                for chunk in _chunks(list(hits), SQLITE_CHUNK):
                    marks = ",".join("?" * len(chunk))
                    db.execute(
                        f"UPDATE embeddings SET last_used = ? WHERE model = ? AND key IN ({marks})",
                        (now, model, *chunk),
                    )
        except sqlite3.OperationalError as e:  # locked past the busy timeout, disk full, I/O error
            self._backend_failed("lookup", e)
            self._record(misses=len(wanted))
            return {}
        self._backend_answered()
        self._record(hits=len(hits), misses=len(wanted) - len(hits))
        return hits

    def put_many(self, model: str, entries: Mapping[str, np.ndarray]) -> None:
        if not entries:
            return
        now = self.clock()
        rows = [(model, key, blob, len(blob) // STORED_DTYPE.itemsize, now, now) for key, blob in _encode(entries)]
        evicted = 0
        try:
            with self._transaction() as db:
                db.executemany(
                    "INSERT INTO embeddings (model, key, vector, dim, created, last_used) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (model, key) DO UPDATE SET vector = excluded.vector, dim = excluded.dim,"
                    " created = excluded.created, last_used = excluded.last_used",
                    rows,
                )
                if self.max_entries is not None:
                    over = self._count(db, model) - self.max_entries
                    if over > 0:
                        evicted = db.execute(
                            "DELETE FROM embeddings WHERE rowid IN (SELECT rowid FROM embeddings WHERE model = ?"
                            " ORDER BY last_used, key LIMIT ?)",
                            (model, over),
                        ).rowcount
        except sqlite3.OperationalError as e:
            self._backend_failed("store", e)
            return
        self._backend_answered()
        self._record(puts=len(rows), evictions=evicted)

    def count(self, model: str) -> int:
        """Expired entries are removed first, so the count is of entries a lookup would return."""
        with self._transaction() as db:
            if self.ttl_seconds is not None:
                db.execute(
                    "DELETE FROM embeddings WHERE model = ? AND created <= ?", (model, self.clock() - self.ttl_seconds)
                )
            return self._count(db, model)

    def clear(self, model: str | None = None) -> None:
        with self._transaction() as db:
            if model is None:
                db.execute("DELETE FROM embeddings")
                db.execute("DELETE FROM model_counts")
            else:
                db.execute("DELETE FROM embeddings WHERE model = ?", (model,))
                db.execute("DELETE FROM model_counts WHERE model = ?", (model,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _expired(self, created: float, now: float) -> bool:
        return self.ttl_seconds is not None and now >= created + self.ttl_seconds

    @staticmethod
    def _count(db: sqlite3.Connection, model: str) -> int:
        row = db.execute("SELECT entries FROM model_counts WHERE model = ?", (model,)).fetchone()
        return int(row[0]) if row else 0


class _SqliteTransaction:
    """The thread lock and one BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error) around a block."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self._db.execute("COMMIT")
            elif self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._lock.release()


class RedisCache(EmbeddingCache):
    """Values are raw little-endian float32 bytes under ``PREFIX + model + ":" + key``, expiring in
    Redis itself (so memory comes back without us); the model's sorted set ``PREFIX + model + ":@lru"``
    scores each key by its last use (client clock) and is what the size cap evicts from.

    Redis being down must cost the caller little: timeouts are short, there is no retry backoff, and
    after a failure the server is left alone for ``retry_after_seconds`` (calls meanwhile are misses
    and dropped writes, counted as errors) instead of paying a connect timeout on every batch.
    """

    def __init__(
        self,
        url: str,
        ttl_seconds: float | None = None,
        max_entries: int | None = None,
        prefix: str = "mmembed:cache:",
        *,
        clock: Clock = time.time,
        retry_after_seconds: float = 30.0,
    ) -> None:
        super().__init__(ttl_seconds, max_entries, clock)
        self.url = url
        self.prefix = prefix
        self.retry_after_seconds = retry_after_seconds
        self._retry_at: float | None = None
        # One immediate retry: it reconnects a pooled connection the server dropped while idle,
        # and costs nothing more when the server is really gone (the connection is refused).
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 1)
        )

    def _value_key(self, model: str, key: str) -> str:
        return f"{self.prefix}{model}:{key}"

    def _lru_key(self, model: str) -> str:
        # '@' never occurs in a cache_key (hex), so this cannot collide with a value key.
        return f"{self.prefix}{model}:@lru"

    def _available(self) -> bool:
        if self._retry_at is None:
            return True
        if self.clock() >= self._retry_at:
            self._retry_at = None
            return True
        self._record(errors=1)
        return False

    def _failed(self, operation: str, error: Exception) -> None:
        self._retry_at = self.clock() + self.retry_after_seconds
        self._backend_failed(operation, error)

    def get_many(self, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = _unique(keys)
        if not wanted:
            return {}
        if not self._available():
            self._record(misses=len(wanted))
            return {}
        now = self.clock()
        hits: dict[str, np.ndarray] = {}
        try:
            values = self._redis.mget([self._value_key(model, key) for key in wanted])
            for key, value in zip(wanted, values, strict=True):
                vector = None if value is None else _from_stored(value)
                if vector is not None:
                    hits[key] = vector
            missing = [key for key in wanted if key not in hits]
            with self._redis.pipeline(transaction=False) as pipe:
                if hits:
                    pipe.zadd(self._lru_key(model), dict.fromkeys(hits, now))
                if missing:  # expired, evicted elsewhere, or never stored: none may keep a place in the LRU
                    pipe.zrem(self._lru_key(model), *missing)
                pipe.execute()
        except redis.RedisError as e:
            self._failed("lookup", e)
            self._record(misses=len(wanted))
            return {}
        self._backend_answered()
        self._record(hits=len(hits), misses=len(wanted) - len(hits))
        return hits

    def put_many(self, model: str, entries: Mapping[str, np.ndarray]) -> None:
        if not entries:
            return
        encoded = _encode(entries)  # a bad vector is the caller's bug, raised whether Redis is up or not
        if not self._available():
            return
        now = self.clock()
        lru = self._lru_key(model)
        ttl_ms = None if self.ttl_seconds is None else max(1, math.ceil(self.ttl_seconds * 1000))
        evicted = 0
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                for key, blob in encoded:
                    pipe.set(self._value_key(model, key), blob, px=ttl_ms)
                pipe.zadd(lru, {key: now for key, _ in encoded})
                self._forget_expired(pipe, model)
                pipe.zcard(lru)
                size = pipe.execute()[-1]
            if self.max_entries is not None and size > self.max_entries:
                popped = self._redis.zpopmin(lru, size - self.max_entries)
                if popped:
                    # DEL counts only values that still existed: an expired one is not an eviction.
                    evicted = self._redis.delete(*(self._value_key(model, member.decode()) for member, _ in popped))
        except redis.RedisError as e:
            self._failed("store", e)
            return
        self._backend_answered()
        self._record(puts=len(encoded), evictions=evicted)

    def count(self, model: str) -> int:
        """Approximate under a TTL: an entry used after it was written but since expired counts until
        it is looked up."""
        with self._redis.pipeline(transaction=True) as pipe:
            self._forget_expired(pipe, model)
            pipe.zcard(self._lru_key(model))
            return int(pipe.execute()[-1])

    def clear(self, model: str | None = None) -> None:
        """One model is cleared through its LRU set, not a key pattern, because model names may contain
        ':' and a pattern for model 'a' would also match model 'a:b'."""
        if model is None:
            pattern = _glob_escape(self.prefix) + "*"
            for batch in batched(self._redis.scan_iter(match=pattern, count=1000), 1000):
                self._redis.unlink(*batch)
            return
        lru = self._lru_key(model)
        members = (member.decode() for member, _ in self._redis.zscan_iter(lru, count=1000))
        for batch in batched(members, 1000):
            self._redis.unlink(*(self._value_key(model, key) for key in batch))
        self._redis.unlink(lru)

    def close(self) -> None:
        self._redis.close()

    def _forget_expired(self, pipe: Any, model: str) -> None:
        """Last used before now - ttl means written before that too: such keys have expired in Redis."""
        if self.ttl_seconds is not None:
            pipe.zremrangebyscore(self._lru_key(model), "-inf", f"({self.clock() - self.ttl_seconds!r}")


def _encode(entries: Mapping[str, np.ndarray]) -> list[tuple[str, bytes]]:
    """Validates every vector before anything is written, so a bad batch stores nothing."""
    return [(key, _to_stored(vector)) for key, vector in entries.items()]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` (the last may be shorter): itertools.batched is Python 3.12's."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_cache(config: CacheConfig) -> EmbeddingCache | None:
    """The cache ``config.url`` names; None when it is off."""
    url = config.url
    limits: dict[str, Any] = {"ttl_seconds": config.ttl_seconds, "max_entries": config.max_entries}
    if url == "off":
        return None
    if url == "sqlite":
        return SqliteCache(config.sqlite_path, **limits)
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteCache(Path(url.removeprefix("sqlite://")), **limits)
    if url.startswith(("redis://", "rediss://")):
        return RedisCache(url, **limits)
    raise ValueError(f"cache_url {url!r} is not one of {ACCEPTED_URLS}")

"""The embedding cache, the same suite on SQLite and on a real Redis.

Time is a fake clock the test advances, so TTL and LRU order never depend on how busy the machine
is; the one exception is Redis's own expiry, which runs on the server's clock.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis_server import RedisProcess

from mmembed.config import Settings
from mmembed.contracts import Query
from mmembed.store.cache import (
    CacheStats,
    EmbeddingCache,
    RedisCache,
    SqliteCache,
    cache_key,
    media_key,
    open_cache,
)

MODEL = "demo-clip"
OTHER_MODEL = "all-MiniLM-L6-v2"


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeCache = Callable[..., EmbeddingCache]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "redis"])
def make_cache(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[MakeCache]:
    """Builds caches of one backend on one store (a SQLite file, or a Redis key prefix of this test's own)."""
    caches: list[EmbeddingCache] = []

    def make(**options: object) -> EmbeddingCache:
        options.setdefault("clock", clock)
        if request.param == "sqlite":
            cache: EmbeddingCache = SqliteCache(tmp_path / "cache.sqlite", **options)  # type: ignore[arg-type]
        else:
            cache = RedisCache(request.getfixturevalue("redis_server"), prefix=prefix, **options)  # type: ignore[arg-type]
        caches.append(cache)
        return cache

    prefix = f"mmembed-test:{uuid.uuid4().hex}:"
    yield make
    for cache in caches:
        cache.close()


def vec(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mmembed.store.cache" and r.levelno == logging.WARNING]


def keys(*names: str) -> list[str]:
    return [cache_key(name, MODEL, "v1") for name in names]


# --- keys ---


def test_key_is_sha256_hex_and_stable() -> None:
    key = cache_key(b"a cat", "demo-clip", "1")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == cache_key(b"a cat", "demo-clip", "1")
    # Pinned: changing the scheme orphans every cache users have built, so it changes only with KEY_SCHEME.
    assert key == "81bf1fa6171b54d1c8982e4d63588f8f0d8236398d3a9c00782de2dce4809d2f"


def test_key_differs_by_content_model_version_and_type() -> None:
    base = cache_key(b"x", "m", "1")
    assert cache_key(b"y", "m", "1") != base
    assert cache_key(b"x", "n", "1") != base
    assert cache_key(b"x", "m", "2") != base
    assert cache_key("x", "m", "1") != base, "text and bytes with the same bytes must not share an entry"
    assert cache_key(Query("x"), "m", "1") not in (base, cache_key("x", "m", "1")), "a prompted query is not a document"
    assert cache_key(Query("x"), "m", "1") == cache_key(Query("x"), "m", "1")
    assert cache_key(bytearray(b"x"), "m", "1") == base
    # Length prefixes: moving a boundary between parts changes the key.
    assert cache_key(b"x", "ab", "c") != cache_key(b"x", "a", "bc")
    assert cache_key("xa", "b", "1") != cache_key("x", "ab", "1")


def test_media_is_keyed_by_its_content_hash_as_bulk_jobs_know_it() -> None:
    """The API has the bytes, a job the SHA-256 it computed while reading them: one entry."""
    data = b"\x89PNG the bytes of one file"
    assert cache_key(data, "demo-clip", "v") == media_key(hashlib.sha256(data).hexdigest(), "demo-clip", "v")
    assert media_key(hashlib.sha256(data).hexdigest(), "demo-clip", "v") != cache_key(
        hashlib.sha256(data).hexdigest(), "demo-clip", "v"
    ), "a text that spells a digest is not the file"


# --- behaviour shared by both backends ---


def test_round_trip_is_exact_float32(make_cache: MakeCache) -> None:
    cache = make_cache()
    tricky = np.array([0.0, -0.0, 1e-45, -3.4028235e38, np.inf, 1 / 3, -1.5, 7.0], dtype=np.float32)
    entries = {"k-tricky": tricky, "k-512": vec(1, 512), "k-3": vec(2, 3)}
    entries["k-f64"] = np.linspace(0, 1, 5)  # float64 in, float32 out
    cache.put_many(MODEL, entries)

    got = cache.get_many(MODEL, [*entries, "k-missing"])

    assert set(got) == set(entries)
    for key, vector in entries.items():
        assert got[key].dtype == np.float32 and got[key].ndim == 1
        assert got[key].tobytes() == vector.astype(np.float32).tobytes(), key  # bit for bit, -0.0 included
    got["k-3"][:] = 0  # writable, and a copy: the cache keeps its own
    assert np.array_equal(cache.get_many(MODEL, ["k-3"])["k-3"], entries["k-3"])


def test_put_replaces_an_entry(make_cache: MakeCache) -> None:
    cache = make_cache()
    cache.put_many(MODEL, {"k": vec(1, 4)})
    cache.put_many(MODEL, {"k": vec(2, 6)})
    assert np.array_equal(cache.get_many(MODEL, ["k"])["k"], vec(2, 6))
    assert cache.count(MODEL) == 1


def test_rejects_vectors_that_are_not_1d(make_cache: MakeCache) -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="1-d"):
        cache.put_many(MODEL, {"good": vec(1), "bad": np.zeros((2, 4), dtype=np.float32)})
    assert cache.get_many(MODEL, ["good"]) == {}, "a bad batch stores nothing"


def test_models_are_separate_namespaces(make_cache: MakeCache) -> None:
    cache = make_cache()
    [shared] = keys("same content")
    cache.put_many(MODEL, {shared: vec(1)})
    cache.put_many(OTHER_MODEL, {shared: vec(2, 384)})
    cache.put_many("local-dir:/m", {"x": vec(3)})
    cache.put_many("local-dir:/m:x", {"y": vec(4)})  # a model name that extends another's keys

    assert np.array_equal(cache.get_many(MODEL, [shared])[shared], vec(1))
    assert np.array_equal(cache.get_many(OTHER_MODEL, [shared])[shared], vec(2, 384))
    assert cache.get_many("nobody", [shared]) == {}
    assert [cache.count(m) for m in (MODEL, OTHER_MODEL, "local-dir:/m", "local-dir:/m:x")] == [1, 1, 1, 1]

    cache.clear(MODEL)
    assert cache.get_many(MODEL, [shared]) == {}
    assert cache.count(MODEL) == 0
    assert set(cache.get_many(OTHER_MODEL, [shared])) == {shared}
    cache.clear("local-dir:/m")
    assert set(cache.get_many("local-dir:/m:x", ["y"])) == {"y"}, "clearing 'local-dir:/m' left 'local-dir:/m:x' alone"

    cache.clear()
    assert cache.get_many(OTHER_MODEL, [shared]) == {}
    assert cache.get_many("local-dir:/m:x", ["y"]) == {}
    assert cache.count(OTHER_MODEL) == 0


def test_lru_evicts_the_least_recently_used(make_cache: MakeCache, clock: FakeClock) -> None:
    cache = make_cache(max_entries=3)
    a, b, c, d = keys("a", "b", "c", "d")
    for key in (a, b, c):
        cache.put_many(MODEL, {key: vec(1)})
        clock.advance(1)
    assert cache.get_many(MODEL, [a]).keys() == {a}  # a, the oldest, is used again
    clock.advance(1)

    cache.put_many(MODEL, {d: vec(2)})

    assert cache.get_many(MODEL, [a, b, c, d]).keys() == {a, c, d}, "b, untouched longest, went; a stayed"
    assert cache.stats.evictions == 1
    assert cache.count(MODEL) == 3
    cache.put_many(OTHER_MODEL, {a: vec(3)})
    assert cache.count(MODEL) == 3 and cache.stats.evictions == 1, "the cap is per model"


def test_a_batch_larger_than_the_cap_keeps_the_cap(make_cache: MakeCache) -> None:
    cache = make_cache(max_entries=3)
    cache.put_many(MODEL, {f"k{i}": vec(i) for i in range(5)})
    assert cache.count(MODEL) == 3
    assert cache.stats.evictions == 2
    assert len(cache.get_many(MODEL, [f"k{i}" for i in range(5)])) == 3


def test_stats_count_hits_misses_and_puts(make_cache: MakeCache) -> None:
    cache = make_cache()
    assert cache.stats.hit_rate == 0.0
    cache.put_many(MODEL, {"a": vec(1), "b": vec(2)})
    cache.get_many(MODEL, ["a", "b", "c"])
    cache.get_many(MODEL, ["a", "a", "d"])  # a duplicate key is one lookup

    assert cache.stats == CacheStats(hits=3, misses=2, puts=2, evictions=0, errors=0)
    assert cache.stats.hit_rate == pytest.approx(0.6)
    assert cache.stats.as_dict() == {
        "hits": 3,
        "misses": 2,
        "puts": 2,
        "evictions": 0,
        "errors": 0,
        "hit_rate": pytest.approx(0.6),
    }


def test_empty_calls_do_nothing(make_cache: MakeCache) -> None:
    cache = make_cache()
    assert cache.get_many(MODEL, []) == {}
    cache.put_many(MODEL, {})
    assert cache.stats == CacheStats()


# --- TTL ---


def test_sqlite_ttl_expires_entries(tmp_path: Path, clock: FakeClock) -> None:
    with SqliteCache(tmp_path / "c.sqlite", ttl_seconds=0.2, clock=clock) as cache:
        cache.put_many(MODEL, {"old": vec(1)})
        clock.advance(0.1)
        cache.put_many(MODEL, {"new": vec(2)})
        assert cache.get_many(MODEL, ["old", "new"]).keys() == {"old", "new"}
        clock.advance(0.15)  # old is 0.25 s old, new 0.15 s: a use does not extend the TTL

        assert cache.get_many(MODEL, ["old", "new"]).keys() == {"new"}
        assert cache.stats.misses == 1
        assert cache.count(MODEL) == 1, "the expired entry was removed"
        clock.advance(0.1)
        assert cache.count(MODEL) == 0, "count drops expired entries nobody looked up"


def test_redis_ttl_expires_entries_in_redis(redis_server: str) -> None:
    prefix = f"mmembed-test:{uuid.uuid4().hex}:"
    raw = redis.Redis.from_url(redis_server)
    with RedisCache(redis_server, ttl_seconds=0.2, prefix=prefix) as cache:
        cache.put_many(MODEL, {"k": vec(1)})
        assert 0 < raw.pttl(f"{prefix}{MODEL}:k") <= 200

        deadline = time.monotonic() + 10
        while cache.get_many(MODEL, ["k"]) and time.monotonic() < deadline:
            time.sleep(0.05)  # Redis expires on its own clock; poll with a deadline

        assert cache.get_many(MODEL, ["k"]) == {}
        assert raw.zscore(f"{prefix}{MODEL}:@lru", "k") is None, "the expired key left the LRU set"
        assert cache.count(MODEL) == 0
    raw.close()


# --- SQLite specifics ---


def test_sqlite_persists_across_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "nested" / "cache.sqlite"
    with SqliteCache(path, clock=clock) as cache:
        cache.put_many(MODEL, {"a": vec(1), "b": vec(2)})
        clock.advance(1)
        cache.get_many(MODEL, ["a"])

    with SqliteCache(path, max_entries=2, clock=clock) as reopened:
        assert np.array_equal(reopened.get_many(MODEL, ["b"])["b"], vec(2))
        assert reopened.count(MODEL) == 2
        clock.advance(1)
        reopened.put_many(MODEL, {"c": vec(3)})
        assert reopened.get_many(MODEL, ["a", "b", "c"]).keys() == {"b", "c"}, "use times survived the reopen"


def test_sqlite_from_several_threads_and_connections(tmp_path: Path) -> None:
    """Two threads on one cache and a third on its own connection to the same file, as another
    process would be: nothing is lost and the per-model counts stay exact."""
    path = tmp_path / "cache.sqlite"
    shared, separate = SqliteCache(path), SqliteCache(path)
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def work(cache: SqliteCache, worker: int) -> None:
        try:
            start.wait()
            for batch in range(20):
                entries = {f"w{worker}-{batch}-{i}": vec(worker * 1000 + batch * 10 + i) for i in range(10)}
                cache.put_many(MODEL, entries)
                got = cache.get_many(MODEL, list(entries))
                assert got.keys() == entries.keys()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=args) for args in ((shared, 0), (shared, 1), (separate, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert shared.count(MODEL) == separate.count(MODEL) == 600
    assert shared.stats.hits == 400 and separate.stats.hits == 200
    assert np.array_equal(separate.get_many(MODEL, ["w0-7-3"])["w0-7-3"], vec(73))
    shared.close()
    separate.close()


def test_sqlite_locked_past_the_timeout_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.sqlite"
    with SqliteCache(path) as writer:
        writer.put_many(MODEL, {"a": vec(1)})
    cache = SqliteCache(path, busy_timeout_seconds=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    with caplog.at_level(logging.WARNING, logger="mmembed.store.cache"):
        assert cache.get_many(MODEL, ["a"]) == {}
        cache.put_many(MODEL, {"b": vec(2)})
    blocker.execute("ROLLBACK")

    assert cache.stats.errors == 2 and cache.stats.misses == 1 and cache.stats.puts == 0
    assert len(cache_warnings(caplog)) == 1
    assert cache.get_many(MODEL, ["a", "b"]).keys() == {"a"}, "works again once the lock is gone; b was dropped"
    cache.close()
    blocker.close()


# --- Redis specifics ---


def test_redis_stores_raw_float32_under_the_model_prefix(redis_server: str) -> None:
    prefix = f"mmembed-test:{uuid.uuid4().hex}:"
    raw = redis.Redis.from_url(redis_server)
    with RedisCache(redis_server, prefix=prefix) as cache:
        cache.put_many(MODEL, {"k": vec(1)})
        assert raw.get(f"{prefix}{MODEL}:k") == vec(1).astype("<f4").tobytes()
        assert raw.pttl(f"{prefix}{MODEL}:k") == -1, "no TTL configured: no expiry"
        cache.clear()
        assert list(raw.scan_iter(match=f"{prefix}*")) == []
    raw.close()


def test_redis_down_is_a_miss_with_one_warning(
    redis_process: RedisProcess, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(redis_process.url, prefix="t:", clock=clock, retry_after_seconds=30)
    cache.put_many(MODEL, {"a": vec(1)})
    assert cache.get_many(MODEL, ["a"]).keys() == {"a"}

    redis_process.stop(kill=True)
    with caplog.at_level(logging.INFO, logger="mmembed.store.cache"):
        assert cache.get_many(MODEL, ["a"]) == {}
        cache.put_many(MODEL, {"b": vec(2)})
        clock.advance(31)  # past the pause: it tries the server again, which is still down
        assert cache.get_many(MODEL, ["a", "b"]) == {}
        cache.put_many(MODEL, {"c": vec(3)})
        warnings = cache_warnings(caplog)

        assert cache.stats.errors == 4
        assert cache.stats.misses == 3 and cache.stats.hits == 1 and cache.stats.puts == 1
        assert len(warnings) == 1 and "embedding cache" in warnings[0].getMessage()

        redis_process.start()
        errors = cache.stats.errors
        cache.put_many(MODEL, {"d": vec(4)})
        assert cache.stats.errors == errors + 1, "still paused: the server is not asked yet"
        errors = cache.stats.errors
        clock.advance(31)
        cache.put_many(MODEL, {"d": vec(4)})
        assert cache.get_many(MODEL, ["d"]).keys() == {"d"}, "back in use once the pause is over"
        assert cache.stats.errors == errors
    assert any(
        r.name == "mmembed.store.cache" and r.levelno == logging.INFO and "again" in r.getMessage()
        for r in caplog.records
    )
    cache.close()


def test_redis_never_reachable_costs_little(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = RedisCache(f"redis://127.0.0.1:{port}/0")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mmembed.store.cache"):
        for _ in range(5):
            assert cache.get_many(MODEL, ["a"]) == {}
            cache.put_many(MODEL, {"a": vec(1)})
    elapsed = time.monotonic() - started
    assert cache.stats.errors == 10
    assert len(cache_warnings(caplog)) == 1
    assert elapsed < 5, f"10 calls against a closed port took {elapsed:.1f} s"
    cache.close()


# --- open_cache ---


def test_open_cache_picks_the_backend(tmp_path: Path, redis_server: str) -> None:
    assert open_cache(Settings(data_dir=tmp_path, cache_url="off").cache_config()) is None

    default = open_cache(
        Settings(
            data_dir=tmp_path / "data", cache_url="sqlite", cache_ttl_seconds=60, cache_max_entries=7
        ).cache_config()
    )
    assert isinstance(default, SqliteCache)
    assert default.path == tmp_path / "data" / "cache.sqlite" and default.path.is_file()
    assert (default.ttl_seconds, default.max_entries) == (60, 7)
    default.close()

    explicit = open_cache(
        Settings(data_dir=tmp_path, cache_url=f"sqlite://{tmp_path}/elsewhere/c.sqlite").cache_config()
    )
    assert isinstance(explicit, SqliteCache) and explicit.path == tmp_path / "elsewhere" / "c.sqlite"
    explicit.put_many(MODEL, {"k": vec(1)})
    assert explicit.count(MODEL) == 1
    explicit.close()

    remote = open_cache(Settings(data_dir=tmp_path, cache_url=redis_server, cache_max_entries=5).cache_config())
    assert isinstance(remote, RedisCache) and remote.url == redis_server and remote.max_entries == 5
    remote.close()


@pytest.mark.parametrize("url", ["", "memory", "sqlite://relative.sqlite", "sqlite:///", "postgres://db/x", "OFF"])
def test_open_cache_refuses_a_bad_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match=r"'off', 'sqlite', 'sqlite:///.*'redis://"):
        open_cache(Settings(data_dir=tmp_path, cache_url=url).cache_config())

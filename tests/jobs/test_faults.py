"""Faults during a bulk ingest, on real parts: a SeaweedFS S3 server killed part-way through a run and
started again, the embedded Qdrant engine failing in the middle of a batch, and a Redis cache killed
mid-run. Each fault is triggered at a fixed point of the run (after the Nth write), never by timing.

What must hold: the run ends (bounded retries, then dead letters, no hang), no point ever names a
missing object or lacks one of its vectors, no item whose write failed is marked done, and a rerun of
the same job ends with exactly one point per good item: nothing lost, nothing doubled."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from catalogue_files import SCENES, job_settings, write_catalogue
from redis_server import RedisProcess
from s3 import S3Process

from mmembed.config import Settings
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.state import DONE, FAILED, JobStore
from mmembed.store.cache import RedisCache
from mmembed.store.catalog import Catalog, NewItem
from mmembed.store.objects import LocalObjects, ObjectStore, ObjectStoreError, S3Objects
from mmembed.store.vectors import EdgeStore, Point, StoreError, point_id

MODELS = ("demo-clip", "all-MiniLM-L6-v2")
VECTORS = {"demo-clip.image", "demo-clip.text", "all-MiniLM-L6-v2.text"}  # every scene has a caption
BATCH = 4  # the eleven items (scene-0 ... scene-9, broken.png) come in batches of 4, 4 and 3
ATTEMPTS = 2


@pytest.fixture
def env(tmp_path: Path, settings: Settings) -> dict:
    return {
        "settings": job_settings(settings, tmp_path / "data", "faults"),
        "manifest": write_catalogue(tmp_path / "catalogue"),
        "jobs": JobStore(tmp_path / "jobs.sqlite"),
    }


def _ingest(env: dict, catalog: Catalog, cache: object = False) -> Ingest:
    options = IngestOptions(str(env["manifest"]), MODELS, batch_size=BATCH, workers=0, attempts=ATTEMPTS)
    return Ingest(options, env["settings"], catalog=catalog, cache=cache, jobs=env["jobs"])  # type: ignore[arg-type]


def _uri(env: dict, name: str) -> str:
    return "file://" + str(env["manifest"].parent / name)


def _scenes(env: dict) -> set[str]:
    return {_uri(env, f"scene-{n}.png") for n in range(SCENES)}


def _batches(env: dict, job: Ingest) -> list[list[str]]:
    """The run's batches, in the order the run writes them (the plan's, as the job store keeps it)."""
    todo = [i.uri for _, i in env["jobs"].pending(job.job)]
    return [todo[n : n + BATCH] for n in range(0, len(todo), BATCH)]


def _ids(uris: set[str]) -> set[str]:
    return {point_id(u) for u in uris}


def _points(catalog: Catalog) -> dict[str, Point]:
    ids = catalog.vectors.scroll_ids()
    assert len(ids) == len(set(ids))
    return {p.id: p for p in catalog.vectors.retrieve(ids, with_vectors=True)}


def _assert_whole(points: dict[str, Point], objects: ObjectStore, env: dict) -> None:
    """Every point has all its vectors, and its object holds the bytes of the file it came from."""
    for p in points.values():
        assert set(p.vectors) == VECTORS, p.payload["source_uri"]
        data = objects.get(p.payload["object_uri"])
        assert hashlib.sha256(data).hexdigest() == p.payload["content_hash"]
        assert data == Path(p.payload["source_uri"].removeprefix("file://")).read_bytes()


def _item_states(jobs: JobStore, job: str) -> dict[str, str]:
    return dict(jobs._run("SELECT uri, status FROM items WHERE job_id = ?", (job,)))


# --- S3 unavailable ------------------------------------------------------------------------------


def _s3_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, access_key: str, secret_key: str) -> None:
    """S3Objects signs with boto3's usual chain: here the environment, with nothing else to fall back on."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class S3ThatDies(S3Objects):
    """The real store on the real server (its own boto3 client and retry settings); the server is
    killed right after the ``kill_after``-th object is stored, as a crash of the S3 host would."""

    def __init__(self, bucket: str, process: S3Process, kill_after: int = 0) -> None:
        assert process.server is not None
        super().__init__(bucket, endpoint_url=process.server.endpoint_url, region=process.server.region)
        self.process, self.kill_after = process, kill_after
        self.stored = 0
        self.refused: list[float] = []  # seconds each refused put took, botocore's own retries included

    def put(self, key: str, data: bytes, content_type: str) -> str:
        started = time.monotonic()
        try:
            uri = super().put(key, data, content_type)
        except ObjectStoreError:
            self.refused.append(time.monotonic() - started)
            raise
        self.stored += 1
        if self.stored == self.kill_after:
            self.process.stop(kill=True)
        return uri


def test_s3_killed_mid_run_dead_letters_the_rest_and_a_rerun_after_it_is_back_loses_nothing(
    env: dict, s3_process: S3Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = s3_process.server
    assert server is not None
    _s3_credentials(monkeypatch, tmp_path, server.access_key, server.secret_key)
    objects = S3ThatDies("faults", s3_process)
    catalog = Catalog(EdgeStore(tmp_path / "vectors"), objects)
    job = _ingest(env, catalog)
    plan = job.plan(calibrate=False)
    first, second, *rest = _batches(env, job)
    written = set(first) & _scenes(env)
    assert len(rest) == 1 and set(second) <= _scenes(env)
    # Killed right after the second batch's second object: that batch dies half-way through its puts.
    objects.kill_after = len(written) + 2

    summary = job.run(plan, progress=False)

    assert s3_process.process is None, "the server was killed during the run"
    lost = _scenes(env) - written
    assert (summary.written, summary.failed) == (len(written), len(lost) + 1)
    # Bounded retries: each of the two failing batches tried its write exactly ATTEMPTS times, and each
    # put to the dead endpoint gave up within seconds (botocore's retries included), never a timeout's wait.
    assert len(objects.refused) == 2 * ATTEMPTS
    assert max(objects.refused) < 10, objects.refused
    letters = {d.uri: d for d in env["jobs"].dead_letters(job.job)}
    assert {u for u, d in letters.items() if d.code == "write_failed"} == lost
    assert all(
        d.attempts == ATTEMPTS and "check the endpoint URL" in d.reason
        for d in letters.values()
        if d.code == "write_failed"
    )
    assert letters[_uri(env, "broken.png")].code != "write_failed"
    states = _item_states(env["jobs"], job.job)
    assert {u for u, s in states.items() if s == DONE} == written
    assert {u for u, s in states.items() if s == FAILED} == lost | {_uri(env, "broken.png")}
    assert env["jobs"].get(job.job).status == "done"  # ended, not hung or crashed: a rerun picks it up
    before = _points(catalog)
    assert set(before) == _ids(written)  # the second batch's first objects were stored, but have no point

    # The server comes back on the same ports with the same data; the store's client is the same one.
    assert s3_process.start() == server  # same endpoint, same credentials
    _assert_whole(before, objects, env)  # every point written before the crash names an object that survived it
    rerun = _ingest(env, catalog)
    plan = rerun.plan(calibrate=False)
    assert (plan.unchanged, plan.to_check) == (len(written), len(lost) + 1)
    again = rerun.run(plan, progress=False)
    assert (again.written, again.failed) == (len(lost), 1)
    after = _points(catalog)
    assert set(after) == _ids(_scenes(env))
    _assert_whole(after, objects, env)
    assert [d.uri for d in env["jobs"].dead_letters(job.job)] == [_uri(env, "broken.png")]
    assert env["jobs"].item_counts(job.job) == {DONE: len(lost), FAILED: 1}  # the rerun's own plan


# --- the vector store failing mid-batch ----------------------------------------------------------


class EdgeStoreThatFails(EdgeStore):
    """The real engine, whose inserts number ``at`` to ``at + times - 1`` write the first half of their
    points and then fail, as a store that dies in the middle of a batch would."""

    def __init__(self, path: Path, at: int, times: int) -> None:
        super().__init__(path)
        self.at, self.times, self.inserts, self.failed = at, times, 0, 0

    def _insert(self, points: list[Point]) -> None:
        self.inserts += 1
        if self.at <= self.inserts < self.at + self.times:
            super()._insert(points[: len(points) // 2])
            self.failed += 1
            raise StoreError("the vector store went away mid-batch (injected)")
        super()._insert(points)


def test_a_vector_store_failing_once_mid_batch_is_healed_by_the_retry(env: dict, tmp_path: Path) -> None:
    objects = LocalObjects(tmp_path / "objects")
    catalog = Catalog(EdgeStoreThatFails(tmp_path / "vectors", at=2, times=1), objects)
    job = _ingest(env, catalog)
    summary = job.run(progress=False)
    assert catalog.vectors.failed == 1  # type: ignore[attr-defined]
    assert (summary.written, summary.failed) == (SCENES, 1)
    points = _points(catalog)
    assert set(points) == _ids(_scenes(env))
    _assert_whole(points, objects, env)
    assert [d.uri for d in env["jobs"].dead_letters(job.job)] == [_uri(env, "broken.png")]
    assert env["jobs"].item_counts(job.job) == {DONE: SCENES, FAILED: 1}


def test_a_vector_store_failing_mid_batch_past_its_retries_leaves_no_partial_point_and_a_rerun_completes(
    env: dict, tmp_path: Path
) -> None:
    objects = LocalObjects(tmp_path / "objects")
    # The second batch's insert fails on both of its attempts, each time after writing half its points.
    catalog = Catalog(EdgeStoreThatFails(tmp_path / "vectors", at=2, times=ATTEMPTS), objects)
    job = _ingest(env, catalog)
    plan = job.plan(calibrate=False)
    batch = set(_batches(env, job)[1])
    assert len(batch) == BATCH and batch <= _scenes(env)
    summary = job.run(plan, progress=False)

    assert catalog.vectors.failed == ATTEMPTS  # type: ignore[attr-defined]
    assert (summary.written, summary.failed) == (SCENES - BATCH, BATCH + 1)
    letters = {d.uri: d for d in env["jobs"].dead_letters(job.job)}
    assert {u for u, d in letters.items() if d.code == "write_failed"} == batch
    states = _item_states(env["jobs"], job.job)
    assert {u for u in batch if states[u] == DONE} == set(), "an item of the failed batch was marked done"
    assert {u for u, s in states.items() if s == DONE} == _scenes(env) - batch
    # Half the batch, then half of the rest, reached the engine before it failed: those points may stay,
    # but each is whole (every vector, its payload, its object), never one missing a vector or its object.
    points = _points(catalog)
    assert len({p.payload["source_uri"] for p in points.values()} & batch) == BATCH // 2 + BATCH // 4
    assert set(points) <= _ids(_scenes(env))
    _assert_whole(points, objects, env)

    # A rerun of the same job takes up every dead-lettered item again, half-written or not, and clears its
    # dead letter once the item is whole.
    rerun = _ingest(env, catalog)
    plan = rerun.plan(calibrate=False)
    assert {i.uri for _, i in env["jobs"].pending(rerun.job)} == batch | {_uri(env, "broken.png")}, (
        "every failed write is retried"
    )
    again = rerun.run(plan, progress=False)
    # The items whose whole point is already stored (same content hash) only get their version set again.
    assert (again.written, again.refreshed, again.failed) == (BATCH // 4, BATCH // 2 + BATCH // 4, 1)
    points = _points(catalog)
    assert set(points) == _ids(_scenes(env))
    _assert_whole(points, objects, env)
    assert [d.uri for d in env["jobs"].dead_letters(job.job)] == [_uri(env, "broken.png")]
    assert env["jobs"].item_counts(job.job) == {DONE: BATCH, FAILED: 1}  # the rerun's own plan


# --- Redis down ----------------------------------------------------------------------------------


class CatalogThatKillsRedis(Catalog):
    """A real catalogue that kills the cache's Redis right after the first batch is written."""

    def __init__(self, catalog: Catalog, redis_process: RedisProcess) -> None:
        super().__init__(catalog.vectors, catalog.objects)
        self.redis_process = redis_process

    def add_many(self, items: list[NewItem], durable: bool = True) -> list[str]:
        ids = super().add_many(items, durable)
        self.redis_process.stop(kill=True)
        return ids


def test_redis_killed_mid_run_is_bypassed_with_one_warning_and_the_run_completes(
    env: dict, tmp_path: Path, redis_process: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    env["settings"] = env["settings"].model_copy(update={"cache_url": redis_process.url})
    objects = LocalObjects(tmp_path / "objects")
    catalog = CatalogThatKillsRedis(Catalog(EdgeStore(tmp_path / "vectors"), objects), redis_process)
    job = _ingest(env, catalog, cache=True)  # the cache the settings name, as `mmembed ingest` opens it
    assert isinstance(job.cache, RedisCache) and job.cache.url == redis_process.url
    plan = job.plan(calibrate=False)
    first = set(_batches(env, job)[0]) & _scenes(env)

    with caplog.at_level(logging.WARNING, logger="mmembed.store.cache"):
        summary = job.run(plan, progress=False)

    assert redis_process.process is None, "Redis was killed during the run"
    assert (summary.written, summary.failed) == (SCENES, 1)
    # The first batch's image and caption vectors (demo-clip's image, both text towers) went to Redis;
    # every later lookup and store was a bypass.
    assert summary.cache["puts"] == 3 * len(first) > 0 and summary.cache["hits"] == 0
    assert summary.cache["misses"] == 3 * SCENES and summary.cache["errors"] >= 2
    warnings = [r for r in caplog.records if r.name == "mmembed.store.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "embedding cache" in warnings[0].getMessage() and "carrying on without the cache" in warnings[0].getMessage()
    points = _points(catalog)
    assert set(points) == _ids(_scenes(env))
    _assert_whole(points, objects, env)


# --- deletes (--sync) with the object store failing --------------------------------------------


class ObjectsThatFailToDelete(LocalObjects):
    """A real local store whose first ``failures`` deletes fail, as an S3 endpoint mid-restart does."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures

    def delete(self, uri: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ObjectStoreError("endpoint unavailable (injected)")
        super().delete(uri)


def test_a_sync_delete_with_the_object_store_failing_leaves_no_orphan_object(env: dict, tmp_path: Path) -> None:
    objects = ObjectsThatFailToDelete(tmp_path / "objects", failures=0)
    catalog = Catalog(EdgeStore(tmp_path / "vectors"), objects)
    _ingest(env, catalog).run(progress=False)
    gone = env["manifest"].parent / "scene-2.png"
    stored = catalog.get(point_id(_uri(env, "scene-2.png")))
    assert stored is not None and objects.exists(stored.payload["object_uri"])
    gone.unlink()
    rows = [json.loads(line) for line in env["manifest"].read_text().splitlines()]
    env["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows if r["uri"] != gone.name))
    objects.failures = 1  # the first delete of the sync fails; its retry must finish the job
    summary = Ingest(
        IngestOptions(str(env["manifest"]), MODELS, batch_size=BATCH, workers=0, attempts=ATTEMPTS, sync=True),
        env["settings"],
        catalog=catalog,
        cache=False,
        jobs=env["jobs"],
    ).run(progress=False)
    assert summary.deleted == 1 and objects.failures == 0
    assert catalog.get(point_id(_uri(env, "scene-2.png"))) is None
    assert not objects.exists(stored.payload["object_uri"])  # not orphaned
    _assert_whole(_points(catalog), objects, env)


def test_an_object_two_items_share_goes_with_the_last_of_them(tmp_path: Path) -> None:
    objects = LocalObjects(tmp_path / "objects")
    catalog = Catalog(EdgeStore(tmp_path / "vectors"), objects)
    catalog.open({"v": 4})
    vector = {"v": np.array([1.0, 0.0, 0.0, 0.0], np.float32)}
    first, second = (
        catalog.add(NewItem(b"same bytes", "image", "image/png", vector, source_uri=f"file:///{n}.png"))
        for n in ("a", "b")
    )
    uri = catalog.get(first).payload["object_uri"]
    assert catalog.get(second).payload["object_uri"] == uri
    assert catalog.delete(first) and objects.exists(uri)  # the other item still shows it
    assert catalog.delete(second) and not objects.exists(uri)
    assert not catalog.delete(second)


def test_a_batched_delete_frees_only_the_objects_no_surviving_item_holds(tmp_path: Path) -> None:
    objects = LocalObjects(tmp_path / "objects")
    catalog = Catalog(EdgeStore(tmp_path / "vectors"), objects)
    catalog.open({"v": 4})
    vector = {"v": np.array([1.0, 0.0, 0.0, 0.0], np.float32)}
    ids = {
        name: catalog.add(NewItem(data, "image", "image/png", vector, source_uri=f"file:///{name}.png"))
        for name, data in [("a1", b"shared"), ("a2", b"shared"), ("b1", b"both"), ("b2", b"both"), ("c", b"alone")]
    }
    uri = {name: catalog.get(i).payload["object_uri"] for name, i in ids.items()}
    deleted = catalog.delete_many([ids["a1"], ids["b1"], ids["b2"], ids["c"], point_id("file:///never.png")])
    assert sorted(deleted) == sorted([ids["a1"], ids["b1"], ids["b2"], ids["c"]])
    assert objects.exists(uri["a2"])  # a2 still shows the shared bytes
    assert not objects.exists(uri["b1"]) and not objects.exists(uri["c"])
    assert [p.id for p in catalog.vectors.retrieve(list(ids.values()))] == [ids["a2"]]
    assert catalog.delete_many([ids["a1"]]) == []

"""Bulk ingest end to end on real parts: a folder and manifest of rendered scenes, the
embedded Qdrant engine, local objects, the SQLite cache and job store; plan, incremental
reruns, sync deletes, dead letters, retries, and a run killed with SIGKILL that resumes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalogue_files import SCENES, job_settings, write_catalogue

from mmembed.config import Settings
from mmembed.demo import world
from mmembed.embedding import ItemEmbedder
from mmembed.encoders import load
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.state import JobStore
from mmembed.loaders.images import DecodeLimits, decode_image
from mmembed.loaders.sources import SourceError
from mmembed.store.cache import SqliteCache
from mmembed.store.catalog import Catalog, NewItem
from mmembed.store.config import IndexConfig
from mmembed.store.objects import LocalObjects, ObjectStoreError
from mmembed.store.vectors import EdgeStore, point_id
from mmembed.store.warm import warm_cache

MODELS = ("demo-clip", "all-MiniLM-L6-v2")


@pytest.fixture
def env(tmp_path: Path, settings: Settings) -> dict:
    return {
        "settings": job_settings(settings, tmp_path / "data", "ingest"),
        "manifest": write_catalogue(tmp_path / "catalogue"),
        "catalog": Catalog(EdgeStore(tmp_path / "vectors"), LocalObjects(tmp_path / "objects")),
        "cache": SqliteCache(tmp_path / "cache.sqlite"),
        "jobs": JobStore(tmp_path / "jobs.sqlite"),
    }


def _ingest(env: dict, **options) -> Ingest:
    opts = IngestOptions(str(env["manifest"]), MODELS, batch_size=4, workers=0, **options)
    return Ingest(opts, env["settings"], catalog=env["catalog"], cache=env["cache"], jobs=env["jobs"])


def test_plan_then_run_writes_one_point_per_good_item_and_dead_letters_the_bad(env):
    job = _ingest(env)
    plan = job.plan()
    assert (plan.total, plan.unchanged, plan.to_check, plan.new, plan.deleted) == (11, 0, 11, 11, 0)
    assert plan.seconds_per_item > 0 and plan.estimated_cost_usd > 0
    assert env["catalog"].vectors.count() == 0  # planning writes nothing
    summary = job.run(plan, progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1)
    assert env["catalog"].vectors.count() == SCENES
    [letter] = env["jobs"].dead_letters(job.job)
    assert letter.uri.endswith("broken.png") and letter.code in ("truncated_image", "not_an_image")
    point = env["catalog"].get(point_id("file://" + str(env["manifest"].parent / "scene-3.png")), with_vectors=True)
    assert set(point.vectors) == {"demo-clip.image", "demo-clip.text", "all-MiniLM-L6-v2.text"}
    assert point.payload["meta"] == {"shop": "north"} and point.payload["source"] == str(env["manifest"])
    assert all(v > 0 for k, v in summary.stages_s.items()), summary.stages_s


def test_a_rerun_embeds_only_what_changed_and_sync_deletes_what_is_gone(env):
    _ingest(env).run(progress=False)
    folder = env["manifest"].parent
    again = _ingest(env).plan()
    assert (again.unchanged, again.to_check) == (SCENES, 1)  # only the broken file, which has no point yet
    # One image redrawn (new bytes), one only touched (new mtime, same bytes), one removed.
    world.eval_set(SCENES + 1, seed=99)[-1][1].save(folder / "scene-0.png")
    os.utime(folder / "scene-1.png", ns=(time.time_ns(), time.time_ns() + 10_000_000_000))
    (folder / "scene-2.png").unlink()
    rows = [json.loads(line) for line in env["manifest"].read_text().splitlines()]
    env["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows if r["uri"] != "scene-2.png"))
    before = env["catalog"].get(point_id("file://" + str(folder / "scene-0.png")), with_vectors=True)
    counted, listed = _ingest(env).plan(calibrate=False), _ingest(env, sync=True).plan(calibrate=False)
    assert counted.deleted == listed.deleted == len(listed.gone) == 1 and counted.gone == []  # counted, not listed
    summary = _ingest(env, sync=True).run(progress=False)
    assert (summary.written, summary.refreshed, summary.deleted) == (1, 1, 1), summary
    assert env["catalog"].vectors.count() == SCENES - 1
    after = env["catalog"].get(point_id("file://" + str(folder / "scene-0.png")), with_vectors=True)
    assert after.payload["content_hash"] != before.payload["content_hash"]
    assert env["catalog"].get(point_id("file://" + str(folder / "scene-2.png"))) is None


def _forward_passes(job: Ingest) -> list[str]:
    """Every forward pass the job's models make, by model: the cache's lookups are counted apart."""
    calls: list[str] = []
    for name, loaded in job.models.loaded.items():  # type: ignore[attr-defined]
        for encoder in loaded.encoders.values():
            forward = encoder.encode_prepared

            def counted(batch, forward=forward, name=name):  # type: ignore[no-untyped-def]
                calls.append(name)
                return forward(batch)

            encoder.encode_prepared = counted
    return calls


def _fresh_collection(env: dict, root: Path) -> None:
    env["catalog"] = Catalog(EdgeStore(root / "vectors"), LocalObjects(root / "objects"))
    env["jobs"] = JobStore(root / "jobs.sqlite")


# Each scene's cache entries: its image (demo-clip) and its caption (demo-clip's and MiniLM's text towers).
ENTRIES_PER_SCENE = 3


def test_the_cache_saves_the_forward_passes_of_content_seen_before(env, tmp_path: Path):
    _ingest(env).run(progress=False)
    _fresh_collection(env, tmp_path / "second")
    env["cache"].stats.hits = env["cache"].stats.misses = 0
    job = _ingest(env)
    calls = _forward_passes(job)
    summary = job.run(progress=False)
    hits = ENTRIES_PER_SCENE * SCENES
    assert summary.written == SCENES and summary.cache["hits"] == hits and summary.cache["misses"] == 0
    assert calls == []  # images and captions alike
    assert summary.cache_savings()["calls_saved"] == hits and f"saved {hits} forward passes" in summary.lines()[2]


def test_a_cache_warmed_from_the_collection_spares_every_forward_pass_of_a_reingest(env, tmp_path: Path):
    first = _ingest(env)
    first.run(progress=False)
    versions = dict(first.models.versions)  # type: ignore[attr-defined]
    stored = {p.id: p for p in (env["catalog"].get(i, with_vectors=True) for i in env["catalog"].vectors.scroll_ids())}
    assert all(p.payload["model_versions"] == versions for p in stored.values())

    env["cache"] = SqliteCache(tmp_path / "wiped.sqlite")
    report = warm_cache(env["catalog"].vectors, env["cache"], versions)
    assert report.points == SCENES and report.hit_rate == 1.0
    assert report.written == {"demo-clip": 2 * SCENES, "all-MiniLM-L6-v2": SCENES}
    assert env["cache"].count("demo-clip") == 2 * SCENES and env["cache"].count("all-MiniLM-L6-v2") == SCENES

    _fresh_collection(env, tmp_path / "second")
    env["cache"].stats.hits = 0  # the warm-up's own read-back
    job = _ingest(env)
    calls = _forward_passes(job)
    summary = job.run(progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1) and calls == []
    assert summary.cache["misses"] == 0 and summary.cache["hits"] == ENTRIES_PER_SCENE * SCENES
    for point_id_, before in stored.items():  # the warmed vectors are the ones the models gave
        after = env["catalog"].get(point_id_, with_vectors=True)
        assert after is not None and set(after.vectors) == set(before.vectors)
        for name, vector in before.vectors.items():
            assert np.allclose(after.vectors[name], vector, atol=1e-5)


def test_warming_leaves_out_vectors_of_other_weights_and_points_that_do_not_say(env, tmp_path: Path):
    first = _ingest(env)
    first.run(progress=False)
    versions = dict(first.models.versions)  # type: ignore[attr-defined]
    vector = {"demo-clip.image": np.ones(128, dtype=np.float32)}
    env["catalog"].add(NewItem(b"no versions", "image", "image/png", vector, source_uri="file:///old.png"))

    retrained = versions | {"demo-clip": "retrained"}
    env["cache"] = SqliteCache(tmp_path / "wiped.sqlite")
    report = warm_cache(env["catalog"].vectors, env["cache"], retrained)
    assert report.points == SCENES + 1
    assert report.written == {"all-MiniLM-L6-v2": SCENES}  # demo-clip's vectors are the old weights'
    assert report.stale == 2 * SCENES and report.unversioned == 1
    assert report.hit_rate == pytest.approx(SCENES / (3 * SCENES + 1))
    assert env["cache"].count("demo-clip") == 0
    assert any("other weights" in line for line in report.lines())
    assert any("do not record the weights" in line for line in report.lines())


class FlakyObjects(LocalObjects):
    """A real local store that refuses its first few writes, as an S3 endpoint mid-restart does."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise ObjectStoreError("endpoint unavailable (injected)")
        return super().put(key, data, content_type)


def test_transient_write_failures_are_retried_and_persistent_ones_dead_lettered(env, tmp_path: Path):
    env["catalog"] = Catalog(EdgeStore(tmp_path / "v"), FlakyObjects(tmp_path / "o", failures=2))
    summary = _ingest(env).run(progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1)  # two refusals retried away
    env["catalog"] = Catalog(EdgeStore(tmp_path / "v2"), FlakyObjects(tmp_path / "o2", failures=10_000))
    env["jobs"] = JobStore(tmp_path / "jobs-3.sqlite")
    failed = _ingest(env, attempts=2).run(progress=False)
    assert failed.written == 0 and failed.failed == SCENES + 1
    codes = {d.code for d in env["jobs"].dead_letters()}
    assert "write_failed" in codes


def test_a_resumed_job_indexes_what_the_stopped_run_wrote_before_writing_its_own(env, tmp_path: Path):
    """Built together, the stopped run's unindexed writes and the resume's would be one segment
    larger than a window's, built with both in memory (the 100k-image resume's peak RSS)."""
    store = EdgeStore(tmp_path / "indexed", IndexConfig(min_points=1))
    env["catalog"] = Catalog(store, LocalObjects(tmp_path / "indexed-objects"))
    first = _ingest(env)
    write_batch = first._write_batch

    def stopped_after_one_batch(*args: Any) -> None:
        write_batch(*args)
        raise KeyboardInterrupt  # Ctrl-C after the first batch was written and checkpointed

    first._write_batch = stopped_after_one_batch  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=False)
    written = store.count()
    again = _ingest(env)
    plan = again.plan(calibrate=False)
    assert plan.resumed and 0 < written < SCENES
    counted, build = [], store.build_index
    store.build_index = lambda: (counted.append(store.count()), build())[1]  # type: ignore[method-assign]
    again.run(plan, progress=False)
    assert counted[0] == written and counted[-1] == SCENES, counted
    assert store.shard.info().indexed_vectors_count > 0


@pytest.mark.subprocess
def test_a_run_killed_with_sigkill_resumes_and_ends_with_exactly_one_point_per_item(env, tmp_path: Path):
    data = tmp_path / "cli-data"
    environment = os.environ | {
        "MMEMBED_DATA_DIR": str(data),
        "MMEMBED_COLLECTION": "killed",
        "MMEMBED_ALLOW_DOWNLOADS": "false",
        "MMEMBED_MODELS_DIR": str(env["settings"].models_path),
    }
    models = [arg for m in MODELS for arg in ("--model", m)]
    command = [
        sys.executable,
        "-m",
        "mmembed.cli",
        "ingest",
        str(env["manifest"]),
        "--batch-size",
        "1",
        "--checkpoint-every",
        "1",
        "--checkpoint-seconds",
        "0",
        "--workers",
        "0",
        *models,
    ]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    done = 0
    while done < 3 and process.poll() is None and time.monotonic() < deadline:
        try:  # the file can exist before its tables do, and the job holds write locks
            with sqlite3.connect(f"file:{data / 'jobs.sqlite'}?mode=ro", uri=True) as db:
                done = db.execute("SELECT COUNT(*) FROM items WHERE status = 'done'").fetchone()[0]
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)  # polling interval; the condition above is what the test waits for
    assert process.poll() is None, process.stdout.read().decode()  # still running: killed mid-job
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= done < SCENES
    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(resuming)" in resumed.stdout
    store = EdgeStore(data / "vectors" / "killed")
    store.open({"demo-clip.image": 128, "demo-clip.text": 128, "all-MiniLM-L6-v2.text": 384})
    ids = store.scroll_ids()
    assert len(ids) == len(set(ids)) == SCENES


@pytest.mark.subprocess
def test_dead_letters_are_listed_retried_and_purged_from_the_command_line(env, tmp_path: Path):
    data = tmp_path / "dlq-data"
    environment = os.environ | {
        "MMEMBED_DATA_DIR": str(data),
        "MMEMBED_COLLECTION": "dlq",
        "COLUMNS": "250",
        "MMEMBED_ALLOW_DOWNLOADS": "false",
        "MMEMBED_MODELS_DIR": str(env["settings"].models_path),
    }

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mmembed.cli", *args], env=environment, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    models = [arg for m in MODELS for arg in ("--model", m)]
    first = cli("ingest", str(env["manifest"]), "--workers", "0", *models)
    assert "10 written" in first and "1 failed" in first
    listed = cli("dlq", "list")
    assert "broken.png" in listed
    job = JobStore(data / "jobs.sqlite").dead_letters()[0].job_id
    world.eval_set(1, seed=8)[0][1].save(env["manifest"].parent / "broken.png")  # the file is fixed
    retried = cli("dlq", "retry", job)
    assert "1 item(s) back" in retried and "1 written" in retried and "0 failed" in retried
    assert "broken.png" not in cli("dlq", "list")
    assert "purged 0" in cli("dlq", "purge")


class CountingJobStore(JobStore):
    """The real job store, counting the queries that read a job's pending items and its dead letters."""

    pending_calls = dead_letter_calls = 0

    def pending(self, job: str, after: int = -1, limit: int = -1) -> list:
        self.pending_calls += 1
        return super().pending(job, after, limit)

    def dead_lettered(self, job: str, uris) -> set[str]:  # type: ignore[no-untyped-def]
        self.dead_letter_calls += 1
        return super().dead_lettered(job, uris)


def test_a_plan_queries_the_job_store_once_per_chunk_of_the_listing(env, tmp_path: Path, monkeypatch):
    """A per-item query would make planning a million items a million scans; one query per chunk is linear."""
    monkeypatch.setattr("mmembed.jobs.ingest.PLAN_CHUNK", 4)
    env["jobs"] = CountingJobStore(tmp_path / "counted-jobs.sqlite")
    plan = _ingest(env).plan(calibrate=False)
    assert plan.total == SCENES + 1
    assert env["jobs"].dead_letter_calls == math.ceil((SCENES + 1) / 4)


class CountingEdgeStore(EdgeStore):
    """A real store that counts lookups by id, the reads whose cost grows with its segments."""

    retrieve_calls = 0

    def retrieve(self, ids, with_vectors=False, fields=None):  # type: ignore[no-untyped-def]
        self.retrieve_calls += 1
        return super().retrieve(ids, with_vectors, fields)


def test_a_rerun_trusts_the_ledger_while_the_store_agrees_and_reads_the_store_when_it_does_not(env, tmp_path: Path):
    """A rerun looks no item up in the vector store while the store's count of the source's points
    matches what the job store recorded writing; a point deleted behind its back (over HTTP, say)
    sends the next plan to the store, which finds the missing item and rebuilds the ledger."""
    store = CountingEdgeStore(tmp_path / "counted-vectors")
    env["catalog"] = Catalog(store, LocalObjects(tmp_path / "counted-objects"))
    first = _ingest(env).run(progress=False)
    assert first.written == SCENES
    store.retrieve_calls = 0
    again = _ingest(env).plan(calibrate=False)
    assert (again.unchanged, again.to_check, again.deleted) == (SCENES, 1, 0)  # the broken file only
    assert store.retrieve_calls == 0
    gone = point_id("file://" + str(env["manifest"].parent / "scene-4.png"))
    assert env["catalog"].delete(gone)
    store.retrieve_calls = 0
    behind = _ingest(env).plan(calibrate=False)
    assert (behind.unchanged, behind.to_check, behind.new) == (SCENES - 1, 2, 2)
    assert store.retrieve_calls > 0
    assert _ingest(env).run(progress=False).written == 1 and env["catalog"].get(gone) is not None
    store.retrieve_calls = 0
    assert _ingest(env).plan(calibrate=False).to_check == 1 and store.retrieve_calls == 0  # trusted again


def test_a_run_reads_its_pending_items_a_window_at_a_time(env, tmp_path: Path):
    """A per-item query would make a job of a million items a million scans of the job table; one
    query for them all would hold a million items in memory. A run reads windows, plus the empty one."""
    env["jobs"] = CountingJobStore(tmp_path / "counted-jobs.sqlite")
    job = _ingest(env)
    job.options.window = 3
    plan = job.plan(calibrate=False)
    before = env["jobs"].pending_calls
    summary = job.run(plan, progress=False)
    assert summary.written == SCENES
    assert env["jobs"].pending_calls - before == math.ceil(SCENES / 3) + 1


def test_a_manifest_of_texts_is_embedded_by_the_text_towers_and_searchable(env, tmp_path: Path):
    """Text items (a RAG corpus, product titles) are the manifest's own rows: no file to read, no
    object stored, the text in the payload; an edited text is embedded again, the rest are not."""
    manifest = tmp_path / "texts.jsonl"
    texts = {f"doc-{n}": scene.caption() for n, (scene, _) in enumerate(world.eval_set(6, seed=5))}
    rows = [{"uri": uri, "kind": "text", "text": text, "lang": "en"} for uri, text in texts.items()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = IngestOptions(str(manifest), ("demo-clip",), batch_size=4, workers=0)
    job = Ingest(options, env["settings"], catalog=env["catalog"], cache=env["cache"], jobs=env["jobs"])
    summary = job.run(progress=False)
    assert (summary.written, summary.failed) == (6, 0)
    point = env["catalog"].get(point_id("doc-2"), with_vectors=True)
    assert set(point.vectors) == {"demo-clip.text"}
    assert point.payload["text"] == texts["doc-2"] and point.payload["kind"] == "text"
    assert point.payload["meta"] == {"lang": "en"} and "object_uri" not in point.payload
    query = job.models.loaded["demo-clip"].encoder("text").encode_items([texts["doc-2"]])[0].vector
    [best] = env["catalog"].search("demo-clip.text", query, top_k=1)
    assert best.id == point.id and best.url is None

    rows[0]["text"] = "a completely different sentence about green triangles"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = Ingest(options, env["settings"], catalog=env["catalog"], cache=env["cache"], jobs=env["jobs"])
    plan = again.plan(calibrate=False)
    assert (plan.unchanged, plan.to_check) == (5, 1)
    assert again.run(plan, progress=False).written == 1
    assert env["catalog"].get(point_id("doc-0")).payload["text"] == rows[0]["text"]


def test_a_source_listing_one_item_twice_is_refused_when_planned(env, tmp_path: Path):
    """The listing streams and keeps no set of URIs: the job store's index of the listing refuses the repeat."""
    manifest = tmp_path / "twice.jsonl"
    rows = [{"uri": f"doc-{n}", "kind": "text", "text": f"text {n}"} for n in range(5000)] + [
        {"uri": "doc-7", "kind": "text", "text": "again"}
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = IngestOptions(str(manifest), ("demo-clip",), batch_size=4, workers=0)
    job = Ingest(options, env["settings"], catalog=env["catalog"], cache=env["cache"], jobs=env["jobs"])
    with pytest.raises(SourceError) as info:
        job.plan(calibrate=False)
    assert info.value.code == "bad_manifest" and "doc-7" in str(info.value)


def test_a_photo_ingested_in_bulk_gets_the_vector_an_encoder_deployment_computes(tmp_path: Path, settings: Settings):
    """Both paths decode a JPEG at the DCT scale that covers the model's input (``Settings.decode_limits``):
    a job that decoded at full size would store, and share through the cache, a vector the server would
    not compute for the same file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = random.Random(5)
    photo = folder / "photo.jpg"
    world.render(world.random_scene(rng), rng, size=640).resize((640, 480)).save(photo, quality=90)
    job_settings_ = job_settings(settings, tmp_path / "data", "photos")
    catalog = Catalog(EdgeStore(tmp_path / "vectors"), LocalObjects(tmp_path / "objects"))
    options = IngestOptions(str(folder), ("demo-clip",), batch_size=4, workers=0)
    Ingest(options, job_settings_, catalog=catalog, jobs=JobStore(tmp_path / "jobs.sqlite")).run(progress=False)
    stored = catalog.get(point_id("file://" + str(photo)), with_vectors=True).vectors["demo-clip.image"]

    encoder = load("demo-clip", settings.models_config()).encoder("image")
    served_limits = settings.decode_limits([encoder.limits.image_size])  # what EncoderDeployment decodes with

    def vector(limits: DecodeLimits) -> np.ndarray:
        return encoder.encode([encoder.preprocess(decode_image(photo.read_bytes(), limits))])[0]

    np.testing.assert_allclose(stored, vector(served_limits), atol=1e-6)
    assert not np.allclose(stored, vector(replace(served_limits, draft_size=None)), atol=1e-6)  # full size differs


def test_a_job_flushes_the_store_once_per_checkpoint_and_before_marking_items_done(env, monkeypatch):
    """Batches are written to the shard's log without a flush each (as long again as the upsert); the
    checkpoint flushes, then marks, so what the job state calls done is on disk."""
    events: list[str] = []
    flush, mark = EdgeStore.flush, JobStore.mark

    def flushed(self: EdgeStore) -> None:
        events.append("flush")
        flush(self)

    def marked(self: JobStore, job: str, uris: list[str], status: str) -> None:
        events.append(f"mark {status} {len(uris)}")
        mark(self, job, uris, status)

    monkeypatch.setattr(EdgeStore, "flush", flushed)
    monkeypatch.setattr(JobStore, "mark", marked)
    summary = _ingest(env, checkpoint_every=2, checkpoint_seconds=0).run(progress=False)
    assert summary.written == SCENES  # in 3 batches of 4 (the bad item among them): 2 checkpoints
    done = [i for i, e in enumerate(events) if e.startswith("mark done")]
    assert events.count("flush") == len(done) == 2
    assert all(events[i - 1] == "flush" for i in done)
    assert sum(int(events[i].rsplit(" ", 1)[1]) for i in done) == SCENES


def test_a_job_encodes_every_batch_on_one_event_loop_and_closes_it(env, monkeypatch):
    """Not ``asyncio.run`` per batch: in the main thread that formats each finished batch's vectors
    as text to restore the SIGINT handler (6% of a bf16 ViT-B/32 batch, docs/benchmarks.md)."""
    loops: list[asyncio.AbstractEventLoop] = []
    embed = ItemEmbedder.embed

    async def watched(self: ItemEmbedder, items: Any) -> Any:
        loops.append(asyncio.get_running_loop())
        return await embed(self, items)

    monkeypatch.setattr(ItemEmbedder, "embed", watched)
    summary = _ingest(env).run(progress=False)
    assert summary.written == SCENES and len(loops) == math.ceil((SCENES + 1) / 4)  # batches of 4, the bad one too
    assert len(set(map(id, loops))) == 1 and loops[0].is_closed()


def test_a_job_counts_its_items_as_it_marks_them_not_by_counting_the_job_store(env, monkeypatch):
    """The counts saved at each checkpoint (what ``GET /jobs/{id}`` shows as it runs) follow the run's own
    marks: counting the job store's rows per checkpoint made a job quadratic in its size. One count, at the
    start, and the saved counts agree with the store's at every checkpoint and at the end."""
    scans: list[dict[str, int]] = []
    counts, update = JobStore.item_counts, JobStore.update
    saved: list[tuple[dict[str, int], dict[str, int]]] = []

    def counted(self: JobStore, job: str) -> dict[str, int]:
        scans.append(result := counts(self, job))
        return result

    def updated(self: JobStore, job: str, **fields: Any) -> None:
        if "items" in (fields.get("counts") or {}):
            saved.append((fields["counts"]["items"], counts(self, job)))
        update(self, job, **fields)

    monkeypatch.setattr(JobStore, "item_counts", counted)
    monkeypatch.setattr(JobStore, "update", updated)
    summary = _ingest(env, checkpoint_every=1, checkpoint_seconds=0).run(progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1)
    assert scans == [{"pending": SCENES + 1}]  # the one count, before anything ran
    assert len(saved) >= 3 and all(ours == theirs for ours, theirs in saved), saved
    assert saved[-1][0] == {"done": SCENES, "failed": 1}


def test_checkpoints_wait_their_seconds_as_well_as_their_batches(env, monkeypatch):
    """Each checkpoint flushes the store: on an accelerator's hundreds of batches a second, a count of
    batches alone would flush it tens of times a second. With an hour between them, a short run saves its
    progress once, at its end, and still marks every item."""
    flushes: list[int] = []
    flush = EdgeStore.flush
    monkeypatch.setattr(EdgeStore, "flush", lambda self: (flushes.append(1), flush(self))[1])
    summary = _ingest(env, checkpoint_every=1, checkpoint_seconds=3600).run(progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1)
    assert len(flushes) == 1
    assert env["jobs"].item_counts(summary.job_id) == {"done": SCENES, "failed": 1}

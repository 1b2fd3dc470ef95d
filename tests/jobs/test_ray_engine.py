"""The ray engine against the local engine on the same catalogue (the one tests/jobs/test_ingest.py
embeds), each into its own collection, on a small real Ray cluster: the same points, payloads, vectors,
dead letters and counts; the same again after an incremental rerun; and cache hits that skip the
forward pass."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
from catalogue_files import SCENES, job_settings, write_catalogue
from remote_stub import StubProvider, stub_tokens

from mmembed.config import RemoteModelConfig, Settings
from mmembed.demo import world
from mmembed.jobs.ingest import Ingest, IngestOptions, Summary
from mmembed.jobs.state import JobStore
from mmembed.store.cache import SqliteCache
from mmembed.store.catalog import Catalog
from mmembed.store.objects import LocalObjects
from mmembed.store.vectors import EdgeStore, Point

MODELS = ("demo-clip", "all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A small local cluster of this module's own, or the one already up (the serve tests' session
    cluster), which the engine then reuses. Workers inherit this process's environment (offline hubs).
    Ours declares one GPU, real or not: an actor reserving part of it runs on the CPU where there is
    none, and decoding then runs in tasks of its own, as on a GPU cluster."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/mmembed-ray")
    yield
    ray.shutdown()


@dataclass
class Run:
    """One collection, with its own job store and cache, filled by one engine."""

    settings: Settings
    catalog: Catalog
    jobs: JobStore
    cache: SqliteCache

    def ingest(self, manifest: Path, engine: str, **options) -> tuple[Ingest, Summary]:
        opts = IngestOptions(str(manifest), MODELS, batch_size=4, workers=0, engine=engine, **options)
        job = Ingest(opts, self.settings, catalog=self.catalog, cache=self.cache, jobs=self.jobs)
        return job, job.run(progress=False)


def _collection(root: Path, name: str, settings: Settings, cache: SqliteCache | None = None) -> Run:
    # One object store for all: objects are content-addressed, so their URIs in the payloads agree.
    catalog = Catalog(EdgeStore(root / name / "vectors"), LocalObjects(root / "objects"))
    jobs = JobStore(root / name / "jobs.sqlite")
    return Run(job_settings(settings, root / name, name), catalog, jobs, cache or SqliteCache(root / name / "c.db"))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, settings: Settings, ray_cluster: None) -> dict:
    """The catalogue embedded once by each engine."""
    root = tmp_path_factory.mktemp("engines")
    manifest = write_catalogue(root / "catalogue")
    local, remote = _collection(root, "local", settings), _collection(root, "ray", settings)
    local_job, local_summary = local.ingest(manifest, "local")
    gpus = 0.5 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0  # unfused stages where there is a GPU
    remote_job, remote_summary = remote.ingest(manifest, "ray", num_gpus_per_encoder=gpus)
    return {
        "root": root,
        "manifest": manifest,
        "settings": settings,
        "local": local,
        "ray": remote,
        "summaries": (local_summary, remote_summary),
        "jobs": (local_job.job, remote_job.job),
    }


def _points(catalog: Catalog) -> dict[str, Point]:
    return {p.id: p for p in catalog.vectors.retrieve(catalog.vectors.scroll_ids(), with_vectors=True)}


def _assert_same_points(a: Catalog, b: Catalog) -> None:
    mine, theirs = _points(a), _points(b)
    assert sorted(mine) == sorted(theirs)
    for item_id, point in mine.items():
        other = theirs[item_id]
        assert {k: v for k, v in point.payload.items() if k != "added_at"} == {
            k: v for k, v in other.payload.items() if k != "added_at"
        }
        assert set(point.vectors) == set(other.vectors), item_id
        for name, vector in point.vectors.items():
            np.testing.assert_allclose(np.asarray(vector), np.asarray(other.vectors[name]), atol=1e-5, err_msg=name)


def _counts(summary: Summary) -> tuple:
    return summary.written, summary.refreshed, summary.failed, summary.deleted, summary.cache


def _letters(run: Run) -> list[tuple[str, str, int]]:
    """Not the reason's text: Pillow's names an object address, which differs from run to run."""
    return sorted((d.uri, d.code, d.attempts) for d in run.jobs.dead_letters())


def test_the_ray_engine_writes_what_the_local_engine_writes(both: dict):
    local, remote = both["local"], both["ray"]
    local_summary, remote_summary = both["summaries"]
    # The engine is not part of a job's identity: a job started on one resumes on the other.
    assert IngestOptions("x", engine="ray").job_config(local.settings) == IngestOptions("x").job_config(local.settings)
    assert (remote_summary.written, remote_summary.failed) == (SCENES, 1)
    assert _counts(remote_summary) == _counts(local_summary)
    entries = 3 * SCENES  # each scene's image (demo-clip) and caption (both text towers)
    assert remote_summary.cache["misses"] == entries and remote_summary.cache["puts"] == entries
    assert all(v > 0 for v in remote_summary.stages_s.values()), remote_summary.stages_s
    assert len(_points(remote.catalog)) == SCENES
    _assert_same_points(local.catalog, remote.catalog)
    [letter] = _letters(remote)
    assert letter[0].endswith("broken.png") and _letters(remote) == _letters(local)
    local_job, remote_job = both["jobs"]
    assert remote.jobs.item_counts(remote_job) == local.jobs.item_counts(local_job) == {"done": SCENES, "failed": 1}
    assert remote.jobs.get(remote_job).status == "done"  # type: ignore[union-attr]


def test_cache_hits_in_the_encoder_actors_skip_the_forward_pass(both: dict):
    """A third collection, sharing the ray run's cache, through two CPU encoder actors (decoding fused
    into them): every image and caption vector comes from the cache."""
    again = _collection(both["root"], "ray-cached", both["settings"], cache=both["ray"].cache)
    again.cache.stats.hits = again.cache.stats.misses = again.cache.stats.puts = 0
    _, summary = again.ingest(both["manifest"], "ray", ray_encoders=2)
    assert summary.written == SCENES
    assert (summary.cache["hits"], summary.cache["misses"], summary.cache["puts"]) == (3 * SCENES, 0, 0)
    _assert_same_points(both["local"].catalog, again.catalog)


def test_an_incremental_rerun_with_sync_matches_too(both: dict):
    """One image redrawn, one only touched (new mtime, same bytes: refreshed without encoding), one gone."""
    folder = both["manifest"].parent
    world.eval_set(SCENES + 1, seed=99)[-1][1].save(folder / "scene-0.png")
    os.utime(folder / "scene-1.png", ns=(time.time_ns(), time.time_ns() + 10_000_000_000))
    (folder / "scene-2.png").unlink()
    rows = [json.loads(line) for line in both["manifest"].read_text().splitlines()]
    both["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows if r["uri"] != "scene-2.png"))
    for run in (both["local"], both["ray"]):
        run.cache.stats.hits = run.cache.stats.misses = run.cache.stats.puts = 0
    _, local_summary = both["local"].ingest(both["manifest"], "local", sync=True)
    _, remote_summary = both["ray"].ingest(both["manifest"], "ray", sync=True)
    assert (remote_summary.written, remote_summary.refreshed, remote_summary.deleted) == (1, 1, 1)
    # The redrawn image was encoded, its unchanged caption was not, nor the touched file.
    assert (remote_summary.cache["misses"], remote_summary.cache["hits"]) == (1, 2)
    assert _counts(remote_summary) == _counts(local_summary)
    _assert_same_points(both["local"].catalog, both["ray"].catalog)
    assert _letters(both["ray"]) == _letters(both["local"])


def test_remote_calls_made_in_the_actors_are_billed_in_the_summary(tmp_path: Path, settings: Settings, ray_cluster):
    """A remote model's calls happen in the encoder actors; their costs ride back with the batches."""
    manifest = write_catalogue(tmp_path / "catalogue")
    captions = [row["caption"] for row in map(json.loads, manifest.read_text().splitlines()) if "caption" in row]
    with StubProvider(key=None) as stub:
        config = RemoteModelConfig.model_validate(stub.config("stub:captions", usd_per_million_tokens=1000.0))
        run = _collection(tmp_path, "billed", settings)
        run.settings = run.settings.model_copy(update={"remote_models": [config]})
        opts = IngestOptions(str(manifest), ("demo-clip", "stub:captions"), batch_size=4, workers=0, engine="ray")
        summary = Ingest(opts, run.settings, catalog=run.catalog, cache=run.cache, jobs=run.jobs).run(progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1)
    cost = summary.remote_costs["stub:captions"]
    billed = sum(stub_tokens(c) for c in captions)
    assert (cost["calls"], cost["inputs"], cost["tokens_billed"]) == (len(stub.ok_calls()), len(captions), billed)
    assert cost["usd"] == pytest.approx(billed * 1000.0 / 1e6) and cost["usd_per_million"] == 1000.0
    assert any(line.startswith("  remote stub:captions: ") for line in summary.lines())

"""Model migration end to end on real parts: the catalogue of rendered scenes ingested with
demo-clip, then moved to a second real CLIP (a small transformers CLIP folder) on the embedded
engine (a new shard beside the live one) and on qdrant-client (named vectors added in place);
searches answer from the old vectors until the switch; rollback, drop-old, a SIGKILL mid-run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from catalogue_files import SCENES, job_settings, write_catalogue
from hf_clip_folder import write_hf_clip
from PIL import Image
from qdrant_client import QdrantClient

from mmembed.config import Settings
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.migrate import MigrateOptions, Migration
from mmembed.jobs.state import JobStore
from mmembed.store.cache import SqliteCache
from mmembed.store.catalog import Catalog
from mmembed.store.objects import LocalObjects
from mmembed.store.spaces import default_vector
from mmembed.store.switching import MigrationError, drop_old, rollback
from mmembed.store.vectors import ClientStore, EdgeStore, StoreError, VectorStore

OLD = "demo-clip"
ITEMS = 200  # the killed migration's catalogue
LAYOUT = {"demo-clip.image": 128, "demo-clip.text": 128}


@pytest.fixture(scope="module")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-clip:{write_hf_clip(tmp_path_factory.mktemp('hf-clip'))}"


def _store(engine: str, root: Path) -> VectorStore:
    return EdgeStore(root / "vectors") if engine == "edge" else ClientStore(QdrantClient(":memory:"), "migrated")


@pytest.fixture(params=["edge", "client"])
def env(request: pytest.FixtureRequest, tmp_path: Path, settings: Settings) -> dict:
    catalog = Catalog(_store(request.param, tmp_path), LocalObjects(tmp_path / "objects"))
    env = {
        "engine": request.param,
        "settings": job_settings(settings, tmp_path / "data", "migrated"),
        "catalog": catalog,
        "cache": SqliteCache(tmp_path / "cache.sqlite"),
        "jobs": JobStore(tmp_path / "jobs.sqlite"),
    }
    manifest = write_catalogue(tmp_path / "catalogue")
    options = IngestOptions(str(manifest), (OLD,), batch_size=4, workers=0)
    Ingest(options, env["settings"], catalog=catalog, cache=env["cache"], jobs=env["jobs"]).run(progress=False)
    return env


def _migration(env: dict, to: str, **options) -> Migration:
    opts = MigrateOptions(to, batch_size=4, workers=0, **options)
    return Migration(opts, env["settings"], catalog=env["catalog"], cache=env["cache"], jobs=env["jobs"])


def _search(store: VectorStore) -> list[str]:
    """A search the way the API makes one: the default image vector, a query of its own size."""
    vector = default_vector({}, store.vectors, store.state().defaults)
    query = np.random.default_rng(0).normal(size=store.vectors[vector])
    return [vector, *(h.payload["filename"] for h in store.search(vector, query, top_k=5))]


def test_a_migration_fills_the_new_vectors_then_switches_and_rolls_back(env, new_model: str):
    store: VectorStore = env["catalog"].vectors
    store.open_existing()
    before = _search(store)
    assert before[0] == "demo-clip.image"

    job = _migration(env, new_model, switch=False)
    plan = job.plan()
    assert (plan.total, plan.to_check, plan.unchanged) == (SCENES, SCENES, 0)
    assert job.old == OLD and plan.seconds_per_item > 0 and plan.estimated_cost_usd > 0
    assert _search(store) == before  # planning wrote nothing searches see

    summary = job.run(plan, progress=False)
    assert (summary.written, summary.failed) == (SCENES, 0)
    assert _search(store) == before  # still the old vectors until the switch
    switched = job.switch()
    assert switched.switched and switched.defaults["image"] == f"{new_model}.image"
    assert switched.previous == {"image": "demo-clip.image", "text": "demo-clip.text"}

    after = _search(store)
    assert after[0] == f"{new_model}.image" and len(after) == 6
    points = store.retrieve(store.scroll_ids(), with_vectors=True)
    assert len(points) == SCENES
    for p in points:  # every point kept its payload and old vectors, and has the new ones and their version
        assert {"demo-clip.image", "demo-clip.text", f"{new_model}.image", f"{new_model}.text"} <= set(p.vectors)
        assert p.payload["filename"].startswith("scene-") and new_model in p.payload["model_versions"]
        assert p.payload["model_versions"][OLD]

    rerun = _migration(env, new_model).plan(calibrate=False)
    assert (rerun.to_check, rerun.unchanged) == (0, SCENES)  # nothing left: a rerun is free

    assert rollback(store).defaults["image"] == "demo-clip.image"
    assert _search(store) == before
    assert rollback(store).defaults["image"] == f"{new_model}.image"  # again: forward
    dropped = drop_old(store)
    assert sorted(dropped) == ["demo-clip.image", "demo-clip.text"]
    assert _search(store)[0] == f"{new_model}.image"
    assert not any("demo-clip.image" in p.vectors for p in store.retrieve(store.scroll_ids(), with_vectors=True))
    with pytest.raises(MigrationError, match="no switch to roll back"):
        rollback(store)
    if env["engine"] == "edge":  # the old shard's folder is gone, and the live one opens on its own
        assert sorted(d.name for d in store.path.parent.glob("vectors*") if d.is_dir()) == ["vectors~2"]
        store.close()
        again = EdgeStore(store.path)
        again.open_existing()
        assert _search(again)[0] == f"{new_model}.image"
        again.close()


def test_a_text_model_migrates_in_through_the_words_stored_with_each_item(env):
    """MiniLM reads no image: it embeds each scene's caption, under its own caption vector."""
    job = _migration(env, "all-MiniLM-L6-v2", from_=OLD)
    summary = job.run(job.plan(calibrate=False), progress=False)
    assert (summary.written, summary.failed) == (SCENES, 0)
    assert job.switched is not None and job.switched.defaults == {"text": "all-MiniLM-L6-v2.text"}
    store: VectorStore = env["catalog"].vectors
    points = store.retrieve(store.scroll_ids(), with_vectors=True)
    assert all("all-MiniLM-L6-v2.text" in p.vectors and "demo-clip.image" in p.vectors for p in points)
    assert _search(store)[0] == "demo-clip.image"  # searches by default still go to the pictures


def test_a_migration_refuses_what_it_cannot_do(env, new_model: str):
    with pytest.raises(MigrationError, match="no vectors of 'bind'"):
        _migration(env, new_model, from_="bind").plan(calibrate=False)
    with pytest.raises(MigrationError, match=r"already use the vectors of .demo-clip."):
        _migration(env, OLD).plan(calibrate=False)
    store = env["catalog"].vectors
    store.open_existing()
    with pytest.raises(MigrationError, match="nothing to drop"):
        drop_old(store)
    with pytest.raises(StoreError, match="mmembed migrate --to hf-clip"):  # an ingest with an unmigrated model
        store.open(LAYOUT | {f"{new_model}.image": 48})


def test_items_the_new_model_refuses_hold_the_switch_back_and_keep_their_old_vectors(env, new_model: str):
    store: VectorStore = env["catalog"].vectors
    store.open_existing()
    victim = store.retrieve(store.scroll_ids()[:1], fields=["object_uri"])[0]
    Path(victim.payload["object_uri"].removeprefix("file://")).write_bytes(b"not an image any more")
    job = _migration(env, new_model)
    summary = job.run(job.plan(calibrate=False), progress=False)
    assert (summary.written, summary.failed) == (SCENES - 1, 1)
    held = job.switched
    assert held is not None and env["jobs"].get(job.job).counts["switched"] is False
    assert not held.switched and "--accept-failed" in (held.waiting or "")
    assert _search(store)[0] == "demo-clip.image"
    [letter] = env["jobs"].dead_letters(job.job)
    assert letter.code == "not_an_image"
    forced = _migration(env, new_model, accept_failed=True)
    forced.run(forced.plan(calibrate=False), progress=False)
    assert forced.switched is not None and forced.switched.switched
    kept = store.retrieve([victim.id], with_vectors=True)[0]  # copied or in place, it lost nothing
    assert "demo-clip.image" in kept.vectors and f"{new_model}.image" not in kept.vectors


@pytest.mark.subprocess
def test_a_migration_killed_with_sigkill_resumes_from_the_command_line(tmp_path: Path, settings: Settings, new_model):
    data = tmp_path / "cli-data"
    environment = os.environ | {
        "MMEMBED_DATA_DIR": str(data),
        "MMEMBED_COLLECTION": "killed",
        "MMEMBED_ALLOW_DOWNLOADS": "false",
        "MMEMBED_MODELS_DIR": str(settings.models_path),
        "MMEMBED_CACHE_URL": "off",  # every item costs a forward pass, so the kill lands mid-run
    }
    folder = tmp_path / "noise"  # enough items that the kill lands mid-run: the small CLIP is quick
    folder.mkdir()
    rng = np.random.default_rng(3)
    for n in range(ITEMS):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"noise-{n}.png")
    cli = [sys.executable, "-m", "mmembed.cli"]
    ingest = [*cli, "ingest", str(folder), "--workers", "0", "--model", OLD]
    assert subprocess.run(ingest, env=environment, capture_output=True, timeout=600).returncode == 0
    command = [*cli, "migrate", "--to", new_model, "--batch-size", "1", "--workers", "0", "--checkpoint-seconds", "0"]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    done = 0
    while done < 3 and process.poll() is None and time.monotonic() < deadline:
        try:  # the file can exist before its tables do, and the job holds write locks
            with sqlite3.connect(f"file:{data / 'jobs.sqlite'}?mode=ro", uri=True) as db:
                query = (
                    "SELECT COUNT(*) FROM items JOIN jobs ON jobs.id = items.job_id WHERE items.status = 'done' AND "
                )
                done = db.execute(query + "jobs.source LIKE 'migrate:%'").fetchone()[0]
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)  # polling interval; the condition above is what the test waits for
    assert process.poll() is None, process.stdout.read().decode()[-3000:]  # still running: killed mid-migration
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= done < ITEMS
    store = EdgeStore(data / "vectors" / "killed")
    store.open_existing()
    assert store.state().defaults == {} and store.state().building == "killed~2"  # not switched
    store.close()
    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(resuming)" in resumed.stdout and "switched the default vectors" in resumed.stdout
    store.open_existing()
    assert store.state().defaults["image"] == f"{new_model}.image"
    ids = store.scroll_ids()
    assert len(ids) == len(set(ids)) == ITEMS
    assert all(f"{new_model}.image" in p.vectors for p in store.retrieve(ids, with_vectors=True))
    store.close()

    def run(*args: str) -> str:
        done = subprocess.run([*cli, "migrate", *args], env=environment, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return " ".join(done.stdout.split())

    assert f"{new_model}.image -> demo-clip.image" in run("--rollback")
    assert f"demo-clip.image -> {new_model}.image" in run("--rollback")  # again: forward
    assert "dropped demo-clip.image, demo-clip.text" in run("--drop-old")
    store.open_existing()
    assert OLD not in {name.rpartition(".")[0] for name in store.vectors}
    assert store.state().defaults["image"] == f"{new_model}.image"
    store.close()

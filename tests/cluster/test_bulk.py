"""Bulk jobs across nodes: ``mmembed ingest --engine ray`` on a head and two workers. Encoder actors
run on both workers and the summary counts items per node; a worker or the driver killed mid-job
still ends with exactly one point per item; sources and objects in S3 and the cache in Redis are
one for every node, and a SQLite cache on a cluster is warned about."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from on_cluster import cluster_env, wait_until
from s3 import S3Server

from mmembed.cluster import LocalCluster
from mmembed.config import Settings
from mmembed.demo import world
from mmembed.jobs.state import JobStore
from mmembed.store.vectors import EdgeStore

SCENES = 48
LAYOUT = {"demo-clip.image": 128, "demo-clip.text": 128}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rendered scenes and one corrupt file (the only item a job may dead-letter), behind a JSONL manifest."""
    folder = tmp_path_factory.mktemp("catalogue")
    rows = []
    for n, (scene, image) in enumerate(world.eval_set(SCENES, seed=23)):
        image.save(folder / f"scene-{n}.png")
        rows.append({"uri": f"scene-{n}.png", "caption": scene.caption()})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows.append({"uri": "broken.png"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ingest_command(manifest: Path, batch_size: int = 4) -> list[str]:
    """Two encoder actors of half an "encoder" each: one per worker while both live, both on the
    survivor when one dies."""
    return [
        sys.executable, "-m", "mmembed.cli", "ingest", str(manifest), "--model", "demo-clip",
        "--engine", "ray", "--ray-encoders", "2", "--encoder-resources", '{"encoder": 0.5}',
        "--batch-size", str(batch_size), "--checkpoint-every", "1", "--checkpoint-seconds", "0",
    ]  # fmt: skip


def job_env(cluster: LocalCluster, settings: Settings, data: Path, **extra: str) -> dict[str, str]:
    return cluster_env(
        cluster, settings, MMEMBED_DATA_DIR=str(data), MMEMBED_MODELS_DIR=str(settings.models_path), **extra
    )


def run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def nodes_of(data: Path) -> dict[str, int]:
    """Items encoded per node by the data folder's last job, from its record."""
    [job] = JobStore(data / "jobs.sqlite").list()[-1:]
    return job.counts["nodes"]


def points(data: Path, collection: str) -> list[str]:
    store = EdgeStore(data / "vectors" / collection)
    store.open(LAYOUT)
    ids = store.scroll_ids()
    store.close()
    return ids


def dead_letter_uris(data: Path) -> list[str]:
    return sorted(Path(d.uri).name for d in JobStore(data / "jobs.sqlite").dead_letters())


def s3_catalogue(manifest: Path, s3_server: S3Server, bucket: str) -> Path:
    """The catalogue's files in S3, behind a manifest that names them by s3:// URI: the decode tasks
    on the workers read them from there."""
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    rows = []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        client.put_object(
            Bucket=bucket, Key=f"catalogue/{row['uri']}", Body=(manifest.parent / row["uri"]).read_bytes()
        )
        rows.append(row | {"uri": f"s3://{bucket}/catalogue/{row['uri']}"})
    remote = manifest.with_name(f"{bucket}.jsonl")
    remote.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return remote


def test_both_workers_encode_with_state_in_s3_and_redis_and_one_node_hits_what_the_other_embedded(
    cluster: LocalCluster, settings: Settings, manifest: Path, redis_server: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """Sources and objects in S3, the cache in Redis: what every node sees. The first job runs on both
    workers; the second, into a new collection with worker-1 gone, finds every vector in the cache."""
    nodes = cluster.nodes()
    bucket = f"cluster-{tmp_path.name.lower().replace('_', '-')}"[:63]
    source = s3_catalogue(manifest, s3_server, bucket)
    shared = {
        "MMEMBED_CACHE_URL": redis_server.rsplit("/", 1)[0] + "/7",  # a database no other test writes
        "MMEMBED_S3_BUCKET": bucket,
        "MMEMBED_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "MMEMBED_S3_REGION": s3_server.region,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    first = tmp_path / "first"
    out = run(ingest_command(source), job_env(cluster, settings, first, MMEMBED_COLLECTION="first", **shared))
    assert "each node has its own" not in out  # Redis is one cache for every node
    encoded = nodes_of(first)
    assert set(encoded) == {nodes["worker-1"], nodes["worker-2"]}, (encoded, nodes)
    assert sum(encoded.values()) == SCENES + 1  # the broken file went through an actor too
    assert len(set(points(first, "first"))) == SCENES
    assert "items per node:" in out
    stored = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=settings.s3_prefix)
    assert stored.get("KeyCount") == SCENES  # the originals, one object per distinct content

    # worker-1 goes: a new collection of the same content is encoded on worker-2 alone, and what
    # worker-1 embedded the first time is a cache hit there.
    assert cluster.kill("worker-1") > 0
    wait_until(lambda: "worker-1" not in cluster.nodes(), 60, "the head to see worker-1 gone")
    second = tmp_path / "second"
    out = run(ingest_command(source), job_env(cluster, settings, second, MMEMBED_COLLECTION="second", **shared))
    assert nodes_of(second) == {nodes["worker-2"]: SCENES + 1}
    [job] = JobStore(second / "jobs.sqlite").list()
    cache_counts = job.counts["cache"]  # one entry per vector: each scene's image and its caption
    assert cache_counts["hits"] == 2 * SCENES and cache_counts["misses"] == 0, cache_counts
    assert len(set(points(second, "second"))) == SCENES


def _done(data: Path) -> int:
    try:  # the file can exist before its tables do, and the job holds write locks
        with sqlite3.connect(f"file:{data / 'jobs.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM items WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _start_and_wait_for(command: list[str], env: dict[str, str], data: Path, done: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: process.poll() is not None or _done(data) >= done, 600, f"{done} items written")
    assert process.poll() is None, process.stdout.read() if process.stdout else ""  # still running: mid-job
    return process


def test_a_worker_killed_mid_job_loses_no_item_and_dead_letters_only_the_bad_one(
    cluster: LocalCluster, settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = job_env(cluster, settings, data, MMEMBED_COLLECTION="killed", MMEMBED_CACHE_URL="off")
    process = _start_and_wait_for(ingest_command(manifest, batch_size=2), env, data, done=8)
    assert cluster.kill("worker-1") > 0
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-4000:]
    ids = points(data, "killed")
    assert len(ids) == len(set(ids)) == SCENES
    assert dead_letter_uris(data) == ["broken.png"]


def test_the_driver_killed_mid_job_resumes_and_a_sqlite_cache_on_a_cluster_is_warned_about(
    cluster: LocalCluster, settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = job_env(cluster, settings, data, MMEMBED_COLLECTION="driver")  # the default cache: SQLite
    process = _start_and_wait_for(ingest_command(manifest, batch_size=2), env, data, done=8)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 8 <= _done(data) < SCENES
    out = run(ingest_command(manifest), env)
    assert "(resuming)" in out
    assert "each node has its own file" in out
    ids = points(data, "driver")
    assert len(ids) == len(set(ids)) == SCENES
    assert dead_letter_uris(data) == ["broken.png"]

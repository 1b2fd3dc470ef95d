"""Watch mode on real parts: a folder followed through real file events (and a file written
slowly by another process), an S3 prefix on SeaweedFS polled by listing, demo-clip embedding each
round into the embedded Qdrant engine. After each change the test waits for the watch's rounds
(a queue, not a sleep) until the collection matches the source, or fails after a deadline."""

from __future__ import annotations

import hashlib
import io
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from catalogue_files import job_settings

from mmembed.config import Settings
from mmembed.demo import world
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.state import JobStore
from mmembed.jobs.watch import Round, Watch, WatchOptions
from mmembed.store.cache import SqliteCache
from mmembed.store.catalog import Catalog
from mmembed.store.objects import LocalObjects
from mmembed.store.vectors import EdgeStore

pytestmark = pytest.mark.slow  # rounds of real model runs, minutes on 2 cores

DEADLINE_S = 120.0
FAST = WatchOptions(delay_s=0.3, settle_s=1.5, poll_s=0.3)


def _pngs(count: int, seed: int) -> list[bytes]:
    out = []
    for _, image in world.eval_set(count, seed=seed):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


class Running:
    """A watch in a thread; its rounds arrive on a queue."""

    def __init__(self, watch: Watch) -> None:
        self.watch, self.rounds = watch, queue.Queue[Round | BaseException]()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for done in self.watch.rounds():
                self.rounds.put(done)
        except BaseException as exc:  # handed to the test, which raises it
            self.rounds.put(exc)

    def until(self, condition: Callable[[], bool], what: str) -> list[Round]:
        """Rounds as they end, until ``condition`` holds after one (every step of a test changes the
        source, so at least one round must come)."""
        seen: list[Round] = []
        while not seen or not condition():
            try:
                done = self.rounds.get(timeout=DEADLINE_S)
            except queue.Empty:
                pytest.fail(f"no round made the collection {what} in {DEADLINE_S:.0f} s; rounds: {seen}")
            if isinstance(done, BaseException):
                raise done
            seen.append(done)
        return seen

    def stop(self) -> None:
        self.watch.stop.set()
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive()


@pytest.fixture
def parts(tmp_path: Path, settings: Settings) -> dict:
    return {
        "settings": job_settings(settings, tmp_path / "data", "watch"),
        "catalog": Catalog(EdgeStore(tmp_path / "vectors"), LocalObjects(tmp_path / "objects")),
        "cache": SqliteCache(tmp_path / "cache.sqlite"),
        "jobs": JobStore(tmp_path / "jobs.sqlite"),
    }


def _watch(parts: dict, source: str) -> Running:
    options = IngestOptions(source, ("demo-clip",), batch_size=8, workers=0, sync=True)
    ingest = Ingest(options, parts["settings"], catalog=parts["catalog"], cache=parts["cache"], jobs=parts["jobs"])
    return Running(Watch(options, parts["settings"], FAST, ingest=ingest))


def _stored(catalog: Catalog) -> dict[str, str]:
    """source URI -> content hash of every point."""
    points = catalog.vectors.retrieve(catalog.vectors.scroll_ids(), fields=["source_uri", "content_hash"])
    return {p.payload["source_uri"]: p.payload["content_hash"] for p in points}


def _folder(folder: Path) -> dict[str, str]:
    """source URI -> content hash of every image a listing finds (hidden files are not items)."""
    files = (p for p in folder.rglob("*.png") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return {p.as_uri(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def watched(parts: dict, tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    folder = tmp_path / "shop"
    folder.mkdir()
    for n, data in enumerate(_pngs(3, seed=5)):
        (folder / f"item-{n}.png").write_bytes(data)
    running = _watch(parts, str(folder))
    yield running, folder.resolve()
    running.stop()


def test_a_watched_folder_follows_adds_changes_deletes_and_renames(parts: dict, watched: tuple[Running, Path]):
    running, folder = watched
    catalog = parts["catalog"]

    def matches() -> bool:
        return _stored(catalog) == _folder(folder)

    [first] = running.until(matches, "match the folder at start")
    assert first.whole and first.summary.written == 3

    new = _pngs(6, seed=6)
    for n, data in enumerate(new[:2]):
        (folder / f"new-{n}.png").write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.png").write_bytes(new[2])
    (folder / ".hidden.png").write_bytes(new[3])  # hidden: never listed, never watched
    rounds = running.until(matches, "hold the added files")
    assert not any(r.whole for r in rounds) and sum(r.summary.written for r in rounds) == 3  # only the new files

    (folder / "item-0.png").write_bytes(new[4])
    running.until(matches, "hold the changed file")

    (folder / "item-1.png").unlink()
    rounds = running.until(matches, "lose the deleted file")
    assert sum(r.summary.deleted for r in rounds) == 1

    (folder / "item-2.png").rename(folder / "renamed.png")
    rounds = running.until(matches, "follow the rename")
    assert sum(r.summary.deleted for r in rounds) == 1 and sum(r.summary.written for r in rounds) == 1

    (folder / "sub").rename(folder / "moved")  # a folder renamed whole: its items are found by listing
    rounds = running.until(matches, "follow the renamed folder")
    assert any(r.whole for r in rounds)
    assert len(_stored(catalog)) == 5 and parts["jobs"].dead_letters() == []


WRITER = """
import sys, time
path, data, chunk, pause = sys.argv[1], sys.stdin.buffer.read(), int(sys.argv[2]), float(sys.argv[3])
with open(path, "wb") as f:
    for start in range(0, len(data), chunk):
        f.write(data[start:start + chunk]); f.flush(); time.sleep(pause)
"""


def test_a_file_still_being_written_is_read_only_once_whole(parts: dict, watched: tuple[Running, Path]):
    running, folder = watched
    running.until(lambda: len(_stored(parts["catalog"])) == 3, "match the folder at start")
    slow, quick = _pngs(2, seed=8)
    # Another process writes `slow` in small pieces for about 4 s, each well inside settle_s.
    chunk = max(len(slow) // 40, 1)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder / "slow.png"), str(chunk), "0.1"], stdin=subprocess.PIPE
    )
    assert writer.stdin is not None
    writer.stdin.write(slow)
    writer.stdin.close()
    deadline = time.monotonic() + 60
    while not (folder / "slow.png").exists() or (folder / "slow.png").stat().st_size == 0:  # the writer started
        assert time.monotonic() < deadline and writer.poll() is None
        time.sleep(0.05)  # polling interval: the file's own size is the condition
    (folder / "quick.png").write_bytes(quick)  # settles at once: its round comes while `slow` grows
    rounds = running.until(lambda: (folder / "quick.png").as_uri() in _stored(parts["catalog"]), "hold quick.png")
    assert (folder / "slow.png").as_uri() in rounds[-1].waiting
    assert writer.wait(timeout=60) == 0
    running.until(lambda: _stored(parts["catalog"]) == _folder(folder), "hold the whole slow.png")
    assert _stored(parts["catalog"])[(folder / "slow.png").as_uri()] == hashlib.sha256(slow).hexdigest()
    assert parts["jobs"].dead_letters() == []  # never read half-written


def test_a_watched_s3_prefix_is_polled(parts: dict, s3_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)  # as `mmembed ingest` finds them
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    update = {"s3_endpoint_url": s3_server.endpoint_url, "s3_region": s3_server.region}
    parts["settings"] = parts["settings"].model_copy(update=update)
    bucket = f"watch-{uuid.uuid4().hex[:16]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    images = _pngs(4, seed=9)
    for n in range(2):
        client.put_object(Bucket=bucket, Key=f"shop/{n}.png", Body=images[n])

    def bucket_now() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="shop/").get("Contents", [])
        return {
            f"s3://{bucket}/{o['Key']}": hashlib.sha256(
                client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            ).hexdigest()
            for o in listed
        }

    running = _watch(parts, f"s3://{bucket}/shop")
    try:
        running.until(lambda: _stored(parts["catalog"]) == bucket_now(), "match the prefix at start")
        client.put_object(Bucket=bucket, Key="shop/2.png", Body=images[2])
        client.put_object(Bucket=bucket, Key="shop/0.png", Body=images[3])  # changed: a new ETag
        client.delete_object(Bucket=bucket, Key="shop/1.png")
        rounds = running.until(lambda: _stored(parts["catalog"]) == bucket_now(), "follow the prefix")
        assert all(r.whole for r in rounds) and sum(r.summary.deleted for r in rounds) == 1
    finally:
        running.stop()

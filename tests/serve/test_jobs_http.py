"""Bulk jobs over HTTP on a real Ray Serve: POST /ingest runs in the background, GET /jobs
follows it to 100%, the items become searchable, and job state outlives the replica: a job
left running when the app went down is resumed by the next one."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from ray import serve

from mmembed.demo import world
from mmembed.jobs.state import JobStore, job_id
from mmembed.serve.app import build_app

MODELS = ["demo-clip", "all-MiniLM-L6-v2"]


def _folder(path: Path, n: int, seed: int) -> Path:
    path.mkdir(parents=True)
    for i, (_, image) in enumerate(world.eval_set(n, seed=seed)):
        image.save(path / f"scene-{i}.png")
    return path


def _until_done(api: str, job: str, deadline_s: float = 180) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/jobs/{job}").json()
        if state["status"] in ("done", "failed"):
            return state
        time.sleep(0.2)  # polling interval; the job's own status is what the test waits for
    raise AssertionError(f"job {job} not finished in {deadline_s} s: {state}")


@pytest.fixture(scope="module")
def setup(ray_cluster: int, tmp_path_factory: pytest.TempPathFactory) -> dict:
    data, folders = tmp_path_factory.mktemp("jobs-data"), tmp_path_factory.mktemp("sources")
    collection = f"jobs-{uuid.uuid4().hex[:6]}"
    env = {
        "MMEMBED_DATA_DIR": str(data),
        "MMEMBED_COLLECTION": collection,
        "MMEMBED_MAX_CONCURRENT_JOBS": "1",
        "MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1",
        "MMEMBED_INGEST_ROOTS": str(folders),
    }
    app = build_app({"models": [{"name": m} for m in MODELS], "env": env})
    return {"app": app, "data": data, "collection": collection, "port": ray_cluster, "folders": folders}


def _start(setup: dict) -> str:
    serve.run(setup["app"], name="jobs", route_prefix="/jobs-app")
    return f"http://127.0.0.1:{setup['port']}/jobs-app"


def test_a_job_runs_in_the_background_and_its_state_outlives_the_server(setup: dict):
    api = _start(setup)
    try:
        folder = _folder(setup["folders"] / "a", 12, seed=3)
        started = httpx.post(f"{api}/ingest", json={"source": str(folder)})
        assert started.status_code == 202, started.text
        job = started.json()["id"]
        state = _until_done(api, job)
        assert state["status"] == "done" and state["progress"] == 1.0 and state["items"] == {"done": 12}
        assert state["counts"]["written"] == 12 and state["counts"]["stages_s"]["encode"] > 0
        assert state["counts"]["plan"] == {"total": 12, "unchanged": 0, "to_embed": 12, "gone": 0}
        assert started.json()["status_url"] == f"/jobs-app/jobs/{job}"  # under the app's mount point
        found = httpx.post(f"{api}/search", json={"text": "a shape", "top_k": 50}).json()["hits"]
        assert len(found) == 12 and all(h["payload"]["source"] == str(folder) for h in found)
        # Objects of the local store are linked under the mount point too, and answer there.
        assert found[0]["url"].startswith("/jobs-app/objects/")
        assert httpx.get(f"http://127.0.0.1:{setup['port']}{found[0]['url']}").status_code == 200
        metrics = httpx.get(f"{api}/metrics").text
        assert f'mmembed_job_progress{{job_id="{job}"}}' not in metrics  # a finished job leaves the gauges
        assert 'mmembed_jobs{status="done"}' in metrics
        assert httpx.post(f"{api}/ingest", json={"source": str(folder), "models": ["nope"]}).status_code == 422
        assert httpx.get(f"{api}/jobs/unknown").json()["error"]["code"] == "job_not_found"
    finally:
        serve.delete("jobs")
    api = _start(setup)
    try:
        again = httpx.get(f"{api}/jobs/{job}").json()
        assert again["status"] == "done" and again["counts"]["written"] == 12
    finally:
        serve.delete("jobs")


def test_a_second_job_waits_for_the_first(setup: dict, gate: tuple[str, threading.Event]):
    """One job at a time here (MMEMBED_MAX_CONCURRENT_JOBS=1). The first job reads its image
    from a server that answers only when the test opens the gate, so it is surely running."""
    url, opened = gate
    listing = setup["folders"] / "gated.txt"
    listing.write_text(f"{url}/scene.png\n")
    api = _start(setup)
    try:
        first = httpx.post(f"{api}/ingest", json={"source": str(listing)})
        again = httpx.post(f"{api}/ingest", json={"source": str(listing)})
        other = httpx.post(f"{api}/ingest", json={"source": str(_folder(setup["folders"] / "d", 2, seed=6))})
        opened.set()
        assert first.status_code == 202 and again.json()["id"] == first.json()["id"]  # the running job, not a 429
        assert other.status_code == 429 and other.headers["Retry-After"] == "30"
        assert other.json()["error"]["code"] == "too_many_jobs"
        assert _until_done(api, first.json()["id"])["items"] == {"done": 1}
        assert httpx.post(f"{api}/ingest", json={"source": str(setup["folders"] / "d")}).status_code == 202
    finally:
        opened.set()
        serve.delete("jobs")


def test_jobs_read_local_files_only_inside_the_ingest_roots(setup: dict, tmp_path: Path):
    """Clients name the paths a server job reads: outside MMEMBED_INGEST_ROOTS is refused, for
    the source itself and for each item a manifest lists (by .., absolute path or symlink)."""
    outside = tmp_path / "secret.png"
    world.eval_set(1, seed=9)[0][1].save(outside)
    world.eval_set(1, seed=11)[0][1].save(tmp_path / "other.png")
    folder = _folder(setup["folders"] / "e", 1, seed=10)
    (folder / "link.png").symlink_to(outside)
    manifest = folder / "manifest.jsonl"
    escapes = ["scene-0.png", str(outside), f"../../{tmp_path.name}/other.png", "link.png"]
    manifest.write_text("".join(f'{{"uri": "{uri}"}}\n' for uri in escapes))
    api = _start(setup)
    try:
        refused = httpx.post(f"{api}/ingest", json={"source": str(tmp_path)})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "path_forbidden"
        assert "MMEMBED_INGEST_ROOTS" in refused.json()["error"]["message"]
        assert httpx.post(f"{api}/ingest", json={"source": "/etc"}).status_code == 403
        job = httpx.post(f"{api}/ingest", json={"source": str(manifest)}).json()["id"]
        state = _until_done(api, job)
        assert state["items"] == {"done": 1, "failed": 3}, state
        letters = httpx.get(f"{api}/jobs/{job}/dead-letters").json()["data"]
        assert len(letters) == 3 and {d["code"] for d in letters} == {"path_forbidden"}
    finally:
        serve.delete("jobs")


@pytest.fixture
def gate() -> Iterator[tuple[str, threading.Event]]:
    """A local HTTP server whose one image is sent only once the event is set."""
    opened = threading.Event()
    image = io.BytesIO()
    world.eval_set(1, seed=8)[0][1].save(image, "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            opened.wait(timeout=120)
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(image.getvalue())))
            self.end_headers()
            self.wfile.write(image.getvalue())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", opened
    opened.set()
    server.shutdown()


def test_a_job_left_running_is_resumed_by_the_next_replica(setup: dict):
    folder = _folder(setup["folders"] / "b", 6, seed=4)
    # The state a replica leaves behind when it dies mid-job: the job recorded as running.
    store = JobStore(setup["data"] / "jobs.sqlite")
    job = job_id(str(folder), {"models": MODELS, "collection": setup["collection"]})
    store.create(job, str(folder), {"models": MODELS, "collection": setup["collection"], "server": True})
    store.update(job, status="running")
    store.close()
    api = _start(setup)
    try:
        state = _until_done(api, job)
        assert state["status"] == "done" and state["items"] == {"done": 6}
        hits = httpx.post(
            f"{api}/search", json={"text": "a shape", "top_k": 50, "filter": {"source": str(folder)}}
        ).json()["hits"]
        assert len(hits) == 6
    finally:
        serve.delete("jobs")


def _until(api: str, job: str, done: Callable[[dict], bool], what: str, deadline_s: float = 180) -> dict:
    deadline = time.monotonic() + deadline_s
    state: dict = {}
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/jobs/{job}").json()
        if done(state):
            return state
        assert state["status"] != "failed", state
        time.sleep(0.2)  # polling interval; the job's own state is what the test waits for
    raise AssertionError(f"job {job} did not {what} in {deadline_s} s: {state}")


def test_a_server_job_can_watch_its_folder_until_stopped(setup: dict):
    folder = _folder(setup["folders"] / "watched", 2, seed=12)
    api = _start(setup)
    try:
        started = httpx.post(f"{api}/ingest", json={"source": str(folder), "models": ["demo-clip"], "watch": True})
        assert started.status_code == 202, started.text
        job = started.json()["id"]
        first = _until(api, job, lambda s: s["status"] == "watching", "finish its first round")
        assert first["counts"]["whole"] is True and first["counts"]["written"] == 2

        def mine() -> list[str]:
            found = httpx.post(f"{api}/search", json={"text": "a shape", "top_k": 50}).json()["hits"]
            return sorted(h["payload"]["filename"] for h in found if h["payload"]["source"] == str(folder))

        assert mine() == ["scene-0.png", "scene-1.png"]
        world.eval_set(1, seed=13)[0][1].save(folder / "new.png")
        (folder / "scene-0.png").unlink()
        deadline = time.monotonic() + 180
        while mine() != ["new.png", "scene-1.png"]:
            assert time.monotonic() < deadline, (mine(), httpx.get(f"{api}/jobs/{job}").json())
            time.sleep(0.2)  # polling interval; the collection's own contents are what the test waits for
        later = httpx.get(f"{api}/jobs/{job}").json()
        assert later["counts"]["rounds"] >= 2 and later["counts"]["whole"] is False  # the changes alone

        assert httpx.delete(f"{api}/jobs/{job}").status_code == 202
        _until(api, job, lambda s: s["status"] == "stopped", "stop")
        assert httpx.delete(f"{api}/jobs/{job}").json()["error"]["code"] == "job_not_watching"
    finally:
        serve.delete("jobs")

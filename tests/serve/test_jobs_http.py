"""Bulk jobs over HTTP on a real Ray Serve: POST /ingest runs in the background, GET /jobs
follows it to 100%, the items become searchable, and job state outlives the replica: a job
left running when the app went down is resumed by the next one."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from ray import serve

from jobs.state import JobStore, job_id
from mmembed.demo import world
from serve.app import build_app

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
    data = tmp_path_factory.mktemp("jobs-data")
    collection = f"jobs-{uuid.uuid4().hex[:6]}"
    env = {"MMEMBED_DATA_DIR": str(data), "MMEMBED_COLLECTION": collection}
    app = build_app({"models": [{"name": m} for m in MODELS], "env": env})
    return {"app": app, "data": data, "collection": collection, "port": ray_cluster,
            "folders": tmp_path_factory.mktemp("sources")}  # fmt: skip


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
        assert f'mmembed_job_progress{{job="{job}"}} 1.0' in metrics
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
        hits = httpx.post(f"{api}/search", json={"text": "a shape", "top_k": 50,
                                                 "filter": {"source": str(folder)}}).json()["hits"]  # fmt: skip
        assert len(hits) == 6
    finally:
        serve.delete("jobs")

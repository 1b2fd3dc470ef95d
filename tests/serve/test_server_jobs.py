"""Server jobs on a real Ray Serve send their items to the encoder deployments: the catalogue
replica loads no model, and a job's items share the deployment's batches with the API's
requests while both go on."""

from __future__ import annotations

import base64
import io
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from ray import serve
from test_jobs_http import _until_done

from mmembed.demo import world
from mmembed.serve.catalog import build_catalog
from mmembed.serve.config import ServeConfig, replica_settings
from mmembed.serve.deployments import build_encoder
from mmembed.serve.ingress import Ingress

MODEL = "demo-clip"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _folder(path: Path, n: int, seed: int) -> Path:
    path.mkdir(parents=True)
    for i, (_, image) in enumerate(world.eval_set(n, seed=seed)):
        image.save(path / f"scene-{i}.png")
    return path


@pytest.fixture(scope="module")
def server(ray_cluster: int, tmp_path_factory: pytest.TempPathFactory):
    """The app ``build_app`` makes, except that the catalogue replica's settings name a device that does
    not exist: any model it loaded would fail to load, and its job with it."""
    data, folders = tmp_path_factory.mktemp("server-jobs-data"), tmp_path_factory.mktemp("server-jobs-sources")
    env = {
        "MMEMBED_DATA_DIR": str(data),
        "MMEMBED_COLLECTION": f"server-jobs-{uuid.uuid4().hex[:6]}",
        "MMEMBED_INGEST_ROOTS": str(folders),
    }
    # A lone item waits up to a second for company, so a batch that holds more than it found company.
    batch = {"max_batch_size": 8, "batch_wait_timeout_s": 1.0}
    config = ServeConfig.model_validate({"models": [{"name": MODEL, "batch": batch}], "env": env})
    settings = replica_settings(config.env)
    encoders = {m.name: build_encoder(m, settings, config.env) for m in config.models}
    catalog = build_catalog(settings.model_copy(update={"device": "no-such-device"}), config.env, encoders)
    app = Ingress.bind(encoders, catalog, config.model_dump(), settings)
    serve.run(app, name="server-jobs", route_prefix="/server-jobs")
    try:
        yield f"http://127.0.0.1:{ray_cluster}/server-jobs", folders
    finally:
        serve.delete("server-jobs")  # a leaked app holds its CPUs: later apps could never start


def test_the_catalogue_replica_runs_a_job_without_loading_a_model(server):
    api, folders = server
    folder = _folder(folders / "small", 6, seed=5)
    started = httpx.post(f"{api}/ingest", json={"source": str(folder)})
    assert started.status_code == 202, started.text
    state = _until_done(api, started.json()["id"])
    assert state["status"] == "done", state["error"]  # loading a model there raises: its device does not exist
    assert state["items"] == {"done": 6} and state["counts"]["written"] == 6
    found = httpx.post(f"{api}/search", json={"text": "a shape", "top_k": 50}).json()["hits"]
    assert {h["payload"]["source"] for h in found} >= {str(folder)}


def test_a_job_and_concurrent_requests_share_the_deployments_batches(server):
    api, folders = server
    folder = _folder(folders / "large", 160, seed=6)
    requests = [base64.b64encode(_png(image)).decode() for _, image in world.eval_set(40, seed=7)]
    running = threading.Event()
    sizes: list[int] = []
    answers: list[int] = []

    def ask() -> None:
        """One request at a time: a batch holding more than its one item holds the job's items."""
        with httpx.Client(timeout=120) as client:
            for item in requests:
                if not running.is_set():
                    return
                answer = client.post(f"{api}/encode/image", json={"model": MODEL, "items": [item]})
                answers.append(answer.status_code)
                if answer.status_code == 200 and running.is_set():
                    sizes.append(answer.json()["data"][0]["info"]["batch_size"])

    running.set()
    asker = threading.Thread(target=ask)
    started = httpx.post(f"{api}/ingest", json={"source": str(folder)})
    assert started.status_code == 202, started.text
    asker.start()
    try:
        state = _until_done(api, started.json()["id"])
    finally:
        running.clear()
        asker.join()
    assert state["status"] == "done" and state["counts"]["written"] == 160, state
    assert answers and set(answers) == {200}, answers
    assert sizes and max(sizes) > 1, sizes

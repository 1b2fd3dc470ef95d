"""A model migration over HTTP on a real Ray Serve: the demo catalogue, embedded with demo-clip,
moves to a second CLIP the server now also serves (a small transformers CLIP folder) while searches
go on; they answer 200 with results from the old vectors until the switch, then from the new ones,
and a rollback brings the old answers back."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from hf_clip_folder import write_hf_clip
from ray import serve

from mmembed.config import Settings
from mmembed.demo.catalogue import build_demo_catalogue
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.serve.catalog import build_catalog
from mmembed.serve.config import ServeConfig, replica_settings
from mmembed.serve.deployments import build_encoder
from mmembed.serve.ingress import Ingress

OLD = "demo-clip"
QUERY = {"text": "a red circle", "top_k": 5}


@pytest.fixture(scope="module")
def server(ray_cluster: int, settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    """The demo catalogue ingested with demo-clip alone, then a server that also serves the new model:
    what a team has when it adds a model to its serve config and redeploys."""
    data = tmp_path_factory.mktemp("migration-data")
    collection = f"migration-{uuid.uuid4().hex[:6]}"
    manifest = build_demo_catalogue(tmp_path_factory.mktemp("demo-catalogue"), scenes=24)
    local = settings.model_copy(update={"data_dir": data, "collection": collection})
    job = Ingest(IngestOptions(str(manifest), (OLD,), workers=0), local)
    summary = job.run(progress=False)
    assert summary.written >= 24, summary.lines()
    job.catalog.vectors.close()  # the server's catalogue replica holds the shard from here

    new = f"hf-clip:{write_hf_clip(tmp_path_factory.mktemp('hf-clip'))}"
    env = {"MMEMBED_DATA_DIR": str(data), "MMEMBED_COLLECTION": collection}
    config = ServeConfig.model_validate({"models": [{"name": OLD}, {"name": new}], "env": env})
    replica = replica_settings(config.env)
    encoders = {m.name: build_encoder(m, replica, config.env) for m in config.models}
    catalog = build_catalog(replica, config.env, encoders)
    serve.run(
        Ingress.bind(encoders, catalog, config.model_dump(), replica), name="migration", route_prefix="/migration"
    )
    try:
        yield f"http://127.0.0.1:{ray_cluster}/migration", new, summary.written
    finally:
        serve.delete("migration")  # a leaked app holds its CPUs: later apps could never start


def _search(client: httpx.Client) -> dict:
    answer = client.post("/search", json=QUERY)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert len(found["hits"]) == QUERY["top_k"], found
    return found


def test_searches_answer_throughout_a_migration_then_from_the_new_model_and_back(server):
    api, new, items = server
    with httpx.Client(base_url=api, timeout=120) as client:
        catalog = client.get("/catalog").json()
        assert f"{new}.image" not in catalog["vectors"]  # served, not migrated in yet: left out of searches
        before = _search(client)
        assert before["vector"] == f"{OLD}.image"

        started = client.post("/migrations", json={"to": new})
        assert started.status_code == 202, started.text
        job_url = f"/jobs/{started.json()['id']}"
        assert started.json()["status_url"] == f"/migration{job_url}"
        during: list[str] = []
        deadline = time.monotonic() + 300
        while (job := client.get(job_url).json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            during.append(_search(client)["vector"])  # every search while it runs: 200, five hits
        assert job["status"] == "done", job["error"]
        assert job["counts"]["switched"] is True, job["counts"]
        assert job["counts"]["written"] >= 24 and job["counts"]["failed"] == 0, job["counts"]
        assert during and set(during) <= {f"{OLD}.image", f"{new}.image"}, during
        assert during[0] == f"{OLD}.image"

        after = _search(client)
        assert after["vector"] == f"{new}.image" and after["model"] == new
        catalog = client.get("/catalog").json()
        assert catalog["count"] == items and catalog["default_vector"] == f"{new}.image"

        back = client.post("/migrations/rollback")
        assert back.status_code == 200 and back.json()["defaults"]["image"] == f"{OLD}.image", back.text
        restored = _search(client)
        assert restored["vector"] == f"{OLD}.image"
        assert [h["id"] for h in restored["hits"]] == [h["id"] for h in before["hits"]]

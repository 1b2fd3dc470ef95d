"""The whole HTTP surface in-process: the app of ``create_app`` over a fake backend (no Ray,
no model), so validation, error shapes, auth, limits and every route's answer run in seconds."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fake_backend import PNG_MAGIC, TRANSCRIPT, WAV_MAGIC, FakeBackend, unit_vector
from fastapi.testclient import TestClient

from mmembed.config import Settings
from mmembed.contracts import PathForbidden, TooManyJobs
from mmembed.serve.config import ServeConfig
from mmembed.serve.http import create_app
from mmembed.store.objects import LocalObjects

MODELS = ["demo-clip", "all-MiniLM-L6-v2", "whisper-base"]
PNG = PNG_MAGIC + b" a small picture"
WAV = WAV_MAGIC + b" a short clip"


def _config(**overrides) -> ServeConfig:
    args = {"models": [{"name": m} for m in MODELS], "max_body_bytes": 100_000, "max_items_per_request": 4}
    return ServeConfig.model_validate(args | {"max_text_chars": 50} | overrides)


def _client(tmp_path: Path, backend: FakeBackend | None = None, root_path: str = "", **settings) -> TestClient:
    defaults = {"data_dir": tmp_path, "api_keys_write": [], "api_keys_read": [], "cors_origins": []}
    objects = LocalObjects(tmp_path / "objects")
    app = create_app(backend or FakeBackend(), _config(), Settings(**(defaults | settings)), objects=objects)
    return TestClient(app, root_path=root_path)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> TestClient:
    return _client(tmp_path, backend)


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- operations ---------------------------------------------------------------------------


def test_probes_and_models(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "models": sorted(MODELS)}
    models = {m["name"]: m for m in client.get("/models").json()["data"]}
    assert set(models) == {"demo-clip.image", "demo-clip.text", "all-MiniLM-L6-v2.text", "whisper-base.audio"}
    image = models["demo-clip.image"]
    assert image["model"] == "demo-clip" and image["modality"] == "image" and image["dim"] == 16
    assert image["limits"] == {"image_size": 64} and image["device"] == "cpu"  # None limits left out
    assert image["replicas"] == {"min": 1, "max": 1}


def test_a_model_not_answering_is_not_ready(tmp_path: Path) -> None:
    answer = _client(tmp_path, FakeBackend(describe_error=TimeoutError("no replica yet"))).get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "not_ready", "reason": "TimeoutError: no replica yet"}


def test_metrics_count_requests_items_and_jobs(client: TestClient) -> None:
    client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["a", "", "b"]})
    client.post("/ingest", json={"source": "/data/photos"})
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert 'mmembed_requests_total{endpoint="/encode/text",status="200"} 1.0' in text
    assert 'mmembed_items_total{modality="text",model="all-MiniLM-L6-v2"} 2.0' in text
    assert 'mmembed_item_errors_total{code="empty_input",modality="text",model="all-MiniLM-L6-v2"} 1.0' in text
    assert "mmembed_batch_size_bucket" in text and "mmembed_job_progress{" in text


# --- errors, limits, auth, CORS ---------------------------------------------------------------


def test_unknown_paths_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    _error(client.get("/nope"), 404, "not_found")
    _error(client.get("/v1/embeddings"), 405, "method_not_allowed")


def test_invalid_bodies_say_where(client: TestClient) -> None:
    assert _error(client.post("/v1/embeddings", json={"model": "x"}), 422, "invalid_request").startswith("body.input")
    _error(client.post("/encode/text", json={"model": "x", "texts": []}), 422, "invalid_request")
    _error(client.post("/search", json={"text": "a", "image": "b"}), 422, "invalid_request")
    _error(client.post("/search", json={"text": "a", "top_k": 0}), 422, "invalid_request")


def test_bodies_over_the_limit_get_413_declared_or_chunked(client: TestClient) -> None:
    big = {"model": "all-MiniLM-L6-v2", "texts": ["x" * 200_000]}
    _error(client.post("/encode/text", json=big), 413, "body_too_large")
    chunks = (b"x" * 10_000 for _ in range(20))  # no content-length: read up to the limit
    _error(client.post("/encode/text", content=chunks), 413, "body_too_large")


def test_too_many_items_and_too_long_texts(client: TestClient) -> None:
    five = {"model": "all-MiniLM-L6-v2", "texts": ["a"] * 5}
    assert "at most 4" in _error(client.post("/encode/text", json=five), 413, "too_many_items")
    mixed = client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["ok", "y" * 51]}).json()
    assert mixed["data"][0]["error"] is None and mixed["data"][1]["error"]["code"] == "text_too_long"
    alone = client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["y" * 51]})
    _error(alone, 422, "text_too_long")


def test_unknown_models_and_modalities(client: TestClient) -> None:
    _error(client.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404, "model_not_found")
    audio = {"model": "all-MiniLM-L6-v2", "items": [_b64(WAV)]}
    _error(client.post("/encode/audio", json=audio), 422, "unsupported_modality")


def test_keys_guard_reads_and_writes(tmp_path: Path) -> None:
    client = _client(tmp_path, api_keys_write=["w-key"], api_keys_read=["r-key"], open_reads=False)
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    denied = client.post("/search", json={"text": "a"})
    _error(denied, 401, "unauthorized")
    assert denied.headers["www-authenticate"].startswith("Bearer")
    read = {"authorization": "Bearer r-key"}
    assert client.post("/search", json={"text": "a"}, headers=read).status_code == 200
    _error(client.post("/items", files={"file": ("a.png", PNG, "image/png")}, headers=read), 403, "forbidden")
    write = {"authorization": "Bearer w-key"}
    assert client.post("/items", files={"file": ("a.png", PNG, "image/png")}, headers=write).status_code == 201
    _error(client.get("/jobs", headers={"authorization": "Bearer wrong"}), 401, "unauthorized")


def test_cors_only_for_configured_origins(tmp_path: Path) -> None:
    preflight = {"origin": "https://page.example", "access-control-request-method": "POST"}
    closed = _client(tmp_path).options("/v1/embeddings", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = _client(tmp_path, cors_origins=["https://page.example"]).options("/v1/embeddings", headers=preflight)
    assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == "https://page.example"


# --- encoding ---------------------------------------------------------------------------------


def test_openai_embeddings_float_and_base64(client: TestClient) -> None:
    body = {"model": "all-MiniLM-L6-v2", "input": ["a red circle", "blue"], "encoding_format": "float"}
    answer = client.post("/v1/embeddings", json=body).json()
    assert answer["object"] == "list" and answer["model"] == "all-MiniLM-L6-v2"
    assert answer["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert [d["index"] for d in answer["data"]] == [0, 1] and answer["data"][0]["object"] == "embedding"
    expected = unit_vector(12, "all-MiniLM-L6-v2", "a red circle")
    assert np.allclose(answer["data"][0]["embedding"], expected)
    packed = client.post("/v1/embeddings", json=body | {"encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed), dtype="<f4"), expected)


def test_openai_embeddings_refusals(client: TestClient) -> None:
    post = lambda body: client.post("/v1/embeddings", json=body)  # noqa: E731
    _error(post({"model": "all-MiniLM-L6-v2", "input": []}), 422, "empty_input")
    _error(post({"model": "all-MiniLM-L6-v2", "input": [[1, 2, 3]]}), 422, "token_arrays_unsupported")
    _error(post({"model": "demo-clip", "input": "x", "dimensions": 8}), 422, "dimensions_unsupported")
    assert post({"model": "demo-clip", "input": "x", "dimensions": 16}).status_code == 200
    message = _error(post({"model": "all-MiniLM-L6-v2", "input": ["ok", ""]}), 422, "empty_input")
    assert message.startswith("input[1] (text)")


def test_openai_embeddings_take_data_uris_beside_text(client: TestClient) -> None:
    uri = "data:image/png;base64," + _b64(PNG)
    body = {"model": "demo-clip", "input": ["a red circle", uri], "encoding_format": "float"}
    data = client.post("/v1/embeddings", json=body).json()["data"]
    assert np.allclose(data[1]["embedding"], unit_vector(16, "demo-clip", PNG))
    assert np.allclose(data[0]["embedding"], unit_vector(16, "demo-clip", "a red circle"))
    bad = {"model": "demo-clip", "input": ["data:image/png;base64,%%%"]}
    _error(client.post("/v1/embeddings", json=bad), 422, "invalid_base64")


def test_native_endpoints_return_good_items_beside_bad_ones(client: TestClient) -> None:
    body = {"model": "demo-clip", "items": [_b64(PNG), _b64(b"not an image"), "%%%"]}
    data = client.post("/encode/image", json=body).json()["data"]
    assert len(data[0]["embedding"]) == 16 and data[0]["error"] is None
    assert data[0]["info"] == {"batch_size": 2, "queue_ms": 0.25, "encode_ms": 1.5}
    assert [d["error"]["code"] for d in data[1:]] == ["not_an_image", "invalid_base64"]
    assert data[1]["embedding"] is None
    files = [("files", ("a.png", PNG, "image/png")), ("files", ("b.png", PNG + b"2", "image/png"))]
    upload = client.post("/encode/image/upload", params={"model": "demo-clip"}, files=files)
    assert [len(d["embedding"]) for d in upload.json()["data"]] == [16, 16]
    audio = client.post("/encode/audio", json={"model": "whisper-base", "items": [_b64(WAV)]}).json()["data"]
    assert audio[0]["info"]["transcript"] == TRANSCRIPT
    every = client.post("/encode/image", json={"model": "demo-clip", "items": [_b64(b"junk")]})
    assert _error(every, 422, "not_an_image").startswith("every item failed; items[0]")


def test_urls_are_fetched_under_the_address_policy(client: TestClient) -> None:
    body = {"model": "demo-clip", "items": ["http://127.0.0.1:9/a.png"]}
    assert client.post("/encode/image", json=body).status_code == 422  # loopback refused by default


# --- the catalogue ----------------------------------------------------------------------------


def test_items_are_added_read_and_deleted(client: TestClient) -> None:
    form = {"caption": "a red circle", "meta": '{"colour": "red"}', "source_uri": "shop/1"}
    added = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data=form)
    assert added.status_code == 201, added.text
    item = added.json()
    assert item["vectors"] == ["all-MiniLM-L6-v2.text", "demo-clip.image", "demo-clip.text"]
    assert item["payload"]["meta"] == {"colour": "red"} and item["url"].startswith("/objects/")
    assert client.get(f"/items/{item['id']}").json()["payload"]["caption"] == "a red circle"
    assert client.delete(f"/items/{item['id']}").json() == {"id": item["id"], "deleted": True}
    _error(client.get(f"/items/{item['id']}"), 404, "item_not_found")
    _error(client.delete(f"/items/{item['id']}"), 404, "item_not_found")


def test_audio_items_get_their_transcript_embedded(client: TestClient) -> None:
    added = client.post("/items", files={"file": ("a.wav", WAV, "audio/wav")}).json()
    assert added["vectors"] == ["all-MiniLM-L6-v2.text", "demo-clip.text", "whisper-base.audio"]
    assert added["payload"]["transcript"] == TRANSCRIPT and added["payload"]["kind"] == "audio"


def test_item_forms_are_checked(client: TestClient) -> None:
    _error(client.post("/items", data={"caption": "x"}), 422, "invalid_request")
    both = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"url": "http://x/a.png"})
    _error(both, 422, "invalid_request")
    bad_meta = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"meta": "[1]"})
    _error(bad_meta, 422, "invalid_meta")
    _error(client.post("/items", files={"file": ("a.png", b"junk", "image/png")}), 422, "not_an_image")


def test_search_routes_queries_into_the_vector_searched(tmp_path: Path, backend: FakeBackend) -> None:
    client = _client(tmp_path, backend, root_path="/app")
    red = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"caption": "red"}).json()
    client.post("/items", files={"file": ("b.png", PNG + b"b", "image/png")})
    found = client.post("/search", json={"text": "a red circle", "top_k": 5}).json()
    assert (found["vector"], found["model"], found["route"]) == ("demo-clip.image", "demo-clip", "direct")
    assert found["query"] == {"modality": "text"} and len(found["hits"]) == 2
    assert all(h["url"].startswith("/app/objects/") for h in found["hits"])  # under the mount point
    heard = client.post("/search", json={"audio": _b64(WAV), "route": "transcript"}).json()
    assert heard["query"] == {"modality": "audio", "transcript": TRANSCRIPT} and heard["model"] == "demo-clip"
    like = client.post("/search", json={"item_id": red["id"]}).json()
    assert [h["id"] for h in like["hits"]] != [] and red["id"] not in [h["id"] for h in like["hits"]]


def test_search_refusals(client: TestClient) -> None:
    _error(client.post("/search", json={"text": "a", "vector": "nope.image"}), 422, "no_route")
    _error(client.post("/search", json={"image": _b64(PNG), "vector": "whisper-base.audio"}), 422, "no_route")
    _error(client.post("/search", json={"text": "a", "via": "nope"}), 422, "no_route")
    _error(client.post("/search", json={"image": "%%%"}), 422, "invalid_base64")
    missing = "00000000-0000-0000-0000-000000000000"
    _error(client.post("/search", json={"item_id": missing}), 404, "item_not_found")


def test_catalog_says_what_each_vector_can_be_searched_with(client: TestClient) -> None:
    info = client.get("/catalog").json()
    assert info["count"] == 0 and info["default_vector"] == "demo-clip.image" and info["models"] == MODELS
    assert info["vectors"]["demo-clip.image"] == {"dim": 16, "queries": ["text", "image", "audio:transcript"]}
    assert info["vectors"]["whisper-base.audio"]["queries"] == ["text", "audio", "audio:transcript"]


def test_a_collection_of_other_sizes_is_a_conflict(tmp_path: Path) -> None:
    client = _client(tmp_path, FakeBackend(stored_layout={"demo-clip.image": 512}))
    _error(client.get("/catalog"), 409, "dimension_mismatch")


def test_objects_are_served_from_the_local_store_only_inside_it(client: TestClient, tmp_path: Path) -> None:
    LocalObjects(tmp_path / "objects").put("ab/cd.png", PNG, "image/png")
    assert client.get("/objects/ab/cd.png").content == PNG
    _error(client.get("/objects/ab/none.png"), 404, "not_found")
    _error(client.get("/objects/../secret"), 404, "not_found")


# --- bulk jobs --------------------------------------------------------------------------------


def test_jobs_start_and_are_followed(client: TestClient) -> None:
    started = client.post("/ingest", json={"source": "/data/photos", "models": ["demo-clip"]})
    assert started.status_code == 202
    job = started.json()["id"]
    assert started.json()["status_url"] == f"/jobs/{job}"
    assert client.get(f"/jobs/{job}").json()["source"] == "/data/photos"
    assert [j["id"] for j in client.get("/jobs").json()["data"]] == [job]
    assert client.get(f"/jobs/{job}/dead-letters").json()["data"][0]["code"] == "not_an_image"
    _error(client.get("/jobs/nope"), 404, "job_not_found")
    _error(client.get("/jobs/nope/dead-letters"), 404, "job_not_found")
    _error(client.post("/ingest", json={"source": "/x", "models": ["nope"]}), 422, "model_not_found")


def test_jobs_refused_by_the_catalogue(client: TestClient, backend: FakeBackend) -> None:
    backend.next_start = PathForbidden("/etc is outside the folders jobs may read")
    assert "outside" in _error(client.post("/ingest", json={"source": "/etc"}), 403, "path_forbidden")
    backend.next_start = TooManyJobs(2)
    busy = client.post("/ingest", json={"source": "/data"})
    assert _error(busy, 429, "too_many_jobs").startswith("2 bulk jobs") and busy.headers["retry-after"] == "30"


# --- pages ------------------------------------------------------------------------------------


def test_the_page_and_docs_are_served_from_here(tmp_path: Path) -> None:
    client = _client(tmp_path, root_path="/app")
    page = client.get("/")
    assert page.status_code == 200 and "{{BASE}}" not in page.text and "/app/" in page.text
    docs = client.get("/docs").text
    assert "/app/ui/swagger-ui-bundle.js" in docs and "/app/openapi.json" in docs
    assert client.get("/ui/swagger-ui.css").status_code == 200 and client.get("/ui/style.css").status_code == 200
    _error(client.get("/ui/nope.js"), 404, "not_found")
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embeddings", "/search", "/items", "/ingest", "/catalog", "/models"} <= set(paths)
    assert "/" not in paths and "/docs" not in paths

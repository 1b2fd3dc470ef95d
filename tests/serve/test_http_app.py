"""The HTTP surface in-process: the app of ``create_app`` over a fake backend (no Ray, no
model), so validation, error shapes, auth, limits and encoding run in seconds."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from fake_backend import TRANSCRIPT, FakeBackend, unit_vector
from fastapi.testclient import TestClient
from http_app import MODELS, PNG, WAV, api_error, b64, client_for

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
    answer = client_for(tmp_path, FakeBackend(describe_error=TimeoutError("no replica yet"))).get("/readyz")
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
    api_error(client.get("/nope"), 404, "not_found")
    api_error(client.get("/v1/embeddings"), 405, "method_not_allowed")


def test_invalid_bodies_say_where(client: TestClient) -> None:
    assert api_error(client.post("/v1/embeddings", json={"model": "x"}), 422, "invalid_request").startswith(
        "body.input"
    )
    api_error(client.post("/encode/text", json={"model": "x", "texts": []}), 422, "invalid_request")
    api_error(client.post("/search", json={"text": "a", "image": "b"}), 422, "invalid_request")
    api_error(client.post("/search", json={"text": "a", "top_k": 0}), 422, "invalid_request")


def test_bodies_over_the_limit_get_413_declared_or_chunked(client: TestClient) -> None:
    big = {"model": "all-MiniLM-L6-v2", "texts": ["x" * 200_000]}
    api_error(client.post("/encode/text", json=big), 413, "body_too_large")
    chunks = (b"x" * 10_000 for _ in range(20))  # no content-length: read up to the limit
    api_error(client.post("/encode/text", content=chunks), 413, "body_too_large")


def test_too_many_items_and_too_long_texts(client: TestClient) -> None:
    five = {"model": "all-MiniLM-L6-v2", "texts": ["a"] * 5}
    assert "at most 4" in api_error(client.post("/encode/text", json=five), 413, "too_many_items")
    mixed = client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["ok", "y" * 51]}).json()
    assert mixed["data"][0]["error"] is None and mixed["data"][1]["error"]["code"] == "text_too_long"
    alone = client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["y" * 51]})
    api_error(alone, 422, "text_too_long")


def test_unknown_models_and_modalities(client: TestClient) -> None:
    api_error(client.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404, "model_not_found")
    audio = {"model": "all-MiniLM-L6-v2", "items": [b64(WAV)]}
    api_error(client.post("/encode/audio", json=audio), 422, "unsupported_modality")


def test_keys_guard_reads_and_writes(tmp_path: Path) -> None:
    client = client_for(tmp_path, api_keys_write=["w-key"], api_keys_read=["r-key"], open_reads=False)
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    denied = client.post("/search", json={"text": "a"})
    api_error(denied, 401, "unauthorized")
    assert denied.headers["www-authenticate"].startswith("Bearer")
    read = {"authorization": "Bearer r-key"}
    assert client.post("/search", json={"text": "a"}, headers=read).status_code == 200
    api_error(client.post("/items", files={"file": ("a.png", PNG, "image/png")}, headers=read), 403, "forbidden")
    write = {"authorization": "Bearer w-key"}
    assert client.post("/items", files={"file": ("a.png", PNG, "image/png")}, headers=write).status_code == 201
    api_error(client.get("/jobs", headers={"authorization": "Bearer wrong"}), 401, "unauthorized")


def test_cors_only_for_configured_origins(tmp_path: Path) -> None:
    preflight = {"origin": "https://page.example", "access-control-request-method": "POST"}
    closed = client_for(tmp_path).options("/v1/embeddings", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = client_for(tmp_path, cors_origins=["https://page.example"]).options("/v1/embeddings", headers=preflight)
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
    api_error(post({"model": "all-MiniLM-L6-v2", "input": []}), 422, "empty_input")
    api_error(post({"model": "all-MiniLM-L6-v2", "input": [[1, 2, 3]]}), 422, "token_arrays_unsupported")
    api_error(post({"model": "demo-clip", "input": "x", "dimensions": 8}), 422, "dimensions_unsupported")
    assert post({"model": "demo-clip", "input": "x", "dimensions": 16}).status_code == 200
    message = api_error(post({"model": "all-MiniLM-L6-v2", "input": ["ok", ""]}), 422, "empty_input")
    assert message.startswith("input[1] (text)")


def test_openai_embeddings_take_data_uris_beside_text(client: TestClient) -> None:
    uri = "data:image/png;base64," + b64(PNG)
    body = {"model": "demo-clip", "input": ["a red circle", uri], "encoding_format": "float"}
    data = client.post("/v1/embeddings", json=body).json()["data"]
    assert np.allclose(data[1]["embedding"], unit_vector(16, "demo-clip", PNG))
    assert np.allclose(data[0]["embedding"], unit_vector(16, "demo-clip", "a red circle"))
    bad = {"model": "demo-clip", "input": ["data:image/png;base64,%%%"]}
    api_error(client.post("/v1/embeddings", json=bad), 422, "invalid_base64")


def test_native_endpoints_return_good_items_beside_bad_ones(client: TestClient) -> None:
    body = {"model": "demo-clip", "items": [b64(PNG), b64(b"not an image"), "%%%"]}
    data = client.post("/encode/image", json=body).json()["data"]
    assert len(data[0]["embedding"]) == 16 and data[0]["error"] is None
    assert data[0]["info"] == {"batch_size": 2, "queue_ms": 0.25, "encode_ms": 1.5}
    assert [d["error"]["code"] for d in data[1:]] == ["not_an_image", "invalid_base64"]
    assert data[1]["embedding"] is None
    files = [("files", ("a.png", PNG, "image/png")), ("files", ("b.png", PNG + b"2", "image/png"))]
    upload = client.post("/encode/image/upload", params={"model": "demo-clip"}, files=files)
    assert [len(d["embedding"]) for d in upload.json()["data"]] == [16, 16]
    audio = client.post("/encode/audio", json={"model": "whisper-base", "items": [b64(WAV)]}).json()["data"]
    assert audio[0]["info"]["transcript"] == TRANSCRIPT
    every = client.post("/encode/image", json={"model": "demo-clip", "items": [b64(b"junk")]})
    assert api_error(every, 422, "not_an_image").startswith("every item failed; items[0]")


def test_urls_are_fetched_under_the_address_policy(client: TestClient) -> None:
    body = {"model": "demo-clip", "items": ["http://127.0.0.1:9/a.png"]}
    assert client.post("/encode/image", json=body).status_code == 422  # loopback refused by default

"""The HTTP surface in-process: the app of ``create_app`` over a fake backend (no Ray, no
model), so validation, error shapes, auth, limits and encoding run in seconds."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fake_backend import TRANSCRIPT, FakeBackend, unit_vector
from fastapi.testclient import TestClient
from http_app import MODELS, PNG, WAV, api_error, b64, client_for, config
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmembed.config import Settings
from mmembed.contracts import Query
from mmembed.serve.config import ServeConfig

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


def metric(text: str, name: str, **labels: str) -> float | None:
    """A sample's value in a Prometheus exposition, or None when the series is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_metrics_count_requests_items_and_jobs(tmp_path: Path) -> None:
    backend = FakeBackend()
    client = client_for(tmp_path, backend, api_keys_write=["w-key"])
    client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["a", "", "b"]})
    client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    client.get("/items/no-such-item")
    client.post("/items", files={"file": ("a.png", PNG, "image/png")})  # refused before routing: no key
    client.get("/nope")
    write = {"authorization": "Bearer w-key"}
    done = client.post("/ingest", json={"source": "/data/photos"}, headers=write).json()["id"]
    backend.jobs[done] = replace(backend.jobs[done], status="done", progress=1.0, items={"done": 5, "failed": 2})
    running = client.post("/ingest", json={"source": "/data/more"}, headers=write).json()["id"]
    backend.jobs[running] = replace(backend.jobs[running], items={"done": 1, "failed": 1, "pending": 2})
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    requests = "mmembed_requests_total"
    assert metric(text, requests, method="POST", endpoint="/encode/text", status="200") == 1.0
    assert metric(text, requests, method="POST", endpoint="/v1/embeddings", status="404") == 1.0
    assert metric(text, requests, method="GET", endpoint="/items/{item_id}", status="404") == 1.0
    assert metric(text, requests, method="POST", endpoint="/items", status="401") == 1.0
    assert metric(text, requests, method="GET", endpoint="unmatched", status="404") == 1.0
    assert metric(text, requests, method="POST", endpoint="/ingest", status="202") == 2.0
    assert metric(text, "mmembed_items_total", model="all-MiniLM-L6-v2", modality="text") == 2.0
    errors = metric(text, "mmembed_item_errors_total", model="all-MiniLM-L6-v2", modality="text", code="empty_input")
    assert errors == 1.0
    # Per-job series only while a job runs; finished jobs are counted by status.
    assert metric(text, "mmembed_job_progress", job_id=running) == 0.5
    assert metric(text, "mmembed_job_progress", job_id=done) is None
    assert metric(text, "mmembed_jobs", status="done") == 1.0 and metric(text, "mmembed_jobs", status="running") == 1.0
    assert metric(text, "mmembed_job_items", job_id=running, state="failed") == 1.0
    # Dead letters over every job, finished ones too: the alert on their growth reads this.
    assert metric(text, "mmembed_dead_letters") == 3.0
    # No label Prometheus reserves, and nothing Ray Serve already exports per deployment.
    labels = {name for family in text_string_to_metric_families(text) for s in family.samples for name in s.labels}
    assert not labels & {"job", "instance"}
    assert "batch_size" not in text and "queue_wait" not in text and "encode_seconds" not in text


# --- errors, limits, auth, CORS ---------------------------------------------------------------


def test_unknown_paths_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    api_error(client.get("/nope"), 404, "not_found")
    api_error(client.get("/v1/embeddings"), 405, "method_not_allowed")


def test_an_unexpected_failure_is_a_500_in_the_error_shape_without_its_text(tmp_path: Path) -> None:
    """A call into a replica can fail in ways no backend names (a gRPC message over its cap, say):
    clients still get the API's shape, and the exception's text, which may name internals, stays out."""

    class Failing(FakeBackend):
        async def encode(self, model: str, modality: str, items: list) -> list:
            raise RuntimeError("grpc: message larger than max (secret internals)")

    client = TestClient(client_for(tmp_path, Failing()).app, raise_server_exceptions=False)
    for path, body in (
        ("/encode/text", {"model": "all-MiniLM-L6-v2", "texts": ["a"]}),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "a"}),
    ):
        message = api_error(client.post(path, json=body), 500, "internal_error")
        assert "RuntimeError" in message and "secret" not in message


def test_invalid_bodies_say_where(client: TestClient) -> None:
    missing = client.post("/v1/embeddings", json={"model": "x"})  # OpenAI's status under /v1/
    assert api_error(missing, 400, "invalid_request", param="input").startswith("body.input")
    api_error(client.post("/encode/text", json={"model": "x", "texts": []}), 422, "invalid_request", "texts")
    api_error(client.post("/search", json={"text": "a", "image": "b"}), 422, "invalid_request")
    api_error(client.post("/search", json={"text": "a", "top_k": 0}), 422, "invalid_request", "top_k")


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
    api_error(client.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404, "model_not_found", "model")
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
    api_error(post({"model": "all-MiniLM-L6-v2", "input": []}), 400, "empty_input", "input")
    api_error(post({"model": "demo-clip", "input": "x", "dimensions": 8}), 400, "dimensions_unsupported", "dimensions")
    assert post({"model": "demo-clip", "input": "x", "dimensions": 16}).status_code == 200
    message = api_error(post({"model": "all-MiniLM-L6-v2", "input": ["ok", ""]}), 400, "empty_input", "input")
    assert message.startswith("input[1] (text)")


def test_openai_embeddings_take_data_uris_beside_text(client: TestClient) -> None:
    uri = "data:image/png;base64," + b64(PNG)
    body = {"model": "demo-clip", "input": ["a red circle", uri], "encoding_format": "float"}
    data = client.post("/v1/embeddings", json=body).json()["data"]
    assert np.allclose(data[1]["embedding"], unit_vector(16, "demo-clip", PNG))
    assert np.allclose(data[0]["embedding"], unit_vector(16, "demo-clip", "a red circle"))
    bad = {"model": "demo-clip", "input": ["data:image/png;base64,%%%"]}
    api_error(client.post("/v1/embeddings", json=bad), 400, "invalid_base64", "input")


def test_input_type_query_sends_texts_as_search_queries(tmp_path: Path, backend: FakeBackend) -> None:
    """``input_type: query`` (default ``document``) reaches the model as ``Query``, which a text
    model with a query prompt (e5's "query: ") puts before the text."""
    seen: list[type] = []
    encode = backend.encode

    async def recording(model: str, modality: str, items: list) -> list:
        seen.extend(type(i) for i in items)
        return await encode(model, modality, items)

    backend.encode = recording  # type: ignore[method-assign]
    client = client_for(tmp_path, backend)
    for input_type, expected in (("query", Query), ("document", str), (None, str)):
        seen.clear()
        extra = {"input_type": input_type} if input_type else {}
        assert (
            client.post("/v1/embeddings", json={"model": "demo-clip", "input": ["a", "b"]} | extra).status_code == 200
        )
        assert client.post("/encode/text", json={"model": "demo-clip", "texts": ["c"]} | extra).status_code == 200
        assert seen == [expected] * 3
    api_error(
        client.post("/encode/text", json={"model": "demo-clip", "texts": ["c"], "input_type": "x"}),
        422,
        "invalid_request",
        "input_type",
    )


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


# --- OpenAI compatibility -----------------------------------------------------------------------


def test_openai_models_list_and_get(client: TestClient) -> None:
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == MODELS
    for model in listed["data"]:
        assert model["object"] == "model" and model["owned_by"] == "mmembed" and isinstance(model["created"], int)
    assert client.get("/v1/models/demo-clip").json() == listed["data"][0]
    api_error(client.get("/v1/models/nope"), 404, "model_not_found", "model")


def test_large_openai_requests_go_to_the_model_in_concurrent_calls(tmp_path: Path) -> None:
    assert ServeConfig().max_items_per_request == 2048  # OpenAI's own limit, above LangChain's 1,000
    backend = FakeBackend()
    client = client_for(tmp_path, backend, serve_config=config(max_items_per_request=10, items_per_call=3))
    texts = [f"text number {i}" for i in range(10)]
    data = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts}).json()["data"]
    assert [d["index"] for d in data] == list(range(10))
    for d, text in zip(data, texts, strict=True):
        assert np.allclose(d["embedding"], unit_vector(12, "all-MiniLM-L6-v2", text))
    assert sorted(n for _, _, n in backend.encode_calls) == [1, 3, 3, 3]
    eleven = {"model": "all-MiniLM-L6-v2", "input": [*texts, "one more"]}
    assert "at most 10" in api_error(client.post("/v1/embeddings", json=eleven), 400, "too_many_items", "input")


def test_token_ids_are_read_as_cl100k_text(client: TestClient) -> None:
    """What OpenAI clients and LangChain send by default: the server decodes them to the text."""
    import tiktoken

    cl100k = tiktoken.get_encoding("cl100k_base")
    texts = ["a red circle", "une tasse de café, 日本"]
    body = {"model": "all-MiniLM-L6-v2", "input": [cl100k.encode(t) for t in texts]}
    data = client.post("/v1/embeddings", json=body).json()["data"]
    for d, text in zip(data, texts, strict=True):
        assert np.allclose(d["embedding"], unit_vector(12, "all-MiniLM-L6-v2", text))
    one = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": cl100k.encode(texts[0])})
    assert np.allclose(one.json()["data"][0]["embedding"], unit_vector(12, "all-MiniLM-L6-v2", texts[0]))
    for ids in ([10**6], [-1], [9468]):  # not in the vocabulary; half a UTF-8 character
        bad = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [ids]})
        assert "input[0]" in api_error(bad, 400, "invalid_token_ids", "input")


def test_token_ids_refused_when_no_encoding_is_set(tmp_path: Path) -> None:
    client = client_for(tmp_path, serve_config=config(token_ids_encoding=None))
    refused = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [[1, 2, 3]]})
    assert "check_embedding_ctx_length=False" in api_error(refused, 400, "token_arrays_unsupported", "input")


def _real_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _real_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype=np.float32), 16_000, format="WAV")
    return buf.getvalue()


def test_data_uris_of_other_media_types_are_sniffed_or_refused(client: TestClient) -> None:
    png, wav = _real_png(), _real_wav()
    post = lambda model, uri: client.post("/v1/embeddings", json={"model": model, "input": [uri]})  # noqa: E731
    image = post("demo-clip", "data:application/octet-stream;base64," + b64(png)).json()["data"][0]
    assert np.allclose(image["embedding"], unit_vector(16, "demo-clip", png))
    audio = post("whisper-base", "data:application/octet-stream;base64," + b64(wav)).json()["data"][0]
    assert np.allclose(audio["embedding"], unit_vector(12, "all-MiniLM-L6-v2", wav))
    never_text = [
        "data:application/octet-stream;base64," + b64(b"\x00 neither an image nor audio"),
        "data:text/plain;base64," + b64(b"a red circle"),
        "data:,a red circle",
        "data:application/json;charset=utf-8,{}",
    ]
    for uri in never_text:
        message = api_error(post("demo-clip", uri), 400, "unsupported_media_type", "input")
        assert message.startswith("input[0]: a data URI of ")
    assert post("demo-clip", "data: the new oil").status_code == 200  # text that only starts like one


def test_token_ids_are_read_with_the_file_in_the_tokenizer_dir_and_refused_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server never downloads an encoding: it reads ``MMEMBED_REMOTE_TOKENIZER_DIR`` or tiktoken's cache."""
    import tiktoken

    cached = Settings.tiktoken_cache_dir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    without = client_for(tmp_path / "a")
    refused = without.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [[64, 2579]]})
    assert "MMEMBED_REMOTE_TOKENIZER_DIR" in api_error(refused, 400, "token_arrays_unsupported", "input")
    folder = tmp_path / "tokenizers"
    folder.mkdir()
    [ranks] = [p for p in cached.iterdir() if p.stat().st_size > 1_000_000]  # the one file the setup puts there
    (folder / "cl100k_base.tiktoken").write_bytes(ranks.read_bytes())
    monkeypatch.setenv("MMEMBED_REMOTE_TOKENIZER_DIR", str(folder))
    ids = tiktoken.get_encoding("cl100k_base").encode("a red circle")
    data = client_for(tmp_path / "b").post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [ids]}).json()
    assert np.allclose(data["data"][0]["embedding"], unit_vector(12, "all-MiniLM-L6-v2", "a red circle"))

"""The HTTP API on a real Ray Serve: every endpoint, the official openai client, error codes."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from ray import serve

from mmembed.demo.speech import espeak_wav
from mmembed.encoders import LoadedModel, Modality
from mmembed.serve.app import build_app

MODELS = [
    {"name": "demo-clip", "batch": {"max_batch_size": 8}},
    {"name": "all-MiniLM-L6-v2"},
    {"name": "bind", "batch": {"max_batch_size": 4}},
]


@pytest.fixture(scope="module")
def api(ray_cluster: int) -> str:
    # The media tests fetch from a server on this machine, which the default address policy refuses.
    args = {"models": MODELS, "max_body_bytes": 2_000_000, "env": {"MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1"}}
    serve.run(build_app(args), name="mmembed", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster}"
    serve.delete("mmembed")


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "PNG")
    return buf.getvalue()


def test_health_readiness_and_models(api: str):
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz", timeout=30).json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"demo-clip", "all-MiniLM-L6-v2", "bind"}
    models = {m["name"]: m for m in httpx.get(f"{api}/models", timeout=30).json()["data"]}
    assert models["demo-clip.image"]["dim"] == 128 and models["demo-clip.image"]["limits"]["image_size"] == 64
    assert models["all-MiniLM-L6-v2.text"]["limits"]["max_tokens"] == 256
    assert models["bind.audio"]["limits"]["max_seconds"] == 600


def test_by_default_no_key_is_needed_and_no_other_origin_may_call(api: str):
    """No keys configured: open, as a local tool on 127.0.0.1 is; CORS stays off regardless."""
    headers = {"origin": "https://elsewhere.example", "access-control-request-method": "POST"}
    preflight = httpx.options(f"{api}/v1/embeddings", headers=headers)
    assert "access-control-allow-origin" not in preflight.headers
    answer = httpx.post(
        f"{api}/v1/embeddings", json={"model": "demo-clip", "input": "x"}, headers={"origin": headers["origin"]}
    )
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_openai_client_round_trip(api: str, minilm: LoadedModel):
    client = OpenAI(base_url=f"{api}/v1", api_key="unused")
    texts = ["a red circle", "the weather is nice today"]
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    local = minilm.encoder(Modality.TEXT).encode_items(texts)
    for item, mine in zip(response.data, local, strict=True):
        assert np.allclose(item.embedding, mine.vector, atol=1e-5)
    assert response.usage.prompt_tokens == sum(r.info["tokens"] for r in local)
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input="a red circle", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, local[0].vector, atol=1e-5)


def test_embeddings_accept_image_data_uris(api: str, demo_clip: LoadedModel):
    uri = "data:image/png;base64," + base64.b64encode(_png((220, 30, 30))).decode()
    body = {"model": "demo-clip", "input": ["a red circle", uri], "encoding_format": "float"}
    data = httpx.post(f"{api}/v1/embeddings", json=body, timeout=60).json()["data"]
    [local] = demo_clip.encoder(Modality.IMAGE).encode_items([Image.open(io.BytesIO(_png((220, 30, 30))))])
    assert np.allclose(data[1]["embedding"], local.vector, atol=1e-5)
    assert len(data[0]["embedding"]) == 128


def test_native_image_endpoints_return_good_items_beside_bad_ones(api: str):
    good = base64.b64encode(_png((30, 70, 220))).decode()
    body = {"model": "demo-clip", "items": [good, base64.b64encode(b"not an image").decode()]}
    data = httpx.post(f"{api}/encode/image", json=body, timeout=60).json()["data"]
    assert len(data[0]["embedding"]) == 128 and data[1]["error"]["code"] == "not_an_image"
    files = [("files", ("a.png", _png((1, 2, 3)), "image/png")), ("files", ("b.png", _png((9, 9, 9)), "image/png"))]
    upload = httpx.post(f"{api}/encode/image/upload", params={"model": "demo-clip"}, files=files, timeout=60)
    assert [len(d["embedding"]) for d in upload.json()["data"]] == [128, 128]


def test_audio_endpoint(api: str):
    wav = base64.b64encode(espeak_wav("a red circle")).decode()
    data = httpx.post(f"{api}/encode/audio", json={"model": "bind", "items": [wav]}, timeout=120).json()["data"]
    assert len(data[0]["embedding"]) == 128 and data[0]["info"]["seconds"] > 0.5


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ["ok", ""]}, 400, "empty_input"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": [[1, 2, 10**6]]}, 400, "invalid_token_ids"),
        ("/v1/embeddings", {"model": "demo-clip", "input": "x", "dimensions": 64}, 400, "dimensions_unsupported"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2"}, 400, "invalid_request"),
        ("/encode/image", {"model": "demo-clip", "items": ["%%%"]}, 422, "invalid_base64"),
        ("/encode/audio", {"model": "all-MiniLM-L6-v2", "items": ["AAAA"]}, 422, "unsupported_modality"),
    ],
)
def test_errors_are_json_with_stable_codes(api: str, path: str, body: dict, status: int, code: str):
    response = httpx.post(f"{api}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_bodies_over_the_limit_get_413(api: str):
    response = httpx.post(f"{api}/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["x" * 3_000_000]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_a_chunked_body_over_the_limit_gets_413_and_under_it_is_read(api: str):
    """No Content-Length (chunked transfer): the limit is counted as the body arrives."""
    big = (b"x" * 65536 for _ in range(40))  # 2.6 MB against the app's 2 MB
    refused = httpx.post(f"{api}/encode/text", content=big, headers={"content-type": "application/json"})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "body_too_large"
    body = json.dumps({"model": "demo-clip", "texts": ["a red circle"]}).encode()
    chunks = (body[i : i + 7] for i in range(0, len(body), 7))
    chunked = httpx.post(f"{api}/encode/text", content=chunks, headers={"content-type": "application/json"})
    assert chunked.status_code == 200 and chunked.json()["data"][0]["error"] is None


def test_text_over_the_character_limit_fails_alone(api: str):
    texts = ["a red circle", "x" * 100_001]
    data = httpx.post(f"{api}/encode/text", json={"model": "demo-clip", "texts": texts}).json()["data"]
    assert data[0]["error"] is None and len(data[0]["embedding"]) == 128
    assert data[1]["embedding"] is None and data[1]["error"]["code"] == "text_too_long"
    refused = httpx.post(f"{api}/v1/embeddings", json={"model": "demo-clip", "input": ["ok", "y" * 100_001]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "text_too_long"


def test_over_long_texts_say_they_were_truncated(api: str):
    """MMEMBED_TOKEN_POLICY=truncate (the default): the embedding object says so, as OpenAI would refuse."""
    long = " ".join(["a red circle"] * 200)  # 600 words, over MiniLM's 256 tokens
    body = {"model": "all-MiniLM-L6-v2", "input": [long, "short"]}
    data = httpx.post(f"{api}/v1/embeddings", json=body, timeout=60).json()["data"]
    assert data[0]["truncated_tokens"] > 300 and "truncated_tokens" not in data[1]


def test_metrics_count_items_and_ray_exports_the_batches(ray_cluster, api: str):
    """Our series count items and requests; batch sizes and times are Ray Serve's own, per deployment."""
    import ray

    httpx.post(f"{api}/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["metrics probe"]}, timeout=60)
    text = httpx.get(f"{api}/metrics").text
    assert 'mmembed_items_total{modality="text",model="all-MiniLM-L6-v2"}' in text
    assert 'mmembed_requests_total{endpoint="/encode/text",method="POST",status="200"}' in text
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ("ray_serve_actual_batch_size", 'deployment="encoder-all-MiniLM-L6-v2"', 'function_name="_batch_text"')
    deadline = time.monotonic() + 90  # Ray's agent exports on its own interval
    while time.monotonic() < deadline:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        if any(all(w in line for w in wanted) for line in lines):
            break
        time.sleep(1)
    else:
        batches = [x for x in lines if "serve_batch" in x][:5]
        pytest.fail(f"Ray exported no batch sizes for the model; its batch series: {batches}")


def test_concurrent_http_requests_share_batches(api: str):
    import asyncio

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:
            requests = [
                client.post(f"{api}/encode/text", json={"model": "demo-clip", "texts": [f"a red star {i}"]})
                for i in range(24)
            ]
            return [r.json()["data"][0] for r in await asyncio.gather(*requests)]

    sizes = [d["info"]["batch_size"] for d in asyncio.run(burst())]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes  # demo-clip's max_batch_size above


def test_langchain_openai_embeddings_work_unchanged(api: str, minilm: LoadedModel):
    """LangChain's defaults: cl100k token ids (tiktoken), 1,000 inputs a request, long texts split."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model="all-MiniLM-L6-v2", base_url=f"{api}/v1", api_key="unused")
    texts = [f"a red circle number {i}" for i in range(3000)]
    vectors = embeddings.embed_documents(texts)
    assert len(vectors) == 3000
    probe = [0, 1234, 2999]
    local = minilm.encoder(Modality.TEXT).encode_items([texts[i] for i in probe])
    for i, mine in zip(probe, local, strict=True):
        assert np.allclose(vectors[i], mine.vector, atol=1e-5)
    query = embeddings.embed_query("a red circle number 0")
    assert np.allclose(query, local[0].vector, atol=1e-5)


def test_openai_client_lists_models_and_raises_its_own_errors(api: str):
    import openai

    client = OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"demo-clip", "all-MiniLM-L6-v2", "bind"}
    assert client.models.retrieve("demo-clip").owned_by == "mmembed"
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input="x")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["ok", ""])
    assert empty.value.code == "empty_input" and empty.value.type == "invalid_request_error"
    assert "input[1]" in empty.value.message


def test_a_full_queue_answers_429_with_retry_after(ray_cluster, api: str):
    import asyncio

    tight = {"models": [{"name": "demo-clip", "batch": {"max_batch_size": 1}, "max_queued_requests": 1}]}
    serve.run(build_app(tight), name="tight", route_prefix="/tight")
    image = base64.b64encode(_png((200, 10, 10))).decode()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "demo-clip", "items": [image]}
            return list(await asyncio.gather(*(client.post(f"{api}/tight/encode/image", json=body) for _ in range(40))))

    try:
        responses = asyncio.run(burst())
    finally:
        serve.delete("tight")
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses  # some served, the overflow refused; never a 5xx or a hang
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["code"] == "overloaded"


def test_a_full_ingress_queue_answers_429_with_retry_after(ray_cluster, api: str):
    """Past the ingress's own queue, Serve's proxy refuses instead of queueing without bound."""
    import asyncio

    narrow = {
        "models": [{"name": "demo-clip", "batch": {"max_batch_size": 1}}],
        "ingress_max_ongoing_requests": 1,
        "ingress_max_queued_requests": 1,
    }
    serve.run(build_app(narrow), name="narrow", route_prefix="/narrow")
    image = base64.b64encode(_png((10, 200, 10))).decode()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "demo-clip", "items": [image]}
            calls = (client.post(f"{api}/narrow/encode/image", json=body) for _ in range(30))
            return list(await asyncio.gather(*calls))

    try:
        responses = asyncio.run(burst())
    finally:
        serve.delete("narrow")
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    assert next(r for r in responses if r.status_code == 429).headers["Retry-After"] == "1"


@pytest.fixture(scope="module")
def media_site() -> str:
    """A real local HTTP server with one image, one web page, and nothing else."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = _png((220, 30, 30))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, ctype = {"/red.png": (png, "image/png"), "/page": (b"<html></html>", "text/html")}.get(
                self.path, (b"", "")
            )
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", ctype or "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_media_by_url_each_failure_its_own_code(api: str, media_site: str, demo_clip: LoadedModel):
    items = [f"{media_site}/red.png", f"{media_site}/page", f"{media_site}/missing", "http://127.0.0.1:9/none"]
    data = httpx.post(f"{api}/encode/image", json={"model": "demo-clip", "items": items}, timeout=60).json()["data"]
    [local] = demo_clip.encoder(Modality.IMAGE).encode_items([Image.open(io.BytesIO(_png((220, 30, 30))))])
    assert np.allclose(data[0]["embedding"], local.vector, atol=1e-5)
    assert [d["error"]["code"] for d in data[1:]] == ["url_wrong_type", "url_status", "url_unreachable"]
    body = {"model": "demo-clip", "modality": "image", "input": [f"{media_site}/red.png"], "encoding_format": "float"}
    embedded = httpx.post(f"{api}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]
    assert np.allclose(embedded, local.vector, atol=1e-5)

"""The hostile-input corpus (tests/hostile.py) against every HTTP endpoint of a real Ray Serve app.

Each endpoint must answer every hostile input with its documented JSON error (or a vector, for the
inputs that are odd but valid), return the good items of a batch beside the bad ones, never answer
5xx, and leave the server healthy: the last test checks that no replica died or restarted.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
import ray
from hostile import (
    DECODES,
    Hostile,
    encode_audio,
    encode_image,
    hostile_audio,
    hostile_base64,
    hostile_images,
    hostile_texts,
    noisy_image,
    tone,
)
from PIL import Image
from ray import serve

from mmembed.encoders import LoadedModel, Modality
from mmembed.serve.app import build_app

APP = "hostile"
MAX_TEXT_CHARS = 100_000
MODELS = [{"name": "demo-clip"}, {"name": "all-MiniLM-L6-v2"}, {"name": "bind", "batch": {"max_batch_size": 4}}]
IMAGES, AUDIO, TEXTS, BASE64 = hostile_images(), hostile_audio(), hostile_texts(), hostile_base64()
GOOD_IMAGE = encode_image(noisy_image(seed=42), "PNG")
GOOD_AUDIO = encode_audio(tone(1.0), 16_000, "FLAC")
JSON_ENDPOINTS = ["/v1/embeddings", "/encode/text", "/encode/image", "/encode/audio", "/search", "/ingest"]


def _replicas() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"::{APP}#" in a["name"]}


@pytest.fixture(scope="module")
def api(ray_cluster: int) -> Iterator[str]:
    args = {
        "models": MODELS,
        "max_body_bytes": 32_000_000,
        "max_text_chars": MAX_TEXT_CHARS,
        "env": {"MMEMBED_COLLECTION": "hostile"},
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    url = f"http://127.0.0.1:{ray_cluster}/{APP}"
    assert httpx.get(f"{url}/readyz", timeout=120).json()["status"] == "ready"
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def replicas_at_start(api: str) -> set[str]:
    names = _replicas()
    assert len(names) == len(MODELS) + 2  # the encoders, the catalogue and the ingress
    return names


def _post(url: str, body: object, timeout: float = 120) -> httpx.Response:
    """JSON with ASCII escapes, as most clients send it: httpx's own encoder cannot carry the
    corpus's lone surrogates, which JSON allows as ``\\ud800``."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=timeout)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def _expected(h: Hostile, text: bool = False) -> frozenset[str]:
    """What the API may answer: the corpus's codes, and the API's own text length limit."""
    if text and isinstance(h.data, str) and len(h.data) > MAX_TEXT_CHARS:
        return frozenset({"text_too_long"})
    return h.codes


def _check_items(corpus: list[Hostile], data: list[dict], text: bool = False) -> None:
    """``data`` answers [good, *corpus, good]: each hostile item its own outcome, the good ones vectors."""
    assert len(data) == len(corpus) + 2
    assert data[0]["error"] is None and data[-1]["error"] is None
    assert np.allclose(data[0]["embedding"], data[-1]["embedding"], atol=1e-5)
    wrong = {}
    for h, d in zip(corpus, data[1:-1], strict=True):
        expected = _expected(h, text)
        if d["error"] is None:
            if DECODES not in expected or not d["embedding"]:
                wrong[h.name] = "vector"
        elif d["error"]["code"] not in expected or not d["error"]["message"]:
            wrong[h.name] = d["error"]
    assert not wrong, wrong


def _check_refusal(answer: httpx.Response, h: Hostile, text: bool = False) -> None:
    """A one-item request: a vector (200) when the input may decode, else 422 (400 on OpenAI's
    endpoint) with one of its codes."""
    expected = _expected(h, text)
    if answer.status_code == 200:
        assert DECODES in expected, (h.name, answer.text[:200])
    else:
        refused = 400 if "/v1/" in str(answer.url) else 422
        assert answer.status_code == refused, (h.name, answer.status_code, answer.text[:300])
        assert answer.json()["error"]["code"] in expected, (h.name, answer.json())


def test_a_batch_of_hostile_images_returns_the_good_ones(api: str, replicas_at_start, demo_clip: LoadedModel):
    items = [_b64(GOOD_IMAGE), *(_b64(h.data) for h in IMAGES), _b64(GOOD_IMAGE)]
    answer = httpx.post(f"{api}/encode/image", json={"model": "demo-clip", "items": items}, timeout=300)
    assert answer.status_code == 200, answer.text[:300]
    data = answer.json()["data"]
    _check_items(IMAGES, data)
    [local] = demo_clip.encoder(Modality.IMAGE).encode_items([Image.open(io.BytesIO(GOOD_IMAGE))])
    assert np.allclose(data[0]["embedding"], local.vector, atol=1e-5)


def test_hostile_image_uploads_fail_alone(api: str, replicas_at_start):
    files = [("files", (f"{h.name}.jpg", h.data, "image/jpeg")) for h in IMAGES]
    good = ("files", ("good.png", GOOD_IMAGE, "image/png"))
    answer = httpx.post(
        f"{api}/encode/image/upload", params={"model": "demo-clip"}, files=[good, *files, good], timeout=300
    )
    assert answer.status_code == 200, answer.text[:300]
    _check_items(IMAGES, answer.json()["data"])


def test_hostile_base64_and_data_uris_fail_alone(api: str, replicas_at_start):
    items = [_b64(GOOD_IMAGE), *(h.data for h in BASE64), _b64(GOOD_IMAGE)]
    answer = httpx.post(f"{api}/encode/image", json={"model": "demo-clip", "items": items}, timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    _check_items(BASE64, answer.json()["data"])
    for h in BASE64:  # all or nothing on the OpenAI endpoint: each alone
        body = {"model": "demo-clip", "modality": "image", "input": h.data}
        _check_refusal(httpx.post(f"{api}/v1/embeddings", json=body, timeout=60), h)


def test_a_batch_of_hostile_audio_returns_the_good_ones(api: str, replicas_at_start):
    items = [_b64(GOOD_AUDIO), *(_b64(h.data) for h in AUDIO), _b64(GOOD_AUDIO)]
    answer = httpx.post(f"{api}/encode/audio", json={"model": "bind", "items": items}, timeout=600)
    assert answer.status_code == 200, answer.text[:300]
    _check_items(AUDIO, answer.json()["data"])


@pytest.mark.parametrize("model", ["demo-clip", "all-MiniLM-L6-v2"])
def test_a_batch_of_hostile_texts_returns_the_good_ones(api: str, replicas_at_start, model: str):
    texts = ["a red circle", *(h.data for h in TEXTS), "a red circle"]
    answer = _post(f"{api}/encode/text", {"model": model, "texts": texts}, timeout=300)
    assert answer.status_code == 200, answer.text[:300]
    _check_items(TEXTS, answer.json()["data"], text=True)
    for h in TEXTS:
        _check_refusal(_post(f"{api}/v1/embeddings", {"model": model, "input": h.data}), h, text=True)


def test_hostile_queries_on_search_are_refused_with_their_codes(api: str, replicas_at_start):
    for h in TEXTS:
        _check_refusal(_post(f"{api}/search", {"text": h.data}), h, text=True)
    for h in IMAGES:
        _check_refusal(httpx.post(f"{api}/search", json={"image": _b64(h.data)}, timeout=120), h)
    for h in BASE64:
        _check_refusal(httpx.post(f"{api}/search", json={"image": h.data}, timeout=120), h)
    for h in AUDIO:
        _check_refusal(httpx.post(f"{api}/search", json={"audio": _b64(h.data)}, timeout=300), h)


def _count(api: str) -> int:
    return httpx.get(f"{api}/catalog", timeout=60).json()["count"]


def test_hostile_items_are_refused_and_add_nothing(api: str, replicas_at_start):
    before = _count(api)
    bad = [("image", h) for h in IMAGES if DECODES not in h.codes] + [
        ("audio", h) for h in AUDIO if DECODES not in h.codes
    ]
    for kind, h in bad:
        answer = httpx.post(f"{api}/items", files={"file": (h.name, h.data)}, data={"kind": kind}, timeout=120)
        assert answer.status_code == 422 and answer.json()["error"]["code"] in h.codes, (h.name, answer.text[:300])
    assert _count(api) == before
    added = httpx.post(f"{api}/items", files={"file": ("good.png", GOOD_IMAGE)}, timeout=120)
    assert added.status_code == 201 and _count(api) == before + 1


MALFORMED = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"text"',
    b"\xff\xfe\x00",
    b'{"model": 5}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "demo-clip", "input": NaN, "texts": Infinity}',
    b'{"model": "demo-clip"' + b" " * 1000,
]


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_malformed_json_is_refused_with_a_code(api: str, replicas_at_start, path: str):
    for body in MALFORMED:
        answer = httpx.post(f"{api}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert answer.status_code in (400, 422), (body[:40], answer.status_code, answer.text[:200])
        assert answer.json()["error"]["code"] == "invalid_request"
    form = httpx.post(f"{api}{path}", data={"model": "demo-clip"}, timeout=60)  # a form where JSON is expected
    refused = 400 if path.startswith("/v1/") else 422
    assert form.status_code == refused and form.json()["error"]["code"] == "invalid_request"


WRONG_TYPES = [
    ("/encode/text", {"model": "demo-clip", "texts": "not a list"}, 422, "invalid_request"),
    ("/encode/text", {"model": ["demo-clip"], "texts": ["a"]}, 422, "invalid_request"),
    ("/encode/text", {"model": "demo-clip", "texts": [1, 2]}, 422, "invalid_request"),
    ("/encode/text", {"model": "demo-clip", "texts": []}, 422, "invalid_request"),
    ("/encode/text", {"model": "no-such-model", "texts": ["a"]}, 404, "model_not_found"),
    ("/encode/image", {"model": "demo-clip", "items": [{"url": "x"}]}, 422, "invalid_request"),
    ("/encode/audio", {"model": "demo-clip", "items": [_b64(GOOD_AUDIO)]}, 422, "unsupported_modality"),
    ("/encode/image", {"model": "all-MiniLM-L6-v2", "items": [_b64(GOOD_IMAGE)]}, 422, "unsupported_modality"),
    ("/v1/embeddings", {"model": "demo-clip", "input": [[1, 2], [-3]]}, 400, "invalid_token_ids"),
    ("/v1/embeddings", {"model": "demo-clip", "input": []}, 400, "empty_input"),
    ("/v1/embeddings", {"model": "demo-clip", "input": "x", "dimensions": 7}, 400, "dimensions_unsupported"),
    ("/v1/embeddings", {"model": "demo-clip", "input": "x", "encoding_format": "int8"}, 400, "invalid_request"),
    ("/v1/embeddings", {"model": "demo-clip", "input": {"text": "x"}}, 400, "invalid_request"),
    ("/search", {"text": "x", "image": _b64(GOOD_IMAGE)}, 422, "invalid_request"),
    ("/search", {}, 422, "invalid_request"),
    ("/search", {"text": "x", "top_k": -1}, 422, "invalid_request"),
    ("/search", {"text": "x", "top_k": 10**30}, 422, "invalid_request"),
    ("/search", {"text": "x", "filter": "kind = image"}, 422, "invalid_request"),
    ("/search", {"text": "x", "filter": {"kind": {"$where": "1"}}}, 422, "invalid_search"),
    ("/search", {"text": "x", "vector": "no-such.vector"}, 422, "no_route"),
    ("/search", {"item_id": "../../etc/passwd"}, 404, "item_not_found"),
    ("/ingest", {"source": "/etc"}, 403, "path_forbidden"),
    ("/ingest", {"source": "../../../../etc/passwd"}, 403, "path_forbidden"),
    ("/ingest", {"source": "x", "models": ["no-such-model"]}, 422, "model_not_found"),
    ("/ingest", {"source": 5}, 422, "invalid_request"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), WRONG_TYPES, ids=lambda v: str(v)[:40])
def test_wrong_types_and_values_get_their_documented_codes(api: str, replicas_at_start, path, body, status, code):
    answer = httpx.post(f"{api}{path}", json=body, timeout=60)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text[:300]


WEIRD_IDS = ["..%2F..%2Fetc%2Fpasswd", "%00", "a" * 5000, "%F0%9F%92%A5", "'%20OR%201=1%20--", "%ff%fe", "a/" * 300]


@pytest.mark.parametrize(
    "route",
    [
        "GET /items/{}",
        "DELETE /items/{}",
        "GET /jobs/{}",
        "GET /jobs/{}/dead-letters",
        "GET /objects/{}",
        "GET /objects/{}/x.png",
    ],
)
def test_hostile_ids_in_paths_are_404s(api: str, replicas_at_start, route: str):
    method, path = route.split(" ")
    for weird in WEIRD_IDS:
        answer = httpx.request(method, f"{api}{path.format(weird)}", timeout=60)
        assert answer.status_code in (404, 422), (weird[:20], answer.status_code, answer.text[:200])
        assert "error" in answer.json()


def test_a_schemathesis_fuzz_run_finds_no_server_error(api: str, replicas_at_start, tmp_path: Path):
    """Inputs generated from the OpenAPI spec, valid and not, for every operation, in bounded time."""
    report = tmp_path / "junit.xml"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{api}/openapi.json",
        "--url",
        api,
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "25",
        "--max-time",
        "120",
        "--request-timeout",
        "60",
        "--workers",
        "1",
        "--seed",
        "7",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        "--no-color",
    ]
    # One worker: CPython 3.11's AST constructor keeps its recursion counter per interpreter, so two
    # schemathesis threads parsing lambdas at once can fail with "recursion depth mismatch" (CI did).
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache too
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases = ElementTree.parse(report).getroot()
    assert int(cases.get("tests", 0)) >= 15  # every operation was exercised


def test_the_server_stays_healthy_and_no_replica_restarted(api: str, replicas_at_start: set[str]):
    """Last in this module on purpose: after all of the above, the same replicas still serve."""
    assert httpx.get(f"{api}/healthz", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{api}/readyz", timeout=30).json()["status"] == "ready"
    answer = httpx.post(f"{api}/encode/text", json={"model": "demo-clip", "texts": ["still here"]}, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 128
    assert _replicas() == replicas_at_start
    statuses = serve.status().applications[APP].deployments
    assert {d.status for d in statuses.values()} == {"HEALTHY"}, statuses
    assert json.loads(httpx.get(f"{api}/jobs", timeout=30).text)["data"] is not None

"""Remote providers and the server, both ways round, on a real Ray Serve:

- a real mmembed server as the remote: its OpenAI-compatible /v1/embeddings (all-MiniLM-L6-v2)
  used through the remote encoder gives the local model's vectors;
- the encode API serving remote models: an app whose model list names a remote model on the
  stub provider, and another that names the mmembed server above, answering /v1/embeddings
  and /encode/text with the providers' vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from ray import serve
from remote_stub import StubProvider, stub_vector

from mmembed.config import RemoteModelConfig, Settings
from mmembed.encoders import LoadedModel, Modality, load
from mmembed.encoders.remote import RemoteEncoder
from mmembed.serve.app import build_app

TEXTS = ["a red circle", "the weather is nice today", "a small blue square at the top left"]


def _origin(api: str) -> dict:
    """The mmembed server of the 'remote-origin' app, as a remote model (no key: it runs open)."""
    return {
        "name": "origin-minilm",
        "base_url": f"{api}/origin/v1",
        "model": "all-MiniLM-L6-v2",
        "dim": 384,
        "max_tokens": 256,
        "timeout_s": 60.0,
    }


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProvider]:
    with StubProvider(dim=24) as provider:
        yield provider


@pytest.fixture(scope="module")
def api(ray_cluster: int, stub: StubProvider) -> Iterator[str]:
    base = f"http://127.0.0.1:{ray_cluster}"
    origin = {"models": [{"name": "all-MiniLM-L6-v2"}], "env": {"MMEMBED_COLLECTION": "remote-origin"}}
    serve.run(build_app(origin), name="remote-origin", route_prefix="/origin")
    dead = {
        "name": "dead-remote",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "gone",
        "dim": 8,
        "max_attempts": 2,
        "backoff_s": 0.01,
        "timeout_s": 5.0,
    }  # nothing listens on port 9
    remote_models = [stub.config("stub-remote", backoff_s=0.01), _origin(base), dead]
    env = {
        "MMEMBED_COLLECTION": "remote-api",
        "MMEMBED_REMOTE_MODELS": json.dumps(remote_models),
        "STUB_API_KEY": stub.key or "",
    }
    models = [{"name": n, "num_cpus": 0.25} for n in ("stub-remote", "origin-minilm", "dead-remote")]
    serve.run(build_app({"models": models, "env": env}), name="remote-api", route_prefix="/remote-api")
    yield base
    serve.delete("remote-api")
    serve.delete("remote-origin")


def test_a_real_mmembed_server_as_the_remote_gives_the_local_models_vectors(api, minilm: LoadedModel, settings):
    config = RemoteModelConfig.model_validate(_origin(api))
    enc = load(config.name, settings.model_copy(update={"remote_models": [config]}).models_config()).encoder("text")
    assert isinstance(enc, RemoteEncoder)
    remote = enc.encode_items(TEXTS)
    local = minilm.encoder(Modality.TEXT).encode_items(TEXTS)
    for r, mine in zip(remote, local, strict=True):
        assert r.vector is not None and np.allclose(r.vector, mine.vector, atol=1e-4)
    # the server reports the tokens its own tokenizer counted: that is what the meter bills
    assert enc.meter.total.tokens_billed == sum(m.info["tokens"] for m in local)
    assert enc.meter.total.tokens_counted >= enc.meter.total.tokens_billed  # the estimate never under-counts


def test_the_encode_api_serves_a_remote_model_on_the_stub(api, stub: StubProvider):
    before = stub.delivered.copy()
    body = {"model": "stub-remote", "input": TEXTS, "encoding_format": "float"}
    answer = httpx.post(f"{api}/remote-api/v1/embeddings", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    for text, item in zip(TEXTS, answer.json()["data"], strict=True):
        expected = stub_vector(text, 24)
        assert np.allclose(item["embedding"], expected / np.linalg.norm(expected), atol=1e-6)
    assert answer.json()["usage"]["prompt_tokens"] == sum(len(t.encode()) + 2 for t in TEXTS)
    native = httpx.post(
        f"{api}/remote-api/encode/text", json={"model": "stub-remote", "texts": ["a red circle"]}, timeout=60
    ).json()
    info = native["data"][0]["info"]
    assert info["token_count"] == "estimate:utf8-bytes+2" and info["truncated_tokens"] == 0
    assert stub.delivered - before == {**dict.fromkeys(TEXTS, 1), "a red circle": 2}
    models = {m["name"]: m for m in httpx.get(f"{api}/remote-api/models", timeout=30).json()["data"]}
    assert models["stub-remote.text"]["dim"] == 24


def test_the_encode_api_serves_another_mmembed_server_as_a_model(api, minilm: LoadedModel):
    body = {"model": "origin-minilm", "input": TEXTS, "encoding_format": "float"}
    answer = httpx.post(f"{api}/remote-api/v1/embeddings", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    local = minilm.encoder(Modality.TEXT).encode_items(TEXTS)
    for item, mine in zip(answer.json()["data"], local, strict=True):
        assert np.allclose(item["embedding"], mine.vector, atol=1e-4)


def test_a_provider_that_is_down_is_a_502_not_the_clients_fault(api):
    for path, body in [
        ("/encode/text", {"model": "dead-remote", "texts": ["a", "b"]}),
        ("/v1/embeddings", {"model": "dead-remote", "input": "a"}),
    ]:
        answer = httpx.post(f"{api}/remote-api{path}", json=body, timeout=60)
        assert answer.status_code == 502 and answer.json()["error"]["code"] == "provider_failed", answer.text


def test_the_settings_the_replicas_read_name_the_remote_models(stub: StubProvider, monkeypatch, tmp_path):
    """What the replicas above do: MMEMBED_REMOTE_MODELS from the environment, the key from its variable."""
    monkeypatch.setenv("MMEMBED_REMOTE_MODELS", json.dumps([stub.config("stub-remote")]))
    monkeypatch.setenv("STUB_API_KEY", stub.key or "")
    enc = load("stub-remote", Settings(data_dir=tmp_path).models_config()).encoder("text")
    assert isinstance(enc, RemoteEncoder) and enc.url == f"{stub.url}/v1/embeddings"

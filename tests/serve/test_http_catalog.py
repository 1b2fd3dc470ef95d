"""The catalogue, bulk jobs and pages over HTTP, in-process over a fake backend (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from fake_backend import TRANSCRIPT, FakeBackend
from fastapi.testclient import TestClient
from http_app import MODELS, PNG, WAV, api_error, b64, client_for

from mmembed.contracts import EncodedItem, ItemError, MigrationRefused, PathForbidden, Query, TooManyJobs
from mmembed.store.objects import LocalObjects
from mmembed.store.switching import MigrationRunning

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
    api_error(client.get(f"/items/{item['id']}"), 404, "item_not_found")
    api_error(client.delete(f"/items/{item['id']}"), 404, "item_not_found")


def test_audio_items_get_their_transcript_embedded(client: TestClient) -> None:
    added = client.post("/items", files={"file": ("a.wav", WAV, "audio/wav")}).json()
    assert added["vectors"] == ["all-MiniLM-L6-v2.text", "demo-clip.text", "whisper-base.audio"]
    assert added["payload"]["transcript"] == TRANSCRIPT and added["payload"]["kind"] == "audio"


def test_item_forms_are_checked(client: TestClient) -> None:
    api_error(client.post("/items", data={"caption": "x"}), 422, "invalid_request")
    both = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"url": "http://x/a.png"})
    api_error(both, 422, "invalid_request")
    bad_meta = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"meta": "[1]"})
    api_error(bad_meta, 422, "invalid_meta")
    api_error(client.post("/items", files={"file": ("a.png", b"junk", "image/png")}), 422, "not_an_image")


def test_search_routes_queries_into_the_vector_searched(tmp_path: Path, backend: FakeBackend) -> None:
    client = client_for(tmp_path, backend, root_path="/app")
    red = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"caption": "red"}).json()
    client.post("/items", files={"file": ("b.png", PNG + b"b", "image/png")})
    found = client.post("/search", json={"text": "a red circle", "top_k": 5}).json()
    assert (found["vector"], found["model"], found["route"]) == ("demo-clip.image", "demo-clip", "direct")
    assert found["query"] == {"modality": "text"} and len(found["hits"]) == 2
    assert all(h["url"].startswith("/app/objects/") for h in found["hits"])  # under the mount point
    heard = client.post("/search", json={"audio": b64(WAV), "route": "transcript"}).json()
    assert heard["query"] == {"modality": "audio", "transcript": TRANSCRIPT} and heard["model"] == "demo-clip"
    like = client.post("/search", json={"item_id": red["id"]}).json()
    assert [h["id"] for h in like["hits"]] != [] and red["id"] not in [h["id"] for h in like["hits"]]


def test_a_fused_search_ranks_over_an_items_vectors_each_queried_by_its_own_model(client, backend) -> None:
    red = client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"caption": "red"}).json()
    client.post("/items", files={"file": ("b.png", PNG + b"b", "image/png")}, data={"caption": "blue"})
    backend.encode_calls.clear()
    fused = client.post("/search", json={"text": "red", "fuse": True, "top_k": 5})
    assert fused.status_code == 200, fused.text
    body = fused.json()
    # Every vector a text query can search: the image, both caption vectors, and speech (by its transcript's space).
    assert set(body["vectors"]) == {"demo-clip.image", "demo-clip.text", "all-MiniLM-L6-v2.text", "whisper-base.audio"}
    assert body["models"]["all-MiniLM-L6-v2.text"] == "all-MiniLM-L6-v2" and body["fusion"] == "dbsf"
    assert sorted(m for m, _, _ in backend.encode_calls) == ["all-MiniLM-L6-v2", "demo-clip"]  # once per model
    assert len(body["hits"]) == 2 and all(
        set(h["matched"]) == set(body["vectors"]) - {"whisper-base.audio"} for h in body["hits"]
    )
    named = {"text": "red", "vectors": ["demo-clip.image", "all-MiniLM-L6-v2.text"], "fusion": "rrf"}
    two = client.post("/search", json=named).json()
    assert two["vectors"] == named["vectors"] and two["fusion"] == "rrf"
    like = client.post("/search", json={"item_id": red["id"], "fuse": True}).json()
    assert red["id"] not in [h["id"] for h in like["hits"]] and len(like["vectors"]) == 3
    bad = {"image": b64(PNG), "vectors": ["all-MiniLM-L6-v2.text"]}
    api_error(client.post("/search", json=bad), 422, "no_route")
    api_error(
        client.post("/search", json={"text": "red", "fuse": True, "vector": "demo-clip.image"}), 422, "invalid_request"
    )
    api_error(client.post("/search", json={"text": "red", "fuse": True, "via": "demo-clip"}), 422, "invalid_request")


def test_a_fused_search_goes_on_without_a_model_that_cannot_take_the_query(client, backend, monkeypatch) -> None:
    client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"caption": "red"})
    encode = backend.encode

    async def refusing(model, modality, items):  # MiniLM refuses the query (say, its tokenizer cannot read it)
        if model == "all-MiniLM-L6-v2":
            return [EncodedItem(None, ItemError("unreadable", "cannot read this text"))]
        return await encode(model, modality, items)

    monkeypatch.setattr(backend, "encode", refusing)
    fused = client.post("/search", json={"text": "red", "fuse": True}).json()
    refused = "unreadable: text: cannot read this text"
    # MiniLM encodes for its own caption vector and for Whisper's transcripts: both are left out.
    assert fused["query"]["skipped"] == {"all-MiniLM-L6-v2.text": refused, "whisper-base.audio": refused}
    assert set(fused["vectors"]) == {"demo-clip.image", "demo-clip.text"} and fused["hits"]
    alone = client.post("/search", json={"text": "red", "vector": "all-MiniLM-L6-v2.text"})
    api_error(alone, 422, "unreadable")  # one vector: its model's refusal is the answer


def test_search_sends_its_text_as_a_query_and_items_their_captions_as_documents(
    tmp_path: Path, backend: FakeBackend
) -> None:
    """A text model with a query prompt (e5's "query: ") must see which texts are searches:
    the query and a spoken query's transcript arrive as ``Query``, a stored caption as plain text."""
    seen: list[tuple[str, str, type]] = []
    encode = backend.encode

    async def recording(model: str, modality: str, items: list) -> list:
        seen.extend((model, modality, type(i)) for i in items if isinstance(i, str))
        return await encode(model, modality, items)

    backend.encode = recording  # type: ignore[method-assign]
    client = client_for(tmp_path, backend)
    client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"caption": "red"})
    assert {t for _, m, t in seen if m == "text"} == {str}
    seen.clear()
    client.post("/search", json={"text": "a red circle", "vector": "all-MiniLM-L6-v2.text"})
    client.post("/search", json={"audio": b64(WAV), "route": "transcript"})
    assert seen == [("all-MiniLM-L6-v2", "text", Query), ("demo-clip", "text", Query)]


def test_search_refusals(client: TestClient) -> None:
    api_error(client.post("/search", json={"text": "a", "vector": "nope.image"}), 422, "no_route")
    api_error(client.post("/search", json={"image": b64(PNG), "vector": "whisper-base.audio"}), 422, "no_route")
    api_error(client.post("/search", json={"text": "a", "via": "nope"}), 422, "no_route")
    api_error(client.post("/search", json={"image": "%%%"}), 422, "invalid_base64")
    missing = "00000000-0000-0000-0000-000000000000"
    api_error(client.post("/search", json={"item_id": missing}), 404, "item_not_found")


def test_catalog_says_what_each_vector_can_be_searched_with(client: TestClient) -> None:
    info = client.get("/catalog").json()
    assert info["count"] == 0 and info["default_vector"] == "demo-clip.image" and info["models"] == MODELS
    assert info["vectors"]["demo-clip.image"] == {"dim": 16, "queries": ["text", "image", "audio:transcript"]}
    assert info["vectors"]["whisper-base.audio"]["queries"] == ["text", "audio", "audio:transcript"]


def test_a_collection_of_other_sizes_is_a_conflict(tmp_path: Path) -> None:
    client = client_for(tmp_path, FakeBackend(stored_layout={"demo-clip.image": 512}))
    api_error(client.get("/catalog"), 409, "dimension_mismatch")


def test_objects_are_served_from_the_local_store_only_inside_it(client: TestClient, tmp_path: Path) -> None:
    LocalObjects(tmp_path / "objects").put("ab/cd.png", PNG, "image/png")
    assert client.get("/objects/ab/cd.png").content == PNG
    api_error(client.get("/objects/ab/none.png"), 404, "not_found")
    api_error(client.get("/objects/../secret"), 404, "not_found")


# --- bulk jobs --------------------------------------------------------------------------------


def test_jobs_start_and_are_followed(client: TestClient) -> None:
    started = client.post("/ingest", json={"source": "/data/photos", "models": ["demo-clip"]})
    assert started.status_code == 202
    job = started.json()["id"]
    assert started.json()["status_url"] == f"/jobs/{job}"
    assert client.get(f"/jobs/{job}").json()["source"] == "/data/photos"
    assert [j["id"] for j in client.get("/jobs").json()["data"]] == [job]
    assert client.get(f"/jobs/{job}/dead-letters").json()["data"][0]["code"] == "not_an_image"
    api_error(client.get("/jobs/nope"), 404, "job_not_found")
    api_error(client.get("/jobs/nope/dead-letters"), 404, "job_not_found")
    api_error(client.post("/ingest", json={"source": "/x", "models": ["nope"]}), 422, "model_not_found")


def test_a_watching_job_is_stopped_by_delete(client: TestClient) -> None:
    watching = client.post("/ingest", json={"source": "/data/photos", "watch": True}).json()["id"]
    once = client.post("/ingest", json={"source": "/data/more"}).json()["id"]
    assert client.get(f"/jobs/{watching}").json()["status"] == "watching"
    stopped = client.delete(f"/jobs/{watching}")
    assert stopped.status_code == 202 and stopped.json() == {"id": watching, "stopping": True}
    assert client.get(f"/jobs/{watching}").json()["status"] == "stopped"
    assert "not watching" in api_error(client.delete(f"/jobs/{once}"), 409, "job_not_watching")
    api_error(client.delete("/jobs/nope"), 404, "job_not_found")


def test_jobs_refused_by_the_catalogue(client: TestClient, backend: FakeBackend) -> None:
    backend.next_start = PathForbidden("/etc is outside the folders jobs may read")
    assert "outside" in api_error(client.post("/ingest", json={"source": "/etc"}), 403, "path_forbidden")
    backend.next_start = TooManyJobs(2)
    busy = client.post("/ingest", json={"source": "/data"})
    assert api_error(busy, 429, "too_many_jobs").startswith("2 bulk jobs") and busy.headers["retry-after"] == "30"
    # What the fuzz test found: a path no system call can take is a 422, not a 500 from the catalogue.
    for unnameable in ("/data/a\x00b.png", "/data/\ud800.png", "  "):  # sent as JSON escapes, as the fuzzer does
        body = json.dumps({"source": unnameable})
        answer = client.post("/ingest", content=body, headers={"content-type": "application/json"})
        api_error(answer, 422, "invalid_request", param="source")


# --- model migration --------------------------------------------------------------------------


def test_a_migration_starts_as_a_job_and_searches_follow_the_collections_defaults(client, backend) -> None:
    started = client.post("/migrations", json={"to": "whisper-base", "from": "demo-clip"})
    assert started.status_code == 202, started.text
    assert client.get(started.json()["status_url"]).json()["source"] == "migrate:whisper-base"
    api_error(client.post("/migrations", json={"to": "nope"}), 422, "model_not_found")
    backend.next_start = MigrationRefused("2 jobs write the collection now; migrate once they end")
    refused = client.post("/migrations", json={"to": "demo-clip"})
    assert "2 jobs" in api_error(refused, 409, "migration_refused") and refused.headers["retry-after"].isdigit()
    backend.next_start = None

    client.post("/items", files={"file": ("a.png", PNG, "image/png")}, data={"caption": "red"})
    assert client.post("/search", json={"text": "red"}).json()["vector"] == "demo-clip.image"
    backend.defaults, backend.previous = {"image": "demo-clip.text"}, {"image": "demo-clip.image"}  # switched
    assert client.post("/search", json={"text": "red"}).json()["vector"] == "demo-clip.text"
    info = client.get("/catalog").json()
    assert info["default_vector"] == "demo-clip.text" and info["default_vectors"] == {"image": "demo-clip.text"}
    back = client.post("/migrations/rollback")
    assert back.status_code == 200 and back.json()["defaults"] == {"image": "demo-clip.image"}
    assert client.post("/search", json={"text": "red"}).json()["vector"] == "demo-clip.image"
    assert client.post("/migrations/drop-old").json() == {"dropped": ["demo-clip.text"]}
    api_error(client.post("/migrations/rollback"), 409, "nothing_to_switch")
    api_error(client.post("/migrations/drop-old"), 409, "nothing_to_drop")


def test_writes_wait_while_a_migration_copies_the_collection(client, backend, monkeypatch) -> None:
    async def copying(*args, **kwargs):
        raise MigrationRunning("a migration to x is copying the collection; writes wait until it switches")

    monkeypatch.setattr(backend, "add_item", copying)
    monkeypatch.setattr(backend, "delete_item", copying)
    added = client.post("/items", files={"file": ("a.png", PNG, "image/png")})
    assert "copying" in api_error(added, 503, "migration_running") and added.headers["retry-after"].isdigit()
    api_error(client.delete("/items/abc"), 503, "migration_running")
    backend.next_start = MigrationRefused("a migration to x is copying the collection")
    api_error(client.post("/ingest", json={"source": "/data"}), 409, "migration_running")


# --- pages ------------------------------------------------------------------------------------


def test_the_page_and_docs_are_served_from_here(tmp_path: Path) -> None:
    client = client_for(tmp_path, root_path="/app")
    page = client.get("/")
    assert page.status_code == 200 and "{{BASE}}" not in page.text and "/app/" in page.text
    docs = client.get("/docs").text
    assert "/app/ui/swagger-ui-bundle.js" in docs and "/app/openapi.json" in docs
    assert client.get("/ui/swagger-ui.css").status_code == 200 and client.get("/ui/style.css").status_code == 200
    api_error(client.get("/ui/nope.js"), 404, "not_found")
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embeddings", "/search", "/items", "/ingest", "/catalog", "/models"} <= set(paths)
    assert "/" not in paths and "/docs" not in paths

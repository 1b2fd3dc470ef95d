"""The catalogue over HTTP on a real Ray Serve, with objects in a real S3 server (SeaweedFS)
and vectors in the embedded Qdrant engine: add demo scenes and a spoken clip, find them by
text, image, voice and item, filter, delete."""

from __future__ import annotations

import base64
import io
import json
import random
import uuid

import httpx
import pytest
from ray import serve

from mmembed.demo import world
from mmembed.demo.speech import espeak_wav
from mmembed.evaluation.dataset import load_eval_set
from mmembed.serve.app import build_app
from mmembed.store.vectors import point_id

MODELS = [
    {"name": "demo-clip", "batch": {"max_batch_size": 16}},
    {"name": "all-MiniLM-L6-v2"},
    {"name": "whisper-base", "batch": {"max_batch_size": 4}},
    {"name": "bind", "batch": {"max_batch_size": 4}},
]
RED_CIRCLE = world.Query((world.Spec("circle", "red"),), exact=False)


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return f"search-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('cache') / 'cache.sqlite'}"


@pytest.fixture(scope="module")
def api(ray_cluster: int, s3_server, bucket: str, cache_url: str) -> str:
    env = {
        "MMEMBED_CACHE_URL": cache_url,
        "MMEMBED_COLLECTION": f"search-{uuid.uuid4().hex[:8]}",
        "MMEMBED_S3_BUCKET": bucket,
        "MMEMBED_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    serve.run(build_app({"models": MODELS, "env": env}), name="search", route_prefix="/catalogue")
    yield f"http://127.0.0.1:{ray_cluster}/catalogue"
    serve.delete("search")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scenes(api: str) -> dict[str, world.Scene]:
    """120 rendered scenes added over HTTP, by id."""
    pool = world.eval_set(120, seed=77)
    assert sum(RED_CIRCLE.matches(s) for s, _ in pool) >= 5
    added = {}
    with httpx.Client(timeout=120) as client:
        for n, (scene, image) in enumerate(pool):
            colours = sorted({o.colour for o in scene.objects})
            response = client.post(
                f"{api}/items",
                files={"file": (f"scene-{n}.png", _png(image), "image/png")},
                data={
                    "caption": scene.caption(),
                    "source_uri": f"demo://scene/{n}",
                    "meta": json.dumps({"n": n, "colours": colours}),
                },
            )
            assert response.status_code == 201, response.text
            added[response.json()["id"]] = scene
    return added


def test_an_added_image_lives_in_s3_with_its_vectors_and_payload(api: str, scenes, s3_server, bucket: str):
    item_id = point_id("demo://scene/0")
    assert item_id in scenes  # ids derive from the source URI
    item = httpx.get(f"{api}/items/{item_id}").json()
    payload = item["payload"]
    assert payload["object_uri"].startswith(f"s3://{bucket}/")
    assert payload["caption"] == scenes[item_id].caption() and payload["kind"] == "image"
    assert payload["meta"]["n"] == 0 and payload["media_type"] == "image/png"
    stored = httpx.get(item["url"])  # a presigned URL: SeaweedFS checks its signature
    assert stored.status_code == 200 and stored.content.startswith(b"\x89PNG")
    key = payload["object_uri"].removeprefix(f"s3://{bucket}/")
    assert s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read() == stored.content


def test_text_finds_the_right_scenes(api: str, scenes):
    found = httpx.post(f"{api}/search", json={"text": "a red circle", "top_k": 5}, timeout=60).json()
    assert (found["vector"], found["model"]) == ("demo-clip.image", "demo-clip")
    top = [scenes[h["id"]] for h in found["hits"]]
    assert all(RED_CIRCLE.matches(s) for s in top[:3]), [s.caption() for s in top]
    assert [h["score"] for h in found["hits"]] == sorted((h["score"] for h in found["hits"]), reverse=True)


def test_an_image_finds_itself_first_and_more_like_this_leaves_it_out(api: str, scenes):
    image = world.eval_set(120, seed=77)[7][1]
    found = httpx.post(f"{api}/search", json={"image": base64.b64encode(_png(image)).decode(), "top_k": 3}).json()
    target = point_id("demo://scene/7")
    assert found["hits"][0]["id"] == target and found["hits"][0]["score"] > 0.99
    similar = httpx.post(f"{api}/search", json={"item_id": target, "top_k": 3}).json()
    assert target not in [h["id"] for h in similar["hits"]] and len(similar["hits"]) == 3


@pytest.mark.parametrize("route", ["direct", "transcript"])
def test_a_spoken_query_finds_red_circles(api: str, scenes, route: str):
    audio = base64.b64encode(espeak_wav("a red circle")).decode()
    found = httpx.post(f"{api}/search", json={"audio": audio, "route": route, "top_k": 5}, timeout=120).json()
    assert found["vector"] == "demo-clip.image"
    assert found["model"] == ("bind" if route == "direct" else "demo-clip")
    top = [scenes[h["id"]] for h in found["hits"]]
    # Red circles are under a tenth of the gallery; the transcript route is the weaker one (see docs/audio.md).
    assert RED_CIRCLE.matches(top[0]) and sum(map(RED_CIRCLE.matches, top)) >= 3, [s.caption() for s in top]
    if route == "transcript":
        assert "red circle" in found["query"]["transcript"].lower()


def test_filters_threshold_and_pages(api: str, scenes):
    red = httpx.post(f"{api}/search", json={"text": "a shape", "top_k": 50, "filter": {"meta.colours": "red"}}).json()
    assert red["hits"] and all("red" in h["payload"]["meta"]["colours"] for h in red["hits"])
    ranged = httpx.post(
        f"{api}/search", json={"text": "a shape", "top_k": 50, "filter": {"meta.n": {"gte": 10, "lt": 20}}}
    ).json()
    assert sorted(h["payload"]["meta"]["n"] for h in ranged["hits"]) == list(range(10, 20))
    first = httpx.post(f"{api}/search", json={"text": "a red circle", "top_k": 4}).json()["hits"]
    second = httpx.post(f"{api}/search", json={"text": "a red circle", "top_k": 2, "offset": 2}).json()["hits"]
    assert [h["id"] for h in second] == [h["id"] for h in first[2:]]
    cut = first[1]["score"] - 1e-5  # scores are float32: the same hit may score a few ulps apart
    above = httpx.post(f"{api}/search", json={"text": "a red circle", "top_k": 10, "threshold": cut}).json()
    assert all(h["score"] >= cut for h in above["hits"]) and len(above["hits"]) >= 2


def test_a_spoken_clip_is_found_by_text_through_its_transcript(api: str, scenes):
    clip = espeak_wav("the quick brown fox jumps over the lazy dog")
    added = httpx.post(f"{api}/items", files={"file": ("fox.wav", clip, "audio/wav")}, timeout=120)
    assert added.status_code == 201, added.text
    body = added.json()
    assert {"whisper-base.audio", "bind.audio", "all-MiniLM-L6-v2.text"} <= set(body["vectors"])
    assert "fox" in body["payload"]["transcript"].lower() and body["payload"]["kind"] == "audio"
    found = httpx.post(f"{api}/search", json={"text": "a fox and a dog", "vector": "whisper-base.audio"}).json()
    assert found["model"] == "all-MiniLM-L6-v2" and found["hits"][0]["id"] == body["id"]


def test_delete_removes_the_point_and_the_object(api: str, scenes, s3_server, bucket: str):
    image = world.render(world.random_scene(random.Random(5)), random.Random(5))
    added = httpx.post(f"{api}/items", files={"file": ("x.png", _png(image), "image/png")}).json()
    key = added["payload"]["object_uri"].removeprefix(f"s3://{bucket}/")
    assert httpx.delete(f"{api}/items/{added['id']}").json() == {"id": added["id"], "deleted": True}
    assert httpx.get(f"{api}/items/{added['id']}").status_code == 404
    assert httpx.delete(f"{api}/items/{added['id']}").json()["error"]["code"] == "item_not_found"
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key)
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"text": "x", "vector": "ViT-B-32.image"}, 422, "no_route"),
        ({"text": "x", "filter": {"size": {"near": 3}}}, 422, "invalid_search"),
        ({"item_id": "00000000-0000-0000-0000-000000000000"}, 404, "item_not_found"),
        ({"item_id": "not-an-id"}, 404, "item_not_found"),
        ({"text": "x", "image": "aGk="}, 422, "invalid_request"),
    ],
)
def test_search_errors_have_stable_codes(api: str, scenes, body: dict, status: int, code: str):
    response = httpx.post(f"{api}/search", json=body, timeout=60)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)


def test_a_corrupt_upload_is_refused_and_stores_nothing(api: str, scenes):
    before = httpx.post(f"{api}/search", json={"text": "x", "top_k": 1000}).json()["hits"]
    truncated = _png(world.eval_set(1, seed=3)[0][1])[:200]
    bad = httpx.post(f"{api}/items", files={"file": ("bad.png", truncated, "image/png")})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "truncated_image")
    after = httpx.post(f"{api}/search", json={"text": "x", "top_k": 1000}).json()["hits"]
    assert len(after) == len(before)


def test_the_command_line_searches_a_running_server(api: str, scenes):
    from typer.testing import CliRunner

    from mmembed.cli import app

    result = CliRunner().invoke(app, ["search", "a red circle", "--url", api, "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    assert len(hits) == 3 and RED_CIRCLE.matches(scenes[hits[0]["id"]])
    table = CliRunner().invoke(app, ["search", "a red circle", "--url", api, "--top-k", "2"])
    assert table.exit_code == 0 and "demo-clip.image via demo-clip" in table.output
    wrong = CliRunner().invoke(app, ["search", "x", "--url", api, "--vector", "nope.image"])
    assert wrong.exit_code == 1 and "no vector 'nope.image'" in wrong.output


def test_an_evaluation_over_http_measures_what_the_server_gives(api: str, scenes, tmp_path, settings):
    from mmembed.evaluation.demo import build_demo_set
    from mmembed.evaluation.embedders import HttpEmbedder, LocalEmbedder
    from mmembed.evaluation.run import evaluate_model

    small = load_eval_set(*build_demo_set(tmp_path, items=40, text_queries=10, image_queries=4, seed=9))
    remote = evaluate_model(small, HttpEmbedder(api, "demo-clip"), batch_size=16)
    local = evaluate_model(small, LocalEmbedder("demo-clip", settings), batch_size=16)
    assert remote.quality == pytest.approx(local.quality, abs=1e-6) and remote.coverage == 1.0
    assert remote.items_per_s > 0 and remote.query_ms_p50 > 0


def test_the_encode_endpoints_answer_repeated_content_from_the_cache(api: str, scenes):
    body = {"model": "demo-clip", "texts": ["a cached purple star"]}
    first = httpx.post(f"{api}/encode/text", json=body).json()["data"][0]
    second = httpx.post(f"{api}/encode/text", json=body).json()["data"][0]
    assert "cached" not in first["info"] and second["info"]["cached"] is True
    assert (
        second["embedding"] == pytest.approx(first["embedding"]) and second["info"]["tokens"] == first["info"]["tokens"]
    )
    image = base64.b64encode(_png(world.eval_set(1, seed=31)[0][1])).decode()
    for _ in range(2):
        last = httpx.post(f"{api}/encode/image", json={"model": "demo-clip", "items": [image]}).json()["data"][0]
    assert last["info"]["cached"] is True
    metrics = httpx.get(f"{api}/metrics").text
    assert 'mmembed_cache_hits_total{modality="text",model="demo-clip"}' in metrics


def _image_hits(api: str) -> float:
    prefix = 'mmembed_cache_hits_total{modality="image",model="demo-clip"} '
    lines = [line for line in httpx.get(f"{api}/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_bulk_jobs_and_the_api_share_one_cache(api: str, cache_url: str, settings, tmp_path):
    """One key for the same bytes whoever embeds them: a job's file is a hit over HTTP, and a file
    first sent over HTTP is a hit for the job that later finds it in its folder."""
    from mmembed.jobs.ingest import Ingest, IngestOptions

    job_settings = settings.model_copy(
        update={"data_dir": tmp_path / "job", "models_dir": settings.models_path, "cache_url": cache_url}
    )
    folder = tmp_path / "shop"
    folder.mkdir()
    by_job, by_api = (_png(image) for _, image in world.eval_set(2, seed=41))
    (folder / "by-job.png").write_bytes(by_job)

    def ingest():
        return Ingest(IngestOptions(str(folder), ("demo-clip",), workers=0), job_settings).run(progress=False)

    first = ingest()
    assert first.written == 1 and first.cache["hits"] == 0 and first.cache["puts"] == 1
    hits = _image_hits(api)
    answer = httpx.post(
        f"{api}/encode/image", json={"model": "demo-clip", "items": [base64.b64encode(by_job).decode()]}
    )
    assert answer.json()["data"][0]["info"]["cached"] is True
    assert _image_hits(api) == hits + 1

    fresh = httpx.post(f"{api}/encode/image", json={"model": "demo-clip", "items": [base64.b64encode(by_api).decode()]})
    assert "cached" not in fresh.json()["data"][0]["info"]
    (folder / "by-api.png").write_bytes(by_api)
    second = ingest()
    assert second.written == 1 and second.cache["hits"] == 1 and second.cache["misses"] == 0

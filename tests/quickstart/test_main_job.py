"""The main job (`mmembed quickstart`) ends with a server whose demo catalogue answers text,
image and voice searches, serves its search page, and re-ingests nothing unchanged."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from mmembed.config import Settings
from mmembed.demo.catalogue import CLIPS, PHOTOS
from quickstart.quickstart_run import SCENES, Quickstart

ITEMS = SCENES + len(PHOTOS) + len(CLIPS)


@pytest.fixture(scope="module")
def api(quickstart: Quickstart) -> httpx.Client:
    with httpx.Client(base_url=quickstart.url, timeout=120) as client:
        yield client


def _scenes(quickstart: Quickstart) -> dict[str, list[dict[str, str]]]:
    """Each scene's objects, the ground truth the demo world rendered."""
    rows = [json.loads(line) for line in (quickstart.catalogue / "scenes" / "captions.jsonl").read_text().splitlines()]
    return {r["file"]: r["objects"] for r in rows}


def _assert_red_circles_lead(quickstart: Quickstart, found: list[str], within: int = 1) -> None:
    """A scene with a red circle within the first ``within`` hits (40 scenes hold few); every
    hit holds at least something red or a circle."""
    scenes = _scenes(quickstart)
    assert any(any(o["colour"] == "red" and o["shape"] == "circle" for o in scenes[n]) for n in found[:within]), found
    for name in found:
        assert any(o["colour"] == "red" or o["shape"] == "circle" for o in scenes[name]), (name, found)


def test_the_command_reports_the_ingest_and_the_page(quickstart: Quickstart) -> None:
    assert f"demo catalogue ready: {ITEMS} items ({ITEMS} embedded now, 0 unchanged, 0 failed)" in quickstart.output
    assert re.search(rf"search page: {re.escape(quickstart.url)}/", quickstart.output), quickstart.output
    assert "Ray dashboard: http://" in quickstart.output


def test_the_catalogue_holds_every_demo_item_with_its_vectors(api: httpx.Client) -> None:
    info = api.get("/catalog").json()
    assert info["count"] == ITEMS
    assert info["default_vector"] == "demo-clip.image"
    assert {"demo-clip.image", "demo-clip.text", "bind.audio", "whisper-base.audio"} <= set(info["vectors"])
    assert "audio" in info["vectors"]["demo-clip.image"]["queries"]


def test_text_finds_red_circles(quickstart: Quickstart, api: httpx.Client) -> None:
    everything = api.post("/search", json={"text": "red circle", "top_k": 3}).json()["hits"]
    _assert_red_circles_lead(quickstart, [h["payload"]["filename"] for h in everything[:1]])
    # Below the first hit, demo-clip (which has never seen a photo) may rank retina.jpg, an orange
    # disc, beside the red circles; among the scenes, every hit holds something red or a circle.
    query = {"text": "red circle", "top_k": 3, "filter": {"meta.collection": "scenes"}}
    hits = api.post("/search", json=query).json()["hits"]
    _assert_red_circles_lead(quickstart, [h["payload"]["filename"] for h in hits])


def test_a_caption_search_finds_the_cat_photo(api: httpx.Client) -> None:
    answer = api.post("/search", json={"text": "a cat", "vector": "all-MiniLM-L6-v2.text", "top_k": 1}).json()
    assert answer["hits"][0]["payload"]["filename"] == "chelsea.png"
    assert answer["hits"][0]["payload"]["meta"]["collection"] == "photos"


def test_a_spoken_clip_finds_red_circles_and_text_finds_the_clip(quickstart: Quickstart, api: httpx.Client) -> None:
    clip = (quickstart.catalogue / "speech" / "red-circle.flac").read_bytes()
    query = {"audio": base64.b64encode(clip).decode(), "top_k": 3, "filter": {"meta.collection": "scenes"}}
    hits = api.post("/search", json=query).json()["hits"]
    _assert_red_circles_lead(quickstart, [h["payload"]["filename"] for h in hits], within=2)
    spoken = api.post("/search", json={"text": "a yellow star", "vector": "whisper-base.audio", "top_k": 1}).json()
    [hit] = spoken["hits"]
    assert hit["payload"]["filename"] == "yellow-star.flac"
    assert "star" in hit["payload"]["transcript"].lower()


def test_the_page_and_its_files_are_served_locally(api: httpx.Client) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<base href="/">' in page.text
    assert api.get("/ui/app.js").status_code == 200
    assert api.get("/ui/..%2Fingress.py").status_code == 404
    assert api.get("/ui/missing.js").json()["error"]["code"] == "not_found"


def test_ingesting_the_demo_catalogue_again_embeds_nothing(quickstart: Quickstart, api: httpx.Client) -> None:
    started = api.post("/ingest", json={"source": str(quickstart.catalogue / "catalogue.jsonl")})
    assert started.status_code == 202
    job = api.get(started.json()["status_url"]).json()
    while job["status"] not in ("done", "failed"):  # each GET answers the job's state at that moment
        job = api.get(started.json()["status_url"]).json()
    assert job["status"] == "done", job
    assert job["counts"]["plan"] == {"total": ITEMS, "unchanged": ITEMS, "to_embed": 0, "gone": 0}


def test_ingest_on_the_command_line_runs_on_the_server_that_holds_the_collection(
    quickstart: Quickstart, api: httpx.Client, settings: Settings
) -> None:
    """The quick start's server holds the embedded store; `mmembed ingest` sees it and sends the job there."""
    folder = settings.data_dir / "cli-ingest"
    folder.mkdir()
    for n, colour in enumerate(((250, 20, 20), (20, 250, 20), (20, 20, 250))):
        Image.new("RGB", (64, 64), colour).save(folder / f"plain-{n}.png")
    env = os.environ | {"MMEMBED_DATA_DIR": str(settings.data_dir), "COLUMNS": "200"}
    command = [sys.executable, "-m", "mmembed.cli", "ingest", str(folder), "--model", "demo-clip"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"holds the collection: the job runs on {quickstart.url}" in result.stdout, result.stdout
    assert "3 items: 3 embedded, 0 unchanged, 0 failed, 0 deleted" in result.stdout, result.stdout
    found = api.post("/search", json={"text": "x", "top_k": 5, "filter": {"source": str(folder)}}).json()["hits"]
    assert sorted(h["payload"]["filename"] for h in found) == ["plain-0.png", "plain-1.png", "plain-2.png"]
    for hit in found:  # the later tests count the demo catalogue
        assert api.delete(f"/items/{hit['id']}").status_code == 200

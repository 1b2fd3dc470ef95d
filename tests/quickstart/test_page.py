"""The search page in a real headless Chromium against the real quickstart server: text,
image, "more like this", speech (uploaded and recorded), filters, an ingest with its
progress bar, a phone-width layout, errors, and nothing loaded from outside the server.

Each test opens a fresh browser context, waits on the page's own state or on the API's
answers (never on the clock) and saves a screenshot to test-artifacts/."""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from mmembed.config import Settings
from mmembed.demo.files import write_scenes
from quickstart.quickstart_run import Quickstart

CHROMIUM = "/usr/bin/chromium"  # Debian's; `playwright install` downloads, which tests never do
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",  # a microphone that beeps, no prompt
]
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser, quickstart: Quickstart) -> Iterator[Callable[..., Page]]:
    """Opens the page in a fresh context (laptop size unless told) once the catalogue is in;
    afterwards, fails the test on any script error the page raised."""
    contexts, errors = [], []

    def opener(**context: Any) -> Page:
        contexts.append(browser.new_context(**({"viewport": LAPTOP} | context)))
        page = contexts[-1].new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{quickstart.url}/")
        expect(page.get_by_test_id("item-count")).to_have_text(re.compile(r"^\d+ items$"))
        return page

    yield opener
    for context in contexts:
        context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture
def page(open_page: Callable[..., Page]) -> Page:
    return open_page()


def searched(page: Page, action: Callable[[], Any]) -> dict[str, Any]:
    """Do what starts a search; answers the API's JSON once the page has drawn it (the grid
    is busy from before the request until the answer is rendered)."""
    with page.expect_response(lambda r: r.url.endswith("/search") and r.request.method == "POST") as answer:
        action()
    expect(page.get_by_test_id("results")).to_have_attribute("aria-busy", "false")
    return answer.value.json()


def search_text(page: Page, text: str) -> dict[str, Any]:
    page.get_by_test_id("search-input").fill(text)
    return searched(page, page.get_by_test_id("search-button").click)


def shown(page: Page) -> list[str]:
    return page.get_by_test_id("result-filename").all_inner_texts()


def shown_ids(page: Page) -> list[str]:
    return page.get_by_test_id("result").evaluate_all("cards => cards.map(c => c.dataset.id)")


def scenes(quickstart: Quickstart) -> dict[str, dict[str, Any]]:
    """Ground truth: each demo scene's caption and objects, by file name."""
    lines = (quickstart.catalogue / "scenes" / "captions.jsonl").read_text().splitlines()
    return {row["file"]: row for row in map(json.loads, lines)}


def has(scene: dict[str, Any] | None, colour: str | None = None, shape: str | None = None) -> bool:
    return any(colour in (None, o["colour"]) and shape in (None, o["shape"]) for o in (scene or {}).get("objects", []))


def wait_for_thumbnails(page: Page) -> None:
    """Every thumbnail in view has loaded from its hit's URL (below the fold they load lazily)."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid=result] img')]
                 .every(i => i.getBoundingClientRect().top > innerHeight || (i.complete && i.naturalWidth > 0))"""
    )


def test_text_search_finds_the_red_circles(page: Page, quickstart: Quickstart, artifacts: Path) -> None:
    answer = search_text(page, "red circle")
    truth = scenes(quickstart)
    red = {name for name, scene in truth.items() if has(scene, "red", "circle")}
    assert shown_ids(page) == [h["id"] for h in answer["hits"]]
    # Fused by default over every vector a text query reaches: the scenes' pictures and captions,
    # and speech (the spoken clip "red circle" may lead). The demo catalogue's 40 scenes hold one red
    # circle (scene-0007): it is the first scene shown, in the top 5, and every scene in the top 5
    # is a near miss at worst, a red shape or a circle.
    assert set(answer["vectors"]) >= {"demo-clip.image", "all-MiniLM-L6-v2.text", "whisper-base.audio"}
    top = shown(page)[:5]
    top_scenes = [name for name in top if name in truth]
    speech = {name for name in top if name.endswith(".flac")}
    assert top_scenes[0] in red and "red-circle.flac" in speech and set(top) == set(top_scenes) | speech, top
    assert all(has(truth[name], "red") or has(truth[name], shape="circle") for name in top_scenes), top
    first = page.get_by_test_id("result").nth(top.index(top_scenes[0]))
    expect(first.get_by_test_id("result-caption")).to_have_text(truth[top_scenes[0]]["caption"])
    expect(first.get_by_test_id("result-why")).to_contain_text("demo-clip.image")
    score = next(h["score"] for h in answer["hits"] if h["payload"].get("filename") == top_scenes[0])
    expect(first.get_by_test_id("result-score")).to_have_text(f"{score:.3f}")
    expect(first.get_by_test_id("result-meta")).to_contain_text("collection")
    expect(first.get_by_test_id("result-meta")).to_contain_text("scenes")
    latency = re.compile(r"^[\d.]+ ms on the server · \d+ ms round trip$")
    expect(page.get_by_test_id("latency")).to_have_text(latency)
    # JavaScript prints 45.0 as "45"; ":g" writes a float the same way.
    assert f"{answer['took_ms']:g} ms on the server" in page.get_by_test_id("latency").inner_text()
    wait_for_thumbnails(page)
    page.screenshot(path=artifacts / "page-text-search.png", full_page=True)


def test_an_uploaded_or_dropped_image_finds_itself_first(page: Page, quickstart: Quickstart, artifacts: Path) -> None:
    uploaded = quickstart.catalogue / "scenes" / "scene-0003.jpg"
    answer = searched(page, lambda: page.get_by_test_id("image-input").set_input_files(uploaded))
    assert answer["query"] == {"modality": "image"}
    assert shown(page)[0] == "scene-0003.jpg"
    assert answer["hits"][0]["matched"]["demo-clip.image"] == 1  # first on the picture itself

    dropped = quickstart.catalogue / "scenes" / "scene-0012.jpg"
    transfer = page.evaluate_handle(
        """([data, name]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
            return transfer;
        }""",
        [base64.b64encode(dropped.read_bytes()).decode(), dropped.name],
    )
    drop = page.get_by_test_id("drop-zone")
    answer = searched(page, lambda: drop.dispatch_event("drop", {"dataTransfer": transfer}))
    assert shown(page)[0] == "scene-0012.jpg"
    expect(page.get_by_test_id("query-info")).to_contain_text("image scene-0012.jpg")
    wait_for_thumbnails(page)
    page.screenshot(path=artifacts / "page-image-search.png")


def test_more_like_this_searches_with_the_item(page: Page, artifacts: Path) -> None:
    search_text(page, "red circle")
    clicked, name = shown_ids(page)[0], shown(page)[0]
    with page.expect_request(lambda r: r.url.endswith("/search")) as request:
        answer = searched(page, page.get_by_test_id("more-like-this").first.click)
    assert request.value.post_data_json["item_id"] == clicked
    assert answer["query"] == {"item_id": clicked}
    ids = shown_ids(page)
    assert ids == [h["id"] for h in answer["hits"]] and len(ids) == 12
    assert clicked not in ids
    expect(page.get_by_test_id("query-info")).to_contain_text(f"more like {name}")
    wait_for_thumbnails(page)
    page.screenshot(path=artifacts / "page-more-like-this.png")


def test_speech_finds_red_circles_directly_and_through_its_transcript(
    page: Page, quickstart: Quickstart, artifacts: Path
) -> None:
    red = {name for name, scene in scenes(quickstart).items() if has(scene, "red", "circle")}
    clip = quickstart.catalogue / "speech" / "red-circle.flac"
    answer = searched(page, lambda: page.get_by_test_id("audio-input").set_input_files(clip))
    assert (answer["models"]["demo-clip.image"], answer["route"]) == ("bind", "direct")
    assert red & set(shown(page)[:3]), shown(page)
    expect(page.get_by_test_id("transcript")).to_be_hidden()

    answer = searched(page, page.get_by_test_id("route-toggle").check)  # the same clip again
    assert (answer["models"]["demo-clip.image"], answer["route"]) == ("demo-clip", "transcript")
    expect(page.get_by_test_id("transcript")).to_be_visible()
    expect(page.get_by_test_id("transcript")).to_contain_text(re.compile(r"Heard: “.*\bred\b.*”", re.IGNORECASE))
    assert red & set(shown(page)[:3]), shown(page)
    page.screenshot(path=artifacts / "page-speech-search.png")


def test_the_suggested_searches_find_what_they_name(page: Page, quickstart: Quickstart, artifacts: Path) -> None:
    """What the search box suggests, fused over the photos' captions and the scenes' pictures alike."""
    examples = page.get_by_test_id("search-input").get_attribute("placeholder")
    assert examples == "Describe it: red circle, a cat, a yellow star…"
    search_text(page, "a cat")
    assert shown(page)[0] == "chelsea.png"  # the photo captioned "a tabby cat", found by its caption
    why = page.get_by_test_id("result").first.get_by_test_id("result-why")
    expect(why).to_contain_text("all-MiniLM-L6-v2.text")
    page.screenshot(path=artifacts / "page-fused-cat.png")
    truth = scenes(quickstart)
    search_text(page, "a yellow star")
    top = shown(page)[:5]
    assert any(has(truth.get(name), "yellow", "star") or name == "yellow-star.flac" for name in top), top


def test_a_recording_from_the_microphone_searches(page: Page, artifacts: Path) -> None:
    record = page.get_by_test_id("record-button")
    record.click()
    expect(record).to_have_attribute("aria-pressed", "true")
    expect(record).to_have_text(re.compile(r"0:0[1-9]"))  # a second or more of Chromium's fake microphone
    with page.expect_request(lambda r: r.url.endswith("/search")) as request:
        answer = searched(page, record.click)
    assert request.value.post_data_json["audio"].startswith("data:audio/webm;base64,")
    assert answer["query"]["modality"] == "audio" and len(answer["hits"]) == 12, answer
    expect(record).to_have_attribute("aria-pressed", "false")
    expect(page.get_by_test_id("error")).to_be_hidden()
    page.screenshot(path=artifacts / "page-recording.png")


def test_filters_and_vector_choice(page: Page, artifacts: Path) -> None:
    search_text(page, "red circle")
    answer = searched(page, lambda: page.get_by_test_id("collection-filter").select_option("photos"))
    assert len(answer["hits"]) == 10  # the ten photos, nothing else
    assert {h["payload"]["meta"]["collection"] for h in answer["hits"]} == {"photos"}
    expect(page.get_by_test_id("result-meta")).to_have_count(10)

    searched(page, lambda: page.get_by_test_id("collection-filter").select_option(""))
    searched(page, lambda: page.get_by_test_id("vector-select").select_option("bind.audio"))
    answer = searched(page, lambda: page.get_by_test_id("kind-filter").select_option("audio"))
    assert answer["vector"] == "bind.audio" and {h["payload"]["kind"] for h in answer["hits"]} == {"audio"}
    expect(page.get_by_test_id("result").locator("audio")).to_have_count(len(answer["hits"]))
    assert shown(page)[0] == "red-circle.flac"

    page.get_by_test_id("filter-field").fill("meta.said")
    page.get_by_test_id("filter-value").fill("a blue square")  # a field without a value searches nothing new
    searched(page, lambda: page.keyboard.press("Tab"))  # change fires as the value loses focus
    assert shown(page) == ["blue-square.flac"]
    expect(page.get_by_test_id("result-caption")).to_contain_text("blue square")

    page.get_by_test_id("vector-select").select_option("all-MiniLM-L6-v2.text")  # takes no image queries
    expect(page.get_by_test_id("image-input")).to_be_disabled()
    expect(page.get_by_test_id("search-input")).to_be_enabled()
    page.screenshot(path=artifacts / "page-filters.png")


@pytest.fixture
def more_scenes(quickstart: Quickstart, settings: Settings) -> Iterator[Path]:
    """Six new scenes in a folder under the server's data directory (where a plain quick start
    may read); afterwards their items go again, so the other tests on this server keep the demo
    catalogue they count on."""
    folder = Path(tempfile.mkdtemp(prefix="more-", dir=settings.data_dir))
    write_scenes(folder, 6, seed=99)
    yield folder
    with httpx.Client(base_url=quickstart.url, timeout=60) as api:
        query = {"text": "a scene", "top_k": 100, "filter": {"source": str(folder)}}
        for hit in api.post("/search", json=query).json()["hits"]:
            assert api.delete(f"/items/{hit['id']}").status_code == 200


def test_an_ingest_shows_its_progress_and_grows_the_catalogue(page: Page, more_scenes: Path, artifacts: Path) -> None:
    count = page.get_by_test_id("item-count")
    before = int(count.inner_text().split()[0])
    page.get_by_test_id("ingest-source").fill(str(more_scenes))
    page.get_by_test_id("ingest-start").click()
    status = page.get_by_test_id("ingest-status")
    expect(status).to_contain_text("100%", timeout=180_000)
    expect(status).to_have_text(re.compile(r"^100% · done · 6 done · written 6, .*failed 0"))
    expect(page.get_by_test_id("ingest-progress")).to_have_js_property("value", 1)
    expect(count).to_have_text(f"{before + 6} items")
    expect(page.get_by_test_id("ingest-start")).to_be_enabled()
    page.screenshot(path=artifacts / "page-ingest.png", full_page=True)


def test_phone_width_has_no_horizontal_scrolling(open_page: Callable[..., Page], artifacts: Path) -> None:
    page = open_page(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    search_text(page, "red circle")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.get_by_test_id("search-input")).to_be_in_viewport()
    cards = page.get_by_test_id("result")
    expect(cards.first).to_be_visible()
    boxes = [cards.nth(i).bounding_box() for i in range(2)]
    assert boxes[0] and boxes[1] and boxes[0]["y"] == boxes[1]["y"]  # two columns of thumbnails
    assert all(b["x"] >= 0 and b["x"] + b["width"] <= PHONE["width"] for b in boxes), boxes
    cards.first.scroll_into_view_if_needed()
    wait_for_thumbnails(page)
    page.screenshot(path=artifacts / "page-phone.png", full_page=True)


def test_the_page_loads_nothing_from_elsewhere(page: Page, quickstart: Quickstart, artifacts: Path) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.reload()  # record from the very first request
    expect(page.get_by_test_id("item-count")).to_have_text(re.compile(r"^\d+ items$"))
    search_text(page, "red circle")
    wait_for_thumbnails(page)
    assert any(url.startswith(f"{quickstart.url}/objects/") for url in requested), requested
    assert all(url.startswith(f"{quickstart.url}/") for url in requested), requested

    assert page.get_by_test_id("docs-link").evaluate("a => a.href") == f"{quickstart.url}/docs"
    dashboard = httpx.get(f"{quickstart.url}/catalog", timeout=60).json()["dashboard_url"]
    assert page.get_by_test_id("dashboard-link").evaluate("a => a.href").rstrip("/") == dashboard.rstrip("/")
    assert httpx.get(f"{quickstart.url}/docs", timeout=60).status_code == 200
    page.screenshot(path=artifacts / "page-links.png")


def test_the_api_docs_render_every_operation_from_the_server_alone(
    browser: Browser, quickstart: Quickstart, artifacts: Path
) -> None:
    spec = httpx.get(f"{quickstart.url}/openapi.json", timeout=60).json()
    operations = sum(len(methods) for methods in spec["paths"].values())
    context = browser.new_context(viewport=LAPTOP)
    try:
        page = context.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"{quickstart.url}/docs")
        page.wait_for_function(
            "n => new Set([...document.querySelectorAll('.opblock')].map(e => e.id)).size === n", arg=operations
        )
        page.wait_for_load_state("networkidle")  # late requests (logos, fonts) are recorded too
        assert f"{quickstart.url}/openapi.json" in requested
        assert all(url.startswith(f"{quickstart.url}/") for url in requested if url.startswith("http")), requested
        page.screenshot(path=artifacts / "page-docs.png")
    finally:
        context.close()


def test_an_error_is_shown_readably(page: Page, tmp_path: Path, artifacts: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("these are notes, not a picture")
    with page.expect_response(lambda r: r.url.endswith("/search")) as response:
        answer = searched(page, lambda: page.get_by_test_id("image-input").set_input_files(notes))
    assert response.value.status == 422
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(answer["error"]["message"])
    expect(error).to_contain_text("(not_an_image)")  # the stable code, after the message
    page.screenshot(path=artifacts / "page-error.png")
    search_text(page, "red circle")
    expect(error).to_be_hidden()  # a good answer clears it

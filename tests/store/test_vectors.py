"""The vector store's contract, run unchanged on both backends: Qdrant Edge in a temporary
folder and qdrant-client's in-process ':memory:' mode."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as edge
from qdrant_client import QdrantClient, models

from mmembed.config import Settings
from mmembed.store.config import IndexConfig
from mmembed.store.vectors import (
    ClientStore,
    DimensionError,
    EdgeStore,
    Point,
    StoreError,
    VectorStore,
    VerificationError,
    open_store,
    point_id,
)

IMAGE, TEXT = "demo-clip.image", "all-MiniLM-L6-v2.text"
DIMS = {IMAGE: 8, TEXT: 6}
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


def _new_store(kind: str, tmp_path: Path) -> VectorStore:
    if kind == "edge":
        return EdgeStore(tmp_path / "catalog")
    return ClientStore(QdrantClient(":memory:"), "catalog")


def _same_collection(store: VectorStore) -> VectorStore:
    """A second store on the same collection (Edge allows one open shard per folder, so close the first)."""
    if isinstance(store, EdgeStore):
        store.close()
        return EdgeStore(store.path)
    assert isinstance(store, ClientStore)
    return ClientStore(store.client, store.collection)


def _overwrite_vector_behind_the_store(store: VectorStore, pid: str, name: str, vector: list[float]) -> None:
    if isinstance(store, EdgeStore):
        store.shard.update(edge.UpdateOperation.update_vectors([edge.PointVectors(pid, {name: vector})]))
    else:
        assert isinstance(store, ClientStore)
        store.client.update_vectors(store.collection, [models.PointVectors(id=pid, vector={name: vector})], wait=True)


def _overwrite_payload_behind_the_store(store: VectorStore, pid: str, payload: dict[str, Any]) -> None:
    if isinstance(store, EdgeStore):
        store.shard.update(edge.UpdateOperation.set_payload([pid], payload))
    else:
        assert isinstance(store, ClientStore)
        store.client.set_payload(store.collection, payload=payload, points=[pid], wait=True)


@pytest.fixture(params=["edge", "client"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    s = _new_store(request.param, tmp_path)
    s.open(DIMS, indexes={"kind": "keyword", "n": "integer", "score": "float", "flag": "bool"})
    yield s
    s.close()


def _random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Deliberately not unit length: the store's cosine normalisation is part of what is tested."""
    return np.random.default_rng(seed).normal(size=(n, dim)) * 3.0


def _unit(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def test_named_vectors_and_payload_round_trip(store: VectorStore) -> None:
    image, text = _random_vectors(1, 8)[0], _random_vectors(1, 6, seed=1)[0].tolist()
    pid = point_id("file:///cat.jpg")
    payload = {"uri": "file:///cat.jpg", "kind": "image", "n": 3, "meta": {"colour": "red", "tags": ["a", "b"]}}
    store.upsert([Point(pid, {IMAGE: image, TEXT: text}, payload)])

    [got] = store.retrieve([pid, point_id("file:///missing.jpg")], with_vectors=True)
    assert got.id == pid
    assert set(got.vectors) == {IMAGE, TEXT}
    np.testing.assert_allclose(got.vectors[IMAGE], _unit(image), atol=1e-6)
    np.testing.assert_allclose(got.vectors[TEXT], _unit(text), atol=1e-6)
    assert got.payload == payload
    [bare] = store.retrieve([pid])
    assert bare.vectors == {} and bare.payload == payload
    assert store.vectors == DIMS


def test_adding_a_vector_keeps_the_other_vector_and_the_payload(store: VectorStore) -> None:
    pid = point_id("file:///dog.jpg")
    image, text = _random_vectors(1, 8)[0], _random_vectors(1, 6, seed=1)[0]
    store.upsert([Point(pid, {IMAGE: image}, {"uri": "file:///dog.jpg", "kind": "image", "meta": {"colour": "blue"}})])
    store.upsert([Point(pid, {TEXT: text}, {"caption": "a dog"})])

    [got] = store.retrieve([pid], with_vectors=True)
    np.testing.assert_allclose(got.vectors[IMAGE], _unit(image), atol=1e-6)
    np.testing.assert_allclose(got.vectors[TEXT], _unit(text), atol=1e-6)
    assert got.payload == {"uri": "file:///dog.jpg", "kind": "image", "meta": {"colour": "blue"}, "caption": "a dog"}
    assert store.count() == 1
    assert [h.id for h in store.search(IMAGE, image, top_k=1)] == [pid]
    assert [h.id for h in store.search(TEXT, text, top_k=1)] == [pid]


def test_point_ids_are_deterministic_and_a_rerun_does_not_duplicate(store: VectorStore) -> None:
    assert point_id("s3://bucket/images/cat.jpg") == "c1efb60a-2724-5ad2-9501-09b3202f995e"
    assert point_id("s3://bucket/images/cat.jpg") != point_id("s3://bucket/images/dog.jpg")
    for uri in ("", "caption-0000042", "file:///tmp/é t€st/☃.png", "s3://b/" + "x" * 5000):  # ids already stored
        assert point_id(uri) == str(uuid.uuid5(uuid.NAMESPACE_URL, uri))
    vectors = _random_vectors(20, 8)
    points = [Point(point_id(f"file:///{i}.jpg"), {IMAGE: v}, {"n": i}) for i, v in enumerate(vectors)]
    store.upsert(points, batch_size=7)
    store.upsert(points, batch_size=7)
    assert store.count() == 20
    assert sorted(store.scroll_ids()) == sorted(p.id for p in points)


# Payloads for the filter tests: 12 points, and one whose "flag" is the integer 1, which a
# boolean filter must not match (Qdrant keeps bool and integer apart).
def _filter_payload(i: int) -> dict[str, Any]:
    return {
        "kind": ("image", "text", "audio")[i % 3],
        "n": i,
        "score": i / 11,
        "flag": i % 2 == 0,
        "meta": {"colour": ("red", "green", "blue", "red")[i % 4]},
    }


FILTER_PAYLOADS = [_filter_payload(i) for i in range(12)] + [{"kind": "image", "n": 100, "flag": 1}]

FILTER_CASES: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ({"kind": "image"}, lambda p: p["kind"] == "image"),
    ({"n": 3}, lambda p: p["n"] == 3),
    ({"flag": True}, lambda p: p["flag"] is True),
    ({"flag": False}, lambda p: p["flag"] is False),
    ({"kind": ["text", "audio"]}, lambda p: p["kind"] in ("text", "audio")),
    ({"n": [1, 4, 7, 50]}, lambda p: p["n"] in (1, 4, 7)),
    ({"n": {"gte": 2, "lt": 5}}, lambda p: 2 <= p["n"] < 5),
    ({"score": {"gt": 0.25, "lte": 0.75}}, lambda p: "score" in p and 0.25 < p["score"] <= 0.75),
    ({"meta.colour": "red"}, lambda p: p.get("meta", {}).get("colour") == "red"),
    (
        {"kind": "image", "meta.colour": ["red", "blue"], "n": {"gte": 3}},
        lambda p: p["kind"] == "image" and p.get("meta", {}).get("colour") in ("red", "blue") and p["n"] >= 3,
    ),
]


@pytest.mark.parametrize(("spec", "predicate"), FILTER_CASES, ids=[str(spec) for spec, _ in FILTER_CASES])
def test_filters_select_exactly_the_matching_points(
    store: VectorStore, spec: dict[str, Any], predicate: Callable[[dict[str, Any]], bool]
) -> None:
    vectors = _random_vectors(len(FILTER_PAYLOADS), 8)
    points = [
        Point(point_id(f"item-{i}"), {IMAGE: v}, p)
        for i, (v, p) in enumerate(zip(vectors, FILTER_PAYLOADS, strict=True))
    ]
    store.upsert(points)
    expected = {p.id for p in points if predicate(p.payload)}
    assert expected, "every case should match something"
    assert set(store.scroll_ids(spec)) == expected
    assert store.count(spec) == len(expected)
    assert {h.id for h in store.search(IMAGE, vectors[0], top_k=50, filter=spec)} == expected


@pytest.mark.parametrize(
    "spec",
    [
        {"n": {"between": [1, 2]}},
        {"n": {}},
        {"n": 1.5},
        {"n": None},
        {"n": []},
        {"n": [1, "a"]},
        {"n": [True, False]},
        {"n": {"gte": "1"}},
        {"n": {"lt": float("nan")}},
    ],
    ids=str,
)
def test_bad_filters_are_refused_with_the_field_named(store: VectorStore, spec: dict[str, Any]) -> None:
    with pytest.raises(StoreError, match="'n'"):
        store.count(spec)
    with pytest.raises(StoreError, match="'n'"):
        store.search(IMAGE, np.ones(8), filter=spec)


def test_a_filter_must_be_an_object(store: VectorStore) -> None:
    with pytest.raises(StoreError, match="field -> condition"):
        store.scroll_ids(["kind", "image"])  # type: ignore[arg-type]


@pytest.fixture
def fan(store: VectorStore) -> tuple[list[str], list[float]]:
    """Ten image points at growing angles from the query (scores cos(angle), known exactly), plus
    one point with only a text vector. Returns the image ids, best first, and their scores."""
    angles = [0.1 * (i + 1) for i in range(10)]
    ids = [point_id(f"fan-{i}") for i in range(10)]
    points = [
        Point(pid, {IMAGE: [math.cos(a), math.sin(a), 0, 0, 0, 0, 0, 0]}, {"i": i})
        for i, (pid, a) in enumerate(zip(ids, angles, strict=True))
    ]
    points.append(Point(point_id("text-only"), {TEXT: [1, 0, 0, 0, 0, 0]}, {"i": -1}))
    store.upsert(points[::-1])
    return ids, [math.cos(a) for a in angles]


QUERY = [2.0, 0, 0, 0, 0, 0, 0, 0]


def test_search_is_best_first_with_cosine_scores(store: VectorStore, fan: tuple[list[str], list[float]]) -> None:
    ids, scores = fan
    hits = store.search(IMAGE, QUERY, top_k=3)
    assert [h.id for h in hits] == ids[:3]
    np.testing.assert_allclose([h.score for h in hits], scores[:3], atol=1e-5)
    assert [h.payload["i"] for h in hits] == [0, 1, 2]


def test_offset_pages_through_the_ranking(store: VectorStore, fan: tuple[list[str], list[float]]) -> None:
    ids, _ = fan
    pages = [store.search(IMAGE, QUERY, top_k=4, offset=o) for o in (0, 4, 8)]
    assert [[h.id for h in page] for page in pages] == [ids[0:4], ids[4:8], ids[8:10]]


def test_threshold_cuts_by_score(store: VectorStore, fan: tuple[list[str], list[float]]) -> None:
    ids, scores = fan
    hits = store.search(IMAGE, QUERY, top_k=10, threshold=(scores[4] + scores[5]) / 2)
    assert [h.id for h in hits] == ids[:5]


def test_points_without_the_vector_are_not_candidates(store: VectorStore, fan: tuple[list[str], list[float]]) -> None:
    ids, _ = fan
    assert [h.id for h in store.search(IMAGE, QUERY, top_k=100)] == ids
    assert [h.id for h in store.search(TEXT, [1, 0, 0, 0, 0, 0], top_k=100)] == [point_id("text-only")]


def test_bad_search_arguments_are_refused(store: VectorStore) -> None:
    with pytest.raises(StoreError, match=r"unknown vector 'clip\.audio'.*all-MiniLM-L6-v2\.text.*demo-clip\.image"):
        store.search("clip.audio", np.ones(8))
    with pytest.raises(DimensionError, match=r"'demo-clip\.image' is 8-d in the collection; got 512-d"):
        store.search(IMAGE, np.ones(512))
    with pytest.raises(StoreError, match="NaN"):
        store.search(IMAGE, [float("nan")] * 8)
    with pytest.raises(StoreError, match="top_k"):
        store.search(IMAGE, np.ones(8), top_k=0)


def test_reopen_with_another_size_names_both_sizes(store: VectorStore) -> None:
    store.upsert([Point(point_id("a"), {IMAGE: np.ones(8)}, {})])
    other = _same_collection(store)
    with pytest.raises(DimensionError, match=r"'demo-clip\.image' is 8-d in the collection; got 16-d"):
        other.open({IMAGE: 16})
    with pytest.raises(StoreError, match="mmembed migrate --to bind"):
        other.open({"bind.audio": 128})
    other.open({IMAGE: 8})
    assert other.vectors == DIMS
    assert other.count() == 1
    other.close()


def test_upsert_with_a_wrong_size_writes_nothing(store: VectorStore) -> None:
    good = [Point(point_id(f"ok-{i}"), {IMAGE: v}, {"n": i}) for i, v in enumerate(_random_vectors(5, 8))]
    bad = Point(point_id("bad"), {IMAGE: np.ones(8), TEXT: np.ones(384)}, {})
    with pytest.raises(
        DimensionError, match=rf"'all-MiniLM-L6-v2\.text' is 6-d in the collection; got 384-d.*{bad.id}"
    ):
        store.upsert([*good, bad], batch_size=2)
    assert store.count() == 0


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_vectors_are_refused_before_anything_is_written(store: VectorStore, poison: float) -> None:
    good = [Point(point_id(f"ok-{i}"), {IMAGE: v}, {}) for i, v in enumerate(_random_vectors(3, 8))]
    vector = np.ones(8)
    vector[5] = poison
    bad = Point(point_id("poisoned"), {IMAGE: vector}, {})
    with pytest.raises(StoreError, match=f"point {bad.id}.*NaN or infinite"):
        store.upsert([*good, bad], batch_size=1)
    assert store.count() == 0


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (Point("not-a-uuid", {IMAGE: np.ones(8)}, {}), "not a UUID"),
        (Point(point_id("x").upper(), {IMAGE: np.ones(8)}, {}), "canonical"),
        (Point(point_id("x"), {"clip.audio": np.ones(8)}, {}), "unknown vector 'clip.audio'"),
        (Point(point_id("x"), {IMAGE: np.zeros(8)}, {}), "all zeros"),
        (Point(point_id("x"), {IMAGE: np.ones(8)}, {"n": np.float32(1)}), "not plain JSON"),
    ],
    ids=["id", "uppercase-id", "name", "zeros", "payload"],
)
def test_bad_points_are_refused_before_anything_is_written(store: VectorStore, point: Point, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        store.upsert([Point(point_id("fine"), {IMAGE: np.ones(8)}, {}), point])
    assert store.count() == 0


def test_one_id_twice_in_one_upsert_is_refused(store: VectorStore) -> None:
    pid = point_id("twice")
    with pytest.raises(StoreError, match=f"{pid} appears twice"):
        store.upsert([Point(pid, {IMAGE: np.ones(8)}, {}), Point(pid, {TEXT: np.ones(6)}, {})])
    assert store.count() == 0


def test_verify_passes_on_good_writes(store: VectorStore) -> None:
    points = [
        Point(point_id(f"v-{i}"), {IMAGE: v, TEXT: np.ones(6) + i}, {"n": i, "pair": (i, "x")})
        for i, v in enumerate(_random_vectors(40, 8))
    ]
    store.upsert(points)
    store.verify(points, sample=100)
    store.verify(points, sample=5, seed=3)


def test_verify_accepts_floats_the_engine_prints_one_ulp_off(store: VectorStore) -> None:
    # Qdrant Edge 0.9 reads 1795674344.7832859 back as 1795674344.783286; a timestamp is not a corrupt write.
    points = [
        Point(
            point_id("t"),
            {IMAGE: _random_vectors(1, 8)[0]},
            {"added_at": 1795674344.7832859, "meta": {"w": [0.1 + 0.2]}},
        )
    ]
    store.upsert(points)
    store.verify(points)
    points[0].payload["added_at"] += 1e-3
    with pytest.raises(VerificationError):
        store.verify(points)


def test_verify_names_a_point_changed_behind_the_store(store: VectorStore) -> None:
    points = [Point(point_id(f"v-{i}"), {IMAGE: v}, {"n": i}) for i, v in enumerate(_random_vectors(40, 8))]
    store.upsert(points)
    vector_changed, payload_changed, deleted = points[7].id, points[20].id, points[33].id
    _overwrite_vector_behind_the_store(store, vector_changed, IMAGE, [1.0, 0, 0, 0, 0, 0, 0, 0])
    _overwrite_payload_behind_the_store(store, payload_changed, {"n": -1})
    store.delete([deleted])
    with pytest.raises(VerificationError) as caught:
        store.verify(points, sample=len(points))
    assert caught.value.ids == [vector_changed, payload_changed, deleted]
    assert vector_changed in str(caught.value)


def test_delete_removes_and_is_idempotent(store: VectorStore) -> None:
    vectors = _random_vectors(5, 8)
    points = [Point(point_id(f"d-{i}"), {IMAGE: v}, {"n": i}) for i, v in enumerate(vectors)]
    store.upsert(points)
    gone = [points[1].id, points[3].id]
    store.delete(gone)
    store.delete([*gone, point_id("never-written")])
    assert store.count() == 3
    assert store.retrieve(gone) == []
    assert set(store.scroll_ids()) == {points[0].id, points[2].id, points[4].id}
    assert not {h.id for h in store.search(IMAGE, vectors[1], top_k=10)} & set(gone)


def test_scroll_ids_pages_past_one_page(store: VectorStore) -> None:
    points = [Point(point_id(f"s-{i}"), {IMAGE: v}, {}) for i, v in enumerate(_random_vectors(2500, 8))]
    store.upsert(points, batch_size=1000)
    assert sorted(store.scroll_ids()) == sorted(p.id for p in points)


def test_a_store_must_be_opened_first(tmp_path: Path) -> None:
    for kind in ("edge", "client"):
        with pytest.raises(StoreError, match="call open"):
            _new_store(kind, tmp_path).count()


def test_edge_data_survives_close_and_reopen(tmp_path: Path) -> None:
    first = EdgeStore(tmp_path / "catalog")
    first.open(DIMS, indexes={"kind": "keyword"})
    points = [
        Point(point_id(f"p-{i}"), {IMAGE: v}, {"kind": "image", "n": i}) for i, v in enumerate(_random_vectors(30, 8))
    ]
    first.upsert(points)
    first.delete([points[0].id])
    first.close()

    again = EdgeStore(tmp_path / "catalog")
    again.open({IMAGE: 8})
    assert again.vectors == DIMS
    assert again.count({"kind": "image"}) == 29
    again.verify(points[1:], sample=100)
    assert again.retrieve([points[0].id]) == []
    again.close()


def test_edge_shard_is_held_by_one_store_at_a_time(tmp_path: Path) -> None:
    first = EdgeStore(tmp_path / "catalog")
    first.open(DIMS)
    with pytest.raises(StoreError, match=r"already open.*MMEMBED_QDRANT_URL"):
        EdgeStore(tmp_path / "catalog").open(DIMS)
    first.close()
    second = EdgeStore(tmp_path / "catalog")
    second.open(DIMS)
    assert second.count() == 0
    second.close()


@pytest.mark.parametrize("durable", [True, False])
def test_edge_keeps_acknowledged_writes_through_a_crash(tmp_path: Path, durable: bool) -> None:
    """The writer process is SIGKILLed without close() right after upsert() returns. A write left
    unflushed (``durable=False``, as a bulk job writes between checkpoints) is replayed from the
    shard's write-ahead log."""
    script = f"""
import os, signal
import numpy as np
from pathlib import Path
from mmembed.store.vectors import EdgeStore, Point, point_id
s = EdgeStore(Path({str(tmp_path / "catalog")!r}))
s.open({DIMS!r})
s.upsert([Point(point_id(f"c-{{i}}"), {{"{IMAGE}": np.ones(8) + i}}, {{"n": i}}) for i in range(50)], durable={durable})
os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert killed.returncode == -9
    after = EdgeStore(tmp_path / "catalog")
    after.open(DIMS)
    assert after.count() == 50
    assert after.retrieve([point_id("c-49")])[0].payload == {"n": 49}
    after.close()


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    embedded = open_store(Settings(data_dir=tmp_path, qdrant_url=None, collection="things").vectors_config())
    assert isinstance(embedded, EdgeStore) and embedded.path == tmp_path / "vectors" / "things"
    in_memory = open_store(Settings(data_dir=tmp_path, qdrant_url=":memory:", collection="things").vectors_config())
    assert isinstance(in_memory, ClientStore) and in_memory.collection == "things"
    in_memory.open({IMAGE: 8})
    assert in_memory.count() == 0
    in_memory.close()
    with pytest.raises(StoreError, match="folder"):
        open_store(Settings(data_dir=tmp_path, qdrant_url=None, collection="../escape").vectors_config())


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_large_enough_collection_gets_the_configured_index_and_still_finds_its_points(
    tmp_path: Path, quantization: str
) -> None:
    """Below ``min_points`` an exact scan is as fast and nothing is built; above it, the search that
    runs through the graph (and int8 rescoring) still answers every point's own vector with itself."""
    index = IndexConfig(m=8, ef_construct=32, ef=64, quantization=quantization, min_points=500)  # type: ignore[arg-type]
    store = EdgeStore(tmp_path / "indexed", index)
    store.open({IMAGE: 8})
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((400, 8)).astype(np.float32)
    store.upsert([Point(point_id(f"p{n}"), {IMAGE: v}, {"n": n}) for n, v in enumerate(vectors)])
    assert store.build_index() is False
    store.upsert([Point(point_id(f"q{n}"), {IMAGE: v}, {"n": n}) for n, v in enumerate(vectors + 0.5)])
    assert store.build_index() is True
    edge_config = (tmp_path / "indexed" / "edge_config.json").read_text()
    assert '"m":8' in edge_config.replace(" ", "") and ("int8" in edge_config.lower()) == (quantization == "int8")
    for n in range(0, 400, 40):
        assert store.search(IMAGE, vectors[n], top_k=1)[0].id == point_id(f"p{n}")


def test_segments_stop_growing_at_their_size_and_live_on_disk(tmp_path: Path) -> None:
    """A job indexes each window as it ends: every window becomes sealed segments of at most
    ``segment_points`` instead of one segment rebuilt over the whole collection, and every
    point is still found through the graphs of all of them."""
    index = IndexConfig(m=8, ef_construct=32, ef=64, min_points=500, segment_points=1000)
    store = EdgeStore(tmp_path / "segmented", index)
    store.open({IMAGE: 8}, indexes={"source": "keyword", "size": "integer"})
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3000, 8)).astype(np.float32)
    for window in range(3):
        rows = range(window * 1000, (window + 1) * 1000)
        store.upsert([Point(point_id(f"s{n}"), {IMAGE: vectors[n]}, {"source": "x", "size": n}) for n in rows])
        assert store.build_index() is True
    info = store.shard.info()
    assert info.segments_count >= 3 and info.indexed_vectors_count >= 3000 - 10
    config = json.loads((tmp_path / "segmented" / "edge_config.json").read_text())
    assert config["payload_memory"] == "cold" and config["optimizers"]["max_segment_size"] == 1000 * 8 * 4 // 1024
    for n in range(0, 3000, 150):
        assert store.search(IMAGE, vectors[n], top_k=1)[0].id == point_id(f"s{n}")
    assert store.count({"size": {"gte": 2000}}) == 1000
    store.close()


def test_a_segment_of_several_named_vectors_stops_at_segment_points_too(tmp_path: Path) -> None:
    """The engine sizes a segment by its largest vector storage: sized by the sum of an image and a
    caption vector, a segment took twice the points, and a job's last, short window was merged into
    the window before it (a rebuild of both, the peak memory of a 100k-image job)."""
    index = IndexConfig(m=8, ef_construct=32, ef=64, min_points=500, segment_points=1000)
    store = EdgeStore(tmp_path / "two", index)
    store.open({IMAGE: 8, TEXT: 8})
    vectors = np.random.default_rng(6).standard_normal((1600, 8)).astype(np.float32)
    for rows in (range(0, 1000), range(1000, 1600)):
        store.upsert([Point(point_id(f"s{n}"), {IMAGE: vectors[n], TEXT: vectors[n]}) for n in rows])
        assert store.build_index() is True
    config = json.loads((tmp_path / "two" / "edge_config.json").read_text())
    assert config["optimizers"]["max_segment_size"] == 1000 * 8 * 4 // 1024
    assert store.shard.info().segments_count == 3  # the two windows apart, and the empty appendable one
    assert store.search(TEXT, vectors[1500], top_k=1)[0].id == point_id("s1500")
    store.close()


def test_retrieve_reads_only_the_fields_asked_for(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "fields")
    store.open({IMAGE: 4})
    store.upsert([Point(point_id("a"), {IMAGE: [1, 0, 0, 0]}, {"source_version": "v1", "text": "long"})])
    assert [p.payload for p in store.retrieve([point_id("a")], fields=["source_version"])] == [{"source_version": "v1"}]
    assert [p.payload for p in store.retrieve([point_id("a"), point_id("b")], fields=[])] == [{}]
    assert store.retrieve([point_id("a")])[0].payload == {"source_version": "v1", "text": "long"}
    store.close()


def test_the_index_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMEMBED_HNSW_EF", "200")
    monkeypatch.setenv("MMEMBED_VECTOR_QUANTIZATION", "int8")
    monkeypatch.setenv("MMEMBED_INDEX_SEGMENT_POINTS", "131072")
    index = Settings().vectors_config().index
    assert (index.ef, index.quantization, index.m, index.segment_points) == (200, "int8", IndexConfig.m, 131072)


def _axis(dim: int, i: int, lean: float = 0.0) -> np.ndarray:
    """A unit vector along axis ``i``, leaning towards the next axis by ``lean``."""
    v = np.zeros(dim)
    v[i % dim], v[(i + 1) % dim] = 1.0, lean
    return v


def test_a_fused_search_ranks_over_both_vectors_and_says_where_each_hit_ranked(store: VectorStore) -> None:
    # "both" is second on each vector alone and first when fused; "image" and "text" each lead one vector.
    store.upsert(
        [
            Point(point_id("image"), {IMAGE: _axis(8, 0), TEXT: _axis(6, 3)}, {"shop": "north"}),
            Point(point_id("text"), {IMAGE: _axis(8, 4), TEXT: _axis(6, 0)}, {"shop": "south"}),
            Point(point_id("both"), {IMAGE: _axis(8, 0, 0.3), TEXT: _axis(6, 0, 0.3)}, {"shop": "north"}),
            Point(point_id("image-only"), {IMAGE: _axis(8, 0, 0.6)}, {"shop": "north"}),
            *(Point(point_id(f"far-{i}"), {IMAGE: _axis(8, 5), TEXT: _axis(6, 4)}, {"shop": "west"}) for i in range(5)),
        ]
    )
    queries = {IMAGE: _axis(8, 0), TEXT: _axis(6, 0)}
    fused = store.search_fused(queries, top_k=3)
    assert fused[0].id == point_id("both")
    assert fused[0].matched == {IMAGE: 2, TEXT: 2}
    assert {h.id for h in fused[1:]} == {point_id("image"), point_id("text")}
    assert store.search_fused(queries, top_k=3, fusion="dbsf")[0].id == point_id("both")
    # A point lacking one vector is still a candidate through the other.
    everything = store.search_fused(queries, top_k=20)
    only = next(h for h in everything if h.id == point_id("image-only"))
    assert set(only.matched) == {IMAGE}
    # Filters, offset and threshold as for one vector: a filter applies to every vector's candidates...
    north = store.search_fused(queries, top_k=10, filter={"shop": "north"})
    assert {h.id for h in north} == {point_id("image"), point_id("both"), point_id("image-only")}
    assert [h.id for h in store.search_fused(queries, top_k=2, offset=1)] == [h.id for h in fused[1:3]]
    # ... and a threshold is a cosine each candidate reaches on its own vector.
    close = store.search_fused(queries, top_k=20, threshold=0.8)
    assert {h.id for h in close} == {point_id("image"), point_id("text"), point_id("both"), point_id("image-only")}
    with pytest.raises(StoreError, match="unknown vector"):
        store.search_fused({"nope.image": _axis(8, 0)})
    with pytest.raises(DimensionError):
        store.search_fused({IMAGE: _axis(6, 0)})
    with pytest.raises(StoreError, match="unknown fusion"):
        store.search_fused(queries, fusion="max")  # type: ignore[arg-type]

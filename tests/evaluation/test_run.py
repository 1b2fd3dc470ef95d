"""Evaluation end to end on a small demo set: a real model scores well, a shuffled one at
chance, and the report, plots and recommendation are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmembed.config import Settings
from mmembed.evaluation.dataset import DatasetError, EvalSet, Item, load_eval_set
from mmembed.evaluation.demo import build_demo_set
from mmembed.evaluation.embedders import LocalEmbedder
from mmembed.evaluation.report import write_report
from mmembed.evaluation.run import Costs, _dbsf, evaluate_fused, evaluate_model
from mmembed.loaders.fetch import FetchError
from mmembed.store.vectors import EdgeStore, Point, point_id

ITEMS = 60


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> EvalSet:
    items, queries = build_demo_set(
        tmp_path_factory.mktemp("evalset"), items=ITEMS, text_queries=20, image_queries=8, seed=5
    )
    return load_eval_set(items, queries)


class Shuffled:
    """demo-clip with its item vectors handed back in a fixed random order: the same vectors,
    the same speed, no idea which item is which."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner, self.name, self.modalities, self.dim = inner, "shuffled", inner.modalities, inner.dim
        self.rng = np.random.default_rng(0)

    def embed(self, modality: str, contents: list) -> tuple[np.ndarray, int]:
        vectors, failed = self.inner.embed(modality, contents)
        return (vectors[self.rng.permutation(len(vectors))] if len(contents) > 1 else vectors), failed


@pytest.fixture(scope="module")
def results(small_set: EvalSet, settings: Settings, demo_clip):
    real = LocalEmbedder("demo-clip", settings)
    costs = Costs(corpus_size=1_000_000, price_per_hour=2.0, traffic_qps=50)
    return [
        evaluate_model(small_set, real, batch_size=ITEMS, costs=costs),
        evaluate_model(small_set, Shuffled(real), batch_size=ITEMS, costs=costs),
    ]


def test_the_real_model_finds_the_scenes_and_the_shuffled_one_scores_at_chance(results):
    real, shuffled = results
    assert real.quality["recall@10"] >= 0.8 and real.coverage == 1.0, real.quality
    # Chance: about 10 of 60 items, so Recall@10 near 1/6 for one relevant item per query.
    assert shuffled.quality["recall@10"] <= 0.35, shuffled.quality
    assert real.quality["mrr"] > 2 * shuffled.quality["mrr"]


def test_speed_and_projected_cost_follow_from_the_measurements(results):
    real = results[0]
    p = real.projection
    assert real.items_per_s > 0 and real.query_ms_p50 > 0 and real.batch_ms_p99 >= real.batch_ms_p50
    assert p["embed_hours"] == pytest.approx(1_000_000 / real.items_per_s / 3600)
    assert p["embed_cost_usd"] == pytest.approx(2.0 * p["embed_hours"])
    assert p["index_bytes"] == 1_000_000 * real.dim * 4
    assert p["machines_for_traffic"] == pytest.approx(50 * real.query_ms_p50 / 1000)


def test_the_report_recommends_the_real_model_and_writes_its_files(results, tmp_path: Path):
    report = write_report(results, tmp_path, {"items": ITEMS})
    assert report["recommendation"]["model"] == "demo-clip"
    assert "shuffled: Recall@10" in report["recommendation"]["against"][0]
    for name in ("report.md", "report.json", "recall.png", "latency_vs_recall.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report.json").read_text())["models"][0]["model"] == "demo-clip"
    assert "**Recommendation: demo-clip.**" in (tmp_path / "report.md").read_text()


def test_a_text_model_is_evaluated_over_the_captions_and_skips_image_queries(small_set, settings, minilm):
    result = evaluate_model(small_set, LocalEmbedder("all-MiniLM-L6-v2", settings), batch_size=ITEMS)
    assert result.coverage == pytest.approx(20 / 28)  # the 8 image queries need an image encoder
    assert result.quality["recall@10"] >= 0.8 and result.failed_items == 0


def test_a_fused_candidate_covers_every_query_its_parts_cover_and_adds_up_their_costs(small_set, settings, minilm):
    parts = []
    for name in ("demo-clip", "all-MiniLM-L6-v2"):
        scores: dict = {}
        parts.append(
            (evaluate_model(small_set, LocalEmbedder(name, settings), batch_size=ITEMS, scores=scores), scores)
        )
    fused = evaluate_fused(small_set, parts)
    clip, mini = parts[0][0], parts[1][0]
    assert fused.model == "demo-clip + all-MiniLM-L6-v2 (fused)" and fused.coverage == 1.0
    assert fused.dim == clip.dim + mini.dim and fused.query_ms_p50 == clip.query_ms_p50 + mini.query_ms_p50
    assert fused.items_per_s == pytest.approx(1 / (1 / clip.items_per_s + 1 / mini.items_per_s))
    assert fused.quality["recall@10"] >= min(clip.quality["recall@10"], mini.quality["recall@10"]) - 0.05
    assert len(parts[1][1]) == 20  # MiniLM scored only the text queries; the image ones are demo-clip's alone


def test_the_evaluations_fusion_ranks_as_the_engines_own(tmp_path: Path):
    """What eval calls fused is what POST /search returns: Qdrant Edge's DBSF over the same candidates."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 6))
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    store = EdgeStore(tmp_path / "fused")
    store.open({"a": 8, "b": 6})
    store.upsert([Point(point_id(str(i)), {"a": a[i], "b": b[i]}, {"i": i}) for i in range(200)])
    qa, qb = a[0] + 0.5 * rng.normal(size=8), b[1] + 0.5 * rng.normal(size=6)
    qa, qb = qa / np.linalg.norm(qa), qb / np.linalg.norm(qb)
    engine = store.search_fused({"a": qa, "b": qb}, top_k=10, fusion="dbsf")  # 50 candidates per vector
    mine = _dbsf(a @ qa, 50) + _dbsf(b @ qb, 50)
    assert [h.payload["i"] for h in engine] == [int(i) for i in np.argsort(-mine)[:10]]
    assert [h.score for h in engine] == pytest.approx(sorted(mine, reverse=True)[:10], abs=1e-4)
    store.close()


def test_a_malformed_queries_file_names_its_line(tmp_path: Path):
    (tmp_path / "items.jsonl").write_text('{"id": "a", "uri": "a.png"}\n')
    (tmp_path / "queries.jsonl").write_text('{"id": "q", "text": "x", "relevant": ["a"]}\n{"id": "r"}\n')
    with pytest.raises(DatasetError, match=r"queries\.jsonl:2"):
        load_eval_set(tmp_path / "items.jsonl", tmp_path / "queries.jsonl")
    (tmp_path / "queries.jsonl").write_text('{"id": "q", "text": "x", "relevant": ["nope"]}\n')
    with pytest.raises(DatasetError, match="not in the manifest"):
        load_eval_set(tmp_path / "items.jsonl", tmp_path / "queries.jsonl")


def test_item_urls_follow_the_fetch_address_policy():
    """An eval set is fetched like any other URL input: a private address is refused unless allowed."""
    item = Item(id="a", kind="image", uri="http://169.254.169.254/latest/meta-data/cat.png")
    with pytest.raises(FetchError) as refused:
        item.content()
    assert refused.value.code == "url_forbidden_address"

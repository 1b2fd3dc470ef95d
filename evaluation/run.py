"""Evaluate candidate models on one evaluation set: retrieval quality, encode speed, and
what embedding the whole corpus and serving queries would cost.

Items are encoded in their own modality when the model has it, else through their caption
when the model reads text (so a text model is compared fairly as "search the captions");
queries a model cannot encode are left out and reported as lower coverage. Ranking is
exact cosine over every item, so the figures measure the model, not an index.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from mmembed.evaluation.dataset import EvalSet
from mmembed.evaluation.embedders import Embedder
from mmembed.evaluation.metrics import ndcg_at_k, recall_at_k, reciprocal_rank

KS = (1, 5, 10)


@dataclass
class Costs:
    """What the user's own scale would cost, projected from the measured speed."""

    corpus_size: int = 0  # 0: the evaluation set's size
    price_per_hour: float = 1.0  # USD per hour of the machine the encoder runs on
    traffic_qps: float = 10.0  # queries per second to serve


@dataclass
class ModelResult:
    model: str
    dim: int
    quality: dict[str, float]
    coverage: float  # share of queries this model could encode
    items_per_s: float
    batch_ms_p50: float
    batch_ms_p99: float
    query_ms_p50: float
    query_ms_p99: float
    failed_items: int
    projection: dict[str, float] = field(default_factory=dict)


def _timed_batches(
    embedder: Embedder, modality: str, contents: list, batch_size: int
) -> tuple[np.ndarray, list[float], int]:
    vectors, times, failed = [], [], 0
    for start in range(0, len(contents), batch_size):
        started = time.perf_counter()
        v, f = embedder.embed(modality, contents[start : start + batch_size])
        times.append((time.perf_counter() - started) * 1000)
        vectors.append(v)
        failed += f
    return np.concatenate(vectors), times, failed


Scores = dict[str, np.ndarray]  # per query id: its cosine to every item, in the evaluation set's order


def evaluate_model(
    evalset: EvalSet,
    embedder: Embedder,
    batch_size: int = 32,
    single_queries: int = 20,
    costs: Costs | None = None,
    scores: Scores | None = None,
) -> ModelResult:
    """``scores``: filled with each encoded query's scores, for a fused candidate (``evaluate_fused``)."""
    costs = costs or Costs()
    item_vectors = np.zeros((len(evalset.items), embedder.dim), np.float32)
    batch_times: list[float] = []
    failed = 0
    by_modality: dict[str, list[int]] = {}
    for n, item in enumerate(evalset.items):
        if item.kind in embedder.modalities:
            by_modality.setdefault(item.kind, []).append(n)
        elif "text" in embedder.modalities and item.caption:
            by_modality.setdefault("caption", []).append(n)
        else:
            failed += 1
    for modality, rows in by_modality.items():
        contents = [
            evalset.items[r].caption if modality == "caption" else evalset.items[r].content(evalset.fetch_limits)
            for r in rows
        ]
        vectors, times, f = _timed_batches(
            embedder, "text" if modality == "caption" else modality, contents, batch_size
        )
        item_vectors[rows] = vectors
        batch_times += times
        failed += f
    encoded = len(evalset.items) - failed
    items_per_s = encoded / (sum(batch_times) / 1000) if batch_times else 0.0

    usable = [q for q in evalset.queries if q.kind in embedder.modalities]
    rows: Scores = {}
    for kind in sorted({q.kind for q in usable}):
        group = [q for q in usable if q.kind == kind]
        vectors, _, _ = _timed_batches(embedder, kind, [q.content(evalset.fetch_limits) for q in group], batch_size)
        rows |= {q.id: row for q, row in zip(group, vectors @ item_vectors.T, strict=True)}
    if scores is not None:
        scores |= rows
    single = []
    for q in usable[:single_queries]:
        started = time.perf_counter()
        embedder.embed(q.kind, [q.content(evalset.fetch_limits)])
        single.append((time.perf_counter() - started) * 1000)

    result = ModelResult(
        model=embedder.name,
        dim=embedder.dim,
        quality=_quality(evalset, rows),
        coverage=len(usable) / len(evalset.queries) if evalset.queries else 0.0,
        items_per_s=items_per_s,
        batch_ms_p50=float(np.percentile(batch_times, 50)) if batch_times else 0.0,
        batch_ms_p99=float(np.percentile(batch_times, 99)) if batch_times else 0.0,
        query_ms_p50=float(np.percentile(single, 50)) if single else 0.0,
        query_ms_p99=float(np.percentile(single, 99)) if single else 0.0,
        failed_items=failed,
    )
    result.projection = project(result, costs.corpus_size or len(evalset.items), costs)
    return result


def _quality(evalset: EvalSet, rows: Scores) -> dict[str, float]:
    """Mean Recall@k, MRR and nDCG@10 over the queries scored, each ranking every item by its score."""
    per_query: dict[str, list[float]] = {f"recall@{k}": [] for k in KS} | {"mrr": [], "ndcg@10": []}
    for q in evalset.queries:
        if q.id not in rows:
            continue
        ranked = [evalset.items[j].id for j in np.argsort(-rows[q.id], kind="stable")]
        for k in KS:
            per_query[f"recall@{k}"].append(recall_at_k(ranked, q.relevant, k))
        per_query["mrr"].append(reciprocal_rank(ranked, q.relevant))
        per_query["ndcg@10"].append(ndcg_at_k(ranked, q.relevant, 10))
    return {k: float(np.mean(v)) if v else 0.0 for k, v in per_query.items()}


def fused_name(models: list[str]) -> str:
    return " + ".join(models) + " (fused)"


def evaluate_fused(
    evalset: EvalSet, parts: list[tuple[ModelResult, Scores]], costs: Costs | None = None, candidates: int = 50
) -> ModelResult:
    """A fused search as a candidate: each model ranks the items by its own vector, and the server's
    fusion merges them (``dbsf``, what ``POST /search`` does by default: each model's ``candidates``
    best scores normalised by their mean and three standard deviations, then summed; an item outside a
    model's candidates adds nothing). Speed and cost are the parts' together: every item and query goes
    through each model, and the index holds every vector."""
    costs = costs or Costs()
    rows: Scores = {}
    for q in evalset.queries:
        own = [scores[q.id] for _, scores in parts if q.id in scores]
        if own:
            rows[q.id] = np.sum([_dbsf(row, candidates) for row in own], axis=0)
    results = [r for r, _ in parts]
    result = ModelResult(
        model=fused_name([r.model for r in results]),
        dim=sum(r.dim for r in results),
        quality=_quality(evalset, rows),
        coverage=len(rows) / len(evalset.queries) if evalset.queries else 0.0,
        items_per_s=1 / sum(1 / r.items_per_s for r in results) if all(r.items_per_s for r in results) else 0.0,
        batch_ms_p50=sum(r.batch_ms_p50 for r in results),
        batch_ms_p99=sum(r.batch_ms_p99 for r in results),
        query_ms_p50=sum(r.query_ms_p50 for r in results),
        query_ms_p99=sum(r.query_ms_p99 for r in results),
        failed_items=max(r.failed_items for r in results),
    )
    result.projection = project(result, costs.corpus_size or len(evalset.items), costs)
    return result


def _dbsf(row: np.ndarray, candidates: int) -> np.ndarray:
    """Distribution-based score fusion's share of one ranking, as Qdrant computes it: the top
    ``candidates`` scores mapped from [mean - 3 std, mean + 3 std] to [0, 1]; the rest 0."""
    top = np.argsort(-row, kind="stable")[:candidates]
    scores = row[top]
    std = scores.std(ddof=1) if len(scores) > 1 else 0.0  # the sample deviation, as Qdrant takes it
    low, spread = scores.mean() - 3 * std, 6 * std
    out = np.zeros_like(row)
    out[top] = (scores - low) / spread if spread > 0 else 0.5
    return out


def project(result: ModelResult, corpus_size: int, costs: Costs) -> dict[str, float]:
    """Embedding the corpus at the measured rate on one machine; serving the traffic with
    one query per request at the measured single-query latency; float32 vectors."""
    hours = corpus_size / result.items_per_s / 3600 if result.items_per_s else float("inf")
    queries_per_machine = 1000 / result.query_ms_p50 if result.query_ms_p50 else float("inf")
    machines = costs.traffic_qps / queries_per_machine
    return {
        "corpus_size": corpus_size,
        "embed_hours": hours,
        "embed_cost_usd": hours * costs.price_per_hour,
        "query_cost_usd_per_million": 1e6 / queries_per_machine / 3600 * costs.price_per_hour,
        "machines_for_traffic": machines,
        "traffic_qps": costs.traffic_qps,
        "index_bytes": corpus_size * result.dim * 4,
    }


def as_dict(result: ModelResult) -> dict:
    return asdict(result)

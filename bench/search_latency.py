"""Vector store speed: the embedded engine (Qdrant Edge) against the client backend
(qdrant-client's in-process ':memory:' mode, the only Qdrant reachable without a server).

For 10k and 100k random 512-d unit vectors (fixed seed) with a small payload, through the
store's own interface (validation included, as the server pays it): upsert points/s, then
search p50/p99 at top_k 10. Edge is timed twice: exact (as written, before any index) and
with HNSW after optimize(), whose build time is reported on its own; HNSW recall@10 is
measured against exact numpy search. The client's ':memory:' mode is a brute-force Python
scan, so at 100k it gets fewer queries (the output says how many). Ratios are edge/client
in this same run, so they hold on a noisy machine.

    python bench/search_latency.py [--sizes 10000 100000] [--out bench/results/search_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import qdrant_edge
from qdrant_client import QdrantClient

from mmembed.store.vectors import ClientStore, EdgeStore, Point, VectorStore, point_id

DIM = 512
TOP_K = 10
NAME = "bench.image"
WRITE_CALL = 1024  # points per upsert() call, as a bulk job would write them
EF_SWEEP = (128, 256, 512)


def _unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _upsert_rate(store: VectorStore, points: list[Point]) -> float:
    started = time.perf_counter()
    for start in range(0, len(points), WRITE_CALL):
        store.upsert(points[start : start + WRITE_CALL])
    return len(points) / (time.perf_counter() - started)


def _latencies(store: VectorStore, queries: np.ndarray) -> tuple[dict[str, float], list[list[str]]]:
    """p50/p99 in ms over these queries, and each query's hit ids (for recall)."""
    store.search(NAME, queries[0], top_k=TOP_K)  # warm-up: first call pays for lazy setup
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        hits = store.search(NAME, q, top_k=TOP_K)
        times.append(time.perf_counter() - started)
        found.append([h.id for h in hits])
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return {"queries": len(queries), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}, found


def _recall(found: list[list[str]], vectors: np.ndarray, queries: np.ndarray, ids: list[str]) -> float:
    """Mean share of the exact top-10 (numpy, cosine on unit vectors) that the store returned."""
    exact = np.argsort(-(queries[: len(found)] @ vectors.T), axis=1)[:, :TOP_K]
    hits = [len({ids[j] for j in row} & set(got)) / TOP_K for row, got in zip(exact, found, strict=True)]
    return round(float(np.mean(hits)), 4)


def _ef_sweep(store: EdgeStore, vectors: np.ndarray, queries: np.ndarray, ids: list[str]) -> dict[str, dict]:
    """Recall and p50 at wider HNSW beams than Qdrant's default, through the engine directly (the store's
    search has no beam setting): random 512-d vectors are HNSW's hardest case, and this shows the price of recall."""
    sweep = {}
    for ef in EF_SWEEP:
        params = qdrant_edge.SearchParams(hnsw_ef=ef)
        times, found = [], []
        for q in queries:
            request = qdrant_edge.QueryRequest(
                limit=TOP_K, query=qdrant_edge.Query.Nearest(q.tolist(), using=NAME), params=params
            )
            started = time.perf_counter()
            points = store.shard.query(request)
            times.append(time.perf_counter() - started)
            found.append([str(p.id) for p in points])
        sweep[str(ef)] = {
            "recall_at_10": _recall(found, vectors, queries, ids),
            "p50_ms": round(float(np.percentile(np.array(times) * 1000, 50)), 3),
        }
    return sweep


def _run(n: int, queries: np.ndarray, args: argparse.Namespace, workdir: Path) -> dict:
    vectors = _unit_rows(n, seed=0)
    ids = [point_id(f"bench://{n}/{i}") for i in range(n)]
    points = [
        Point(pid, {NAME: v}, {"n": i, "kind": ("image", "text")[i % 2]})
        for i, (pid, v) in enumerate(zip(ids, vectors, strict=True))
    ]
    recall_queries = queries[: args.recall_queries]
    entry: dict = {}

    edge = EdgeStore(workdir / f"edge-{n}")
    edge.open({NAME: DIM}, indexes={"kind": "keyword"})
    rate = _upsert_rate(edge, points)
    print(f"{n:>7} edge   upsert {rate:9.0f} points/s", flush=True)
    exact, _ = _latencies(edge, queries)
    print(f"{n:>7} edge   exact  p50 {exact['p50_ms']:8.2f} ms  p99 {exact['p99_ms']:8.2f} ms", flush=True)
    started = time.perf_counter()
    edge.shard.optimize()
    build_s = time.perf_counter() - started
    indexed = edge.shard.info().indexed_vectors_count
    hnsw, found = _latencies(edge, queries)
    recall = _recall(found[: len(recall_queries)], vectors, recall_queries, ids)
    print(
        f"{n:>7} edge   HNSW   p50 {hnsw['p50_ms']:8.2f} ms  p99 {hnsw['p99_ms']:8.2f} ms  "
        f"(build {build_s:.1f} s, {indexed} indexed, recall@10 {recall:.3f})",
        flush=True,
    )
    sweep = _ef_sweep(edge, vectors, recall_queries, ids)
    for ef, figures in sweep.items():
        print(f"{n:>7} edge   hnsw_ef {ef:>4}: recall@10 {figures['recall_at_10']:.3f}, p50 {figures['p50_ms']:.2f} ms")
    edge.close()
    entry["edge"] = {
        "upsert_points_per_s": round(rate),
        "exact_search": exact,
        "hnsw_build_s": round(build_s, 2),
        "hnsw_indexed_vectors": indexed,
        "hnsw_search": hnsw,
        "hnsw_recall_at_10": recall,
        "recall_queries": len(recall_queries),
        "hnsw_ef_sweep": sweep,
    }

    client = ClientStore(QdrantClient(":memory:"), "bench")
    client.open({NAME: DIM})
    rate = _upsert_rate(client, points)
    print(f"{n:>7} client upsert {rate:9.0f} points/s", flush=True)
    client_queries = queries[: args.client_queries_large] if n >= 100_000 else queries
    search, found = _latencies(client, client_queries)
    recall = _recall(found[: len(recall_queries)], vectors, recall_queries, ids)
    print(
        f"{n:>7} client search p50 {search['p50_ms']:8.2f} ms  p99 {search['p99_ms']:8.2f} ms  "
        f"({len(client_queries)} queries, recall@10 {recall:.3f})",
        flush=True,
    )
    client.close()
    entry["client"] = {"upsert_points_per_s": round(rate), "search": search, "recall_at_10": recall}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--client-queries-large", type=int, default=100, help="client queries at 100k points and up")
    parser.add_argument("--recall-queries", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_latency.json")
    args = parser.parse_args()

    queries = _unit_rows(args.queries, seed=1)
    results: dict[str, dict] = {}
    ratios: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmembed-bench-") as tmp:
        for n in args.sizes:
            entry = _run(n, queries, args, Path(tmp))
            results[str(n)] = entry
            edge, client = entry["edge"], entry["client"]
            ratios[f"{n}_upsert_rate_edge_vs_client"] = round(
                edge["upsert_points_per_s"] / client["upsert_points_per_s"], 2
            )
            for stat in ("p50_ms", "p99_ms"):
                for mode in ("exact", "hnsw"):
                    ratios[f"{n}_{stat.removesuffix('_ms')}_edge_{mode}_vs_client"] = round(
                        edge[f"{mode}_search"][stat] / client["search"][stat], 4
                    )
    report = {
        "benchmark": "search_latency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setup": {
            "dim": DIM,
            "top_k": TOP_K,
            "vectors": "random unit vectors, numpy default_rng(0); queries default_rng(1)",
            "payload": "{'n': int, 'kind': 'image'|'text'}, keyword index on kind (Edge)",
            "upsert": f"store.upsert() calls of {WRITE_CALL} points (batch_size 256), new ids",
            "client": "qdrant-client ':memory:' (brute-force Python); "
            f"{args.client_queries_large} queries at 100k points and up, {args.queries} below",
            "edge_exact": "Edge before optimize(): plain segments, exhaustive search",
            "edge_hnsw": "after optimize(), the engine's default HNSW settings and default search beam; "
            "hnsw_ef_sweep: the engine queried directly with wider beams (raw query, no store overhead)",
            "ratios": "edge / client: upsert above 1 means Edge is faster; latency below 1 means Edge is faster",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "qdrant-edge-py": version("qdrant-edge-py"),
            "qdrant-client": version("qdrant-client"),
            "numpy": np.__version__,
        },
        "total_s": round(time.perf_counter() - started, 1),
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out} ({report['total_s']} s)")


if __name__ == "__main__":
    main()

"""The embedded vector store's memory and indexing time as a collection grows, for the two ways a
bulk job can index it: one segment indexed when the job ends, or segments sealed and indexed after
each window (what ``Ingest.run`` does, at ``IndexConfig.segment_points``).

    python bench/edge_segments.py [--points 200000] [--out bench/results/edge_segments.json]

Each layout and size (``--points`` and a tenth of it) runs in a fresh process, through the shipped
``EdgeStore`` with the catalogue's payload indexes: 128-d vectors (demo-clip's width) with a
catalogue-like payload, written 256 at a time. Reported: write and index seconds, peak RSS (the
kernel's high-water mark) and its anonymous part at the end, segments, and search p50 over the
result; then each layout's peak RSS and per-point time at the large size against the small one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "edge_segments.json"
WINDOW = 65_536  # IngestOptions.window
LAYOUTS = {"one_segment_at_the_end": 10**9, "segments_per_window": WINDOW}


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out


def measure(points: int, layout: str) -> dict[str, Any]:
    import numpy as np

    from mmembed.store.catalog import PAYLOAD_INDEXES
    from mmembed.store.config import IndexConfig
    from mmembed.store.vectors import EdgeStore, Point, point_id

    index = IndexConfig(segment_points=LAYOUTS[layout])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        store = EdgeStore(Path(folder) / "catalog", index)
        store.open({"demo-clip.text": 128, "demo-clip.image": 128}, indexes=PAYLOAD_INDEXES)
        write_s = index_s = 0.0
        for start in range(0, points, 256):
            started = time.perf_counter()
            batch = []
            for n in range(start, min(points, start + 256)):
                uri = f"captions.jsonl#{n}"
                digest = hashlib.sha256(uri.encode()).hexdigest()
                payload = {"text": f"a photo of thing {n} on a table", "kind": "text", "source_uri": uri}
                payload |= {"content_hash": digest, "media_type": "text/plain", "size": 30, "meta": {}}
                payload |= {"source": "captions.jsonl", "source_version": digest[:32]}
                batch.append(Point(point_id(uri), {"demo-clip.text": rng.standard_normal(128)}, payload))
            store.upsert(batch)
            write_s += time.perf_counter() - started
            written = min(points, start + 256)
            if layout == "segments_per_window" and written % WINDOW == 0:
                started = time.perf_counter()
                store.build_index()
                index_s += time.perf_counter() - started
        started = time.perf_counter()
        store.build_index()  # the job's last window (or, for one segment, the whole collection)
        index_s += time.perf_counter() - started
        times = []
        for _ in range(200):
            query = rng.standard_normal(128)
            started = time.perf_counter()
            store.search("demo-clip.text", query, top_k=10)
            times.append((time.perf_counter() - started) * 1000)
        segments = store.shard.info().segments_count
        store.close()
    status = _status()
    return {
        "points": points,
        "write_s": write_s,
        "index_s": index_s,
        "per_point_ms": (write_s + index_s) / points * 1000,
        "peak_rss_mb": status["VmHWM"],
        "anon_at_end_mb": status["RssAnon"],
        "segments": segments,
        "search_p50_ms": float(np.percentile(times, 50)),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    for layout in LAYOUTS:
        sizes = {}
        for points in (args.points // 10, args.points):
            run = [sys.executable, __file__, "_run", str(points), layout]
            sizes[str(points)] = json.loads(subprocess.run(run, check=True, capture_output=True, text=True).stdout)
            print(f"[{layout}] {sizes[str(points)]}", flush=True)
        small, large = sizes[str(args.points // 10)], sizes[str(args.points)]
        sizes["ratios"] = {
            "peak_rss_large_vs_small": large["peak_rss_mb"] / small["peak_rss_mb"],
            "per_point_time_large_vs_small": large["per_point_ms"] / small["per_point_ms"],
        }
        results[layout] = sizes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v["ratios"] for k, v in results.items() if k in LAYOUTS}, indent=2))


if __name__ == "__main__":
    main()

"""Serving throughput: the HTTP server against the raw forward pass and a naive server.

One run, one machine, side by side (ViT-B-32 architecture, random weights: the compute
of the published ones):
  (a) ceiling: the batched forward pass in this process on pre-decoded tensors (images),
      and a batch-32 text forward padded to the longest text;
  (b) the server over HTTP: 256 JPEGs of about 640x480 as base64 (and 256 captions), one
      item per request, at client concurrency 1, 8 and 32;
  (c) a naive server: the same stack with max_batch_size 1, so each request runs alone.
Reports items/s and p50/p99 latency, with ratios against (a) and (c), the batch sizes the
server formed, and the CPU time each process spent per request (on a CPU-only machine
the HTTP path and the forward pass share the same cores, so this is where time goes).

    python bench/serve_throughput.py [--model ViT-B-32@random] [--out bench/results/serve_throughput.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import ray
import torch
from PIL import Image
from ray import serve

from mmembed.config import Settings
from mmembed.demo import world
from mmembed.encoders import Modality, load
from mmembed.serve.app import build_app
from mmembed.serve.launch import data_plane_env

N_ITEMS = 256
CONCURRENCY = (1, 8, 32)


def jpegs(n: int) -> list[bytes]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        image = world.render(world.random_scene(rng), rng, size=640).crop((0, 80, 640, 560))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ceiling(model: str, images: list[bytes], texts: list[str]) -> dict[str, float]:
    loaded = load(model, Settings(allow_downloads=False).models_config())
    image, text = loaded.encoder(Modality.IMAGE), loaded.encoder(Modality.TEXT)
    prepared = [image.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[:64]]
    out: dict[str, float] = {}
    for bs in (1, 32):
        batch = prepared[:bs]
        image.encode(batch)
        started, done = time.perf_counter(), 0
        while done < 64:
            image.encode(batch)
            done += bs
        out[f"images_per_s@{bs}"] = done / (time.perf_counter() - started)
    tokens = [text.preprocess(t) for t in texts[:32]]
    text.encode(tokens)
    started = time.perf_counter()
    for _ in range(4):
        text.encode(tokens)
    out["texts_per_s@32"] = 128 / (time.perf_counter() - started)
    started = time.perf_counter()
    for t in tokens[:16]:
        text.encode([t])
    out["text_forward_ms@1"] = (time.perf_counter() - started) / 16 * 1000
    started = time.perf_counter()
    for p in prepared[:8]:
        image.encode([p])
    out["image_forward_ms@1"] = (time.perf_counter() - started) / 8 * 1000
    return out


def cpu_seconds() -> dict[int, tuple[str, float]]:
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            out[p.pid] = (" ".join(p.info["cmdline"] or [])[:80] + " " + p.name(), sum(p.cpu_times()[:2]))
        except psutil.Error:
            continue
    return out


def cpu_ms_per_request(before: dict[int, tuple[str, float]], requests: int) -> dict[str, float]:
    """CPU milliseconds each kind of process spent per request since ``before`` (``cpu_seconds()``)."""
    cpu_ms: dict[str, float] = {}
    for pid, (cmdline, seconds) in cpu_seconds().items():
        if pid in before:
            label = process_label(cmdline)
            cpu_ms[label] = cpu_ms.get(label, 0.0) + (seconds - before[pid][1]) * 1000 / requests
    return {k: round(v, 1) for k, v in sorted(cpu_ms.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def process_label(cmdline: str) -> str:
    for key, label in (
        ("ServeReplica", "replica:"),
        ("ProxyActor", "proxy"),
        ("haproxy", "haproxy"),
        ("ServeController", "controller"),
        ("serve_throughput", "client"),
        ("serve_probe", "client"),
        ("mmembed.cli", "driver"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    ):
        if key in cmdline:
            return label + cmdline.split(":")[-1].split()[0] if label == "replica:" else label
    return "other ray"


async def load_test(url: str, path: str, bodies: list[dict], concurrency: int) -> dict[str, object]:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    batches: list[int] = []

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        async with limit:
            started = time.perf_counter()
            response = await client.post(f"{url}{path}", json=body)
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            batches.append(response.json()["data"][0]["info"]["batch_size"])

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, bodies[0])  # warm-up
        latencies.clear(), batches.clear()
        before = cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(one(client, b) for b in bodies))
        elapsed = time.perf_counter() - started
    cpu_ms = cpu_ms_per_request(before, len(bodies))
    return {
        "per_s": round(len(bodies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "mean_batch": round(float(np.mean(batches)), 1),
        "cpu_ms_per_request": cpu_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32@random")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_throughput.json")
    args = parser.parse_args()

    images = jpegs(N_ITEMS)
    rng = random.Random(1)
    texts = [world.render_query(world.training_query(world.random_scene(rng), rng), rng) for _ in range(N_ITEMS)]
    results: dict[str, object] = {
        "model": args.model,
        "items": N_ITEMS,
        "jpeg_kb_mean": round(sum(map(len, images)) / len(images) / 1024, 1),
    }
    results["ceiling"] = ceiling(args.model, images, texts)
    print("ceiling", json.dumps(results["ceiling"]), flush=True)

    cpus = os.cpu_count() or 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Every concurrency level sends the same items: the embedding cache would answer them all.
    os.environ["MMEMBED_CACHE_URL"] = "off"
    os.environ.update(data_plane_env(Settings().serve_ingress))  # the data plane `mmembed serve` runs
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    servers = {"batched": {"max_batch_size": 32}, "naive": {"max_batch_size": 1}}  # otherwise the defaults
    image_bodies = [{"model": args.model, "items": [base64.b64encode(b).decode()]} for b in images]
    text_bodies = [{"model": args.model, "texts": [t]} for t in texts]
    for name, batch in servers.items():
        model = {"name": args.model, "batch": batch, "num_cpus": cpus, "max_queued_requests": 10_000}
        serve.run(build_app({"models": [model]}), name=name, route_prefix=f"/{name}")
        for concurrency in CONCURRENCY:
            for kind, path, bodies in (("image", "/encode/image", image_bodies), ("text", "/encode/text", text_bodies)):
                figures = asyncio.run(load_test(url, f"/{name}{path}", bodies, concurrency))
                results[f"{name}_{kind}@{concurrency}"] = figures
                print(name, kind, concurrency, json.dumps(results[f"{name}_{kind}@{concurrency}"]), flush=True)
        serve.delete(name)
    serve.shutdown()
    ray.shutdown()

    ceil = results["ceiling"]
    results["ratios"] = {
        "images@32_vs_ceiling": round(results["batched_image@32"]["per_s"] / ceil["images_per_s@32"], 2),
        "images@32_vs_naive": round(results["batched_image@32"]["per_s"] / results["naive_image@32"]["per_s"], 2),
        "texts@32_vs_ceiling": round(results["batched_text@32"]["per_s"] / ceil["texts_per_s@32"], 2),
        "image_p50@1_minus_forward_ms": round(results["batched_image@1"]["p50_ms"] - ceil["image_forward_ms@1"], 1),
        "text_p50@1_minus_forward_ms": round(results["batched_text@1"]["p50_ms"] - ceil["text_forward_ms@1"], 1),
    }  # type: ignore[index]
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

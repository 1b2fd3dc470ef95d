"""Load test on loopback: many concurrent clients, mixed text and image, against the shipped models.

Starts its own local Ray and the Serve app with the models and batch settings of ``serve.yaml``
(default: demo-clip and all-MiniLM-L6-v2, the shipped offline models that encode text and
images), then:
  (a) baseline: one client for a few seconds, the same mix (the unloaded latency);
  (b) load: ``--clients`` asyncio clients (256, aiohttp: httpx's pool cost 20 ms of client CPU
      per request at 256 connections, on the server's cores) for ``--warmup`` (20 s, statuses
      checked, figures apart) and then ``--seconds`` (60, measured), each looping over one-item
      requests: text to ``/v1/embeddings`` (all-MiniLM-L6-v2) or ``/encode/text`` (demo-clip),
      images (640x480 JPEGs) as base64 to ``/encode/image`` or multipart to
      ``/encode/image/upload`` (demo-clip). A well-behaved client: on 429 it waits the
      ``Retry-After`` and goes on;
  (c) after the load: ``/healthz``, ``/readyz`` and one request of each kind must succeed.
Every second it samples the resident memory of every process of the Ray session (replicas,
proxy, controller, raylet, GCS, workers).

Pass/fail ("no errors except documented 429s, memory stays bounded"): every answer is a 200
whose items all have embeddings, or a documented shed (429 ``overloaded`` with Retry-After; a
503 with Retry-After from Serve's own back-pressure); anything else, a timeout or a connection
error is an error. Memory: the Ray processes' peak RSS stays within ``--max-rss-growth-mb`` of
their idle size before the load, and over the second half of the measured window their RSS
grows less than ``--max-slope-mb-per-min`` (a least-squares line through 1 s samples).
Exits 1 when any check fails (the JSON is written either way).

The embedding cache is off by default (``--cache`` turns SQLite on, in a temporary data dir):
the payload pool repeats, so with it on most answers would be cache hits, not forward passes.
The machine is shared and noisy: compare the ratios (load against baseline in the same run).

    python bench/load_test.py [--clients 256] [--seconds 60] [--image-share 0.5] \\
        [--out bench/results/load_test.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import yaml
from serve_throughput import jpegs  # the same 640x480 JPEGs (bench/ is on the path of a script run from it)

from mmembed.config import Settings
from mmembed.demo import world

ROOT = Path(__file__).resolve().parent.parent

IMAGE_MODEL, TEXT_MODELS = "demo-clip", ("all-MiniLM-L6-v2", "demo-clip")


@dataclass
class Result:
    kind: str  # text | image
    route: str
    started: float  # perf_counter
    latency_ms: float
    status: int  # HTTP status; 0: no answer (timeout, connection error)
    code: str  # error code from the body, or the exception's name; "" when fine
    ok: bool
    shed: bool  # a documented 429/503 with Retry-After


@dataclass
class Payloads:
    jpegs: list[bytes]
    b64: list[str]
    texts: list[str]


def payloads(n_images: int, n_texts: int) -> Payloads:
    """The serving benchmark's 640x480 JPEGs, and demo-world captions."""
    images = jpegs(n_images)
    rng = random.Random(1)
    texts = [world.render_query(world.training_query(world.random_scene(rng), rng), rng) for _ in range(n_texts)]
    return Payloads(images, [base64.b64encode(j).decode() for j in images], texts)


# --- one request --------------------------------------------------------------------------


async def request(
    session: aiohttp.ClientSession, url: str, data: Payloads, rng: random.Random, image_share: float
) -> Result:
    kind = "image" if rng.random() < image_share else "text"
    if kind == "image":
        n = rng.randrange(len(data.jpegs))
        if rng.random() < 0.5:
            route, send = "/encode/image", {"json": {"model": IMAGE_MODEL, "items": [data.b64[n]]}}
        else:
            form = aiohttp.FormData()
            form.add_field("files", data.jpegs[n], filename=f"{n}.jpg", content_type="image/jpeg")
            route, send = "/encode/image/upload", {"params": {"model": IMAGE_MODEL}, "data": form}
    else:
        text = rng.choice(data.texts)
        if rng.random() < 0.5:
            route, send = "/v1/embeddings", {"json": {"model": TEXT_MODELS[0], "input": text}}
        else:
            route, send = "/encode/text", {"json": {"model": TEXT_MODELS[1], "texts": [text]}}
    started = time.perf_counter()
    try:
        async with session.post(url + route, **send) as response:
            status, headers, raw = response.status, response.headers, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:  # a request that never answers is an error
        return Result(kind, route, started, (time.perf_counter() - started) * 1000, 0, type(exc).__name__, False, False)
    latency = (time.perf_counter() - started) * 1000
    code, ok, shed = "", False, False
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict):
        items = body.get("data") or []
        ok = len(items) == 1 and items[0].get("embedding") is not None and not items[0].get("error")
        code = "" if ok else "bad_200_body"
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", "?"))
    else:
        code = "not_json"
    if status in (429, 503) and "Retry-After" in headers:
        shed = status == 503 or code == "overloaded"
        if shed:
            # Retry-After is whole seconds here; the wait is the client's, not the request's latency.
            await asyncio.sleep(float(headers["Retry-After"]))
    return Result(kind, route, started, latency, status, code, ok, shed)


def session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """Enough connections that every client really is concurrent; a total timeout per request."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def drive(
    url: str, data: Payloads, clients: int, seconds: float, image_share: float, timeout_s: float, seed: int
) -> tuple[list[Result], float]:
    """``clients`` loops for ``seconds``; each request started before the end is waited for."""
    results: list[Result] = []
    async with session(clients + 8, timeout_s) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def loop(n: int) -> None:
            rng = random.Random(seed * 100_003 + n)
            while time.perf_counter() < deadline:
                results.append(await request(client, url, data, rng, image_share))

        await asyncio.gather(*(loop(n) for n in range(clients)))
    return results, started


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    a = np.asarray(latencies)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p90_ms": round(float(np.percentile(a, 90)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def summarise(results: list[Result], start: float, end: float) -> dict[str, Any]:
    """The requests started in [start, end): their statuses and the latency of their successes.
    Throughput: the successes that finished inside the window, whenever they started."""
    mine = [r for r in results if start <= r.started < end]
    ok = [r for r in mine if r.ok]
    done = [r for r in results if r.ok and start <= r.started + r.latency_ms / 1000 <= end]
    errors = [r for r in mine if not r.ok and not r.shed]
    out: dict[str, Any] = {
        "requests": len(mine),
        "ok": len(ok),
        "ok_per_s": round(len(done) / (end - start), 2),
        "latency_ok": percentiles([r.latency_ms for r in ok]),
        "by_kind": {},
        "status_counts": {str(k): v for k, v in sorted(Counter(r.status for r in mine).items())},
        "shed": sum(r.shed for r in mine),
        "errors": len(errors),
        "error_codes": dict(Counter(f"{r.status}:{r.code}" for r in errors).most_common()),
        "shed_codes": dict(Counter(f"{r.status}:{r.code}" for r in mine if r.shed).most_common()),
    }
    for kind in ("text", "image"):
        finished = sum(r.kind == kind for r in done)
        out["by_kind"][kind] = {"ok": sum(r.kind == kind for r in ok), "ok_per_s": round(finished / (end - start), 2)}
        out["by_kind"][kind] |= percentiles([r.latency_ms for r in ok if r.kind == kind])
    out["by_route"] = {route: sum(r.route == route for r in ok) for route in sorted({r.route for r in mine})}
    return out


# --- memory -------------------------------------------------------------------------------


def _label(cmdline: str, name: str, deployments: tuple[str, ...]) -> str:
    if "ServeReplica:" in cmdline:  # ray::ServeReplica:APP:DEPLOYMENT[.method running now]
        replica = cmdline.split("ServeReplica:")[1].split()[0].split(":", 1)[-1]
        return "replica:" + max((d for d in deployments if replica.startswith(d)), key=len, default=replica)
    for key, label in (
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
        ("runtime_env", "runtime env agent"),
        ("dashboard", "dashboard agent"),
        ("log_monitor", "log monitor"),
        ("ray::IDLE", "idle worker"),
    ):
        if key in cmdline or key in name:
            return label
    return f"other:{name}"


class MemorySampler(threading.Thread):
    """RSS of every process descending from this one (the local Ray session: GCS, raylet and the
    workers it forks), once per ``interval`` s, in a thread so the clients' event loop never waits."""

    def __init__(self, deployments: tuple[str, ...], interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.deployments = deployments
        self.interval, self.stop = interval, threading.Event()
        self.samples: list[tuple[float, float, dict[str, float]]] = []  # (perf_counter, total MB, per label)
        self.me = psutil.Process()

    def sample(self) -> tuple[float, float, dict[str, float]]:
        by_label: dict[str, float] = {}
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    label = _label(" ".join(p.cmdline()), p.name(), self.deployments)
                    by_label[label] = by_label.get(label, 0.0) + p.memory_info().rss / 2**20
            except psutil.Error:
                continue
        return time.perf_counter(), sum(by_label.values()), by_label

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(self.interval)

    def between(self, start: float, end: float) -> list[tuple[float, float, dict[str, float]]]:
        return [s for s in self.samples if start <= s[0] <= end]


def memory_report(
    sampler: MemorySampler, load_start: float, start: float, end: float, max_growth_mb: float, max_slope: float
) -> dict[str, Any]:
    """``before``: idle, just before the load (the warm-up under load included in the growth);
    ``start``/``peak``/``end``: the measured window [start, end]; ``after_idle``: the last sample,
    once the load is over. Slope: a least-squares line through the window's second half."""
    samples = sampler.between(start, end)
    before = [s for s in sampler.samples if s[0] < load_start][-1]
    first, last, after = samples[0], samples[-1], sampler.samples[-1]
    peak = max(samples, key=lambda s: s[1])
    half = [s for s in samples if s[0] >= (start + end) / 2]
    t = np.asarray([s[0] for s in half]) / 60
    slope = float(np.polyfit(t, [s[1] for s in half], 1)[0]) if len(half) >= 3 else float("nan")
    labels = sorted(set(first[2]) | set(peak[2]) | set(last[2]), key=lambda k: -last[2].get(k, 0.0))
    series = sampler.between(load_start, end + 60)
    per_process = {k: [round(s[2].get(k, 0.0)) for s in series] for k in labels}
    return {
        "interval_s": sampler.interval,
        "ray_rss_mb": {
            "before_load": round(before[1]),
            "start": round(first[1]),
            "peak": round(peak[1]),
            "end": round(last[1]),
            "after_idle": round(after[1]),
        },
        "growth_mb": round(peak[1] - before[1]),
        "second_half_slope_mb_per_min": round(slope, 1),
        "by_process_mb": {
            k: {
                "before_load": round(before[2].get(k, 0.0)),
                "start": round(first[2].get(k, 0.0)),
                "peak": round(peak[2].get(k, 0.0)),
                "end": round(last[2].get(k, 0.0)),
            }
            for k in labels
        },
        "thresholds": {"max_growth_mb": max_growth_mb, "max_second_half_slope_mb_per_min": max_slope},
        # Seconds from the start of the measured window (negative: the warm-up), and MB.
        "series_mb": [[round(s[0] - start, 1), round(s[1])] for s in series],
        # Each process that moved by more than 2 MB, one value per sample of series_mb.
        "series_by_process_mb": {k: v for k, v in per_process.items() if max(v) - min(v) > 2},
    }


# --- the server ---------------------------------------------------------------------------


def app_args(config: Path, models: list[str]) -> dict[str, Any]:
    """The application's arguments from the Serve config file, with only ``models`` kept."""
    spec = yaml.safe_load(config.read_text())
    args = dict(spec["applications"][0]["args"])
    kept = [m for m in args["models"] if m["name"] in models]
    missing = set(models) - {m["name"] for m in kept}
    args["models"] = kept + [{"name": m} for m in models if m in missing]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, timeout_s: float = 120) -> None:
    async with session(2, 10) as client:
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                async with client.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{url}/readyz never answered 200")
            await asyncio.sleep(0.5)


async def health_after(url: str, data: Payloads, timeout_s: float) -> dict[str, Any]:
    """The server is still whole once the load stops: health, readiness, one request of each route."""
    out: dict[str, Any] = {}
    async with session(2, timeout_s) as client:
        for path in ("/healthz", "/readyz"):
            try:
                async with client.get(url + path) as response:
                    out[path] = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                out[path] = type(exc).__name__
        rng = random.Random(7)
        seen: dict[str, Result] = {}
        for _ in range(40):  # until every route has answered once
            r = await request(client, url, data, rng, 0.5)
            seen.setdefault(r.route, r)
            if len(seen) == 4:
                break
        for route, r in sorted(seen.items()):
            out[route] = {"status": r.status, "ok": r.ok, "latency_ms": round(r.latency_ms, 1)}
    out["healthy"] = (
        out["/healthz"] == 200 and out["/readyz"] == 200 and len(seen) == 4 and all(r.ok for r in seen.values())
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--image-share", type=float, default=0.5, help="Share of requests that carry an image.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Per request; a timed-out request is an error.")
    parser.add_argument(
        "--warmup", type=float, default=20.0, help="Seconds of the full load before the measured window."
    )
    parser.add_argument("--baseline-seconds", type=float, default=10.0, help="One client, before the load.")
    parser.add_argument("--config", type=Path, default=ROOT / "serve.yaml")
    parser.add_argument("--models", default=",".join(dict.fromkeys((IMAGE_MODEL, *TEXT_MODELS))))
    parser.add_argument("--cache", action="store_true", help="Keep the embedding cache on (SQLite, temporary).")
    parser.add_argument("--max-rss-growth-mb", type=float, default=1024.0, help="Peak over idle, Ray processes.")
    parser.add_argument("--max-slope-mb-per-min", type=float, default=100.0, help="Growth over the load's 2nd half.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_test.json")
    args = parser.parse_args()

    data = payloads(32, 512)
    models = [m for m in args.models.split(",") if m]
    serve_args = app_args(args.config, models)
    # Replicas inherit this environment: the shipped models, no downloads, and a throwaway data
    # dir so the catalogue and any cache never touch the user's.
    work = Path(tempfile.mkdtemp(prefix="mmembed-load-"))
    os.environ["MMEMBED_MODELS_DIR"] = str(Settings().models_path)
    os.environ["MMEMBED_DATA_DIR"] = str(work / "data")
    os.environ["MMEMBED_ALLOW_DOWNLOADS"] = "false"
    os.environ["MMEMBED_CACHE_URL"] = "sqlite" if args.cache else "off"

    import ray  # after the environment is set: workers inherit it
    import torch
    from ray import serve

    from mmembed.serve.app import build_app, logical_cpus
    from mmembed.serve.config import deployment_name

    cpus = os.cpu_count() or 2
    load_before = os.getloadavg()
    ray.init(
        address="local",
        num_cpus=logical_cpus([serve_args], cpus),
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(work / "ray"),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    failures: list[str] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(serve_args), name="mmembed", route_prefix="/")
        asyncio.run(wait_ready(url))
        print(f"server up at {url}: {', '.join(models)}", flush=True)
        # Warm-up: every route once (first calls describe the models and load lazy state).
        asyncio.run(health_after(url, data, args.timeout))

        sampler = MemorySampler(("ingress", "catalog", *(deployment_name(m) for m in models)))
        sampler.start()
        base, base_started = asyncio.run(
            drive(url, data, 1, args.baseline_seconds, args.image_share, args.timeout, args.seed + 1)
        )
        results["baseline"] = summarise(base, base_started, base_started + args.baseline_seconds)
        print("baseline", json.dumps(results["baseline"]), flush=True)

        # One run of the clients: the warm-up, then the measured window, with no gap between them.
        cpu_before = psutil.Process().cpu_times()
        loaded, started = asyncio.run(
            drive(url, data, args.clients, args.warmup + args.seconds, args.image_share, args.timeout, args.seed)
        )
        finished = time.perf_counter()
        cpu_after = psutil.Process().cpu_times()
        window = (started + args.warmup, started + args.warmup + args.seconds)
        results["warmup"] = summarise(loaded, started, window[0]) if args.warmup else {"errors": 0, "error_codes": {}}
        results["load"] = summarise(loaded, *window)
        results["load"]["drain_s"] = round(finished - window[1], 1)
        results["load"]["client_cpu_ms_per_request"] = round(
            (sum(cpu_after[:2]) - sum(cpu_before[:2])) * 1000 / max(len(loaded), 1), 2
        )
        print("load", json.dumps(results["load"]), flush=True)

        results["health_after"] = asyncio.run(health_after(url, data, args.timeout))
        time.sleep(3)  # idle: what the processes hold once the queues are empty
        sampler.stop.set()
        sampler.join()
        results["memory"] = memory_report(sampler, started, *window, args.max_rss_growth_mb, args.max_slope_mb_per_min)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    base, load, memory = results["baseline"], results["load"], results["memory"]
    results["ratios"] = {
        "p99_load_over_p50_unloaded": round(load["latency_ok"]["p99_ms"] / base["latency_ok"]["p50_ms"], 1),
        "p50_load_over_p50_unloaded": round(load["latency_ok"]["p50_ms"] / base["latency_ok"]["p50_ms"], 1),
        "throughput_load_over_one_client": round(load["ok_per_s"] / base["ok_per_s"], 2),
    }
    warm = results["warmup"]
    if base["errors"] or warm["errors"] or load["errors"]:
        codes = {"baseline": base["error_codes"], "warmup": warm["error_codes"], "load": load["error_codes"]}
        failures.append(f"errors other than documented sheds: {codes}")
    if not results["health_after"]["healthy"]:
        failures.append(f"server not healthy after the load: {results['health_after']}")
    if memory["growth_mb"] > args.max_rss_growth_mb:
        failures.append(
            f"Ray RSS peaked {memory['growth_mb']} MB over its idle size (limit {args.max_rss_growth_mb:g})"
        )
    if not memory["second_half_slope_mb_per_min"] < args.max_slope_mb_per_min:
        failures.append(
            f"Ray RSS grew {memory['second_half_slope_mb_per_min']} MB/min over the second half "
            f"(limit {args.max_slope_mb_per_min:g})"
        )
    results["verdict"] = {"passed": not failures, "failures": failures}
    results["config"] = {
        "clients": args.clients,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "baseline_seconds": args.baseline_seconds,
        "image_share": args.image_share,
        "request_timeout_s": args.timeout,
        "items_per_request": 1,
        "images": f"{len(data.jpegs)} JPEGs 640x480, {sum(map(len, data.jpegs)) / len(data.jpegs) / 1024:.1f} kB mean",
        "texts": f"{len(data.texts)} demo captions",
        "embedding_cache": "sqlite" if args.cache else "off",
        "routes": {
            "text": ["/v1/embeddings (all-MiniLM-L6-v2)", "/encode/text (demo-clip)"],
            "image": ["/encode/image base64 (demo-clip)", "/encode/image/upload multipart (demo-clip)"],
        },
        "serve_args": serve_args,
        "config_file": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
    }
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loadavg_before": [round(x, 2) for x in load_before],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    results = {
        k: results[k]
        for k in ("config", "verdict", "baseline", "warmup", "load", "ratios", "memory", "health_after", "machine")
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return 0 if not failures else 1


def print_table(r: dict[str, Any]) -> None:
    base, load, memory, ratios = r["baseline"], r["load"], r["memory"], r["ratios"]
    print()
    print(f"{'':28} {'ok/s':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, s in (("1 client", base), (f"{r['config']['clients']} clients", load)):
        rows = [("all", s["ok_per_s"], s["latency_ok"])] + [(k, v["ok_per_s"], v) for k, v in s["by_kind"].items()]
        for kind, per_s, lat in rows:
            print(
                f"{name + ' ' + kind:28} {per_s:8.1f} {lat.get('p50_ms', 0):9.1f} {lat.get('p90_ms', 0):9.1f} "
                f"{lat.get('p99_ms', 0):9.1f} {lat.get('max_ms', 0):9.1f}"
            )
    warm = r["warmup"]
    print(
        f"\nstatus counts under load: {load['status_counts']}; shed {load['shed']} {load['shed_codes']}; "
        f"errors {load['errors']} {load['error_codes']} (warm-up: {warm.get('status_counts', {})}, "
        f"errors {warm['errors']})"
    )
    print(f"ratios: {ratios}")
    rss, th = memory["ray_rss_mb"], memory["thresholds"]
    print(
        f"Ray RSS MB: idle before {rss['before_load']}, start {rss['start']}, peak {rss['peak']}, end {rss['end']}, "
        f"after idle {rss['after_idle']}; growth {memory['growth_mb']} MB; "
        f"second-half slope {memory['second_half_slope_mb_per_min']} MB/min "
        f"(limits: growth {th['max_growth_mb']:g} MB, slope {th['max_second_half_slope_mb_per_min']:g} MB/min)"
    )
    print(f"health after load: {r['health_after']}")
    print(f"verdict: {'PASS' if r['verdict']['passed'] else 'FAIL'} {r['verdict']['failures']}")


if __name__ == "__main__":
    sys.exit(main())

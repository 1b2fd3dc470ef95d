"""Serving across nodes: ``mmembed serve --address`` on a head and two workers, with the placement
of serve-cluster.yaml; both workers answer, and a worker killed under load costs no request."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from on_cluster import Served, wait_until

from mmembed.cluster import LocalCluster

MODELS = ("demo-clip", "all-MiniLM-L6-v2")


def placement(url: str) -> dict[str, list[tuple[str, str]]]:
    """(state, node id) of each model's replicas, from /models."""
    data = httpx.get(f"{url}/models", timeout=30).json()["data"]
    return {m["model"]: sorted((r["state"], r["node_id"]) for r in m["placement"]) for m in data}


def test_encoders_run_on_both_workers_and_the_ingress_on_the_head(cluster: LocalCluster, served: Served) -> None:
    nodes = cluster.nodes()
    assert set(nodes) == {"head", "worker-1", "worker-2"}
    running = placement(served.url)
    for model in MODELS:
        assert running[model] == sorted([("RUNNING", nodes["worker-1"]), ("RUNNING", nodes["worker-2"])]), model
    for deployment in ("ingress", "catalog"):
        [actor] = cluster.state("actors", class_name=f"ServeReplica:mmembed:{deployment}", state="ALIVE")
        assert actor["node_id"] == nodes["head"], deployment


def _requests_served(cluster: LocalCluster, node: str) -> float:
    """Requests MiniLM's replicas on ``node`` have processed, from that node's own Prometheus exporter."""
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port(node)}/metrics", timeout=10).text
    pattern = r'^ray_serve_deployment_request_counter_total\{[^}]*deployment="encoder-all-MiniLM-L6-v2"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def test_both_workers_answer_under_load(cluster: LocalCluster, served: Served) -> None:
    async def load() -> Counter[int]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(n: int) -> int:
                body = {"model": "all-MiniLM-L6-v2", "input": f"a caption number {n}"}
                return (await client.post(f"{served.url}/v1/embeddings", json=body)).status_code

            codes: Counter[int] = Counter()
            for start in range(0, 160, 16):
                codes.update(await asyncio.gather(*(one(n) for n in range(start, start + 16))))
            return codes

    assert asyncio.run(load()) == Counter({200: 160})

    # Ray's exporters publish every few seconds: wait for the 160 requests to be counted, then
    # each worker must have served its share.
    def counted() -> dict[str, float] | None:
        counts = {node: _requests_served(cluster, node) for node in ("worker-1", "worker-2")}
        return counts if sum(counts.values()) >= 160 else None

    counts = wait_until(counted, 60, "the workers' exporters to count every request")
    assert all(count >= 16 for count in counts.values()), counts


@dataclass
class Load:
    """What clients saw while a worker died under them."""

    codes: Counter[int | str] = field(default_factory=Counter)
    without_retry_after: list[int] = field(default_factory=list)
    slowest_s: float = 0.0
    ok_after_recovery: int = 0


def test_a_worker_killed_under_load_costs_no_request(cluster: LocalCluster, served: Served) -> None:
    """Clients keep sending while worker-1 is SIGKILLed. They get 200s, or 503/429 with Retry-After
    while Serve moves the replicas; never a 500 or a request that hangs. The replicas come back on
    worker-2, the node left, and the API then answers from there."""
    nodes = cluster.nodes()
    seen = Load()
    recovered = asyncio.Event()

    async def client(n: int) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            i = 0
            while not recovered.is_set() or seen.ok_after_recovery < 40:
                i += 1
                model = MODELS[i % 2]
                started = time.monotonic()
                try:
                    answer = await http.post(
                        f"{served.url}/v1/embeddings", json={"model": model, "input": f"caption {n} {i}"}
                    )
                except httpx.HTTPError as exc:
                    seen.codes[type(exc).__name__] += 1
                    continue
                finally:
                    seen.slowest_s = max(seen.slowest_s, time.monotonic() - started)
                seen.codes[answer.status_code] += 1
                if answer.status_code in (429, 503) and "retry-after" not in answer.headers:
                    seen.without_retry_after.append(answer.status_code)
                if answer.status_code == 200 and recovered.is_set():
                    seen.ok_after_recovery += 1

    async def kill_then_watch() -> None:
        while seen.codes[200] < 50:  # the load is on before the node goes
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(cluster.kill, "worker-1") > 0
        moved = sorted([("RUNNING", nodes["worker-2"])] * 2)
        deadline = time.monotonic() + 180
        while True:
            now = await asyncio.to_thread(placement, served.url)
            if all(now[m] == moved for m in MODELS):
                break
            assert time.monotonic() < deadline, f"replicas did not come back on worker-2: {now}"
            await asyncio.sleep(1)
        recovered.set()

    async def main() -> None:
        await asyncio.gather(kill_then_watch(), *(client(n) for n in range(8)))

    asyncio.run(main())
    assert set(seen.codes) <= {200, 429, 503}, seen.codes
    assert seen.without_retry_after == []
    assert seen.slowest_s < 30, f"a request hung for {seen.slowest_s:.1f} s"
    assert seen.ok_after_recovery >= 40

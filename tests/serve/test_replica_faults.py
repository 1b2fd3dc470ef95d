"""An encoder replica killed under load: Serve replaces it, and every client gets an answer (a
vector, or a 503 ``replica_unavailable`` with Retry-After) within its timeout: nothing hangs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from mmembed.encoders import LoadedModel, Modality
from mmembed.serve.app import build_app

APP = "faults"
CLIENTS = 8
TIMEOUT_S = 60.0  # per request: a request past it is a hang
SERVED_AFTER_KILL = 40  # successes after the kill that prove the replacement serves


def _encoder_replicas() -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#encoder-demo-clip#")
    ]


@pytest.fixture(scope="module")
def api(ray_cluster: int) -> Iterator[str]:
    serve.run(
        build_app({"models": [{"name": "demo-clip", "batch": {"max_batch_size": 4}}]}), name=APP, route_prefix=f"/{APP}"
    )
    yield f"http://127.0.0.1:{ray_cluster}/{APP}"
    serve.delete(APP)


async def _load_then_kill(api: str) -> tuple[list[tuple[str, int, str]], str]:
    """CLIENTS loops of requests; once 20 have succeeded the replica is killed, and the loops
    go on until SERVED_AFTER_KILL more succeed (or a deadline passes). Returns every outcome as
    (phase, status, error code) and the killed replica's name."""
    outcomes: list[tuple[str, int, str]] = []
    phase = "before"
    killed = ""
    enough = asyncio.Event()

    async def client(n: int, http: httpx.AsyncClient) -> None:
        nonlocal phase, killed
        body = {"model": "demo-clip", "texts": [f"a red circle {n}"]}
        while not enough.is_set():
            try:
                answer = await http.post(f"{api}/encode/text", json=body, timeout=TIMEOUT_S)
                code = "" if answer.status_code == 200 else answer.json()["error"]["code"]
                outcomes.append((phase, answer.status_code, code))
                if answer.status_code == 503:
                    assert answer.headers["Retry-After"]
            except httpx.TimeoutException:
                outcomes.append((phase, 0, "timeout"))
            ok = [o for o in outcomes if o[1] == 200]
            if phase == "before" and len(ok) >= 20:
                phase = "after"
                [killed] = _encoder_replicas()
                ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
            if sum(1 for o in outcomes if o[0] == "after" and o[1] == 200) >= SERVED_AFTER_KILL:
                enough.set()

    async with httpx.AsyncClient() as http:
        await asyncio.wait_for(asyncio.gather(*(client(n, http) for n in range(CLIENTS))), timeout=300)
    return outcomes, killed


def test_a_killed_replica_is_replaced_and_no_request_hangs(api: str, demo_clip: LoadedModel):
    assert httpx.get(f"{api}/readyz", timeout=120).json()["status"] == "ready"
    outcomes, killed = asyncio.run(_load_then_kill(api))
    statuses = {(status, code) for _, status, code in outcomes}
    assert statuses <= {(200, ""), (503, "replica_unavailable")}, statuses  # no hang, no 500, no other error
    after = [o for o in outcomes if o[0] == "after"]
    assert sum(1 for o in after if o[1] == 200) >= SERVED_AFTER_KILL
    [replacement] = _encoder_replicas()
    assert replacement != killed
    vector = httpx.post(f"{api}/encode/text", json={"model": "demo-clip", "texts": ["a red circle"]}, timeout=60)
    [local] = demo_clip.encoder(Modality.TEXT).encode_items(["a red circle"])
    assert np.allclose(vector.json()["data"][0]["embedding"], local.vector, atol=1e-5)

"""How the app's replicas reach each other, on a real Ray Serve: small calls into a model over
gRPC, an image too large for a gRPC message by reference, and more than one ingress replica."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from mmembed.encoders import LoadedModel, Modality
from mmembed.serve.app import build_app
from mmembed.serve.config import deployment_name
from mmembed.serve.handles import Route

APP = "calls"
GRPC_CAP = 4 * 1024 * 1024  # Serve's default RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH


@pytest.fixture(scope="module")
def api(ray_cluster: int) -> Iterator[str]:
    config = {"models": [{"name": "demo-clip"}], "ingress_min_replicas": 2, "ingress_max_replicas": 2}
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{ray_cluster}/{APP}"
    serve.delete(APP)


def test_small_calls_go_over_grpc_and_large_ones_by_reference(api: str):
    route = Route.to(serve.get_deployment_handle(deployment_name("demo-clip"), APP))
    assert route.for_items(["a red circle"]) is route.grpc
    assert route.for_items([b"\xff" * (2 * 1024 * 1024)]) is route.by_reference
    assert route.grpc.handle_options._by_reference is False
    assert route.by_reference.handle_options._by_reference is True
    # Both ways reach the same replica.
    described = [handle.describe.remote().result(timeout_s=60) for handle in (route.grpc, route.by_reference)]
    assert described[0] == described[1]


def test_an_image_larger_than_a_grpc_message_is_encoded(api: str, demo_clip: LoadedModel):
    noise = np.random.default_rng(3).integers(0, 256, size=(1400, 1300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    png = buf.getvalue()
    assert len(png) > GRPC_CAP  # over gRPC it would be refused: RESOURCE_EXHAUSTED
    files = [("files", ("noise.png", png, "image/png"))]
    answer = httpx.post(f"{api}/encode/image/upload", params={"model": "demo-clip"}, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    [local] = demo_clip.encoder(Modality.IMAGE).encode_items([Image.open(io.BytesIO(png))])
    assert np.allclose(answer.json()["data"][0]["embedding"], local.vector, atol=1e-5)


def test_the_ingress_runs_its_configured_replicas_and_each_answers(api: str):
    ingresses = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#ingress#")
    ]
    assert len(ingresses) == 2, ingresses
    with httpx.Client(timeout=60) as http:
        answers = [http.post(f"{api}/encode/text", json={"model": "demo-clip", "texts": [f"a {n}"]}) for n in range(20)]
    assert [a.status_code for a in answers] == [200] * 20

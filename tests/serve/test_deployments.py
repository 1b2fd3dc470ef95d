"""Encoder deployments on a real Ray cluster: concurrent requests really share batches,
batches respect their caps, and bad items fail alone (each result an ``EncodedItem``)."""

from __future__ import annotations

import numpy as np
from ray import serve

from mmembed.encoders import LoadedModel, Modality
from mmembed.serve.config import BatchConfig, ModelConfig
from mmembed.serve.deployments import Queued, batch_slots, build_encoder, item_cost


def test_concurrent_requests_are_grouped_into_batches(ray_cluster, demo_clip: LoadedModel):
    # Each request is preprocessed in a thread before it joins the batch queue, so on a busy
    # 2-core machine the last ones can trail the rest by a few hundred ms: the batch waits 1 s
    # for company, long enough that no request ends alone however loaded the machine is.
    config = ModelConfig(name="demo-clip", batch=BatchConfig(max_batch_size=8, batch_wait_timeout_s=1.0))
    handle = serve.run(build_encoder(config), name="batching", route_prefix=None)
    try:
        texts = [f"a red circle number {i}" for i in range(24)]
        responses = [handle.encode.remote("text", [t]) for t in texts]
        results = [r.result()[0] for r in responses]
    finally:
        serve.delete("batching")  # a leaked app holds its CPUs: later apps could never start
    sizes = [r.batch_size for r in results]
    assert max(sizes) == 8 and min(sizes) >= 2, sizes  # grouped, and never past the cap
    local = demo_clip.encoder(Modality.TEXT).encode_items(texts)
    for remote, mine in zip(results, local, strict=True):
        assert np.allclose(remote.vector, mine.vector, atol=1e-5)
    assert all(r.queue_ms >= 0 and r.encode_ms > 0 for r in results)


def test_bad_items_fail_alone_in_a_request(ray_cluster):
    handle = serve.run(build_encoder(ModelConfig(name="all-MiniLM-L6-v2")), name="bad-items", route_prefix=None)
    try:
        results = handle.encode.remote("text", ["fine", "", "also fine"]).result()
    finally:
        serve.delete("bad-items")
    assert [r.error.code if r.error else "ok" for r in results] == ["ok", "empty_input", "ok"]
    assert results[0].vector.shape == (384,)


def test_batches_are_capped_by_tokens_as_well_as_count():
    batch = BatchConfig(max_batch_size=8, max_batch_tokens=80)  # 10 tokens per item on average
    from mmembed.encoders import Prepared

    short, long = Prepared(list(range(5))), Prepared(list(range(40)))
    assert item_cost(Modality.TEXT, short, batch) == 0.5
    assert item_cost(Modality.TEXT, long, batch) == 4.0
    assert batch_slots([Queued(short, 0.5, 0)] * 8) == 8  # count decides
    assert batch_slots([Queued(long, 4.0, 0)] * 2 + [Queued(short, 0.5, 0)]) == 9  # tokens decide: over 8
    assert item_cost(Modality.TEXT, Prepared(list(range(1000))), batch) == 8.0  # alone, never refused


def test_deployment_options_follow_the_config():
    fixed = ModelConfig(name="openai/clip-vit-base-patch32", num_gpus=0.25).deployment_options()
    assert fixed["name"] == "encoder-openai_clip-vit-base-patch32"
    assert fixed["num_replicas"] == 1 and fixed["ray_actor_options"]["num_gpus"] == 0.25
    assert fixed["max_ongoing_requests"] == 64  # twice the batch: a full batch can wait while one runs
    scaling = ModelConfig(name="demo-clip", min_replicas=1, max_replicas=4).deployment_options()
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}

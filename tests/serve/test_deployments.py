"""Encoder deployments on a real Ray cluster: concurrent requests really share batches,
batches respect their caps, and bad items fail alone (each result an ``EncodedItem``)."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from ray import serve

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, Modality, Prepared
from mmembed.serve import deployments
from mmembed.serve.app import replica_cpus
from mmembed.serve.config import BatchConfig, ModelConfig, ServeConfig
from mmembed.serve.deployments import (
    Entry,
    Pace,
    Queued,
    batch_slots,
    build_encoder,
    cut,
    idle_wait,
    item_cost,
    sorted_batches,
)


def test_concurrent_requests_are_grouped_into_batches(ray_cluster, demo_clip: LoadedModel):
    # Each request is preprocessed in a thread before it joins the batch queue, so on a busy
    # 2-core machine the last ones can trail the rest by a few hundred ms: the batch waits 1 s
    # for company. The text queue takes up to 4 batches' worth at once (text_sort_batches), so a
    # straggler that misses the take runs in a pass of its own: at most one pass beyond the 3 needed.
    config = ModelConfig(name="demo-clip", batch=BatchConfig(max_batch_size=8, batch_wait_timeout_s=1.0))
    handle = serve.run(build_encoder(config), name="batching", route_prefix=None)
    try:
        texts = [f"a red circle number {i}" for i in range(24)]
        responses = [handle.encode.remote("text", [t]) for t in texts]
        results = [r.result()[0] for r in responses]
    finally:
        serve.delete("batching")  # a leaked app holds its CPUs: later apps could never start
    sizes = [r.batch_size for r in results]
    passes = {r.encode_ms for r in results}  # the items of one forward pass share its duration
    assert max(sizes) == 8 and len(passes) <= 4, (sizes, len(passes))  # grouped, and never past the cap
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


def test_a_replica_with_two_passes_at_once_answers_every_item_with_its_own_vector(ray_cluster, minilm):
    config = ModelConfig(name="all-MiniLM-L6-v2", concurrent_batches=2, batch=BatchConfig(max_batch_size=4))
    handle = serve.run(build_encoder(config), name="two-passes", route_prefix=None)
    try:
        texts = [f"caption number {i} of a longer or shorter length" * (1 + i % 3) for i in range(24)]
        results = [r.result()[0] for r in [handle.encode.remote("text", [t]) for t in texts]]
    finally:
        serve.delete("two-passes")
    local = minilm.encoder(Modality.TEXT).encode_items(texts)
    for remote, mine in zip(results, local, strict=True):
        assert np.allclose(remote.vector, mine.vector, atol=1e-5)
    assert max(r.batch_size for r in results) > 1  # still batched


@pytest.mark.asyncio  # a queued item's answer is a future of the running loop
async def test_batches_are_capped_by_tokens_as_well_as_count():
    batch = BatchConfig(max_batch_size=8, max_batch_tokens=80)  # 10 tokens per item on average
    short, long = Prepared(list(range(5))), Prepared(list(range(40)))
    assert item_cost(Modality.TEXT, short, batch) == 0.5
    assert item_cost(Modality.TEXT, long, batch) == 4.0
    assert batch_slots([Entry.of([Queued(short, 0.5, 0)] * 8)]) == 8  # count decides
    two_long, one_short = Entry.of([Queued(long, 4.0, 0)] * 2), Entry.of([Queued(short, 0.5, 0)])
    assert batch_slots([two_long, one_short]) == 9  # tokens decide: over 8
    assert item_cost(Modality.TEXT, Prepared(list(range(1000))), batch) == 8.0  # alone, never refused


def _queued_texts(seed: int, longest: int, count: int, batch: BatchConfig) -> list[Queued]:
    """Texts of random token counts, each weighed as the text queue weighs it."""
    lengths = np.random.default_rng(seed).integers(1, longest, count)
    return [Queued(p, item_cost(Modality.TEXT, p, batch), 0) for p in (Prepared(list(range(n))) for n in lengths)]


@pytest.mark.asyncio
async def test_a_calls_texts_join_the_queue_as_entries_of_at_most_one_batch_in_order():
    # Serve fails an entry bigger than max_batch_size; an entry per item cost its loop 2.8 ms a request.
    batch = BatchConfig(max_batch_size=8, max_batch_tokens=80)
    queued = _queued_texts(1, 60, 50, batch)
    runs = cut(queued, batch.max_batch_size)
    assert [q for run in runs for q in run] == queued  # every item once, in the call's order
    assert all(batch_slots([Entry.of(run)]) <= 8 for run in runs)
    # each run is as long as the cap allows: the next item would not have fitted
    assert all(batch_slots([Entry.of([*run, after[0]])]) > 8 for run, after in itertools.pairwise(runs))
    assert [len(run) for run in cut([Queued(Prepared([1]), 1.0, 0)] * 20, 8)] == [8, 8, 4]


@pytest.mark.asyncio
async def test_texts_taken_at_once_run_as_batches_of_similar_length_within_the_caps():
    batch = BatchConfig(max_batch_size=8, max_batch_tokens=80)
    queued = _queued_texts(0, 30, 40, batch)
    batches = sorted_batches(queued, batch.max_batch_size)
    assert sorted(map(id, queued)) == sorted(id(q) for b in batches for q in b)  # every text, once
    lengths = [len(q.prepared.data) for b in batches for q in b]
    assert lengths == sorted(lengths)
    assert all(batch_slots([Entry.of(b)]) <= 8 for b in batches)

    def padded(parts: list[list[Queued]]) -> int:
        return sum(len(p) * max(len(q.prepared.data) for q in p) for p in parts)

    first_come = [queued[i : i + 8] for i in range(0, 40, 8)]
    assert padded(batches) < 0.8 * padded(first_come)


def test_a_queue_of_mixed_texts_runs_each_length_in_batches_of_its_own(ray_cluster, minilm):
    """Short and long texts alternate in one request; each forward pass (the items sharing its
    encode_ms) holds one length. First come, first batched would mix every batch."""
    short, long = "a red circle", " ".join(["a long caption about a blue square"] * 5)
    texts = [short if i % 2 else long for i in range(48)]
    config = ModelConfig(
        name="all-MiniLM-L6-v2", batch=BatchConfig(max_batch_size=8, batch_wait_timeout_s=1.0, text_sort_batches=6)
    )
    handle = serve.run(build_encoder(config), name="sorted-batches", route_prefix=None)
    try:
        results = handle.encode.remote("text", texts).result()
    finally:
        serve.delete("sorted-batches")
    passes: dict[float, set[str]] = {}
    for text, r in zip(texts, results, strict=True):
        assert r.batch_size <= 8
        passes.setdefault(r.encode_ms, set()).add(text)
    assert len(passes) == 6 and all(len(kinds) == 1 for kinds in passes.values()), passes
    local = minilm.encoder(Modality.TEXT).encode_items(texts)
    for remote, mine in zip(results, local, strict=True):  # each answer is its own text's
        assert np.allclose(remote.vector, mine.vector, atol=1e-5)


def test_the_next_batch_waits_about_as_long_as_the_running_one_takes():
    pace = Pace()
    assert pace.expected(32) == 0.0  # nothing measured yet: no wait
    pace.record(0.025, 1)  # one text alone: 25 ms, mostly the pass's fixed cost
    pace.record(0.060, 31)  # 31 texts: 60 ms
    # 21 texts would take under the 60 ms of 31; the last pass's 25 ms per item would say 525 ms.
    assert 0.03 < pace.expected(21) < 0.06
    for _ in range(10):  # the pace follows what the model does now
        pace.record(0.3, 30)
    assert pace.expected(30) == pytest.approx(0.3, rel=0.01)


@pytest.mark.asyncio  # a queued item's answer is a future of the running loop
async def test_after_a_run_for_several_calls_an_idle_model_waits_for_the_next_ones():
    pace = Pace()
    pace.record(0.040, 20)  # 2 ms an item
    item = Prepared([1, 2, 3])
    one_call = [Queued(item, 1.0, 0, call=7) for _ in range(8)]  # one client's 8-text request
    eight_calls = [Queued(item, 1.0, 0, call=n) for n in range(8)]  # 8 clients' single texts
    assert idle_wait(pace, one_call[:1], 0.0) == 0.0  # one request at a time: the next runs at once
    assert idle_wait(pace, one_call, 0.0) == 0.0  # whatever its size: no one else is coming
    assert idle_wait(pace, one_call, 0.005) == 0.005  # the configured wait still holds
    assert idle_wait(pace, eight_calls, 0.0) == pytest.approx(0.016)  # about as long as those items took
    assert idle_wait(pace, eight_calls, 0.05) == 0.05  # never below the configured wait
    assert idle_wait(Pace(), eight_calls, 0.0) == 0.0  # nothing measured yet


def test_deployment_options_follow_the_config():
    fixed = ModelConfig(name="openai/clip-vit-base-patch32", num_gpus=0.25).deployment_options()
    assert fixed["name"] == "encoder-openai_clip-vit-base-patch32"
    assert fixed["num_replicas"] == 1 and fixed["ray_actor_options"]["num_gpus"] == 0.25
    assert fixed["max_ongoing_requests"] == 64  # twice the batch: a full batch can wait while one runs
    two = ModelConfig(name="all-MiniLM-L6-v2", concurrent_batches=2).deployment_options()
    assert two["max_ongoing_requests"] == 96  # and with two passes at once, a batch for each
    scaling = ModelConfig(name="demo-clip", min_replicas=1, max_replicas=4).deployment_options()
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}


def test_the_ingress_replicas_follow_the_config():
    assert ServeConfig().ingress_replicas() == {"num_replicas": 1}
    scaling = ServeConfig(ingress_min_replicas=1, ingress_max_replicas=4, ingress_target_ongoing_requests=128)
    assert scaling.ingress_replicas() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 128}
    }
    # Each ingress replica it starts with reserves its CPU, as each model replica does.
    three = ServeConfig(ingress_min_replicas=3, ingress_max_replicas=3, models=[])
    assert replica_cpus(three) == replica_cpus(ServeConfig(models=[])) + 2
    with pytest.raises(ValidationError, match="ingress_min_replicas 2 > ingress_max_replicas 1"):
        ServeConfig(ingress_min_replicas=2)


def replica_outside_ray(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    config: ModelConfig,
    around: Callable[[Callable[[list[Prepared]], object], list[Prepared]], object],
) -> tuple[deployments.EncoderDeployment, int]:
    """The deployment class itself, outside Ray, so a test can see its threads, each text forward
    pass going through ``around(forward, batch)``; and the thread that loaded the model. @serve.batch
    only asks the replica's context for max_ongoing_requests, to warn when a batch could never fill."""
    loaded_on: list[int] = []
    real_load = deployments.load

    def load(name: str, models: object) -> LoadedModel:
        loaded_on.append(threading.get_ident())
        model = real_load(name, models)
        encoder = model.encoder(Modality.TEXT)
        forward = encoder.encode_prepared
        monkeypatch.setattr(encoder, "encode_prepared", lambda batch: around(forward, batch))
        return model

    monkeypatch.setattr(deployments, "load", load)
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    replica = deployments.EncoderDeployment(config.model_dump(), settings)
    return replica, loaded_on[0]


@pytest.mark.asyncio
async def test_every_forward_pass_runs_on_the_thread_that_loaded_the_model(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libgomp keeps a team of OpenMP threads per thread that starts parallel work. Forward passes
    on pool threads, beside the team the load's traced forward started, left 2 cores with more
    OpenMP threads than cores, where libgomp stops spinning: 8-9 ms for one text instead of 3.4."""
    forwards: set[int] = set()

    def recorded(forward: Callable[[list[Prepared]], object], batch: list[Prepared]) -> object:
        forwards.add(threading.get_ident())
        return forward(batch)

    replica, loader = replica_outside_ray(monkeypatch, settings, ModelConfig(name="all-MiniLM-L6-v2"), recorded)
    requests = [replica.encode("text", [f"caption {i}"]) for i in range(6)] + [replica.encode("text", ["a", "b"])]
    results = await asyncio.gather(*requests)
    assert all(item.vector is not None for result in results for item in result)
    assert forwards == {loader} and threading.get_ident() != loader


@pytest.mark.asyncio
async def test_preprocessing_runs_on_one_torch_thread_and_forwards_keep_their_share_of_the_cores(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread that runs torch ops with more than one torch thread starts an OpenMP team of its own:
    an image's resize on the loop's pool threads added teams beside the model's, and a single image's
    forward on 2 cores then ran 1.1-1.4x slower. Setting preprocessing threads to one torch thread
    also sets torch's default for threads that start later, so the model's threads must set theirs."""
    forwards: dict[int, int] = {}

    def recorded(forward: Callable[[list[Prepared]], object], batch: list[Prepared]) -> object:
        forwards[threading.get_ident()] = torch.get_num_threads()
        return forward(batch)

    replica, loader = replica_outside_ray(monkeypatch, settings, ModelConfig(name="all-MiniLM-L6-v2"), recorded)
    encoder, prepared_on = replica.step.model.encoder(Modality.TEXT), {}
    preprocess = encoder.preprocess

    def recorded_preprocess(text: str) -> Prepared:
        prepared_on[threading.get_ident()] = torch.get_num_threads()
        return preprocess(text)

    monkeypatch.setattr(encoder, "preprocess", recorded_preprocess)
    texts = [f"a text no other test sends, number {i}" for i in range(6)]  # not a cache hit
    results = await asyncio.gather(*(replica.encode("text", [text]) for text in texts))
    assert all(item.vector is not None for result in results for item in result)
    assert prepared_on and set(prepared_on.values()) == {1} and loader not in prepared_on, prepared_on
    assert forwards == {loader: len(os.sched_getaffinity(0))}, forwards


@pytest.mark.asyncio
async def test_a_replica_runs_as_many_forward_passes_at_once_as_its_concurrent_batches(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches in flight, each on its own model thread with its share of the cores: the second
    request's forward must start while the first's is still running, or the barrier breaks."""
    started, both = threading.Event(), threading.Barrier(2, timeout=20)
    threads: dict[int, int] = {}

    def together(forward: Callable[[list[Prepared]], object], batch: list[Prepared]) -> object:
        threads[threading.get_ident()] = torch.get_num_threads()
        started.set()
        both.wait()  # BrokenBarrierError (and an error result) unless the other pass runs meanwhile
        return forward(batch)

    config = ModelConfig(name="all-MiniLM-L6-v2", concurrent_batches=2)
    replica, _ = replica_outside_ray(monkeypatch, settings, config, together)
    first = asyncio.ensure_future(replica.encode("text", ["the first request"]))
    await asyncio.to_thread(started.wait, 20)  # its pass holds one model thread: this one needs the other
    second = await replica.encode("text", ["a second request, in a batch of its own"])
    results = [*(await first), *second]
    assert all(item.error is None and item.vector is not None for item in results), results
    assert all(item.batch_size == 1 for item in results)  # two passes, not one batch of two
    cores = len(os.sched_getaffinity(0))
    assert len(threads) == 2 and set(threads.values()) == {max(1, cores // 2)}, threads

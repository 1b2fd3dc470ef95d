"""One Ray Serve deployment per model, batching concurrent requests with ``@serve.batch``.

A request's items go through the model's step of the one embedding step
(``mmembed.embedding.ModelStep``: preprocess in a worker thread, the cache, the same for every
path), and the misses join their modality's batch queue (a batch's worth per entry), the step's
forward pass here. Every caller's items meet in those queues: HTTP requests, ``POST /items`` and
server jobs. The batch handler only stacks ready items and runs the forward pass, also in a
thread, so the event loop keeps admitting and preprocessing the next requests while the model
runs: the accelerator never waits for a JPEG decoder, and preprocessing never waits for it.

Batches are capped by count and by cost (tokens, seconds of audio) through
``batch_size_fn``. The text queue takes several batches' worth at once and runs them sorted by
length (``sorted_batches``), answering each item when its own forward pass ends. Every result
is an ``EncodedItem`` carrying the size of the batch it ran in, how long it queued and how long
the forward pass took, which the ingress turns into metrics. Replicas get their ``Settings``
from the app builder, not from their environment.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from mmembed.config import Settings
from mmembed.contracts import EncodedItem, ModelInfo
from mmembed.embedding import ModelStep, encoded
from mmembed.embedding.model import Input
from mmembed.encoders import Modality, Prepared, load, model_version
from mmembed.encoders.device import use_cpu_threads
from mmembed.serve.config import BatchConfig, ModelConfig, replica_settings
from mmembed.store.cache import open_cache


@dataclass
class Queued:
    prepared: Prepared
    slots: float  # share of one batch: max(1 item, this item's cost over the per-item cost budget)
    enqueued: float
    call: int = 0  # which call into the deployment the item came with (one per request, or a request's share)
    # Set as soon as the item's own forward pass ends, which may be before the batch handler returns.
    answer: asyncio.Future[EncodedItem] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Pace:
    """A model's recent forward seconds and items, halved at each run: how long a run of n items
    is expected to take. Whole runs are summed, so big ones weigh most. A pass of one item costs
    many times an item of a full pass: a wait sized by the last pass's per-item time outlasted
    the run it waited for and left the model idle (MiniLM, 32 texts per request at concurrency 8:
    461 items/s that way, 676 this way)."""

    seconds: float = 0.0
    items: float = 0.0

    def record(self, seconds: float, items: int) -> None:
        self.seconds, self.items = self.seconds / 2 + seconds, self.items / 2 + items

    def expected(self, items: int) -> float:
        return self.seconds / self.items * items if self.items else 0.0


def idle_wait(pace: Pace, last_run: list[Queued], base_wait: float) -> float:
    """How long a batch that starts while the model is idle waits for company, after ``last_run``.
    After a run for one call (requests one at a time, whatever their size): the base wait, so the
    next request runs at once. After a run for several, calls are arriving together, and clients that
    got their answers together send again together, spread out by the ingress handling each: waiting
    about as long as those items took gathers them into one pass, instead of a pass for the first to
    arrive and more for the rest. MiniLM single texts (``bench/serve_probe.py``, two alternating
    pairs): 1.27-1.38x at concurrency 8, 1.09-1.16x at 32, unchanged at 1. Counting items instead
    of calls made a lone client of 32-text requests wait for company that never came: 0.6x."""
    if len({q.call for q in last_run}) < 2:
        return base_wait
    return max(base_wait, pace.expected(len(last_run)))


@dataclass
class Entry:
    """A call's texts, or a batch's worth of them, as one entry of a batch queue. Serve spends
    about 90 µs of the replica's event loop per entry it queues, and weighs the whole forming batch
    again at each arrival: with an entry per item, a 32-text request cost the loop about 2.8 ms
    (py-spy, MiniLM at concurrency 8), paid once per request this way."""

    items: list[Queued]
    slots: float  # the items' summed cost, computed once rather than at each weighing

    @classmethod
    def of(cls, items: list[Queued]) -> Entry:
        return cls(items, sum(q.slots for q in items))


def batch_slots(entries: list[Entry]) -> int:
    """The batch size Serve compares with max_batch_size (its ``batch_size_fn``): the count of
    items, or their cost in per-item budgets when that is larger."""
    return _slots(sum(len(e.items) for e in entries), sum(e.slots for e in entries))


def _slots(count: int, cost: float) -> int:
    return max(count, math.ceil(cost - 1e-9))


def cut(items: list[Queued], max_batch_size: int) -> list[list[Queued]]:
    """``items`` in order, cut into runs of at most ``max_batch_size`` slots (``batch_slots``)."""
    runs: list[list[Queued]] = []
    slots = 0.0
    for item in items:
        if not runs or _slots(len(runs[-1]) + 1, slots + item.slots) > max_batch_size:
            runs.append([])
            slots = 0.0
        runs[-1].append(item)
        slots += item.slots
    return runs


def sorted_batches(texts: list[Queued], max_batch_size: int) -> list[list[Queued]]:
    """The texts the queue took at once, by length and cut into batches of at most ``max_batch_size``
    slots: each batch pads to its longest text, so texts of similar length pad
    little, as infinity and TEI batch them. On ``bench/peers.py``'s captions, first-come batches of
    32 are 1.48x the tokens of their texts, sorted ones 1.06x."""
    return cut(sorted(texts, key=lambda q: len(q.prepared.data)), max_batch_size)


def item_cost(modality: Modality, prepared: Prepared, batch: BatchConfig) -> float:
    """This item's share of a batch's cost budget, in items (1.0 = an average item).
    Capped at a whole batch: an item over the budget runs alone instead of failing."""
    cost = 1.0
    if modality == Modality.TEXT and batch.max_batch_tokens:
        cost = len(prepared.data) / (batch.max_batch_tokens / batch.max_batch_size)
    elif modality == Modality.AUDIO and batch.max_batch_audio_seconds:
        cost = float(prepared.info.get("seconds", 0.0)) / (batch.max_batch_audio_seconds / batch.max_batch_size)
    return min(cost, float(batch.max_batch_size))


class EncoderDeployment:
    """Serve deployment for one model (all its modalities). Built by ``build_encoder``."""

    def __init__(self, config: dict[str, Any], settings: Settings) -> None:
        self.config = ModelConfig.model_validate(config)
        workers = self.config.concurrent_batches
        # Every forward pass runs on one of these threads, the load's (a traced text tower runs some) too.
        # libgomp keeps a team of OpenMP threads per thread that starts parallel work; teams that add up
        # to more OpenMP threads than cores make libgomp stop spinning between ops: a single text's
        # forward took 8-9 ms on a pool thread beside the loader's team, 3.4 on the loader's own. So
        # each worker's team gets its share of the cores, and preprocessing (an image's resize runs
        # torch ops) runs on threads of one torch thread, which start no team at all.
        share = (self.config.cpu_threads, workers)
        self._model_threads = ThreadPoolExecutor(workers, "model", initializer=use_cpu_threads, initargs=share)
        prepare_threads = ThreadPoolExecutor(thread_name_prefix="prepare", initializer=use_cpu_threads, initargs=(1,))
        model = self._model_threads.submit(load, self.config.name, settings.models_config()).result()
        image = model.encoders.get(Modality.IMAGE)
        image_limits = settings.decode_limits([image.limits.image_size] if image else [])
        # The same embedding cache bulk jobs use; the step decides what it may answer.
        version = model_version(model.spec, settings.models_config())
        self.step = ModelStep(model, version, open_cache(settings.cache_config()), image_limits, prepare_threads)
        batch = self.config.batch
        self._pace = {modality: Pace() for modality in Modality}
        self._calls = itertools.count()
        self._handlers = {modality: self._batch_handler(modality, workers) for modality in Modality}
        self._handlers[Modality.TEXT].set_max_batch_size(batch.max_batch_size * batch.text_sort_batches)

    def _batch_handler(self, modality: Modality, workers: int) -> Any:
        """A ``@serve.batch`` queue per modality, made per replica because how many batches run at once
        (``concurrent_batches``) is the config's; named as Serve's batch metrics label it."""

        async def run(taken: list[Entry]) -> list[None]:
            return await self._run(modality, taken)

        run.__name__ = run.__qualname__ = f"_batch_{modality.value}"
        batch = self.config.batch
        return serve.batch(
            run,
            max_batch_size=batch.max_batch_size,
            batch_wait_timeout_s=batch.batch_wait_timeout_s,
            max_concurrent_batches=workers,
            batch_size_fn=batch_slots,
        )

    def describe(self) -> ModelInfo:
        return self.step.info

    async def encode(self, modality: str, items: Sequence[Input]) -> list[EncodedItem]:
        """Per-item results in input order; a bad item never fails the others."""
        return await self.step.encode(modality, items, self._queue)

    async def _queue(self, modality: Modality, prepared: list[Prepared]) -> list[EncodedItem]:
        """The step's forward pass: the call's items join its modality's batch queue, weighed by their
        cost, texts as entries of at most a batch (``Entry``), and each is answered when its own
        forward pass ends (a sorted text batch runs as several)."""
        handler, now, batch = self._handlers[modality], time.perf_counter(), self.config.batch
        call_id = next(self._calls)
        queued = [Queued(p, item_cost(modality, p, batch), now, call_id) for p in prepared]
        # Only the text queue takes several batches' worth at once and cuts them itself, so only there
        # does a call's batch-sized entry still share passes with other calls' items. Elsewhere a full
        # entry would fill a pass alone and leave a single image that came after it a pass of its own,
        # where a server job's images and requests used to share one; those items stay an entry each.
        takes_several = modality == Modality.TEXT and batch.text_sort_batches > 1
        runs = cut(queued, batch.max_batch_size) if takes_several else [[q] for q in queued]
        calls = [asyncio.ensure_future(handler(Entry.of(run))) for run in runs]
        for call in calls:  # its answers went through the items' futures; a failure is raised below
            call.add_done_callback(lambda c: c.cancelled() or c.exception())
        try:
            return [await _answer(q, call) for run, call in zip(runs, calls, strict=True) for q in run]
        except asyncio.CancelledError:  # the caller went away: its items leave the queue
            for call in calls:
                call.cancel()
            raise

    async def _run(self, modality: Modality, taken: list[Entry]) -> list[None]:
        """Serve forms the next batch while this one runs and closes it after the short wait,
        so under load it would queue small batches behind the model. While the forward pass
        runs, the next batch may fill for as long as this one is expected to take (``Pace``) over the
        passes run at once (``concurrent_batches``);
        once it ends, a batch that starts while the model idles waits as ``idle_wait`` says."""
        batch = [q for entry in taken for q in entry.items]
        encoder, handler = self.step.model.encoder(modality), self._handlers[modality]
        base_wait = self.config.batch.batch_wait_timeout_s
        running = self._pace[modality].expected(len(batch)) / self.config.concurrent_batches
        handler.set_batch_wait_timeout_s(max(base_wait, running))
        batches = sorted_batches(batch, self.config.batch.max_batch_size) if modality == Modality.TEXT else [batch]
        run_started = time.perf_counter()
        try:
            for part in batches:
                started = time.perf_counter()
                results = await asyncio.get_running_loop().run_in_executor(
                    self._model_threads, encoder.encode_prepared, [q.prepared for q in part]
                )
                encode_ms = (time.perf_counter() - started) * 1000
                for q, r in zip(part, results, strict=True):
                    q.answer.set_result(
                        encoded(r, batch_size=len(part), queue_ms=(started - q.enqueued) * 1000, encode_ms=encode_ms)
                    )
        finally:
            handler.set_batch_wait_timeout_s(base_wait)
        self._pace[modality].record(time.perf_counter() - run_started, len(batch))
        handler.set_batch_wait_timeout_s(idle_wait(self._pace[modality], batch, base_wait))
        return [None] * len(taken)  # the answers went through each item's future


def build_encoder(
    config: ModelConfig, settings: Settings | None = None, env: dict[str, str] | None = None
) -> serve.Application:
    """``settings``: what the replicas run with; by default this process's environment with ``env`` over it."""
    settings = settings or replica_settings(env or {})
    deployment = serve.deployment(EncoderDeployment).options(**config.deployment_options(env))
    return deployment.bind(config.model_dump(), settings)


async def _answer(queued: Queued, call: asyncio.Future[EncodedItem]) -> EncodedItem:
    """The item's answer as soon as its forward pass ends, or the batch handler's failure."""
    await asyncio.wait((queued.answer, call), return_when=asyncio.FIRST_COMPLETED)
    return queued.answer.result() if queued.answer.done() else call.result()

"""Bulk catalogue jobs: embed a folder, manifest, S3 prefix or URL list into the catalogue.

A run plans first (what is new, changed, unchanged or gone, and what the rest will cost),
then streams the planned items through DataLoader workers (read, hash, decode, preprocess),
looks each (content, model) up in the embedding cache, encodes the misses in batches, and
writes objects and points. Progress is checkpointed in the job store every few batches, so
a run killed at any point resumes with the items it had not yet written; writes are
idempotent (point ids from the source URI, content-addressed objects), so the items of an
interrupted batch written twice still end as one point each. Items that keep failing go
to the dead-letter store with their reason instead of stopping the run.

Three engines run the middle of that (read, decode, encode): "local" (DataLoader workers and this
process's models), "ray" (Ray Data over a cluster, ``jobs.ray_engine``) and "serve" (a server's jobs:
this process reads and hashes, the server's encoder deployments decode, encode and batch the items
with its requests). All encode through the one item step (``mmembed.embedding``, via
``jobs.encode.BatchEncoder``) and hand the same ``EncodedBatch`` to the same write step here, so
vectors, planning, writing, checkpoints, dead letters and counts do not depend on the engine.
"""

from __future__ import annotations

import gc
import itertools
import mimetypes
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential
from tqdm import tqdm

from mmembed.config import Settings
from mmembed.contracts import ItemError
from mmembed.encoders.remote.costs import Usage
from mmembed.encoders.remote.costs import plan_line as remote_plan_line
from mmembed.encoders.remote.costs import summary_line as remote_summary_line
from mmembed.encoders.remote.costs import usd as remote_usd
from mmembed.jobs.dataset import SourceDataset, make_loader
from mmembed.jobs.encode import (
    BatchEncoder,
    Deployments,
    EncodedBatch,
    LoadedModels,
    Loading,
    Models,
    ServedModels,
    unchanged_content,
)
from mmembed.jobs.state import DONE, FAILED, PENDING, JobStore, job_id
from mmembed.loaders.sources import SourceItem, iter_source, s3_client
from mmembed.store.cache import EmbeddingCache, open_cache
from mmembed.store.catalog import Catalog, NewItem
from mmembed.store.objects import ObjectStoreError, object_store
from mmembed.store.spaces import transcriber
from mmembed.store.vectors import DimensionError, StoreError, VectorStore, open_store, point_id

DEFAULT_MODELS = ("demo-clip", "all-MiniLM-L6-v2", "whisper-base", "bind")
PLAN_CHUNK = 2048  # listed items per store read and job-store write while planning
ENGINES = ("local", "ray", "serve")
T = TypeVar("T")


def _transient(exc: BaseException) -> bool:
    """Worth another try: the store or the object store was unreachable. A wrong vector
    size or a refused item will not get better by waiting."""
    return isinstance(exc, StoreError | ObjectStoreError | OSError) and not isinstance(exc, DimensionError)


def retrying(attempts: int) -> Callable:
    return retry(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.2, max=10),
        reraise=True,
    )


@dataclass
class IngestOptions:
    source: str
    models: tuple[str, ...] = DEFAULT_MODELS
    batch_size: int = 32
    workers: int = 2
    checkpoint_every: int = 4  # batches between progress checkpoints
    sync: bool = False  # delete the points of items gone from the source
    price_per_hour: float = 1.0  # USD per hour of this machine, for the estimate
    calibrate: int = 8  # items timed end to end for the estimate
    attempts: int = 5  # tries of a transient write before the batch's items are dead letters
    # "local": DataLoader workers and this process's models; "ray": Ray Data (jobs.ray_engine);
    # "serve": a server's encoder deployments (``Ingest(deployments=...)``), no model in this process
    engine: str = "local"
    ray_encoders: int = 1  # ray engine: encoder actors, each with its own copy of the job's models
    num_gpus_per_encoder: float = 0.0  # ray engine: GPUs each encoder actor reserves (a fraction shares one GPU)
    # ray engine: custom Ray resources each encoder actor needs, e.g. {"encoder": 0.5}: actors go only to
    # the nodes started with them (a cluster's encoder workers)
    encoder_resources: dict[str, float] = field(default_factory=dict)
    file_roots: tuple[str, ...] | None = None  # local files only inside these (a server's jobs); None: anywhere
    window: int = 65_536  # pending items read from the job store per pass of the engine
    # Checkpoints also wait at least this long after the last: each flushes the store (30 ms for 128 ViT-B/32
    # points here), which every 4 of a GPU's 220 batches of 32 a second would do 55 times a second.
    checkpoint_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.ray_encoders < 1:
            raise ValueError(f"ray_encoders must be at least 1, got {self.ray_encoders}")
        if self.num_gpus_per_encoder < 0:
            raise ValueError(f"num_gpus_per_encoder must not be negative, got {self.num_gpus_per_encoder}")

    def job_config(self, settings: Settings) -> dict[str, Any]:
        return {"models": list(self.models), "collection": settings.collection}


@dataclass(frozen=True)
class Changes:
    """What a watch saw change in its source since the last round: the items to list again (new or
    changed files) and the URIs of those gone. A plan over them looks at those items only."""

    items: tuple[SourceItem, ...]
    removed: tuple[str, ...] = ()


@dataclass
class Plan:
    job_id: str
    total: int
    unchanged: int
    to_check: int  # new, or changed according to the listing (content hash decides)
    new: int
    deleted: int
    resumed: bool
    seconds_per_item: float = 0.0
    price_per_hour: float = 1.0
    sample: list[SourceItem] = field(default_factory=list, repr=False)  # the first items to embed, for calibration
    gone: list[str] = field(default_factory=list, repr=False)  # point ids --sync deletes
    remote_costs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per remote model: tokens, usd (estimate)

    @property
    def estimated_seconds(self) -> float:
        return self.to_check * self.seconds_per_item

    @property
    def estimated_cost_usd(self) -> float:
        return self.estimated_seconds / 3600 * self.price_per_hour

    def counts(self) -> dict[str, int]:
        """What a job's record keeps of its plan (GET /jobs/{id} shows it)."""
        return {"total": self.total, "unchanged": self.unchanged, "to_embed": self.to_check, "gone": self.deleted}

    def lines(self) -> list[str]:
        minutes = self.estimated_seconds / 60
        return [
            f"job {self.job_id}{' (resuming)' if self.resumed else ''}: {self.total} items in the source",
            f"  unchanged (already embedded): {self.unchanged}",
            f"  to embed: {self.to_check} ({self.new} new, {self.to_check - self.new} changed or unfinished)",
            f"  gone from the source: {self.deleted}",
            f"  estimate: {minutes:.1f} min at {self.seconds_per_item * 1000:.0f} ms/item on this machine, "
            f"${self.estimated_cost_usd:.4f} at ${self.price_per_hour}/h",
            *(remote_plan_line(name, c) for name, c in self.remote_costs.items()),
        ]


@dataclass
class Summary:
    job_id: str
    written: int = 0
    refreshed: int = 0  # listing said changed, content hash said not: only the version was updated
    failed: int = 0
    deleted: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    stages_s: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0}
    )
    elapsed_s: float = 0.0
    index_s: float = 0.0  # building the search index, after each window (in elapsed_s)
    price_per_hour: float = 1.0
    remote_costs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per remote model: this run's usage
    nodes: dict[str, int] = field(default_factory=dict)  # ray engine: items encoded, by Ray node ID

    def cache_savings(self) -> dict[str, float]:
        """Forward passes the cache answered, priced at this run's own encode time per miss."""
        hits, misses = self.cache.get("hits", 0), self.cache.get("misses", 0)
        seconds = hits * self.stages_s["encode"] / misses if misses else 0.0
        return {"calls_saved": hits, "seconds_saved": seconds, "cost_saved_usd": seconds / 3600 * self.price_per_hour}

    def lines(self) -> list[str]:
        rate = (self.written + self.refreshed) / self.elapsed_s if self.elapsed_s else 0.0
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stages_s.items())
        cache = ", ".join(f"{k} {v}" for k, v in self.cache.items())
        if self.cache:
            saved = self.cache_savings()
            cache += (
                f"; saved {saved['calls_saved']} forward passes, about {saved['seconds_saved']:.1f} s "
                f"(${saved['cost_saved_usd']:.4f})"
            )
        return [
            f"job {self.job_id}: {self.written} written, {self.refreshed} unchanged content (version updated), "
            f"{self.failed} failed (see `mmembed dlq list`), {self.deleted} deleted, in {self.elapsed_s:.1f} s "
            f"({rate:.1f} items/s)",
            f"  stages (summed over workers): {stages}" + (f"; index {self.index_s:.1f} s" if self.index_s else ""),
            f"  cache: {cache or 'off'}",
            *(remote_summary_line(name, c) for name, c in self.remote_costs.items()),
            *(
                [f"  items per node: {', '.join(f'{n[:12]} {k}' for n, k in sorted(self.nodes.items()))}"]
                if self.nodes
                else []
            ),
        ]


class Ingest:
    label = "ingest"  # what its progress bar says

    def __init__(
        self,
        options: IngestOptions,
        settings: Settings,
        catalog: Catalog | None = None,
        cache: EmbeddingCache | bool | None = True,
        jobs: JobStore | None = None,
        deployments: Deployments | None = None,
    ) -> None:
        """``deployments``: the encoder deployments the serve engine sends its items to."""
        if (options.engine == "serve") != (deployments is not None):
            raise ValueError("the serve engine, and only it, runs over encoder deployments (a server's jobs)")
        self.options, self.settings, self.deployments = options, settings, deployments
        self.catalog = catalog or Catalog(
            open_store(settings.vectors_config()), object_store(settings.objects_config())
        )
        self.cache = open_cache(settings.cache_config()) if cache is True else (cache or None)
        self.jobs = jobs or JobStore(settings.data_dir.expanduser() / "jobs.sqlite")
        self.job = job_id(options.source, options.job_config(settings))
        self._models: Models | None = None
        self._s3 = None
        self._items: Counter[str] = Counter()  # the job's items by status while it runs (``_moved``)

    @property
    def models(self) -> Models:
        if self._models is None:
            if self.deployments is not None:
                self._models = ServedModels(self.options.models, self.deployments)
            else:
                self._models = LoadedModels(self.options.models, self.settings)
            self._open_collection(self._models.layout)
        return self._models

    def _open_collection(self, layout: dict[str, int]) -> None:
        self.catalog.open(layout)

    def batch_encoder(self) -> BatchEncoder:
        """A new one per engine pass, closed with it (it holds an event loop)."""
        return BatchEncoder(self.models, self.cache)

    def _s3_client(self) -> Any:
        if self._s3 is None and (self.options.source.startswith("s3://") or self.settings.s3_bucket):
            self._s3 = s3_client(self.settings.s3_endpoint_url, self.settings.s3_region)
        return self._s3

    # --- plan ------------------------------------------------------------------------------

    def plan(self, calibrate: bool = True, changes: Changes | None = None) -> Plan:
        """Streams the listing through the job store chunk by chunk: each chunk's written versions
        (one ledger query, or one store read when the ledger cannot be trusted), prior states and
        dead letters (one indexed query each), and its planned items (one write). Memory holds a
        chunk, the calibration sample and the points to delete. ``changes``: plan those items and
        deletes only, not the whole source (a watch's round)."""
        row = self.jobs.create(self.job, self.options.source, self.options.job_config(self.settings))
        self.models  # noqa: B018  (opens the collection with the models' layout)
        resumed = row.status in ("running", "interrupted") and self.jobs.has_pending(self.job)
        self.jobs.begin_plan(self.job, resume=resumed)
        plan = Plan(self.job, 0, 0, 0, 0, 0, resumed, price_per_hour=self.options.price_per_hour)
        ledger = self.jobs.ledger(self.job)
        source_points = self.catalog.vectors.count({"source": self.options.source})
        trusted = source_points == self.jobs.written_count(ledger)
        if not trusted and not changes:  # rebuilt from the store's answers, chunk by chunk
            self.jobs.forget_written(ledger)
        listing = iter(changes.items) if changes else iter_source(self.options.source, self._s3_client())
        with _no_cycle_collection(), self.jobs.mapped():
            listed_written = self._plan_listing(plan, listing, ledger, trusted)
            self.jobs.end_listing(self.job, self.options.source)
            if changes:
                plan.gone = self._removed(changes.removed)
            elif self.options.sync:
                plan.gone = self.jobs.unlisted_written(self.job, ledger) if trusted else self._gone()
        plan.unchanged = plan.total - plan.to_check
        if changes or self.options.sync:
            plan.deleted = len(plan.gone)
        else:  # only counted: the source's points less those listed
            plan.deleted = source_points - listed_written
        if calibrate and plan.sample:
            plan.seconds_per_item = self._calibrate(plan.sample)
        return plan

    def _plan_listing(self, plan: Plan, listing: Iterator[SourceItem], ledger: str, trusted: bool) -> int:
        """Plans the listing chunk by chunk into ``plan``; returns how many listed items have a point
        this source wrote (the rest of its points are gone)."""
        listed_written = 0
        for start, chunk in _chunks(listing, PLAN_CHUNK):
            ids = [point_id(i.uri) for i in chunk]
            self.jobs.record_listing(self.job, list(zip(ids, (i.uri for i in chunk), strict=True)))
            if trusted:
                stored = self.jobs.written_versions(ledger, ids)
                listed_written += len(stored)
            else:
                payloads = self.catalog.payloads(ids, ["source_version", "source"])
                stored = {k: p.get("source_version") for k, p in payloads.items()}
                mine = {k: stored[k] for k, p in payloads.items() if p.get("source") == self.options.source}
                self.jobs.record_written(ledger, mine)
                listed_written += len(mine)
            uris = [i.uri for i in chunk]
            # A resumed run finishes what is pending and leaves the dead letters; a new run retries them:
            # items this job did not finish, even where a write that failed half-way left their point.
            if plan.resumed:
                pending, failed = {u for u, s in self.jobs.states(self.job, uris).items() if s == PENDING}, set()
            else:
                pending, failed = set(), self.jobs.dead_lettered(self.job, uris)
            todo = []
            for n, (item_id, item) in enumerate(zip(ids, chunk, strict=True)):
                finished = item_id in stored and item.version is not None and stored[item_id] == item.version
                if item.uri in pending or item.uri in failed or not finished:
                    todo.append((start + n, item_id, item))
                    plan.new += item_id not in stored
            self.jobs.plan(self.job, todo)
            plan.total += len(chunk)
            plan.to_check += len(todo)
            plan.sample.extend(item for _, _, item in todo[: self.options.calibrate - len(plan.sample)])
            captions = [i.caption for _, _, i in todo if i.kind == "image" and i.caption and i.caption.strip()]
            self._estimate_remote(plan, captions, sum(1 for _, _, i in todo if i.kind == "audio"))
        return listed_written

    def _removed(self, uris: Sequence[str]) -> list[str]:
        """The points of these URIs that this source wrote."""
        gone: list[str] = []
        for _, chunk in _chunks(uris, PLAN_CHUNK):
            found = self.catalog.payloads([point_id(u) for u in chunk], ["source"])
            gone.extend(i for i, payload in found.items() if payload.get("source") == self.options.source)
        return gone

    def _gone(self) -> list[str]:
        """Points of this source its listing no longer names, a page of the store at a time."""
        gone: list[str] = []
        for _, page in _chunks(self.catalog.vectors.iter_ids({"source": self.options.source}), PLAN_CHUNK):
            gone.extend(self.jobs.unlisted(self.job, page))
        return gone

    def _calibrate(self, sample: list[SourceItem]) -> float:
        """The full path (read, decode, encode) on a few items, nothing written: no cache (it would time
        lookups, not forward passes) and no remote model (it would pay for them)."""
        started = time.perf_counter()
        loader = make_loader(self._dataset(sample), batch_size=len(sample), workers=0)
        with BatchEncoder(self.models, None, remote=False) as encoder:
            for batch in loader:
                encoder.encode(batch, {b.index: sample[b.index] for b in batch})
        return (time.perf_counter() - started) / len(sample)

    # --- run -------------------------------------------------------------------------------

    def run(self, plan: Plan | None = None, progress: bool = True) -> Summary:
        """Writes the plan's pending items, read back from the job store a window at a time (each window
        one DataLoader or Ray Data pass): memory holds a window, whatever the size of the catalogue."""
        plan = plan or self.plan(calibrate=False)
        summary = Summary(self.job, price_per_hour=self.options.price_per_hour)
        started = time.perf_counter()
        self._items = Counter(self.jobs.item_counts(self.job))
        self.jobs.update(self.job, status="running")
        if plan.resumed:
            # What the stopped run wrote after its last window is indexed on its own first, as one
            # segment: the resume's writes would otherwise join it and be built with it in one piece,
            # larger than a window's, holding both in memory at once.
            self._index(summary)
        if plan.gone:
            ledger = self.jobs.ledger(self.job)
            for _, ids in _chunks(plan.gone, PLAN_CHUNK):
                retrying(self.options.attempts)(self.catalog.delete_many)(ids)
                self.jobs.forget_written(ledger, ids)
            summary.deleted = len(plan.gone)
        done: list[str] = []
        remote = self.models.remote()
        usage = {name: Usage() for name in remote}
        bar = tqdm(total=plan.to_check, unit="item", desc=self.label, disable=not progress)
        since_checkpoint, last_checkpoint = 0, time.monotonic()
        try:
            for todo in self._windows():
                with self._engine(todo, progress) as batches:
                    for batch in batches:
                        self._write_batch(todo, batch, summary, done)
                        for name, used in batch.remote_usage.items():
                            usage[name] += used
                        for node, items in batch.nodes.items():
                            summary.nodes[node] = summary.nodes.get(node, 0) + items
                        bar.update(len(batch))
                        bar.set_postfix({k: f"{v:.0f}s" for k, v in summary.stages_s.items()})
                        since_checkpoint += 1
                        waited = time.monotonic() - last_checkpoint >= self.options.checkpoint_seconds
                        if since_checkpoint >= self.options.checkpoint_every and waited:
                            self._checkpoint(done)
                            self.jobs.update(self.job, counts=self._counts(summary, plan))
                            since_checkpoint, last_checkpoint = 0, time.monotonic()
                self._checkpoint(done)
                self._index(summary)
        except BaseException as exc:
            self._checkpoint(done)
            self.jobs.update(self.job, status="interrupted", counts=self._counts(summary, plan), error=repr(exc))
            raise
        finally:
            bar.close()
        if summary.deleted:
            self._index(summary)
        summary.elapsed_s = time.perf_counter() - started
        summary.cache = self.cache.stats.as_dict() if self.cache else {}
        summary.remote_costs = {
            name: used.as_dict() | {"usd_per_million": remote[name].meter.usd_per_million}
            for name, used in usage.items()
        }
        self._finish(summary, plan)
        return summary

    def _checkpoint(self, done: list[str]) -> None:
        """Marks ``done`` written, after flushing the store: batches are written without a flush of their
        own (``durable=False``), so what the job state calls done is always on disk, and a job killed
        between checkpoints redoes only what it had not yet marked."""
        if done:
            self._written_to().flush()
            self.jobs.mark(self.job, done, DONE)
            self._moved(len(done), DONE)
            done.clear()

    def _dead_letter(self, uri: str, code: str, message: str, attempts: int) -> None:
        self.jobs.dead_letter(self.job, uri, code, message, attempts=attempts)
        self._moved(1, FAILED)

    def _moved(self, items: int, status: str) -> None:
        """Pending items a run marked ``status``, counted as it marks them: counting the job store's rows at
        each checkpoint made a job quadratic in its size (66 ms a checkpoint at a million items)."""
        self._items[PENDING] -= items
        self._items[status] += items

    def _finish(self, summary: Summary, plan: Plan) -> None:
        self.jobs.update(self.job, status="done", counts=self._counts(summary, plan))

    def release(self) -> None:
        """Let go of what a job that stopped early holds besides the job store (a migration's new shard)."""

    def _index(self, summary: Summary) -> None:
        """After each window: what it wrote becomes indexed segments now, so building costs the same per
        item at any catalogue size and the collection is searchable by HNSW while the job runs."""
        started = time.perf_counter()
        if self._written_to().build_index():
            summary.index_s += time.perf_counter() - started

    def _written_to(self) -> VectorStore:
        """The store this job's vectors go to."""
        return self.catalog.vectors

    def _windows(self) -> Iterator[list[SourceItem]]:
        """The pending items in windows by position. A window's items are all marked before the next
        is read (written ones done, failed ones dead letters), so reading after the last position seen
        never skips or repeats one."""
        after = -1
        while window := self.jobs.pending(self.job, after, self.options.window):
            after = window[-1][0]
            yield [item for _, item in window]

    def _engine(self, todo: list[SourceItem], progress: bool) -> AbstractContextManager[Iterator[EncodedBatch]]:
        """The encoded batches of ``todo`` (indexes into it), from the engine the options name; a context,
        because the ray engine may start Ray and must stop it however the run ends. The serve engine is the
        local one whose models are the deployments (``self.models``)."""
        if self.options.engine == "ray":
            from mmembed.jobs.ray_engine import RayJob, ray_batches  # Ray is imported only by jobs that use it

            o = self.options
            job = RayJob(
                o.models,
                o.batch_size,
                o.ray_encoders,
                o.num_gpus_per_encoder,
                o.encoder_resources,
                self.loading(todo),
                self.settings,
                self.catalog,
                self.cache,
            )
            return ray_batches(job, todo, progress)
        return nullcontext(self._local_batches(todo))

    def _local_batches(self, todo: list[SourceItem]) -> Iterator[EncodedBatch]:
        loader = make_loader(self._dataset(todo), self.options.batch_size, self.options.workers, self.settings.device)
        with self.batch_encoder() as encoder:
            for batch in loader:
                known = self.catalog.payloads([point_id(b.uri) for b in batch])
                stored = {b.index: known.get(point_id(b.uri), {}).get("content_hash") for b in batch}
                unchanged = [b for b in batch if unchanged_content(b, stored[b.index])]
                fresh = [b for b in batch if not unchanged_content(b, stored[b.index])]
                yield encoder.encode_batch(fresh, unchanged, {b.index: todo[b.index] for b in fresh})

    def _estimate_remote(self, plan: Plan, captions: list[str], audio: int) -> None:
        """Adds one chunk to the tokens and dollars the remote models will cost: captions are counted
        now; transcripts exist only once the audio is transcribed, so those items are only counted."""
        audio = audio if transcriber(self.models.described) else 0
        for name, encoder in self.models.remote().items():
            chunk = encoder.estimate(captions)
            total = plan.remote_costs.setdefault(name, chunk | {"texts": 0, "tokens": 0, "transcripts_not_counted": 0})
            total["texts"] += chunk["texts"]
            total["tokens"] += chunk["tokens"]
            total["transcripts_not_counted"] += audio
            total["usd"] = remote_usd(total["tokens"], total["usd_per_million"])

    def _counts(self, summary: Summary, plan: Plan) -> dict[str, Any]:
        return {
            "plan": plan.counts(),
            "written": summary.written,
            "refreshed": summary.refreshed,
            "failed": summary.failed,
            "deleted": summary.deleted,
            "items": {status: n for status, n in self._items.items() if n},
            "stages_s": summary.stages_s,
            "cache": self.cache.stats.as_dict() if self.cache else {},
            "nodes": summary.nodes,
        }

    def loading(self, items: Sequence[SourceItem]) -> Loading:
        from mmembed.encoders.provision import audio_limits

        image_towers = [m.encoders["image"] for m in self.models.described.values() if "image" in m.encoders]
        limits = self.settings.decode_limits(e.limits.get("image_size") for e in image_towers)
        s3 = None
        if any((i.location or i.uri).startswith("s3://") for i in items):
            s3 = {"endpoint_url": self.settings.s3_endpoint_url, "region_name": self.settings.s3_region}
        audio = audio_limits(self.settings.models_config())
        return Loading(self.options.models, self.settings, limits, audio, s3, self.options.file_roots)

    def _dataset(self, items: list[SourceItem]) -> SourceDataset:
        return self.loading(items).dataset(items, self.models)

    def _write_batch(self, todo: Sequence[SourceItem], batch: EncodedBatch, summary: Summary, done: list[str]) -> None:
        """The write step of both engines: version updates for unchanged content, dead letters for
        failures, objects and points for the rest (retried, then dead letters), and the counts."""
        _count_stages(batch, summary)
        for b in batch.unchanged:
            version = todo[b.index].version
            retrying(self.options.attempts)(self.catalog.set_payload)(point_id(b.uri), {"source_version": version})
            summary.refreshed += 1
            done.append(b.uri)
        items, written = [], []
        for b in batch.fresh:
            result = batch.results[b.index]
            if isinstance(result, ItemError):
                self._dead_letter(b.uri, result.code, result.message, attempts=1)
                summary.failed += 1
                continue
            source = todo[b.index]
            text = source.kind == "text"
            media_type = "text/plain" if text else mimetypes.guess_type(source.uri.split("?")[0])[0]
            media_type = media_type or f"{source.kind}/octet-stream"
            items.append(
                NewItem(
                    data=b.data,
                    kind=source.kind,
                    media_type=media_type,
                    vectors=result.vectors,
                    source_uri=source.uri,
                    filename=source.uri.rsplit("/", 1)[-1],
                    caption=None if text else source.caption,  # a text item's text is its object
                    transcript=result.transcript,
                    meta=source.meta,
                    source=self.options.source,
                    source_version=source.version,
                    model_versions=result.versions,
                )
            )
            written.append(b.uri)
        if items:
            started = time.perf_counter()
            try:
                retrying(self.options.attempts)(self.catalog.add_many)(items, durable=False)
            except (StoreError, ObjectStoreError, OSError) as exc:  # past its retries: the items wait in the DLQ
                for uri in written:
                    self._dead_letter(uri, "write_failed", str(exc), attempts=self.options.attempts)
                summary.failed += len(written)
                written = []
            summary.stages_s["write"] += time.perf_counter() - started
        summary.written += len(written)
        done.extend(written)


def _count_stages(batch: EncodedBatch, summary: Summary) -> None:
    for b in (*batch.fresh, *batch.unchanged):
        summary.stages_s["read"] += b.read_ms / 1000
        summary.stages_s["decode"] += b.decode_ms / 1000
    summary.stages_s["encode"] += batch.encode_s


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Automatic garbage collection off while a listing is planned. A full collection walks every
    live object in the process (the models and their libraries), and a listing's churn of
    short-lived items sets off more of them the longer it is: 4 at a million items (1.2 s of a
    20 s plan), none at 100,000. Planning makes no reference cycles; refcounting frees it all (in a
    server, other threads' cycles wait for the plan's end)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _chunks(items: Iterable[T], size: int) -> Iterator[tuple[int, list[T]]]:
    """(position of the chunk's first item, the chunk), streaming."""
    iterator, start = iter(items), 0
    while chunk := list(itertools.islice(iterator, size)):
        yield start, chunk
        start += len(chunk)

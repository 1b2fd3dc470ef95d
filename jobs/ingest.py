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

import mimetypes
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential
from tqdm import tqdm

from mmembed.config import Settings
from mmembed.contracts import ItemError
from mmembed.encoders.remote.costs import Usage
from mmembed.encoders.remote.costs import plan_line as remote_plan_line
from mmembed.encoders.remote.costs import summary_line as remote_summary_line
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
from mmembed.jobs.state import DONE, JobStore, job_id
from mmembed.loaders.images import DecodeLimits
from mmembed.loaders.sources import SourceItem, list_source, s3_client
from mmembed.store.cache import EmbeddingCache, open_cache
from mmembed.store.catalog import Catalog, NewItem
from mmembed.store.objects import ObjectStoreError, object_store
from mmembed.store.spaces import transcriber
from mmembed.store.vectors import DimensionError, StoreError, open_store, point_id

DEFAULT_MODELS = ("demo-clip", "all-MiniLM-L6-v2", "whisper-base", "bind")
ENGINES = ("local", "ray", "serve")


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
    file_roots: tuple[str, ...] | None = None  # local files only inside these (a server's jobs); None: anywhere

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.ray_encoders < 1:
            raise ValueError(f"ray_encoders must be at least 1, got {self.ray_encoders}")
        if self.num_gpus_per_encoder < 0:
            raise ValueError(f"num_gpus_per_encoder must not be negative, got {self.num_gpus_per_encoder}")

    def job_config(self, settings: Settings) -> dict[str, Any]:
        return {"models": list(self.models), "collection": settings.collection}


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
    todo: list[SourceItem] = field(default_factory=list, repr=False)
    gone: list[str] = field(default_factory=list, repr=False)
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
    price_per_hour: float = 1.0
    remote_costs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per remote model: this run's usage

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
            f"  stages (summed over workers): {stages}",
            f"  cache: {cache or 'off'}",
            *(remote_summary_line(name, c) for name, c in self.remote_costs.items()),
        ]


class Ingest:
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

    @property
    def models(self) -> Models:
        if self._models is None:
            if self.deployments is not None:
                self._models = ServedModels(self.options.models, self.deployments)
            else:
                self._models = LoadedModels(self.options.models, self.settings)
            self.catalog.open(self._models.layout)
        return self._models

    @property
    def encoder(self) -> BatchEncoder:
        return BatchEncoder(self.models, self.cache)

    def _s3_client(self) -> Any:
        if self._s3 is None and (self.options.source.startswith("s3://") or self.settings.s3_bucket):
            self._s3 = s3_client(self.settings.s3_endpoint_url, self.settings.s3_region)
        return self._s3

    # --- plan ------------------------------------------------------------------------------

    def plan(self, calibrate: bool = True) -> Plan:
        items = list_source(self.options.source, self._s3_client())
        self.jobs.create(self.job, self.options.source, self.options.job_config(self.settings))
        row = self.jobs.get(self.job)
        assert row is not None
        by_id = {point_id(i.uri): i for i in items}
        # The source version of each item already stored, and nothing more of its payload: the plan
        # of a million-item catalogue holds a million of these.
        existing: dict[str, Any] = {}
        self.models  # noqa: B018  (opens the collection with the models' layout)
        ids = list(by_id)
        for start in range(0, len(ids), 512):
            for item_id, payload in self.catalog.payloads(ids[start : start + 512]).items():
                existing[item_id] = payload.get("source_version")
        pending = set(self.jobs.pending(self.job)) if row.status in ("running", "interrupted") else set()
        resumed = bool(pending)
        # A new run retries the dead letters: items this job did not finish, even where a write that
        # failed half-way left their point. A resumed run finishes what is pending and leaves them.
        failed = set() if resumed else {d.uri for d in self.jobs.dead_letters(self.job)}
        todo = []
        for item_id, item in by_id.items():
            finished = item_id in existing and item.version is not None and existing[item_id] == item.version
            if (item.uri in pending) or (item.uri in failed) or not finished:
                todo.append(item)
        in_store = set(self.catalog.vectors.scroll_ids({"source": self.options.source}))
        gone = sorted(in_store - set(by_id))
        plan = Plan(
            self.job,
            len(items),
            len(items) - len(todo),
            len(todo),
            sum(1 for i in todo if point_id(i.uri) not in existing),
            len(gone),
            resumed,
            price_per_hour=self.options.price_per_hour,
            todo=todo,
            gone=gone,
        )
        if calibrate and todo:
            plan.seconds_per_item = self._calibrate(todo[: self.options.calibrate])
        plan.remote_costs = self._remote_estimates(todo)
        return plan

    def _calibrate(self, sample: list[SourceItem]) -> float:
        """The full path (read, decode, encode) on a few items, nothing written: no cache (it would time
        lookups, not forward passes) and no remote model (it would pay for them)."""
        started = time.perf_counter()
        loader = make_loader(self._dataset(sample), batch_size=len(sample), workers=0)
        encoder = BatchEncoder(self.models, None, remote=False)
        for batch in loader:
            encoder.encode(batch, {b.index: sample[b.index] for b in batch})
        return (time.perf_counter() - started) / len(sample)

    # --- run -------------------------------------------------------------------------------

    def run(self, plan: Plan | None = None, progress: bool = True) -> Summary:
        plan = plan or self.plan(calibrate=False)
        summary = Summary(self.job, price_per_hour=self.options.price_per_hour)
        started = time.perf_counter()
        if not plan.resumed:
            self.jobs.reset_items(self.job)
            self.jobs.plan(self.job, [i.uri for i in plan.todo])
        self.jobs.update(self.job, status="running")
        if self.options.sync and plan.gone:
            for item_id in plan.gone:
                retrying(self.options.attempts)(self.catalog.delete)(item_id)
            summary.deleted = len(plan.gone)
        pending = set(self.jobs.pending(self.job))  # one query, not one per item
        todo = [i for i in plan.todo if i.uri in pending]
        done: list[str] = []
        remote = self.models.remote()
        usage = {name: Usage() for name in remote}
        bar = tqdm(total=len(todo), unit="item", desc="ingest", disable=not progress)
        try:
            with self._engine(todo, progress) as batches:
                for n, batch in enumerate(batches, 1):
                    self._write_batch(todo, batch, summary, done)
                    for name, used in batch.remote_usage.items():
                        usage[name] += used
                    bar.update(len(batch))
                    bar.set_postfix({k: f"{v:.0f}s" for k, v in summary.stages_s.items()})
                    if n % self.options.checkpoint_every == 0:
                        self.jobs.mark(self.job, done, DONE)
                        done.clear()
                        self.jobs.update(self.job, counts=self._counts(summary, plan))
            self.jobs.mark(self.job, done, DONE)
        except BaseException as exc:
            self.jobs.mark(self.job, done, DONE)
            self.jobs.update(self.job, status="interrupted", counts=self._counts(summary, plan), error=repr(exc))
            raise
        finally:
            bar.close()
        summary.elapsed_s = time.perf_counter() - started
        summary.cache = self.cache.stats.as_dict() if self.cache else {}
        summary.remote_costs = {
            name: used.as_dict() | {"usd_per_million": remote[name].meter.usd_per_million}
            for name, used in usage.items()
        }
        self.jobs.update(self.job, status="done", counts=self._counts(summary, plan))
        return summary

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
                self.loading(todo),
                self.settings,
                self.catalog,
                self.cache,
            )
            return ray_batches(job, todo, progress)
        return nullcontext(self._local_batches(todo))

    def _local_batches(self, todo: list[SourceItem]) -> Iterator[EncodedBatch]:
        loader = make_loader(self._dataset(todo), self.options.batch_size, self.options.workers, self.settings.device)
        encoder = self.encoder
        for batch in loader:
            known = self.catalog.payloads([point_id(b.uri) for b in batch])
            stored = {b.index: known.get(point_id(b.uri), {}).get("content_hash") for b in batch}
            unchanged = [b for b in batch if unchanged_content(b, stored[b.index])]
            fresh = [b for b in batch if not unchanged_content(b, stored[b.index])]
            yield encoder.encode_batch(fresh, unchanged, {b.index: todo[b.index] for b in fresh})

    def _remote_estimates(self, todo: list[SourceItem]) -> dict[str, dict[str, Any]]:
        """Tokens and dollars the remote models will cost: captions are counted now; transcripts
        exist only once the audio is transcribed, so those items are only counted."""
        captions = [i.caption for i in todo if i.kind == "image" and i.caption and i.caption.strip()]
        audio = sum(1 for i in todo if i.kind == "audio") if transcriber(self.models.described) else 0
        return {
            name: enc.estimate(captions) | {"transcripts_not_counted": audio}
            for name, enc in self.models.remote().items()
        }

    def _counts(self, summary: Summary, plan: Plan) -> dict[str, Any]:
        return {
            "plan": plan.counts(),
            "written": summary.written,
            "refreshed": summary.refreshed,
            "failed": summary.failed,
            "deleted": summary.deleted,
            "items": self.jobs.item_counts(self.job),
            "stages_s": summary.stages_s,
        }

    def loading(self, items: Sequence[SourceItem]) -> Loading:
        from mmembed.encoders.provision import audio_limits

        limits = DecodeLimits(max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels)
        s3 = None
        if any(i.uri.startswith("s3://") for i in items):
            s3 = {"endpoint_url": self.settings.s3_endpoint_url, "region_name": self.settings.s3_region}
        audio = audio_limits(self.settings.models_config())
        return Loading(self.options.models, self.settings, limits, audio, s3, self.options.file_roots)

    def _dataset(self, items: list[SourceItem]) -> SourceDataset:
        return self.loading(items).dataset(items, self.models)

    def _write_batch(self, todo: Sequence[SourceItem], batch: EncodedBatch, summary: Summary, done: list[str]) -> None:
        """The write step of both engines: version updates for unchanged content, dead letters for
        failures, objects and points for the rest (retried, then dead letters), and the counts."""
        for b in (*batch.fresh, *batch.unchanged):
            summary.stages_s["read"] += b.read_ms / 1000
            summary.stages_s["decode"] += b.decode_ms / 1000
        summary.stages_s["encode"] += batch.encode_s
        for b in batch.unchanged:
            version = todo[b.index].version
            retrying(self.options.attempts)(self.catalog.set_payload)(point_id(b.uri), {"source_version": version})
            summary.refreshed += 1
            done.append(b.uri)
        items, written = [], []
        for b in batch.fresh:
            result = batch.results[b.index]
            if isinstance(result, ItemError):
                self.jobs.dead_letter(self.job, b.uri, result.code, result.message, attempts=1)
                summary.failed += 1
                continue
            source = todo[b.index]
            media_type = mimetypes.guess_type(source.uri.split("?")[0])[0] or f"{source.kind}/octet-stream"
            items.append(
                NewItem(
                    data=b.data,
                    kind=source.kind,
                    media_type=media_type,
                    vectors=result.vectors,
                    source_uri=source.uri,
                    filename=source.uri.rsplit("/", 1)[-1],
                    caption=source.caption,
                    transcript=result.transcript,
                    meta=source.meta,
                    source=self.options.source,
                    source_version=source.version,
                )
            )
            written.append(b.uri)
        if items:
            started = time.perf_counter()
            try:
                retrying(self.options.attempts)(self.catalog.add_many)(items)
            except (StoreError, ObjectStoreError, OSError) as exc:  # past its retries: the items wait in the DLQ
                for uri in written:
                    self.jobs.dead_letter(self.job, uri, "write_failed", str(exc), attempts=self.options.attempts)
                summary.failed += len(written)
                written = []
            summary.stages_s["write"] += time.perf_counter() - started
        summary.written += len(written)
        done.extend(written)

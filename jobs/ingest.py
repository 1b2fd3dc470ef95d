"""Bulk catalogue jobs: embed a folder, manifest, S3 prefix or URL list into the catalogue.

A run plans first (what is new, changed, unchanged or gone, and what the rest will cost),
then streams the planned items through DataLoader workers (read, hash, decode, preprocess),
looks each (content, model) up in the embedding cache, encodes the misses in batches, and
writes objects and points. Progress is checkpointed in the job store every few batches, so
a run killed at any point resumes with the items it had not yet written; writes are
idempotent (point ids from the source URI, content-addressed objects), so the items of an
interrupted batch written twice still end as one point each. Items that keep failing go
to the dead-letter store with their reason instead of stopping the run.

Two engines run the middle of that (read, decode, encode): "local" (DataLoader workers and this
process's models) and "ray" (Ray Data over a cluster, ``jobs.ray_engine``). Both hand the same
``EncodedBatch`` to the same write step here, so planning, writing, checkpoints, dead letters and
counts do not depend on the engine.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential
from tqdm import tqdm

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, Prepared, load, model_version
from mmembed.encoders.remote.costs import Usage
from mmembed.encoders.remote.costs import plan_line as remote_plan_line
from mmembed.encoders.remote.costs import summary_line as remote_summary_line
from mmembed.jobs.state import DONE, JobStore, job_id
from mmembed.loaders.audio import AudioLimits
from mmembed.loaders.images import DecodeLimits
from mmembed.loaders.sources import Loaded, SourceDataset, SourceItem, list_source, make_loader, s3_client_from_settings
from mmembed.store.cache import EmbeddingCache, cache_key, open_cache
from mmembed.store.catalog import Catalog, NewItem, vector_name
from mmembed.store.objects import ObjectStoreError, object_store
from mmembed.store.spaces import item_encoders, layout, transcriber
from mmembed.store.vectors import DimensionError, StoreError, open_store, point_id

DEFAULT_MODELS = ("demo-clip", "all-MiniLM-L6-v2", "whisper-base", "bind")
ENGINES = ("local", "ray")

# One item after the encode step: its vectors by name (and "_transcript"), or (code, message) on failure.
Result = dict[str, Any] | tuple[str, str]


def _transient(exc: BaseException) -> bool:
    """Worth another try: the store or the object store was unreachable. A wrong vector
    size or a refused item will not get better by waiting."""
    return isinstance(exc, StoreError | ObjectStoreError | OSError) and not isinstance(exc, DimensionError)


def retrying(attempts: int) -> Callable:
    return retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(attempts),
                 wait=wait_random_exponential(multiplier=0.2, max=10), reraise=True)  # fmt: skip


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
    engine: str = "local"  # "local": DataLoader workers and this process's models; "ray": Ray Data (jobs.ray_engine)
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
    stages_s: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "decode": 0.0, "encode": 0.0,
                                                                "write": 0.0})  # fmt: skip
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
            cache += (f"; saved {saved['calls_saved']} forward passes, about {saved['seconds_saved']:.1f} s "
                      f"(${saved['cost_saved_usd']:.4f})")  # fmt: skip
        return [
            f"job {self.job_id}: {self.written} written, {self.refreshed} unchanged content (version updated), "
            f"{self.failed} failed (see `mmembed dlq list`), {self.deleted} deleted, in {self.elapsed_s:.1f} s "
            f"({rate:.1f} items/s)",
            f"  stages (summed over workers): {stages}",
            f"  cache: {cache or 'off'}",
            *(remote_summary_line(name, c) for name, c in self.remote_costs.items()),
        ]


class Models:
    """The job's encoders, and which of them each kind of item goes through."""

    def __init__(self, names: tuple[str, ...], settings: Settings) -> None:
        self.loaded: dict[str, LoadedModel] = {n: load(n, settings.models_config()) for n in names}
        self.described = {n: m.describe() for n, m in self.loaded.items()}
        self.versions = {n: model_version(m.spec, settings.models_config()) for n, m in self.loaded.items()}
        self.layout = layout(self.described)

    def direct(self, kind: str) -> list[str]:
        return [m for m, k in item_encoders(self.described, kind) if k == kind]

    def text(self, kind: str) -> list[str]:
        return [m for m, k in item_encoders(self.described, kind) if k == "text"]

    def remote(self) -> dict[str, Any]:
        """The remote text models' encoders (``RemoteEncoder``: they count tokens and keep a cost meter)."""
        return {n: m.encoder("text") for n, m in self.loaded.items() if m.spec.is_remote}

    def preprocessors(self) -> dict[str, Callable[[Any], dict[str, Prepared]]]:
        """Per kind, one callable giving every direct model its own preprocessed input (a 64 px
        demo-clip view and a 224 px ViT view of the same decoded image), run in the workers."""
        out = {}
        for kind in ("image", "audio"):
            models = [(m, self.loaded[m].encoder(kind)) for m in self.direct(kind)]
            if models:
                out[kind] = _Preprocess(models)
        return out


class _Preprocess:
    """A picklable callable (DataLoader workers may spawn)."""

    def __init__(self, models: list) -> None:
        self.models = models

    def __call__(self, decoded: Any) -> dict[str, Prepared]:
        return {name: encoder.preprocess(decoded) for name, encoder in self.models}


@dataclass(frozen=True)
class Loading:
    """How to build the job's ``SourceDataset``, as plain data (model names, settings, limits, S3 endpoint):
    the local engine's DataLoader workers inherit a dataset by fork, but a Ray task on another machine must
    rebuild it from something that pickles small."""

    models: tuple[str, ...]
    settings: Settings
    image_limits: DecodeLimits
    audio_limits: AudioLimits
    s3_config: dict[str, Any] | None = None
    file_roots: tuple[str, ...] | None = None

    def dataset(self, items: Sequence[SourceItem], models: Models) -> SourceDataset:
        roots = None if self.file_roots is None else [Path(r) for r in self.file_roots]
        return SourceDataset(items, models.preprocessors(), self.image_limits, self.audio_limits, self.s3_config,
                             url_policy=self.settings.url_policy(), file_roots=roots)  # fmt: skip


@dataclass
class EncodedBatch:
    """One batch after the encode step, whichever engine ran it: everything the write step needs."""

    fresh: list[Loaded]  # new or changed content, and failures: each has a result in ``results``
    unchanged: list[Loaded]  # the listing's version moved, the bytes did not: only the version is updated
    results: dict[int, Result]  # by ``Loaded.index``
    encode_s: float  # seconds spent in the encode step (cache lookups, forward passes)
    remote_usage: dict[str, Usage] = field(default_factory=dict)  # what each remote model's calls cost

    def __len__(self) -> int:
        return len(self.fresh) + len(self.unchanged)


def unchanged_content(loaded: Loaded, stored_hash: str | None) -> bool:
    """Read fine and hashes like the point already stored for its URI: nothing to encode or store again."""
    return loaded.error is None and stored_hash is not None and loaded.content_hash == stored_hash


class BatchEncoder:
    """The encode step of both engines: per direct model, cache lookups and one forward pass over the
    misses, then captions and transcripts through every text tower. The local engine runs it in the
    driving process, the ray engine in each encoder actor, so a vector never depends on the engine."""

    def __init__(self, models: Models, cache: EmbeddingCache | None) -> None:
        self.models, self.cache = models, cache

    def encode_batch(
        self, fresh: list[Loaded], unchanged: list[Loaded], items: Mapping[int, SourceItem]
    ) -> EncodedBatch:
        """``encode`` with its figures: the seconds it took and what the remote models' calls cost, read off
        their meters here, in whichever process runs the step."""
        meters = {name: encoder.meter for name, encoder in self.models.remote().items()}
        before = {name: meter.snapshot() for name, meter in meters.items()}
        started = time.perf_counter()
        results = self.encode(fresh, items)
        usage = {name: meter.snapshot() - before[name] for name, meter in meters.items()}
        return EncodedBatch(fresh, unchanged, results, time.perf_counter() - started, usage)

    def encode(
        self, batch: Sequence[Loaded], items: Mapping[int, SourceItem], use_cache: bool = True, remote: bool = True
    ) -> dict[int, Result]:
        """``items``: the listed item of each loaded one, by ``Loaded.index``. ``remote=False`` skips
        remote (paid, rate-limited) text models, as calibration must."""
        out: dict[int, Any] = {}
        good = [b for b in batch if b.error is None]
        for b in batch:
            out[b.index] = b.error if b.error is not None else {}
        for kind in ("image", "audio"):
            group = [b for b in good if items[b.index].kind == kind]
            for model in self.models.direct(kind) if group else []:
                self._encode_model(model, kind, group, out, use_cache)
        self._encode_texts(batch, items, out, remote)
        return out

    def _encode_model(self, model: str, kind: str, group: list[Loaded], out: dict, use_cache: bool) -> None:
        name, version = vector_name(model, kind), self.models.versions[model]
        cacheable = use_cache and self.cache is not None and self.models.described[model].cacheable
        keys = {b.index: cache_key(b.content_hash, model, version) for b in group}
        hits = self.cache.get_many(model, list(keys.values())) if cacheable else {}  # type: ignore[union-attr]
        misses = [b for b in group if keys[b.index] not in hits and isinstance(out[b.index], dict)]
        for b in group:
            if keys[b.index] in hits and isinstance(out[b.index], dict):
                out[b.index][name] = hits[keys[b.index]]
        if not misses:
            return
        results = self.models.loaded[model].encoder(kind).encode_prepared([b.prepared[model] for b in misses])
        fresh = {}
        for b, r in zip(misses, results, strict=True):
            if not r.ok:
                out[b.index] = (r.error.code or "encode_error", f"{model}: {r.error}")  # type: ignore[union-attr]
                continue
            out[b.index][name] = r.vector
            fresh[keys[b.index]] = r.vector
            if "transcript" in r.info:
                out[b.index]["_transcript"] = r.info["transcript"]
        if cacheable and fresh:
            self.cache.put_many(model, fresh)  # type: ignore[union-attr]

    def _encode_texts(
        self, batch: Sequence[Loaded], items: Mapping[int, SourceItem], encoded: dict, remote: bool = True
    ) -> None:
        """Captions (images) and transcripts (audio) through every text tower. A text a remote provider
        failed to embed past its retries makes the item a dead letter, to be retried, not a point without it."""
        for kind in ("image", "audio"):
            rows = [(b, encoded[b.index]) for b in batch
                    if items[b.index].kind == kind and isinstance(encoded[b.index], dict)]  # fmt: skip
            rows = [(b, r, items[b.index].caption if kind == "image" else r.get("_transcript")) for b, r in rows]
            rows = [(b, r, words) for b, r, words in rows if words and words.strip()]
            for model in self.models.text(kind) if rows else []:
                if not remote and self.models.loaded[model].spec.is_remote:
                    continue
                results = self.models.loaded[model].encoder("text").encode_items([w for _, _, w in rows])
                for (b, r, _), result in zip(rows, results, strict=True):
                    if result.ok:
                        r[vector_name(model, "text")] = result.vector
                    elif result.error is not None and result.error.code == "provider_failed":
                        encoded[b.index] = (result.error.code, f"{model}: {result.error}")


class Ingest:
    def __init__(self, options: IngestOptions, settings: Settings, catalog: Catalog | None = None,
                 cache: EmbeddingCache | bool | None = True, jobs: JobStore | None = None) -> None:  # fmt: skip
        self.options, self.settings = options, settings
        self.catalog = catalog or Catalog(open_store(settings), object_store(settings))
        self.cache = open_cache(settings) if cache is True else (cache or None)
        self.jobs = jobs or JobStore(settings.data_dir.expanduser() / "jobs.sqlite")
        self.job = job_id(options.source, options.job_config(settings))
        self._models: Models | None = None
        self._s3 = None

    @property
    def models(self) -> Models:
        if self._models is None:
            self._models = Models(self.options.models, self.settings)
            self.catalog.open(self._models.layout)
        return self._models

    @property
    def encoder(self) -> BatchEncoder:
        return BatchEncoder(self.models, self.cache)

    def _s3_client(self) -> Any:
        if self._s3 is None and (self.options.source.startswith("s3://") or self.settings.s3_bucket):
            self._s3 = s3_client_from_settings(self.settings)
        return self._s3

    # --- plan ------------------------------------------------------------------------------

    def plan(self, calibrate: bool = True) -> Plan:
        items = list_source(self.options.source, self._s3_client())
        self.jobs.create(self.job, self.options.source, self.options.job_config(self.settings))
        row = self.jobs.get(self.job)
        assert row is not None
        by_id = {point_id(i.uri): i for i in items}
        existing: dict[str, dict[str, Any]] = {}
        self.models  # noqa: B018  (opens the collection with the models' layout)
        ids = list(by_id)
        for start in range(0, len(ids), 512):
            existing |= self.catalog.payloads(ids[start : start + 512])
        pending = set(self.jobs.pending(self.job)) if row.status in ("running", "interrupted") else set()
        resumed = bool(pending)
        # A new run retries the dead letters: items this job did not finish, even where a write that
        # failed half-way left their point. A resumed run finishes what is pending and leaves them.
        failed = set() if resumed else {d.uri for d in self.jobs.dead_letters(self.job)}
        todo = []
        for item_id, item in by_id.items():
            known = existing.get(item_id)
            finished = known is not None and item.version is not None and known.get("source_version") == item.version
            if (item.uri in pending) or (item.uri in failed) or not finished:
                todo.append(item)
        in_store = set(self.catalog.vectors.scroll_ids({"source": self.options.source}))
        gone = sorted(in_store - set(by_id))
        plan = Plan(self.job, len(items), len(items) - len(todo), len(todo),
                    sum(1 for i in todo if point_id(i.uri) not in existing), len(gone), resumed,
                    price_per_hour=self.options.price_per_hour, todo=todo, gone=gone)  # fmt: skip
        if calibrate and todo:
            plan.seconds_per_item = self._calibrate(todo[: self.options.calibrate])
        plan.remote_costs = self._remote_estimates(todo)
        return plan

    def _calibrate(self, sample: list[SourceItem]) -> float:
        """The full path (read, decode, encode) on a few items, in this process, nothing written."""
        started = time.perf_counter()
        loader = make_loader(self._dataset(sample), batch_size=len(sample), workers=0)
        for batch in loader:
            self.encoder.encode(batch, {b.index: sample[b.index] for b in batch}, use_cache=False, remote=False)
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
        todo = [i for i in plan.todo if i.uri in set(self.jobs.pending(self.job))]
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
        summary.remote_costs = {name: used.as_dict() | {"usd_per_million": remote[name].meter.usd_per_million}
                                for name, used in usage.items()}  # fmt: skip
        self.jobs.update(self.job, status="done", counts=self._counts(summary, plan))
        return summary

    def _engine(self, todo: list[SourceItem], progress: bool) -> AbstractContextManager[Iterator[EncodedBatch]]:
        """The encoded batches of ``todo`` (indexes into it), from the engine the options name; a context,
        because the ray engine may start Ray and must stop it however the run ends."""
        if self.options.engine == "ray":
            from mmembed.jobs.ray_engine import ray_batches  # Ray is imported only by jobs that use it

            return ray_batches(self, todo, progress)
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
        return {name: enc.estimate(captions) | {"transcripts_not_counted": audio}
                for name, enc in self.models.remote().items()}  # fmt: skip

    def _counts(self, summary: Summary, plan: Plan) -> dict[str, Any]:
        return {"plan": plan.counts(), "written": summary.written, "refreshed": summary.refreshed,
                "failed": summary.failed, "deleted": summary.deleted, "items": self.jobs.item_counts(self.job),
                "stages_s": summary.stages_s}  # fmt: skip

    def loading(self, items: Sequence[SourceItem]) -> Loading:
        from mmembed.encoders.provision import audio_limits

        limits = DecodeLimits(max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels)
        s3 = None
        if any(i.uri.startswith("s3://") for i in items):
            s3 = {"endpoint_url": self.settings.s3_endpoint_url, "region_name": self.settings.s3_region}
        return Loading(self.options.models, self.settings, limits, audio_limits(self.settings.models_config()), s3,
                       self.options.file_roots)  # fmt: skip

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
            if isinstance(result, tuple):
                self.jobs.dead_letter(self.job, b.uri, result[0], result[1], attempts=1)
                summary.failed += 1
                continue
            source = todo[b.index]
            transcript = result.pop("_transcript", None)
            media_type = mimetypes.guess_type(source.uri.split("?")[0])[0] or f"{source.kind}/octet-stream"
            items.append(NewItem(data=b.data, kind=source.kind, media_type=media_type,
                                 vectors=result, source_uri=source.uri, filename=source.uri.rsplit("/", 1)[-1],
                                 caption=source.caption, transcript=transcript, meta=source.meta,
                                 source=self.options.source, source_version=source.version))  # fmt: skip
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

"""The catalogue behind the search API, as its own Serve deployment, and the bulk jobs
started over HTTP.

One replica owns the vector store: the embedded engine (Qdrant Edge) is one folder that
one process may write, so the default runs exactly one. With a Qdrant server
(``MMEMBED_QDRANT_URL``) it is a thin client and could run several. Bulk jobs run in this
replica for the same reason (they write the same store), in background threads; their
state lives in the job store on disk, so a job the last replica left unfinished resumes
when a new one starts.

This replica loads no model. A job here reads and hashes its items and sends them to the
encoder deployments (the ingest engine "serve", through ``EncoderHandles``), which decode,
preprocess, look the cache up and batch them with the API's requests: one copy of each model,
one set of batches, queue limits and metrics for everything the server embeds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mmembed.config import Settings
from mmembed.contracts import (
    CatalogView,
    DeadLetter,
    EncodedItem,
    JobStart,
    JobStarted,
    JobView,
    MigrationRefused,
    MigrationStart,
    ModelInfo,
    PathForbidden,
    SearchHit,
    StoredItem,
    Switched,
    TooManyJobs,
)
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.migrate import MigrateOptions, Migration
from mmembed.jobs.state import JobStore, job_id
from mmembed.jobs.watch import Watch
from mmembed.loaders.sources import SourceError, check_inside_roots
from mmembed.serve.handles import by_reference
from mmembed.store.catalog import Catalog, NewItem
from mmembed.store.objects import object_store
from mmembed.store.switching import MigrationRunning, drop_old, rollback
from mmembed.store.vectors import open_store

log = logging.getLogger(__name__)

WATCHING = "watching"  # a job's status between the rounds of a watch
BUSY_RETRY_S = 1.0  # a full encoder queue makes a job wait this long before asking again, not fail


class EncoderHandles:
    """The encoder deployments, as a server job's models (``jobs.encode.Deployments``), called from a
    job's thread. Every call is made on the replica's own event loop: in Serve's throughput-optimized
    mode a handle's router runs on that loop and refuses calls from any other thread. A job's batches
    carry pixels, so its calls go by reference (``serve.handles``)."""

    def __init__(self, handles: dict[str, DeploymentHandle], loop: asyncio.AbstractEventLoop) -> None:
        self.handles, self.loop = {name: by_reference(h) for name, h in handles.items()}, loop

    def describe(self, models: Sequence[str]) -> dict[str, ModelInfo]:
        missing = sorted(set(models) - set(self.handles))
        if missing:
            raise ValueError(f"models not served here: {missing}; served: {sorted(self.handles)}")
        return {m: asyncio.run_coroutine_threadsafe(self._describe(m), self.loop).result() for m in models}

    async def _describe(self, model: str) -> ModelInfo:
        return await self.handles[model].describe.remote()

    async def encode(self, model: str, modality: str, inputs: list[Any]) -> list[EncodedItem]:
        """Awaited in the job thread's own loop (``BatchEncoder`` gives each batch one)."""
        call = asyncio.run_coroutine_threadsafe(self._encode(model, modality, inputs), self.loop)
        return await asyncio.wrap_future(call)

    async def _encode(self, model: str, modality: str, inputs: list[Any]) -> list[EncodedItem]:
        """A job yields to the API's requests: while the deployment's queue is full it waits and asks again."""
        while True:
            try:
                return await self.handles[model].encode.remote(modality, inputs)
            except BackPressureError:
                await asyncio.sleep(BUSY_RETRY_S)


class CatalogDeployment:
    def __init__(self, settings: Settings, encoders: dict[str, DeploymentHandle]) -> None:
        self.settings = settings
        # Serve runs the constructor on the replica's event loop (its user-code loop)
        self.encoders = EncoderHandles(encoders, asyncio.get_running_loop())
        self.catalog = Catalog(open_store(self.settings.vectors_config()), object_store(self.settings.objects_config()))
        self.layout: dict[str, int] | None = None
        self.jobs = JobStore(self.settings.data_dir.expanduser() / "jobs.sqlite")
        self.roots = self.settings.server_ingest_roots()  # clients name the paths: read only inside these
        self.threads: dict[str, threading.Thread] = {}
        self.stops: dict[str, threading.Event] = {}  # watching jobs, until DELETE /jobs/{id}
        self.migration: Migration | None = None  # the one migration running, if any
        for row in self.jobs.list():
            if row.status in ("planned", "running", WATCHING) and row.config.get("server"):
                log.info("resuming job %s left unfinished by the last replica", row.id)
                if "migrate" in row.config:
                    self.start_migration(**row.config["migrate"])
                else:
                    self._start(row.source, row.config)

    def open(self, layout: dict[str, int]) -> CatalogView:
        """Called by the ingress with the named vectors its models produce; idempotent. A served model
        whose vectors the collection lacks is left out of searches and of the items added until a
        migration adds them (``start_migration``)."""
        if self.layout != layout:
            self.catalog.open(layout, missing_ok=True)
            self.layout = layout
        held = {name: dim for name, dim in layout.items() if name in self.catalog.vectors.vectors}
        return CatalogView(held, self.catalog.vectors.state().defaults)

    def add(self, item: NewItem) -> str:
        self._writable()
        return self.catalog.add(item)

    def delete(self, item_id: str) -> bool:
        self._writable()
        return _is_id(item_id) and self.catalog.delete(item_id)

    def _writable(self) -> None:
        """A migration copying the collection into a new shard would miss a write made meanwhile."""
        migration = self.migration
        if migration is not None and migration.copying:
            raise MigrationRunning(
                f"a migration to {migration.migrate.to} is copying the collection; writes wait until it switches "
                f"(GET /jobs/{migration.job})"
            )

    def get(self, item_id: str, with_vectors: bool = False) -> StoredItem | None:
        point = self.catalog.get(item_id, with_vectors) if _is_id(item_id) else None
        if point is None:
            return None
        return StoredItem(point.id, point.payload, self.catalog.url(point.payload), point.vectors)

    def search(self, vector: str, query: np.ndarray, **options: Any) -> list[SearchHit]:
        return self.catalog.search(vector, query, **options)

    def search_fused(self, queries: dict[str, np.ndarray], **options: Any) -> list[SearchHit]:
        return self.catalog.search_fused(queries, **options)

    def count(self) -> int:
        return self.catalog.vectors.count()

    # --- bulk jobs ------------------------------------------------------------------------------

    def start_job(self, source: str, models: list[str], sync: bool = False, watch: bool = False) -> JobStart:
        """Plans and runs in a background thread; answers the job id at once, or how many jobs
        run when ``max_concurrent_jobs`` already do (each reads and writes in this replica)."""
        try:
            self._writable()
        except MigrationRunning as exc:
            return MigrationRefused(str(exc))
        local = "://" not in source or source.lower().startswith("file://")
        if local:
            try:
                check_inside_roots(Path(url2pathname(urlsplit(source).path)), [Path(r) for r in self.roots])
            except SourceError as exc:
                return PathForbidden(str(exc))
        options = IngestOptions(source, tuple(models), sync=sync, workers=0)
        same = self.threads.get(job_id(source, options.job_config(self.settings)))
        running = sum(t.is_alive() for t in self.threads.values())
        if running >= self.settings.max_concurrent_jobs and not (same and same.is_alive()):
            return TooManyJobs(running)
        config = {"models": models, "sync": sync or watch, "server": True} | ({"watch": True} if watch else {})
        return JobStarted(self._start(source, config))

    def _start(self, source: str, config: dict[str, Any]) -> str:
        options = IngestOptions(
            source,
            tuple(config["models"]),
            sync=config.get("sync", False),
            workers=0,
            engine="serve",
            file_roots=self.roots,
        )
        ingest = Ingest(options, self.settings, catalog=self.catalog, jobs=self.jobs, deployments=self.encoders)
        watch = bool(config.get("watch"))
        server = {"server": True, "sync": options.sync} | ({"watch": True} if watch else {})
        self.jobs.create(ingest.job, source, options.job_config(self.settings) | server)
        if ingest.job in self.threads and self.threads[ingest.job].is_alive():
            return ingest.job  # already running: the same source and models are the same job
        self.jobs.update(ingest.job, status="running")
        if watch:
            self.stops[ingest.job] = threading.Event()
        target = self._watch if watch else self._run
        thread = threading.Thread(target=target, args=(ingest,), name=f"job-{ingest.job}", daemon=True)
        self.threads[ingest.job] = thread
        thread.start()
        return ingest.job

    def _run(self, ingest: Ingest) -> None:
        """An ingest or a migration, to its end."""
        try:
            plan = ingest.plan(calibrate=False)
            self.jobs.update(ingest.job, counts={"plan": plan.counts()})
            ingest.run(plan, progress=False)
        except Exception as exc:  # the job's record says why; the replica keeps serving
            log.exception("job %s failed", ingest.job)
            ingest.release()
            self.jobs.update(ingest.job, status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if self.migration is ingest:
                self.migration = None

    def _watch(self, ingest: Ingest) -> None:
        """Rounds until ``stop_job``: the job's counts are its last round's, its status ``watching``."""
        stop = self.stops[ingest.job]
        try:
            rounds = Watch(ingest.options, self.settings, stop=stop, ingest=ingest).rounds()
            for n, done in enumerate(rounds, 1):
                row = self.jobs.get(ingest.job)
                counts = (row.counts if row else {}) | {"rounds": n, "whole": done.whole, "waiting": list(done.waiting)}
                self.jobs.update(ingest.job, status=WATCHING, counts=counts)
            self.jobs.update(ingest.job, status="stopped")
        except Exception as exc:  # the job's record says why; the replica keeps serving
            log.exception("watching job %s failed", ingest.job)
            self.jobs.update(ingest.job, status="failed", error=f"{type(exc).__name__}: {exc}")

    # --- model migration ------------------------------------------------------------------------

    def start_migration(self, to: str, from_: str | None = None, accept_failed: bool = False) -> MigrationStart:
        """The new model must be served: the job's items go to its encoder deployment like any job's. It
        waits for no other job: they would write the collection while it is copied or read."""
        if to not in self.encoders.handles:
            served = sorted(self.encoders.handles)
            return MigrationRefused(f"model {to!r} is not served here (served: {served}); add it to the serve config")
        options = MigrateOptions(to, from_, workers=0, engine="serve", accept_failed=accept_failed)
        migration = Migration(options, self.settings, catalog=self.catalog, jobs=self.jobs, deployments=self.encoders)
        running = [job for job, thread in self.threads.items() if thread.is_alive()]
        if migration.job in running:
            return JobStarted(migration.job)
        if running:
            return MigrationRefused(f"{len(running)} jobs write the collection now; migrate once they end")
        config = {"server": True, "migrate": {"to": to, "from_": from_, "accept_failed": accept_failed}}
        self.jobs.create(migration.job, migration.options.source, migration.options.job_config(self.settings) | config)
        self.jobs.update(migration.job, status="running")
        self.migration = migration
        thread = threading.Thread(target=self._run, args=(migration,), name=f"job-{migration.job}", daemon=True)
        self.threads[migration.job] = thread
        thread.start()
        return JobStarted(migration.job)

    def rollback(self) -> Switched:
        self._writable()
        return rollback(self.catalog.vectors)

    def drop_old(self) -> list[str]:
        self._writable()
        return drop_old(self.catalog.vectors)

    def stop_job(self, job: str) -> bool:
        stop = self.stops.get(job)
        if stop is None or not self.threads[job].is_alive():
            return False
        stop.set()
        return True

    def job(self, job: str) -> JobView | None:
        row = self.jobs.get(job)
        if row is None:
            return None
        items = self.jobs.item_counts(job)
        planned = sum(items.values())
        finished = items.get("done", 0) + items.get("failed", 0)
        progress = finished / planned if planned else (1.0 if row.status == "done" else 0.0)
        return JobView(row.id, row.source, row.status, row.error, progress, items, row.counts, row.created, row.updated)

    def dead_letters(self, job: str) -> list[DeadLetter]:
        return self.jobs.dead_letters(job)

    def list_jobs(self) -> list[JobView]:
        return [view for row in self.jobs.list() if (view := self.job(row.id)) is not None]


def _is_id(item_id: str) -> bool:
    """Item ids are canonical UUIDs; anything else names no item (a 404, not a store error)."""
    try:
        return str(uuid.UUID(item_id)) == item_id
    except ValueError:
        return False


def build_catalog(
    settings: Settings,
    env: dict[str, str],
    encoders: dict[str, serve.Application],
    num_cpus: float = 1.0,
    resources: dict[str, float] | None = None,
) -> serve.Application:
    """``encoders``: the encoder deployments by model name, which this replica's jobs send their items to.
    ``resources``: custom Ray resources that place the one catalogue replica (the vector store's one writer)."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "resources": resources or {}} | (
        {"runtime_env": {"env_vars": env}} if env else {}
    )
    deployment = serve.deployment(CatalogDeployment, name="catalog", num_replicas=1, max_ongoing_requests=64)
    return deployment.options(ray_actor_options=options).bind(settings, encoders)

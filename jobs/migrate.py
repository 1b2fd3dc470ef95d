"""Zero-downtime model migration: a new model's vectors for every item the collection holds,
computed from the item's stored object (nothing uploaded again), while searches keep answering
from the old model's vectors; then one write switches the default vector of each modality.

A migration is a bulk job whose source is the collection itself, so it plans, costs, checkpoints,
resumes after a kill, retries, dead-letters and reports like any job (``jobs.ingest``). Where the new
vectors go is the engine's call (``VectorStore.with_vectors``): a Qdrant server adds the named
vectors to the existing points; the embedded engine fills a new shard beside the live one, copying
each point's vectors and payload with its new vectors, and the switch makes that shard live. Either
way the old vectors stay until ``drop_old``, so ``rollback`` switches back at once.

The switch waits until every item the new model encodes has its vector: an item the model refused
stays in the dead-letter store, and the migration says so instead of switching (``accept_failed``
switches anyway; those items keep only their old vectors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mmembed.config import Settings
from mmembed.contracts import ItemError, Switched
from mmembed.jobs.dataset import make_loader
from mmembed.jobs.encode import Deployments, EncodedBatch
from mmembed.jobs.ingest import (
    PLAN_CHUNK,
    Changes,
    Ingest,
    IngestOptions,
    Plan,
    Summary,
    _chunks,
    _count_stages,
    retrying,
)
from mmembed.jobs.state import PENDING, JobStore
from mmembed.loaders.sources import SourceItem
from mmembed.store.cache import EmbeddingCache
from mmembed.store.catalog import Catalog
from mmembed.store.switching import MigrationError, effective_defaults
from mmembed.store.vectors import Point, VectorStore, point_id

# What a planned item needs of its point: its identity, what to read, and which weights made it.
FIELDS = ["source_uri", "kind", "object_uri", "text", "caption", "content_hash"]
UNSUPPORTED = "unsupported_kind"  # the dataset's code for an item of a kind the new model does not encode


@dataclass
class MigrateOptions:
    to: str
    from_: str | None = None  # default: the model of the vector searches use now
    batch_size: int = 32
    workers: int = 2
    engine: str = "local"  # or "serve": a server's encoder deployments
    accept_failed: bool = False  # switch even though some items could not be encoded by the new model
    switch: bool = True  # switch at the end of the run (False: the caller calls ``Migration.switch``)
    price_per_hour: float = 1.0
    checkpoint_every: int = 4
    checkpoint_seconds: float = 5.0
    attempts: int = 5

    def __post_init__(self) -> None:
        if self.engine not in ("local", "serve"):
            raise ValueError(f"a migration runs on the local or the serve engine, not {self.engine!r}")


class Migration(Ingest):
    """The job's source is the collection: every point, read back a page at a time."""

    label = "migrate"

    def __init__(
        self,
        options: MigrateOptions,
        settings: Settings,
        catalog: Catalog | None = None,
        cache: EmbeddingCache | bool | None = True,
        jobs: JobStore | None = None,
        deployments: Deployments | None = None,
    ) -> None:
        ingest = IngestOptions(
            f"migrate:{settings.collection}",
            (options.to,),
            options.batch_size,
            options.workers,
            options.checkpoint_every,
            price_per_hour=options.price_per_hour,
            attempts=options.attempts,
            checkpoint_seconds=options.checkpoint_seconds,
            engine=options.engine,
        )
        super().__init__(ingest, settings, catalog, cache, jobs, deployments)
        self.migrate = options
        self.target: VectorStore | None = None
        self.old: str | None = None
        self.switched: Switched | None = None  # what the run's switch did

    @property
    def store(self) -> VectorStore:
        return self.catalog.vectors

    @property
    def copying(self) -> bool:
        """The new vectors go into a new collection, which must also get every point's old ones."""
        return self.target is not None and self.target is not self.store

    def _open_collection(self, layout: dict[str, int]) -> None:
        """The collection as it is (whatever models made it), then the store the new vectors go to."""
        existing = self.store.open_existing()
        self.catalog.open(existing)  # again, with the payload indexes a new shard must have too
        models = list(dict.fromkeys(name.rpartition(".")[0] for name in existing))
        to = self.migrate.to
        if self.migrate.from_ is not None:
            if self.migrate.from_ not in models:
                raise MigrationError(f"no vectors of {self.migrate.from_!r} in the collection; it has {models}")
            self.old = self.migrate.from_
        else:
            state = self.store.state()
            current = effective_defaults(state, existing)
            modalities = [name.rpartition(".")[2] for name in layout]
            owners = [current[m].rpartition(".")[0] for m in modalities if m in current]
            if to in owners:  # switched already (a rerun): from the model the switch replaced
                if not state.previous:
                    raise MigrationError(f"searches already use the vectors of {to!r}: there is nothing to migrate")
                owners = [v.rpartition(".")[0] for v in state.previous.values()]
            self.old = next((o for o in owners if o != to), None)
            if self.old is None:
                raise MigrationError(
                    f"no vector of the collection ({sorted(existing)}) is of a modality {to!r} encodes "
                    f"({modalities}); name the model to migrate from with --from"
                )
        if self.old == to:
            raise MigrationError(f"--from and --to are both {to!r}; migrate to another model")
        self.target = self.store.with_vectors(layout)

    def _written_to(self) -> VectorStore:
        assert self.target is not None
        return self.target

    # --- plan ------------------------------------------------------------------------------

    def plan(self, calibrate: bool = True, changes: Changes | None = None) -> Plan:
        """Pages through the collection's points: an item is to do when its point is not yet in the target
        (a new shard) or lacks the new model's vector of this weights version."""
        if changes is not None:
            raise ValueError("a migration plans the whole collection")
        config = self.options.job_config(self.settings) | {"migrate": True}
        row = self.jobs.create(self.job, self.options.source, config)
        self.models  # noqa: B018  (opens the collection and the target)
        assert self.target is not None
        resumed = row.status in ("running", "interrupted") and self.jobs.has_pending(self.job)
        self.jobs.begin_plan(self.job, resume=resumed)
        plan = Plan(self.job, 0, 0, 0, 0, 0, resumed, price_per_hour=self.options.price_per_hour)
        version = self.models.described[self.migrate.to].version
        kinds = set(self.models.preprocessors())
        with self.jobs.mapped():
            for start, ids in _chunks(self.store.iter_ids(), PLAN_CHUNK):
                points = self.store.retrieve(ids, fields=FIELDS)
                there = {p.id: p.payload for p in self.target.retrieve(ids, fields=["model_versions"])}
                items = [(start + n, p.id, _source_item(p, kinds)) for n, p in enumerate(points)]
                self.jobs.record_listing(self.job, [(pid, item.uri) for _, pid, item in items])
                uris = [item.uri for _, _, item in items]
                states = self.jobs.states(self.job, uris) if resumed else {}
                failed = set() if resumed else self.jobs.dead_lettered(self.job, uris)
                todo = []
                for position, pid, item in items:
                    have = (there.get(pid) or {}).get("model_versions") or {}
                    stale = item.kind in kinds and have.get(self.migrate.to) != version
                    if pid not in there or stale or states.get(item.uri) == PENDING or item.uri in failed:
                        todo.append((position, pid, item))
                self.jobs.plan(self.job, todo)
                plan.total += len(items)
                plan.to_check += len(todo)
                plan.new += sum(1 for _, pid, _ in todo if pid not in there)
                room = self.options.calibrate - len(plan.sample)
                plan.sample.extend(i for _, _, i in todo[:room] if i.kind in kinds)
            self.jobs.end_listing(self.job, self.options.source)
        plan.unchanged = plan.total - plan.to_check
        if calibrate and plan.sample:
            plan.seconds_per_item = self._calibrate(plan.sample)
        return plan

    # --- run -------------------------------------------------------------------------------

    def _local_batches(self, todo: list[SourceItem]) -> Iterator[EncodedBatch]:
        """Every item is encoded: the content is the collection's own, only the model is new."""
        loader = make_loader(self._dataset(todo), self.options.batch_size, self.options.workers, self.settings.device)
        with self.batch_encoder() as encoder:
            for batch in loader:
                yield encoder.encode_batch(batch, [], {b.index: todo[b.index] for b in batch})

    def _write_batch(self, todo: Any, batch: EncodedBatch, summary: Summary, done: list[str]) -> None:
        """The new vectors and the version that made them, merged into each point of the target; copying,
        with the point's old vectors and payload, refused items included (they keep their old vectors)."""
        assert self.target is not None
        _count_stages(batch, summary)
        ids = [point_id(b.uri) for b in batch.fresh]
        fields = None if self.copying else ["model_versions"]
        live = {p.id: p for p in self.store.retrieve(ids, with_vectors=self.copying, fields=fields)}
        points, written = [], []
        for b, pid in zip(batch.fresh, ids, strict=True):
            result = batch.results[b.index]
            old = live.get(pid)
            if old is None:  # deleted since the plan: nothing to migrate
                done.append(b.uri)
                continue
            versions = dict(old.payload.get("model_versions") or {})
            vectors: dict[str, Any] = {}
            if isinstance(result, ItemError) and result.code != UNSUPPORTED:
                self._dead_letter(b.uri, result.code, result.message, attempts=1)
                summary.failed += 1
                if not self.copying:
                    continue
            else:
                if not isinstance(result, ItemError):
                    vectors, versions = dict(result.vectors), versions | result.versions
                written.append(b.uri)
            payload = (old.payload if self.copying else {}) | {"model_versions": versions}
            points.append(Point(pid, (old.vectors if self.copying else {}) | vectors, payload))
        if points:
            retrying(self.options.attempts)(self.target.upsert)(points, durable=False)
        summary.written += len(written)
        done.extend(written)

    # --- switch ----------------------------------------------------------------------------

    def _finish(self, summary: Summary, plan: Plan) -> None:
        """The switch comes before the job says it is done, so whoever follows the job sees its outcome."""
        counts = self._counts(summary, plan)
        if self.migrate.switch:
            self.switched = self.switch()
            counts |= {"switched": self.switched.switched, "switch": self.switched.lines()[0]}
        self.jobs.update(self.job, status="done", counts=counts)

    def switch(self) -> Switched:
        """Make the new vectors the defaults, once they cover the collection: a copy holds every point and
        no item waits or failed (unless ``accept_failed``). Not switched, the new shard is let go, so a
        rerun (in this process too) takes it up again."""
        switched = self._switch()
        if not switched.switched:
            self.release()
        return switched

    def release(self) -> None:
        """Close a new shard that was not adopted: the embedded engine lets one store hold it."""
        if self.copying:
            assert self.target is not None
            self.target.close()
        self.target = None

    def _switch(self) -> Switched:
        assert self.target is not None and self.old is not None
        counts = self.jobs.item_counts(self.job)
        state = self.store.state()
        before = effective_defaults(state, self.store.vectors)
        if counts.get(PENDING):
            return Switched(False, before, state.previous, f"{counts[PENDING]} items not yet migrated: run it again")
        failed = counts.get("failed", 0)
        if failed and not self.migrate.accept_failed:
            waiting = (
                f"{failed} items could not be encoded by {self.migrate.to} (`mmembed dlq list`); fix or delete "
                "them and run it again, or pass --accept-failed to switch with their old vectors only"
            )
            return Switched(False, before, state.previous, waiting)
        if self.copying and self.target.count() != self.store.count():
            missing = self.store.count() - self.target.count()
            return Switched(False, before, state.previous, f"{missing} points changed since the plan: run it again")
        new = {name.rpartition(".")[2]: name for name in self.models.layout}
        switched = {m: v for m, v in new.items() if f"{self.old}.{m}" in self.store.vectors}
        state.previous = {m: before[m] for m in switched}
        state.defaults = state.defaults | switched
        self.target.build_index()
        self.store.adopt(self.target, state)
        self.target = self.store
        return Switched(True, state.defaults, state.previous)


def _source_item(point: Point, kinds: set[str]) -> SourceItem:
    """The item as the new model reads it: its stored object, or for a text model that cannot read the
    object, the words stored with it (an image's caption, a recording's transcript), as a text item."""
    p = point.payload
    kind = p.get("kind", "image")
    text = p.get("text") if kind == "text" else p.get("caption") or p.get("transcript")
    if kind not in kinds and "text" in kinds and text:
        kind = "text"
    return SourceItem(p["source_uri"], kind, caption=text, version=p.get("content_hash"), location=p.get("object_uri"))

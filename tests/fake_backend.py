"""A test double of the HTTP layer's ``Backend``: three small models with deterministic
vectors and an in-memory catalogue and job table, so the whole HTTP surface runs in-process
with no Ray and no model."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mmembed.contracts import (
    CatalogView,
    DeadLetter,
    EncodedItem,
    EncoderInfo,
    ItemError,
    JobStart,
    JobStarted,
    JobView,
    MigrationRefused,
    MigrationStart,
    ModelInfo,
    ReplicaInfo,
    SearchHit,
    StoredItem,
    Switched,
)
from mmembed.serve.http import ApiError
from mmembed.store.catalog import NewItem
from mmembed.store.switching import MigrationError
from mmembed.store.vectors import DimensionError

PNG_MAGIC = b"\x89PNG"
WAV_MAGIC = b"RIFF"
TRANSCRIPT = "a red circle"


def unit_vector(dim: int, *parts: Any) -> np.ndarray:
    """Seeded by the content: the same input always gives the same vector."""
    seed = hashlib.sha256(repr(parts).encode()).digest()
    vec = np.random.default_rng(int.from_bytes(seed[:8], "little")).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


def _info(name: str, space: str, family: str, dims: dict[str, int], **limits: Any) -> ModelInfo:
    encoders = {m: EncoderInfo(f"{name}.{m}", d, dict(limits)) for m, d in dims.items()}
    transcribes = family == "whisper"
    return ModelInfo(name, space, family, "cpu", "float32", encoders, transcribes, cacheable=not transcribes)


MODELS = {
    "demo-clip": _info("demo-clip", "demo-clip", "open_clip", {"image": 16, "text": 16}, image_size=64, x=None),
    "all-MiniLM-L6-v2": _info("all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "sentence_transformers", {"text": 12}),
    "whisper-base": _info("whisper-base", "all-MiniLM-L6-v2", "whisper", {"audio": 12}, max_seconds=600),
}


@dataclass
class FakeBackend:
    models: dict[str, ModelInfo] = field(default_factory=lambda: dict(MODELS))
    items: dict[str, StoredItem] = field(default_factory=dict)
    jobs: dict[str, JobView] = field(default_factory=dict)
    next_start: JobStart | None = None  # what start_job answers; None: a new job
    stored_layout: dict[str, int] | None = None  # a collection made earlier, with these sizes
    encode_calls: list[tuple[str, str, int]] = field(default_factory=list)
    describe_error: Exception | None = None
    defaults: dict[str, str] = field(default_factory=dict)  # the collection's default vectors
    previous: dict[str, str] = field(default_factory=dict)  # what a rollback restores

    async def replicas(self) -> list[ReplicaInfo]:
        return [ReplicaInfo(model, f"{model}-r1", "RUNNING", "node-a", "127.0.0.1") for model in self.models]

    async def describe(self, model: str) -> ModelInfo:
        if self.describe_error is not None:
            raise self.describe_error
        if model not in self.models:
            raise ApiError(404, "model_not_found", f"model {model!r} is not served here; served: {sorted(self.models)}")
        return self.models[model]

    async def encode(self, model: str, modality: str, items: list[Any]) -> list[EncodedItem]:
        info = await self.describe(model)
        self.encode_calls.append((model, modality, len(items)))
        dim = info.encoders[modality].dim
        return [self._one(info, modality, dim, item, len(items)) for item in items]

    def _one(self, info: ModelInfo, modality: str, dim: int, item: Any, batch: int) -> EncodedItem:
        timing = {"batch_size": batch, "queue_ms": 0.25, "encode_ms": 1.5}
        if modality == "text":
            if not item:
                return EncodedItem(None, ItemError("empty_input", "empty text"))
            return EncodedItem(unit_vector(dim, info.space, item), info={"tokens": len(item.split())}, **timing)
        magic = PNG_MAGIC if modality == "image" else WAV_MAGIC
        if not item.startswith(magic):
            code = "not_an_image" if modality == "image" else "not_audio"
            return EncodedItem(None, ItemError(code, f"cannot decode this {modality}"), **timing)
        extra = {"seconds": 1.0, "transcript": TRANSCRIPT} if info.transcribes else {}
        return EncodedItem(unit_vector(dim, info.space, item), info=extra, **timing)

    async def open_catalog(self, layout: dict[str, int]) -> CatalogView:
        for name, dim in (self.stored_layout or {}).items():
            if layout.get(name, dim) != dim:
                raise DimensionError(f"{name} is {dim}-d in the collection; the models give {layout[name]}")
        self.stored_layout = layout
        return CatalogView(layout, dict(self.defaults))

    async def add_item(self, item: NewItem) -> str:
        item_id = str(uuid.uuid5(uuid.NAMESPACE_URL, item.source_uri or hashlib.sha256(item.data).hexdigest()))
        payload = {
            "kind": item.kind,
            "media_type": item.media_type,
            "caption": item.caption,
            "transcript": item.transcript,
            "meta": item.meta,
        }
        key = hashlib.sha256(item.data).hexdigest()
        self.items[item_id] = StoredItem(item_id, payload, f"/objects/{key}", item.vectors)
        return item_id

    async def get_item(self, item_id: str, with_vectors: bool = False) -> StoredItem | None:
        found = self.items.get(item_id)
        return None if found is None else found if with_vectors else replace(found, vectors={})

    async def delete_item(self, item_id: str) -> bool:
        return self.items.pop(item_id, None) is not None

    async def search(
        self, vector: str, query: np.ndarray, *, top_k: int, threshold: float | None, filter: Any, offset: int
    ) -> list[SearchHit]:
        hits = [
            SearchHit(i.id, float(np.dot(i.vectors[vector], query)), i.payload, i.url)
            for i in self.items.values()
            if vector in i.vectors
        ]
        hits = [h for h in hits if threshold is None or h.score >= threshold]
        return sorted(hits, key=lambda h: -h.score)[offset : offset + top_k]

    async def search_fused(
        self,
        queries: dict[str, np.ndarray],
        *,
        top_k: int,
        threshold: float | None,
        filter: Any,
        offset: int,
        fusion: str,
    ) -> list[SearchHit]:
        """Reciprocal-rank fusion (k = 60) whichever fusion is asked for: the routes' tests check what is
        asked and shown, the store's tests what each fusion ranks."""
        scores: dict[str, float] = {}
        matched: dict[str, dict[str, int]] = {}
        for vector, query in queries.items():
            own = await self.search(vector, query, top_k=50, threshold=threshold, filter=filter, offset=0)
            for rank, hit in enumerate(own, 1):
                scores[hit.id] = scores.get(hit.id, 0.0) + 1 / (60 + rank)
                matched.setdefault(hit.id, {})[vector] = rank
        best = sorted(scores, key=lambda i: -scores[i])[offset : offset + top_k]
        return [SearchHit(i, scores[i], self.items[i].payload, self.items[i].url, matched[i]) for i in best]

    async def count(self) -> int:
        return len(self.items)

    async def start_job(self, source: str, models: list[str], sync: bool, watch: bool = False) -> JobStart:
        if self.next_start is not None:
            return self.next_start
        job_id = uuid.uuid4().hex[:12]
        items = {"done": 1, "planned": 1}
        self.jobs[job_id] = JobView(job_id, source, "watching" if watch else "running", None, 0.5, items, {}, 0.0, 0.0)
        return JobStarted(job_id)

    async def stop_job(self, job_id: str) -> bool:
        job = self.jobs[job_id]
        if job.status != "watching":
            return False
        self.jobs[job_id] = replace(job, status="stopped")
        return True

    async def job(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id)

    async def list_jobs(self) -> list[JobView]:
        return list(self.jobs.values())

    async def dead_letters(self, job_id: str) -> list[DeadLetter]:
        return [DeadLetter(job_id, "a.png", "not_an_image", "cannot decode", 1, 0.0)]

    async def start_migration(self, to: str, from_: str | None, accept_failed: bool) -> MigrationStart:
        if self.next_start is not None:
            assert isinstance(self.next_start, JobStarted | MigrationRefused)
            return self.next_start
        job_id = uuid.uuid4().hex[:12]
        self.jobs[job_id] = JobView(job_id, f"migrate:{to}", "running", None, 0.0, {}, {}, 0.0, 0.0)
        return JobStarted(job_id)

    async def rollback(self) -> Switched:
        if not self.previous:
            raise MigrationError("no switch to roll back")
        self.defaults, self.previous = self.defaults | self.previous, {m: self.defaults[m] for m in self.previous}
        return Switched(True, dict(self.defaults), dict(self.previous))

    async def drop_old(self) -> list[str]:
        if not self.previous:
            raise MigrationError("nothing to drop")
        dropped, self.previous = sorted(self.previous.values()), {}
        return dropped

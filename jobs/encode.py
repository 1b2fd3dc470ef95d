"""The encode step of a bulk job, shared by every engine: the job's models (loaded in this process,
or the encoder deployments of a server), how each kind of item is preprocessed in the workers,
and ``BatchEncoder``, which hands a loaded batch to the one item step (``mmembed.embedding``) and
returns one ``ItemOutcome`` per item. The local engine runs it in the driving process, the ray
engine in each encoder actor, the serve engine in the catalogue replica over the deployments'
handles: a vector never depends on the engine.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from mmembed.config import Settings
from mmembed.contracts import EncodedItem, ItemError, ItemOutcome, ModelInfo
from mmembed.embedding import Encoders, Item, ItemEmbedder, LocalEncoders, Media, ModelStep
from mmembed.encoders import LoadedModel, Prepared, load, model_version
from mmembed.encoders.remote.costs import Usage
from mmembed.jobs.dataset import Loaded, Preprocessor, SourceDataset
from mmembed.loaders.audio import AudioLimits
from mmembed.loaders.images import DecodeLimits
from mmembed.loaders.sources import SourceItem
from mmembed.store.cache import CacheStats, EmbeddingCache
from mmembed.store.spaces import item_encoders, layout


class Models(ABC):
    """The job's models as the job sees them, wherever they run: what each is (``described``, by the
    names the job was given), the collection's layout, and which of them each kind of item goes through."""

    def __init__(self, described: dict[str, ModelInfo]) -> None:
        self.described = described
        self.layout = layout(described)

    def direct(self, kind: str) -> list[str]:
        return [m for m, k in item_encoders(self.described, kind) if k == kind]

    def remote(self) -> dict[str, Any]:
        """The remote text models' encoders whose cost meters this process can read (``RemoteEncoder``)."""
        return {}

    @abstractmethod
    def preprocessors(self) -> dict[str, Preprocessor | None]:
        """Per kind of item the job encodes, what the workers run on it after reading it."""

    @abstractmethod
    def embedder(self, cache: EmbeddingCache | None, remote: bool = True) -> ItemEmbedder:
        """The item step over these models. ``remote=False`` leaves out remote (paid, rate-limited)
        models, as calibration must."""


class LoadedModels(Models):
    """The job's models loaded in this process (the local engine; each ray encoder actor)."""

    def __init__(self, names: tuple[str, ...], settings: Settings) -> None:
        config = settings.models_config()
        self.loaded: dict[str, LoadedModel] = {n: load(n, config) for n in names}
        self.versions = {n: model_version(m.spec, config) for n, m in self.loaded.items()}
        super().__init__({n: replace(m.describe(), version=self.versions[n]) for n, m in self.loaded.items()})

    def remote(self) -> dict[str, Any]:
        return {n: m.encoder("text") for n, m in self.loaded.items() if m.spec.is_remote}

    def preprocessors(self) -> dict[str, Preprocessor | None]:
        """Per kind, one callable giving every direct model its own preprocessed input (a 64 px
        demo-clip view and a 224 px ViT view of the same decoded image), run in the workers."""
        out: dict[str, Preprocessor | None] = {}
        for kind in ("image", "audio", "text"):
            models = [(m, self.loaded[m].encoder(kind)) for m in self.direct(kind)]
            if models:
                out[kind] = _Preprocess(models)
        return out

    def embedder(self, cache: EmbeddingCache | None, remote: bool = True) -> ItemEmbedder:
        names = [n for n, m in self.loaded.items() if remote or not m.spec.is_remote]
        steps = {n: ModelStep(self.loaded[n], self.versions[n], cache) for n in names}
        return ItemEmbedder({n: self.described[n] for n in names}, LocalEncoders(steps))


class Deployments(Encoders, Protocol):
    """A server's encoder deployments, as a job that sends them its items sees them."""

    def describe(self, models: Sequence[str]) -> dict[str, ModelInfo]:
        """What each model is, by name; raises for a model not served."""
        ...


class ServedModels(Models):
    """The job's models as a server's encoder deployments (the serve engine): this process loads none.
    Its workers only read and hash; each deployment decodes, preprocesses, looks the cache up and batches
    the job's items with everyone else's requests. Remote models' meters live in their deployments, so
    their costs are neither estimated nor summed here, and the job is not calibrated (it would pay for them)."""

    def __init__(self, names: tuple[str, ...], deployments: Deployments) -> None:
        self.deployments = deployments
        super().__init__(deployments.describe(names))

    def preprocessors(self) -> dict[str, Preprocessor | None]:
        return {kind: None for kind in ("image", "audio", "text") if self.direct(kind)}

    def embedder(self, cache: EmbeddingCache | None, remote: bool = True) -> ItemEmbedder:
        counted = _Counted(self.deployments, self.described, cache.stats if cache is not None else None)
        return ItemEmbedder(self.described, counted)


class _Counted:
    """The deployments' cache answers counted into the job's cache figures (``EncodedItem.cached``), as a
    job in this process would count its own lookups: every input of a cacheable model that encoded."""

    def __init__(self, encoders: Encoders, described: Mapping[str, ModelInfo], stats: CacheStats | None) -> None:
        self.encoders, self.described, self.stats = encoders, described, stats

    async def encode(self, model: str, modality: str, inputs: list[Any]) -> list[EncodedItem]:
        results = await self.encoders.encode(model, modality, inputs)
        if self.stats is not None and self.described[model].cacheable:
            hits = sum(r.cached for r in results if r.ok)
            fresh = sum(not r.cached for r in results if r.ok)
            self.stats.hits += hits
            self.stats.misses += fresh
            self.stats.puts += fresh
        return results


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
        return SourceDataset(
            items,
            models.preprocessors(),
            self.image_limits,
            self.audio_limits,
            self.s3_config,
            url_policy=self.settings.url_policy(),
            file_roots=roots,
        )


@dataclass
class EncodedBatch:
    """One batch after the encode step, whichever engine ran it: everything the write step needs."""

    fresh: list[Loaded]  # new or changed content, and failures: each has a result in ``results``
    unchanged: list[Loaded]  # the listing's version moved, the bytes did not: only the version is updated
    results: dict[int, ItemOutcome]  # by ``Loaded.index``
    encode_s: float  # seconds spent in the encode step (cache lookups, forward passes)
    remote_usage: dict[str, Usage] = field(default_factory=dict)  # what each remote model's calls cost
    nodes: dict[str, int] = field(default_factory=dict)  # ray engine: the batch's items by the node that encoded them

    def __len__(self) -> int:
        return len(self.fresh) + len(self.unchanged)


def unchanged_content(loaded: Loaded, stored_hash: str | None) -> bool:
    """Read fine and hashes like the point already stored for its URI: nothing to encode or store again."""
    return loaded.error is None and stored_hash is not None and loaded.content_hash == stored_hash


class BatchEncoder:
    """A loaded batch through the item step: every engine's encode step. It adds what a job needs around
    it: the seconds it took and what the remote models' calls cost."""

    def __init__(self, models: Models, cache: EmbeddingCache | None, remote: bool = True) -> None:
        self.models = models
        self.embedder = models.embedder(cache, remote)
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> BatchEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
            self._loop = None

    def encode_batch(
        self, fresh: list[Loaded], unchanged: list[Loaded], items: Mapping[int, SourceItem]
    ) -> EncodedBatch:
        """``encode`` with its figures, the remote models' costs read off their meters here, in whichever
        process runs the step."""
        meters = {name: encoder.meter for name, encoder in self.models.remote().items()}
        before = {name: meter.snapshot() for name, meter in meters.items()}
        started = time.perf_counter()
        results = self.encode(fresh, items)
        usage = {name: meter.snapshot() - before[name] for name, meter in meters.items()}
        return EncodedBatch(fresh, unchanged, results, time.perf_counter() - started, usage)

    def encode(self, batch: Sequence[Loaded], items: Mapping[int, SourceItem]) -> dict[int, ItemOutcome]:
        """``items``: the listed item of each loaded one, by ``Loaded.index``. Engines call this from plain
        threads (a DataLoader loop, a Ray actor, a server job's thread), one batch at a time, on a loop kept
        for the encoder's life. Not ``asyncio.run`` per batch: besides a new loop and thread pool each time,
        in the main thread it installs a SIGINT handler holding the task, and restoring the default one
        formats that finished task's repr, every vector of the batch printed as text (6% of a bf16
        ViT-B/32 batch on 2 cores, ``bench/bulk_scale.py``'s ceiling part)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        outcomes = self._loop.run_until_complete(self.embedder.embed([_item(b, items[b.index]) for b in batch]))
        return {b.index: outcome for b, outcome in zip(batch, outcomes, strict=True)}


def _item(loaded: Loaded, source: SourceItem) -> Item | ItemError:
    if loaded.error is not None:
        return ItemError(*loaded.error)
    if isinstance(loaded.prepared, dict):  # each model's input, preprocessed by a worker
        assert loaded.content_hash is not None
        text = source.caption if source.kind == "text" else None  # a text item's caption is its text
        content: bytes | dict[str, Media] = {m: Media(loaded.content_hash, p, text) for m, p in loaded.prepared.items()}
    else:  # read and hashed only: the models' side decodes and preprocesses
        assert loaded.data is not None
        content = loaded.data
    return Item(source.kind, content, None if source.kind == "text" else source.caption)

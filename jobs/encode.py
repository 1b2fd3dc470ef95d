"""The encode step of a bulk job, shared by both engines: the job's models, how each kind of item
is preprocessed in the workers, and ``BatchEncoder``, which turns a loaded batch into one
``ItemOutcome`` per item (cache lookups, forward passes, captions and transcripts through the
text towers). The local engine runs it in the driving process, the ray engine in each encoder
actor, so a vector never depends on the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.config import Settings
from mmembed.contracts import ItemError, ItemOutcome, ItemVectors
from mmembed.encoders import LoadedModel, Prepared, load, model_version
from mmembed.encoders.remote.costs import Usage
from mmembed.jobs.dataset import Loaded, SourceDataset
from mmembed.loaders.audio import AudioLimits
from mmembed.loaders.images import DecodeLimits
from mmembed.loaders.sources import SourceItem
from mmembed.store.cache import EmbeddingCache, media_key
from mmembed.store.catalog import vector_name
from mmembed.store.spaces import item_encoders, layout


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
        for kind in ("image", "audio", "text"):
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
    ) -> dict[int, ItemOutcome]:
        """``items``: the listed item of each loaded one, by ``Loaded.index``. ``remote=False`` skips
        remote (paid, rate-limited) text models, as calibration must."""
        out: dict[int, ItemOutcome] = {
            b.index: ItemError(*b.error) if b.error is not None else ItemVectors() for b in batch
        }
        good = [b for b in batch if b.error is None]
        for kind in ("image", "audio", "text"):
            group = [b for b in good if items[b.index].kind == kind]
            for model in self.models.direct(kind) if group else []:
                self._encode_model(model, kind, group, out, use_cache)
        self._encode_texts(batch, items, out, remote)
        return out

    def _encode_model(
        self, model: str, kind: str, group: list[Loaded], out: dict[int, ItemOutcome], use_cache: bool
    ) -> None:
        name, version = vector_name(model, kind), self.models.versions[model]
        cacheable = use_cache and self.cache is not None and self.models.described[model].cacheable
        keys = {b.index: media_key(b.content_hash, model, version) for b in group}
        hits = self.cache.get_many(model, list(keys.values())) if cacheable else {}  # type: ignore[union-attr]
        for b in group:
            outcome = out[b.index]
            if keys[b.index] in hits and isinstance(outcome, ItemVectors):
                outcome.vectors[name] = hits[keys[b.index]]
        misses = [b for b in group if keys[b.index] not in hits and isinstance(out[b.index], ItemVectors)]
        if not misses:
            return
        results = self.models.loaded[model].encoder(kind).encode_prepared([b.prepared[model] for b in misses])
        fresh = {}
        for b, r in zip(misses, results, strict=True):
            outcome = out[b.index]
            assert isinstance(outcome, ItemVectors)
            if r.error is not None:
                out[b.index] = ItemError(r.error.code or "encode_error", f"{model}: {r.error}")
                continue
            outcome.vectors[name] = r.vector
            fresh[keys[b.index]] = r.vector
            if "transcript" in r.info:
                outcome.transcript = r.info["transcript"]
        if cacheable and fresh:
            self.cache.put_many(model, fresh)  # type: ignore[union-attr]

    def _encode_texts(
        self, batch: Sequence[Loaded], items: Mapping[int, SourceItem], out: dict[int, ItemOutcome], remote: bool
    ) -> None:
        """Captions (images) and transcripts (audio) through every text tower. A text a remote provider
        failed to embed past its retries makes the item a dead letter, to be retried, not a point without it."""
        for kind in ("image", "audio"):
            rows = []
            for b in batch:
                outcome = out[b.index]
                if items[b.index].kind != kind or not isinstance(outcome, ItemVectors):
                    continue
                words = items[b.index].caption if kind == "image" else outcome.transcript
                if words and words.strip():
                    rows.append((b, outcome, words))
            for model in self.models.text(kind) if rows else []:
                if not remote and self.models.loaded[model].spec.is_remote:
                    continue
                results = self.models.loaded[model].encoder("text").encode_items([w for _, _, w in rows])
                for (b, outcome, _), result in zip(rows, results, strict=True):
                    if result.ok:
                        outcome.vectors[vector_name(model, "text")] = result.vector
                    elif result.error is not None and result.error.code == "provider_failed":
                        out[b.index] = ItemError(result.error.code, f"{model}: {result.error}")

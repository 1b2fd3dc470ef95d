"""One model's share of embedding, the same wherever the model runs: preprocess each input,
look the cache up, run one forward pass over the misses, store what it computed.

The forward pass is the one part that differs between paths, so it is injected: an encoder
deployment hands its misses to Serve's batch queue (where they share a batch with other
requests and jobs), the bulk engines call the encoder in their own process. The cache key is
made here and only here: media by its content's SHA-256 (``store.cache.media_key``, also what a
job stores in an item's payload), text by its text, both with the model's weights version, so
a file embedded by a job is a hit over HTTP and the other way round. Models that are not
cacheable (``ModelInfo.cacheable``: a transcribing model's transcript is part of its answer)
never touch the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mmembed.contracts import EncodedItem, ItemError
from mmembed.encoders.base import Encoder, InputError, ItemResult, Modality, Prepared
from mmembed.loaders.images import DecodeLimits, ImageDecodeError, decode_image
from mmembed.store.cache import EmbeddingCache, cache_key, media_key

if TYPE_CHECKING:  # the HTTP layer runs items through this module without importing torch
    from mmembed.encoders import LoadedModel

# A model's prepared misses in, one EncodedItem each out, in order.
Forward = Callable[[Modality, list[Prepared]], Awaitable[list[EncodedItem]]]


@dataclass(frozen=True)
class Media:
    """Media a bulk job's worker already read, hashed and preprocessed for one model: the hash
    keys the cache without the bytes travelling to the model."""

    content_hash: str
    prepared: Prepared
    text: str | None = None  # a text item's text: text is keyed by itself, so the API's requests share it


# What a model's step takes per item: text, media as its bytes (decoded next to the model), or ``Media``.
Input = str | bytes | Media


class ModelStep:
    """One loaded model behind the cache."""

    def __init__(
        self,
        model: LoadedModel,
        version: str,
        cache: EmbeddingCache | None,
        image_limits: DecodeLimits = DecodeLimits(),
        prepare_threads: Executor | None = None,
    ) -> None:
        """``prepare_threads``: where preprocessing runs, by default the event loop's thread pool."""
        self.model, self.version, self.image_limits = model, version, image_limits
        self.prepare_threads = prepare_threads
        self.info = replace(model.describe(), version=version)
        self.cache = cache if self.info.cacheable else None

    def key(self, item: Input) -> str:
        if isinstance(item, Media):
            if item.text is not None:
                return cache_key(item.text, self.info.name, self.version)
            return media_key(item.content_hash, self.info.name, self.version)
        return cache_key(item, self.info.name, self.version)

    async def encode(self, modality: str, items: Sequence[Input], forward: Forward) -> list[EncodedItem]:
        """Per-item results in input order; a bad item never fails the others. Preprocessing and the
        cache run in worker threads, so an event loop serving requests keeps admitting the next ones."""
        encoder = self.model.encoder(modality)
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.prepare_threads, prepare, encoder, items, self.image_limits)
        cache = self.cache
        keys = [
            self.key(i) if cache is not None and isinstance(p, Prepared) else None
            for i, p in zip(items, prepared, strict=True)
        ]
        wanted = [k for k in keys if k]
        hits = await asyncio.to_thread(cache.get_many, self.info.name, wanted) if cache and wanted else {}
        misses = [p for p, k in zip(prepared, keys, strict=True) if isinstance(p, Prepared) and k not in hits]
        encoded_misses = iter(await forward(encoder.modality, misses) if misses else [])
        out: list[EncodedItem] = []
        fresh = {}
        for p, k in zip(prepared, keys, strict=True):
            if isinstance(p, InputError):
                out.append(EncodedItem(None, ItemError(p.code, str(p))))
            elif k in hits:  # the forward pass saved; preprocessing ran, so info (tokens) is the same
                out.append(EncodedItem(hits[k], info=p.info, cached=True))
            else:
                out.append(next(encoded_misses))
                if k and out[-1].vector is not None:
                    fresh[k] = out[-1].vector
        if cache is not None and fresh:
            await asyncio.to_thread(cache.put_many, self.info.name, fresh)
        return out

    async def forward(self, modality: Modality, batch: list[Prepared]) -> list[EncodedItem]:
        """The forward pass in this process, on the caller's thread: a bulk engine runs one model at a
        time, so a batch's activations never share the accelerator with another model's."""
        started = time.perf_counter()
        results = self.model.encoder(modality).encode_prepared(batch)
        encode_ms = (time.perf_counter() - started) * 1000
        return [encoded(r, batch_size=len(batch), encode_ms=encode_ms) for r in results]


def prepare(encoder: Encoder, items: Sequence[Input], limits: DecodeLimits) -> list[Prepared | InputError]:
    """Images arrive as bytes (smaller over the wire than pixels) and are decoded here; ``Media``
    was preprocessed by a job's worker already."""
    out: list[Prepared | InputError] = []
    for item in items:
        try:
            if isinstance(item, Media):
                out.append(item.prepared)
                continue
            data: Any = item
            if encoder.modality == Modality.IMAGE and isinstance(item, bytes):
                data = decode_image(item, limits)
            out.append(encoder.preprocess(data))
        except ImageDecodeError as exc:
            out.append(InputError(str(exc), code=exc.code))
        except InputError as exc:
            out.append(exc)
    return out


def encoded(result: ItemResult, **timing: Any) -> EncodedItem:
    """An encoder's per-item result as the typed answer every path passes on, with the forward pass's figures."""
    error = None if result.error is None else ItemError(result.error.code, str(result.error))
    return EncodedItem(result.vector, error, result.info, **timing)

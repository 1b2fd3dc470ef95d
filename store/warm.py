"""Warm the embedding cache from the vectors a collection already holds, so content the catalogue
has is never encoded again: not by a new job (a fresh collection, a re-ingest on another machine),
not over the HTTP API.

A stored vector answers a cache key only when it is the vector the model would compute now, so
each point records the weights version of every model that gave it a vector (``model_versions``
in its payload). A vector written under other weights (the model was retrained or re-pulled
since) is left out, as is a point written before versions were recorded: its weights are unknown.
Keys are the ones the embedding step makes (``store.cache``): media by the item's content hash,
text (a text item, an image's caption, a recording's transcript) by the text itself.

The collection is read a page of points at a time, so warming a million points holds a page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmembed.store.cache import EmbeddingCache, batched, cache_key, media_key
from mmembed.store.vectors import VectorStore

PAGE = 512  # points per read of the collection and per cache write
FIELDS = ["kind", "content_hash", "text", "caption", "transcript", "model_versions"]
# Which payload text a text vector was computed from, by the item's kind.
TEXT_OF_KIND = {"text": "text", "image": "caption", "audio": "transcript"}


@dataclass
class WarmReport:
    points: int = 0
    written: Counter[str] = field(default_factory=Counter)  # cache entries, by model
    stale: int = 0  # vectors of an earlier weights version than the model's now
    unversioned: int = 0  # vectors of points that do not say which weights made them
    found: int = 0  # of the entries written, how many the cache answered when read back
    evicted: int = 0  # entries the cache dropped to stay within its size while warming

    @property
    def vectors(self) -> int:
        return sum(self.written.values()) + self.stale + self.unversioned

    @property
    def hit_rate(self) -> float:
        """The share of the collection's vectors (of the warmed models) that the cache now answers."""
        return (self.found - self.evicted) / self.vectors if self.vectors else 0.0

    def lines(self) -> list[str]:
        per_model = ", ".join(f"{model} {count}" for model, count in sorted(self.written.items())) or "none"
        out = [
            f"{self.points} points read; {sum(self.written.values())} cache entries written ({per_model})",
            f"hit rate now: {self.hit_rate:.1%} of {self.vectors} stored vectors",
        ]
        if self.stale:
            out.append(f"{self.stale} vectors left out: written by other weights than the model's now")
        if self.unversioned:
            out.append(f"{self.unversioned} vectors left out: their points do not record the weights that made them")
        if self.evicted:
            out.append(f"{self.evicted} entries evicted while warming: the cache is smaller than the catalogue")
        return out


def warm_cache(store: VectorStore, cache: EmbeddingCache, versions: Mapping[str, str]) -> WarmReport:
    """``versions``: the models to warm, by name, with their weights version now (cacheable ones only:
    a model whose answer carries a transcript has no entries to warm)."""
    report = WarmReport()
    evictions_before = cache.stats.evictions
    for page in batched(store.iter_ids(), PAGE):
        entries: dict[str, dict[str, np.ndarray]] = {}
        for point in store.retrieve(page, with_vectors=True, fields=FIELDS):
            report.points += 1
            recorded = point.payload.get("model_versions") or {}
            for name, vector in point.vectors.items():
                model, _, modality = name.rpartition(".")
                if model not in versions:
                    continue
                key = _key(point.payload, modality, model, versions[model])
                if key is None:
                    continue
                if not recorded:
                    report.unversioned += 1
                elif recorded.get(model) != versions[model]:
                    report.stale += 1
                else:
                    entries.setdefault(model, {})[key] = np.asarray(vector, dtype=np.float32)
        for model, by_key in entries.items():
            cache.put_many(model, by_key)
            report.written[model] += len(by_key)
            report.found += len(cache.get_many(model, list(by_key)))
    report.evicted = cache.stats.evictions - evictions_before
    return report


def _key(payload: dict[str, Any], modality: str, model: str, version: str) -> str | None:
    """The key the embedding step would look this vector up by; None where the point lacks what made it."""
    if modality == "text":
        text = payload.get(TEXT_OF_KIND.get(payload.get("kind", ""), ""))
        return cache_key(text, model, version) if isinstance(text, str) and text.strip() else None
    content_hash = payload.get("content_hash")
    return media_key(content_hash, model, version) if content_hash else None

"""Catalogue items: the original object in the object store, its vectors and payload in
the vector store, kept consistent with each other.

A point's id is the uuid5 of the item's source URI (the caller's identity for it, or the
stored object's URI), so adding the same item again updates it instead of duplicating it.
Objects are content-addressed, so two items with the same bytes share one object, and
deleting one of them must not delete the other's bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmembed.contracts import SearchHit
from mmembed.store.objects import ObjectStore, object_key
from mmembed.store.vectors import Fusion, Hit, Point, VectorStore, point_id

# Fields searches filter on; every other payload key (user metadata under "meta") is still
# filterable, only slower on a large collection.
PAYLOAD_INDEXES = {
    "kind": "keyword",
    "media_type": "keyword",
    "content_hash": "keyword",
    "source_uri": "keyword",
    "source": "keyword",
    "size": "integer",
}


def vector_name(model: str, modality: str) -> str:
    """Named vectors say which model and modality made them: ``demo-clip.image``, ``bind.audio``."""
    return f"{model}.{modality}"


@dataclass
class NewItem:
    data: bytes
    kind: str  # "image" | "audio" | "text" (data: the UTF-8 text, kept in the payload, no object)
    media_type: str
    vectors: dict[str, np.ndarray]
    source_uri: str | None = None  # the caller's identity for the item; default: the stored object's URI
    filename: str | None = None
    caption: str | None = None
    transcript: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the bulk source it came from (folder, manifest, prefix): what --sync compares
    source_version: str | None = None  # the source's cheap change hint (mtime-size, ETag) when it was embedded
    model_versions: dict[str, str] = field(default_factory=dict)  # weights version of each model that gave a vector


class Catalog:
    def __init__(self, vectors: VectorStore, objects: ObjectStore) -> None:
        self.vectors, self.objects = vectors, objects

    def open(self, layout: dict[str, int], missing_ok: bool = False) -> dict[str, int]:
        """``layout``: every named vector the served models produce, with its dimension. Returns those the
        collection holds: all of them, unless ``missing_ok`` let a model not migrated in yet be left out
        (its vectors are then left out of the items added, until ``mmembed migrate`` adds them)."""
        self.vectors.open(layout, indexes=PAYLOAD_INDEXES, missing_ok=missing_ok)
        return {name: dim for name, dim in layout.items() if name in self.vectors.vectors}

    def add(self, item: NewItem) -> str:
        return self.add_many([item])[0]

    def add_many(self, items: list[NewItem], durable: bool = True) -> list[str]:
        """Objects first, then one batched upsert of the points, then a read-back check: a point
        never names an object that is not stored. ``durable``: as ``VectorStore.upsert``."""
        points = []
        for item in items:
            content_hash = hashlib.sha256(item.data).hexdigest()
            if item.kind == "text":  # the text is the object: it lives in the payload
                uri = None
                where: dict[str, Any] = {"text": item.data.decode("utf-8")}
            else:
                key = object_key(content_hash, item.filename, item.media_type)
                uri = self.objects.put(key, item.data, item.media_type)
                where = {"object_uri": uri}
            if (item.source_uri or uri) is None:
                raise ValueError("a text item needs a source_uri: it is its only identity")
            payload: dict[str, Any] = where | {
                "kind": item.kind,
                "source_uri": item.source_uri or uri,
                "content_hash": content_hash,
                "media_type": item.media_type,
                "size": len(item.data),
                "added_at": time.time(),
                "meta": item.meta,
            }
            optional = {
                "filename": item.filename,
                "caption": item.caption,
                "transcript": item.transcript,
                "source": item.source,
                "source_version": item.source_version,
                "model_versions": item.model_versions or None,
            }
            payload |= {k: v for k, v in optional.items() if v is not None}
            held = {name: v for name, v in item.vectors.items() if name in self.vectors.vectors}
            if held.keys() != item.vectors.keys():  # a model not migrated in yet: its version would claim a vector
                models = {name.rpartition(".")[0] for name in held}
                payload["model_versions"] = {m: v for m, v in item.model_versions.items() if m in models}
            points.append(Point(point_id(payload["source_uri"]), held, payload))
        self.vectors.upsert(points, durable=durable)
        self.vectors.verify(points)
        return [p.id for p in points]

    def payloads(self, ids: list[str], fields: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """``fields``: the payload keys to read (None: all); every found id is in the result."""
        return {p.id: p.payload for p in self.vectors.retrieve(ids, fields=fields)}

    def set_payload(self, item_id: str, payload: dict[str, Any]) -> None:
        """Merge keys into an existing point's payload (its vectors stay)."""
        self.vectors.upsert([Point(item_id, {}, payload)])

    def delete(self, item_id: str) -> bool:
        return bool(self.delete_many([item_id]))

    def delete_many(self, ids: Sequence[str]) -> list[str]:
        """Removes the points, and each object no point outside ``ids`` still holds; returns the ids found.

        A constant number of store queries per call, whatever its size (a ``--sync`` of 10,000 items
        does not make 10,000 counts over every segment). Objects go first: if deleting the points
        then fails, a retry finds them again and finishes (both deletes are idempotent). Points
        first would leave objects orphaned, with nothing left to find them by."""
        found = self.vectors.retrieve(list(ids), fields=["object_uri", "content_hash"])
        if not found:
            return []
        going = sorted({p.id for p in found})
        objects = {p.payload["content_hash"]: p.payload["object_uri"] for p in found if "object_uri" in p.payload}
        if objects:
            leaving = set(going)
            holders = [i for i in self.vectors.iter_ids({"content_hash": list(objects)}) if i not in leaving]
            for kept in self.vectors.retrieve(holders, fields=["content_hash"]):
                objects.pop(kept.payload["content_hash"], None)
        for uri in objects.values():
            self.objects.delete(uri)
        self.vectors.delete(going)
        return going

    def get(self, item_id: str, with_vectors: bool = False) -> Point | None:
        found = self.vectors.retrieve([item_id], with_vectors=with_vectors)
        return found[0] if found else None

    def search(
        self,
        vector: str,
        query: np.ndarray | list[float],
        top_k: int = 10,
        threshold: float | None = None,
        filter: dict[str, Any] | None = None,
        offset: int = 0,
    ) -> list[SearchHit]:
        hits: list[Hit] = self.vectors.search(vector, query, top_k, threshold, filter, offset)
        return [SearchHit(h.id, h.score, h.payload, self.url(h.payload)) for h in hits]

    def search_fused(
        self,
        queries: dict[str, np.ndarray],
        top_k: int = 10,
        threshold: float | None = None,
        filter: dict[str, Any] | None = None,
        offset: int = 0,
        fusion: Fusion = "dbsf",
    ) -> list[SearchHit]:
        """One ranking over several of each item's vectors (``VectorStore.search_fused``)."""
        hits = self.vectors.search_fused(dict(queries), top_k, threshold, filter, offset, fusion)
        return [SearchHit(h.id, h.score, h.payload, self.url(h.payload), h.matched) for h in hits]

    def url(self, payload: dict[str, Any]) -> str | None:
        """Where a client gets the item's object; a text item has none."""
        return self.objects.http_url(payload["object_uri"]) if "object_uri" in payload else None

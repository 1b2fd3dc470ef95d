"""The catalogue behind the search API, as its own Serve deployment.

One replica owns the vector store: the embedded engine (Qdrant Edge) is one folder that
one process may write, so the default runs exactly one. With a Qdrant server
(``MMEMBED_QDRANT_URL``) it is a thin client and could run several.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from ray import serve

from mmembed.config import get_settings
from store.catalog import Catalog, NewItem
from store.objects import object_store
from store.vectors import open_store


class CatalogDeployment:
    def __init__(self) -> None:
        settings = get_settings()
        self.catalog = Catalog(open_store(settings), object_store(settings))
        self.layout: dict[str, int] | None = None

    def open(self, layout: dict[str, int]) -> dict[str, int]:
        """Called by the ingress with the named vectors its models produce; idempotent."""
        if self.layout != layout:
            self.catalog.open(layout)
            self.layout = layout
        return self.layout

    def add(self, item: NewItem) -> str:
        return self.catalog.add(item)

    def delete(self, item_id: str) -> bool:
        return _is_id(item_id) and self.catalog.delete(item_id)

    def get(self, item_id: str, with_vectors: bool = False) -> dict[str, Any] | None:
        point = self.catalog.get(item_id, with_vectors) if _is_id(item_id) else None
        if point is None:
            return None
        return {"id": point.id, "payload": point.payload, "vectors": point.vectors,
                "url": self.catalog.objects.http_url(point.payload["object_uri"])}  # fmt: skip

    def search(self, vector: str, query: np.ndarray, **options: Any) -> list[dict[str, Any]]:
        found = self.catalog.search(vector, query, **options)
        return [{"id": f.id, "score": f.score, "payload": f.payload, "url": f.url} for f in found]

    def count(self) -> int:
        return self.catalog.vectors.count()


def _is_id(item_id: str) -> bool:
    """Item ids are canonical UUIDs; anything else names no item (a 404, not a store error)."""
    try:
        return str(uuid.UUID(item_id)) == item_id
    except ValueError:
        return False


def build_catalog(env: dict[str, str]) -> serve.Application:
    options = {"runtime_env": {"env_vars": env}} if env else {}
    deployment = serve.deployment(CatalogDeployment, name="catalog", num_replicas=1, max_ongoing_requests=64)
    return deployment.options(ray_actor_options=options).bind()

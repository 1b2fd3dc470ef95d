"""What the HTTP layer needs from the models and the catalogue, and nothing of how they run.

The Serve ingress implements it over deployment handles (``mmembed.serve.ingress.RayBackend``);
the in-process tests implement it with deterministic vectors. A refusal the caller should see
as is (a model not served, a full queue, a replica gone) is raised as ``ApiError``; store
failures are raised as the store's own errors (``DimensionError``, ``StoreError``,
``ObjectStoreError``), which the routes turn into their codes.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from mmembed.contracts import (
    CatalogView,
    DeadLetter,
    EncodedItem,
    JobStart,
    JobView,
    MigrationStart,
    ModelInfo,
    ReplicaInfo,
    SearchHit,
    StoredItem,
    Switched,
)
from mmembed.store.catalog import NewItem


class Backend(Protocol):
    # --- models ---
    async def describe(self, model: str) -> ModelInfo: ...

    async def encode(self, model: str, modality: str, items: list[Any]) -> list[EncodedItem]:
        """Per-item results in input order; text items are strings, media items bytes."""
        ...

    async def replicas(self) -> list[ReplicaInfo]:
        """Every replica of every served model, with the node it runs on."""
        ...

    # --- the catalogue ---
    async def open_catalog(self, layout: dict[str, int]) -> CatalogView:
        """Opens (or creates) the collection with these named vectors; idempotent. The view holds those
        the collection has (a model not migrated in yet is left out) and its default vectors."""
        ...

    async def add_item(self, item: NewItem) -> str: ...

    async def get_item(self, item_id: str, with_vectors: bool = False) -> StoredItem | None:
        """None for no such item; ``vectors`` only when asked for."""
        ...

    async def delete_item(self, item_id: str) -> bool: ...

    async def search(
        self, vector: str, query: np.ndarray, *, top_k: int, threshold: float | None, filter: Any, offset: int
    ) -> list[SearchHit]:
        """Best first."""
        ...

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
        """Best first, over several named vectors at once; each hit's ``matched`` gives its rank in each."""
        ...

    async def count(self) -> int: ...

    # --- bulk jobs ---
    async def start_job(self, source: str, models: list[str], sync: bool, watch: bool = False) -> JobStart: ...

    async def stop_job(self, job_id: str) -> bool:
        """Ends a watching job after its round in progress; False if the job is not watching."""
        ...

    async def job(self, job_id: str) -> JobView | None: ...

    async def list_jobs(self) -> list[JobView]: ...

    async def dead_letters(self, job_id: str) -> list[DeadLetter]: ...

    # --- model migration ---
    async def start_migration(self, to: str, from_: str | None, accept_failed: bool) -> MigrationStart: ...

    async def rollback(self) -> Switched:
        """Raises ``MigrationError`` when there is nothing to switch back to."""
        ...

    async def drop_old(self) -> list[str]: ...

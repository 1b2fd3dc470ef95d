"""The HTTP API on Ray Serve: the app of ``mmembed.serve.http`` over the deployments'
handles.

Each replica builds its own FastAPI app once its constructor has run
(``__serve_build_asgi_app__``, Serve's late-bound ingress), so nothing of the app is pickled
with the class and every replica's app holds its own backend, keys and metrics.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mmembed.config import Settings
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
from mmembed.serve.config import ServeConfig, deployment_name
from mmembed.serve.handles import Route, by_reference
from mmembed.serve.http import ApiError, create_app
from mmembed.store.catalog import NewItem


class RayBackend:
    """The ``Backend`` of the HTTP app over Serve deployment handles: one per model, one catalogue."""

    def __init__(self, encoders: dict[str, DeploymentHandle], catalog: DeploymentHandle, retry_after_s: int) -> None:
        """Small calls into a model go over gRPC (``serve.handles``); the catalogue's carry items'
        images and job requests, so they go by reference."""
        self.encoders = {name: Route.to(handle) for name, handle in encoders.items()}
        self.catalog, self.retry_after_s = by_reference(catalog), retry_after_s

    async def _call(self, model: str, method: str, items: list[Any], *args: Any) -> Any:
        """Every call into a model deployment, over the route its items fit: a full queue there is a
        429, a replica that died under the request (Serve starts another) a 503; both say when to retry."""
        if model not in self.encoders:
            message = f"model {model!r} is not served here; served: {sorted(self.encoders)}"
            raise ApiError(404, "model_not_found", message)
        retry = {"Retry-After": str(self.retry_after_s)}
        try:
            return await getattr(self.encoders[model].for_items(items), method).remote(*args)
        except BackPressureError as exc:
            raise ApiError(429, "overloaded", f"model {model!r} is at capacity; retry", retry) from exc
        except RayActorError as exc:
            message = f"model {model!r}: its replica stopped during the request; Serve is replacing it, retry"
            raise ApiError(503, "replica_unavailable", message, retry) from exc

    async def describe(self, model: str) -> ModelInfo:
        return await self._call(model, "describe", [])

    async def encode(self, model: str, modality: str, items: list[Any]) -> list[EncodedItem]:
        return await self._call(model, "encode", items, modality, items)

    async def replicas(self) -> list[ReplicaInfo]:
        # Serve's controller is the one that knows every replica's node; it is asked the way
        # `serve status` and the dashboard's Serve page ask it (there is no public call for it).
        from ray.serve.context import _get_global_client

        details = await asyncio.to_thread(_get_global_client().get_serve_details)
        app = details["applications"][serve.get_replica_context().app_name]["deployments"]
        return [
            ReplicaInfo(
                model,
                r["replica_id"],
                str(getattr(r["state"], "value", r["state"])),
                r.get("node_id") or "",
                r.get("node_ip") or "",
            )
            for model in self.encoders
            for r in app.get(deployment_name(model), {}).get("replicas", [])
        ]

    async def open_catalog(self, layout: dict[str, int]) -> CatalogView:
        return await self.catalog.open.remote(layout)

    async def add_item(self, item: NewItem) -> str:
        return await self.catalog.add.remote(item)

    async def get_item(self, item_id: str, with_vectors: bool = False) -> StoredItem | None:
        return await self.catalog.get.remote(item_id, with_vectors)

    async def delete_item(self, item_id: str) -> bool:
        return await self.catalog.delete.remote(item_id)

    async def search(
        self, vector: str, query: np.ndarray, *, top_k: int, threshold: float | None, filter: Any, offset: int
    ) -> list[SearchHit]:
        return await self.catalog.search.remote(
            vector, query, top_k=top_k, threshold=threshold, filter=filter, offset=offset
        )

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
        return await self.catalog.search_fused.remote(
            queries, top_k=top_k, threshold=threshold, filter=filter, offset=offset, fusion=fusion
        )

    async def count(self) -> int:
        return await self.catalog.count.remote()

    async def start_job(self, source: str, models: list[str], sync: bool, watch: bool = False) -> JobStart:
        return await self.catalog.start_job.remote(source, models, sync, watch)

    async def stop_job(self, job_id: str) -> bool:
        return await self.catalog.stop_job.remote(job_id)

    async def job(self, job_id: str) -> JobView | None:
        return await self.catalog.job.remote(job_id)

    async def list_jobs(self) -> list[JobView]:
        return await self.catalog.list_jobs.remote()

    async def dead_letters(self, job_id: str) -> list[DeadLetter]:
        return await self.catalog.dead_letters.remote(job_id)

    async def start_migration(self, to: str, from_: str | None, accept_failed: bool) -> MigrationStart:
        return await self.catalog.start_migration.remote(to, from_, accept_failed)

    async def rollback(self) -> Switched:
        return await self.catalog.rollback.remote()

    async def drop_old(self) -> list[str]:
        return await self.catalog.drop_old.remote()


@serve.deployment(name="ingress")  # queue limits: serve.app.build_app, from the config
@serve.ingress()
class Ingress:
    def __init__(
        self,
        encoders: dict[str, DeploymentHandle],
        catalog: DeploymentHandle,
        config: dict[str, Any],
        settings: Settings,
    ) -> None:
        self.config = ServeConfig.model_validate(config)
        self.backend = RayBackend(encoders, catalog, self.config.retry_after_s)
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.backend, self.config, self.settings)

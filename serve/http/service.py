"""What every route group shares: the backend behind the limits the API promises, the
models' descriptions (asked once), the catalogue opened once, and the metrics of every
encode. One per app, reached by routes through ``Depends(get_api)``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from mmembed.contracts import CatalogView, EncodedItem, ItemError, ModelInfo
from mmembed.encoders.config import ModelsConfig
from mmembed.loaders.fetch import FetchLimits
from mmembed.serve.config import ServeConfig
from mmembed.serve.http.backend import Backend
from mmembed.serve.http.errors import ApiError
from mmembed.serve.http.media import resolve
from mmembed.serve.http.metrics import Metrics
from mmembed.store.objects import ObjectStore
from mmembed.store.spaces import layout
from mmembed.store.vectors import DimensionError


def item_status(code: str) -> int:
    """A failed item is the client's input (422), unless a remote provider behind the model failed (502)."""
    return 502 if code == "provider_failed" else 422


def first(results: list[EncodedItem], what: str) -> EncodedItem:
    """The one result of a one-item encode, or its error."""
    r = results[0]
    if r.error is not None:
        raise ApiError(item_status(r.error.code), r.error.code, f"{what}: {r.error.message}")
    return r


@dataclass
class Api:
    backend: Backend
    config: ServeConfig
    fetch_limits: FetchLimits
    models: ModelsConfig  # where token-id clients' tokenizer files are found
    objects: ObjectStore | None = None  # the local object store the app serves files from, if any
    metrics: Metrics = field(default_factory=Metrics)
    started: int = field(default_factory=lambda: int(time.time()))  # the models' "created", for /v1/models
    _described: dict[str, ModelInfo] = field(default_factory=dict)

    @property
    def served(self) -> list[str]:
        return [m.name for m in self.config.models]

    async def describe(self, model: str) -> ModelInfo:
        if model not in self._described:
            self._described[model] = await self.backend.describe(model)
        return self._described[model]

    async def described(self) -> dict[str, ModelInfo]:
        return {name: await self.describe(name) for name in self.served}

    async def open_catalog(self) -> CatalogView:
        """Asked of the catalogue each time: a migration there changes the vectors and defaults."""
        try:
            return await self.backend.open_catalog(layout(await self.described()))
        except DimensionError as exc:
            raise ApiError(409, "dimension_mismatch", str(exc)) from exc

    async def encode(self, model: str, modality: str, items: list[Any]) -> list[EncodedItem]:
        if len(items) > self.config.max_items_per_request:
            raise ApiError(413, "too_many_items", f"{len(items)} items; at most {self.config.max_items_per_request}")
        step = self.config.items_per_call
        if len(items) > step:  # concurrent calls, which Serve spreads over the model's replicas
            parts = [self.encode(model, modality, items[i : i + step]) for i in range(0, len(items), step)]
            return [r for part in await asyncio.gather(*parts) for r in part]
        limit = self.config.max_text_chars
        if modality == "text" and any(len(t) > limit for t in items if isinstance(t, str)):
            # Refused here, item by item: tokenising megabytes costs the model replica seconds.
            short = [t for t in items if len(t) <= limit]
            kept = iter(await self.encode(model, modality, short) if short else [])
            refused = ItemError("text_too_long", f"text over the limit of {limit} characters")
            return [EncodedItem(None, refused) if len(t) > limit else next(kept) for t in items]
        if modality not in (await self.describe(model)).encoders:
            raise ApiError(422, "unsupported_modality", f"model {model!r} does not encode {modality}")
        results = await self.backend.encode(model, modality, items)
        self.metrics.observe(model, modality, results)
        return results

    async def encode_media(self, model: str, modality: str, items: list[str]) -> list[EncodedItem]:
        """Fetch or decode every item's bytes concurrently; items that fail here keep their
        error and the rest are encoded."""
        resolved = await asyncio.gather(
            *(resolve(item, modality, f"items[{n}]", self.fetch_limits) for n, item in enumerate(items))
        )
        good = [r for r in resolved if isinstance(r, bytes)]
        encoded = iter(await self.encode(model, modality, good) if good else [])
        return [next(encoded) if isinstance(r, bytes) else EncodedItem(None, r) for r in resolved]


async def get_api(request: Request) -> Api:
    """Async, so FastAPI calls it on the loop: a plain function dependency costs every request a
    hop to a worker thread and back (a tenth of the ingress's CPU on single texts)."""
    return request.app.state.api


def mounted(request: Request, url: str | None) -> str | None:
    """Local paths the API answers (objects, jobs) under the app's mount point (Serve's route_prefix)."""
    if url is None or not url.startswith("/"):
        return url
    return request.scope.get("root_path", "").rstrip("/") + url


def job_accepted(request: Request, job_id: str) -> JSONResponse:
    """A job started in the background: its id, and where to follow it."""
    return JSONResponse({"id": job_id, "status_url": mounted(request, f"/jobs/{job_id}")}, 202)

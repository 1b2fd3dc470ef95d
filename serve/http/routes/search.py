"""``POST /search``: a text, image or audio query (or an item's own vector) encoded into the
space of the vector it searches. No ``from __future__ import annotations``: FastAPI reads
these signatures' types."""

import time
from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mmembed.contracts import Query
from mmembed.serve.http.errors import ApiError
from mmembed.serve.http.media import resolve_or_raise
from mmembed.serve.http.schemas import SearchRequest
from mmembed.serve.http.service import Api, first, get_api, mounted
from mmembed.store.spaces import RoutingError, default_vector, plan_query
from mmembed.store.vectors import StoreError

router = APIRouter()


@router.post("/search")
async def search(body: SearchRequest, request: Request, api: Annotated[Api, Depends(get_api)]) -> JSONResponse:
    started = time.perf_counter()
    vector, model, query, became = await _query_vector(api, body)
    extra = 1 if body.item_id else 0  # more-like-this leaves the item itself out
    try:
        hits = await api.backend.search(
            vector,
            np.asarray(query, dtype=np.float32),
            top_k=body.top_k + extra,
            threshold=body.threshold,
            filter=body.filter,
            offset=body.offset,
        )
    except StoreError as exc:
        raise ApiError(422, "invalid_search", str(exc)) from exc
    shown = [asdict(h) | {"url": mounted(request, h.url)} for h in hits if h.id != body.item_id][: body.top_k]
    took_ms = round((time.perf_counter() - started) * 1000, 1)
    return JSONResponse(
        {"vector": vector, "model": model, "route": body.route, "query": became, "hits": shown, "took_ms": took_ms}
    )


async def _query_vector(api: Api, body: SearchRequest) -> tuple[str, str, Any, dict[str, Any]]:
    """(vector searched, model used, query vector, what the query became)."""
    described, view = await api.described(), await api.open_catalog()
    vectors = view.vectors
    if body.item_id is not None:
        vector = body.vector or default_vector(described, vectors, view.defaults)
        item = await api.backend.get_item(body.item_id, True)
        if item is None:
            raise ApiError(404, "item_not_found", f"no item {body.item_id!r}")
        if vector not in item.vectors:
            message = f"item {body.item_id!r} has no {vector!r}; it has {sorted(item.vectors)}"
            raise ApiError(422, "no_such_vector", message)
        return vector, vector.rsplit(".", 1)[0], item.vectors[vector], {"item_id": body.item_id}
    modality = next(k for k in ("text", "image", "audio") if getattr(body, k) is not None)
    try:
        plan = plan_query(described, vectors, modality, body.vector, body.via, body.route, view.defaults)
    except RoutingError as exc:
        raise ApiError(422, "no_route", str(exc)) from exc
    value: Any = getattr(body, modality)
    if modality != "text":
        value = await resolve_or_raise(value, modality, modality, api.fetch_limits)
    became: dict[str, Any] = {"modality": modality}
    if plan.transcribe_with:
        heard = first(await api.encode(plan.transcribe_with, "audio", [value]), "audio")
        value = became["transcript"] = heard.transcript or ""
    if isinstance(value, str):  # a text model with a query prompt (e5's "query: ") puts it before a query
        value = Query(value)
    encoded = first(await api.encode(plan.model, plan.modality, [value]), modality)
    return plan.vector, plan.model, encoded.vector, became

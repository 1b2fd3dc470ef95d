"""``POST /search``: a text, image or audio query (or an item's own vector) encoded into the
space of the vector it searches. No ``from __future__ import annotations``: FastAPI reads
these signatures' types."""

import time
from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mmembed.contracts import EncodedItem, Query, QueryPlan
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
    queries, models, became = await _query_vectors(api, body)
    extra = 1 if body.item_id else 0  # more-like-this leaves the item itself out
    options = {"top_k": body.top_k + extra, "threshold": body.threshold, "filter": body.filter, "offset": body.offset}
    fused = body.fuse or body.vectors is not None
    try:
        if fused:
            hits = await api.backend.search_fused(queries, fusion=body.fusion, **options)
        else:
            [(vector, query)] = queries.items()
            hits = await api.backend.search(vector, query, **options)
    except StoreError as exc:
        raise ApiError(422, "invalid_search", str(exc)) from exc
    shown = [asdict(h) | {"url": mounted(request, h.url)} for h in hits if h.id != body.item_id][: body.top_k]
    took_ms = round((time.perf_counter() - started) * 1000, 1)
    answer: dict[str, Any] = {"route": body.route, "query": became, "hits": shown, "took_ms": took_ms}
    if fused:
        answer |= {"vectors": list(queries), "models": models, "fusion": body.fusion}
    else:
        [(vector, model)] = models.items()
        answer |= {"vector": vector, "model": model}
    return JSONResponse(answer)


async def _query_vectors(api: Api, body: SearchRequest) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, Any]]:
    """(query vector by named vector searched, model that made each, what the query became). One vector
    unless the search is fused; each model encodes the query once, whichever vectors it serves."""
    described, view = await api.described(), await api.open_catalog()
    vectors = view.vectors
    if body.item_id is not None:
        item = await api.backend.get_item(body.item_id, True)
        if item is None:
            raise ApiError(404, "item_not_found", f"no item {body.item_id!r}")
        wanted = _fused_names(body, [v for v in vectors if v in item.vectors]) or [
            body.vector or default_vector(described, vectors, view.defaults)
        ]
        for vector in wanted:
            if vector not in item.vectors:
                message = f"item {body.item_id!r} has no {vector!r}; it has {sorted(item.vectors)}"
                raise ApiError(422, "no_such_vector", message)
        queries = {v: np.asarray(item.vectors[v], dtype=np.float32) for v in wanted}
        return queries, {v: v.rsplit(".", 1)[0] for v in wanted}, {"item_id": body.item_id}
    modality = next(k for k in ("text", "image", "audio") if getattr(body, k) is not None)
    plans = []
    try:
        routable = [v for v in vectors if _routes(described, vectors, modality, v, body.route)]
        for vector in _fused_names(body, routable) or [body.vector]:  # type: ignore[list-item]
            plans.append(plan_query(described, vectors, modality, vector, body.via, body.route, view.defaults))
    except RoutingError as exc:
        raise ApiError(422, "no_route", str(exc)) from exc
    value: Any = getattr(body, modality)
    if modality != "text":
        value = await resolve_or_raise(value, modality, modality, api.fetch_limits)
    became: dict[str, Any] = {"modality": modality}
    encoded: dict[tuple[str, str], Any] = {}  # per (model, modality): the query's vector, or why it has none
    for plan in plans:
        if (plan.model, plan.modality) in encoded:
            continue
        try:
            encoded[plan.model, plan.modality] = (await _encode_query(api, plan, value, became)).vector
        except ApiError as exc:  # this model cannot take the query (Whisper hears no speech in a beep)
            encoded[plan.model, plan.modality] = exc
    answers = {p.vector: (p.model, encoded[p.model, p.modality]) for p in plans}
    refused = {v: e for v, (_, e) in answers.items() if isinstance(e, ApiError)}
    if len(refused) == len(answers):  # nothing left to search with: the query's own error
        raise next(iter(refused.values()))
    if refused:  # a fused search goes on with the vectors whose models took the query
        became["skipped"] = {v: f"{e.code}: {e.message}" for v, e in refused.items()}
    queries = {v: np.asarray(e, dtype=np.float32) for v, (_, e) in answers.items() if v not in refused}
    return queries, {v: m for v, (m, _) in answers.items() if v not in refused}, became


async def _encode_query(api: Api, plan: QueryPlan, value: Any, became: dict[str, Any]) -> EncodedItem:
    """The query through the plan's model; speech by its transcript heard once (kept in ``became``)."""
    if plan.transcribe_with:
        if "transcript" not in became:
            heard = first(await api.encode(plan.transcribe_with, "audio", [value]), "audio")
            became["transcript"] = heard.transcript or ""
        value = became["transcript"]
    if isinstance(value, str):  # a text model with a query prompt (e5's "query: ") puts it before a query
        value = Query(value)
    return first(await api.encode(plan.model, plan.modality, [value]), plan.modality)


def _fused_names(body: SearchRequest, searchable: list[str]) -> list[str]:
    """The vectors a fused search asked for (all it can search with ``fuse``); empty for one vector."""
    return list(body.vectors) if body.vectors is not None else searchable if body.fuse else []


def _routes(described: dict, vectors: dict[str, int], modality: str, vector: str, route: str) -> bool:
    try:
        plan_query(described, vectors, modality, vector, None, route)
    except RoutingError:
        return False
    return True

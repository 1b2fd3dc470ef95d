"""The catalogue as the search page sees it: its stored objects and what it can search.
No ``from __future__ import annotations``: FastAPI reads these signatures' types."""

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse

from mmembed.serve.http.errors import ApiError
from mmembed.serve.http.service import Api, get_api
from mmembed.store.objects import LocalObjects, ObjectStoreError
from mmembed.store.spaces import RoutingError, default_vector, plan_query

QUERY_ROUTES = (("text", "direct"), ("image", "direct"), ("audio", "direct"), ("audio", "transcript"))

router = APIRouter()
ApiDep = Annotated[Api, Depends(get_api)]


@router.get("/objects/{key:path}")
async def get_object(key: str, api: ApiDep) -> FileResponse:
    """Objects of the local store (an S3 store gives its own URLs)."""
    if not isinstance(api.objects, LocalObjects):
        raise ApiError(404, "not_found", "objects are served by the S3 store here")
    try:
        path = api.objects.path_for(key)
    except ObjectStoreError as exc:  # an escaping key: say nothing about the server's folders
        raise ApiError(404, "not_found", f"no object {key!r}") from exc
    if not path.is_file():
        raise ApiError(404, "not_found", f"no object {key!r}")
    return FileResponse(path)


@router.get("/catalog")
async def catalog_info(api: ApiDep) -> JSONResponse:
    """What the search page needs: the vectors, which queries each takes, the item count."""
    described, view = await api.described(), await api.open_catalog()
    vectors = view.vectors
    searchable = {}
    for vector, dim in vectors.items():
        queries = []
        for modality, route in QUERY_ROUTES:
            try:
                plan_query(described, vectors, modality, vector, None, route)
            except RoutingError:
                continue
            queries.append(modality if route == "direct" else "audio:transcript")
        searchable[vector] = {"dim": dim, "queries": queries}
    return JSONResponse(
        {
            "count": await api.backend.count(),
            "vectors": searchable,
            "default_vector": default_vector(described, vectors, view.defaults),
            "default_vectors": view.defaults,
            "models": api.served,
            "dashboard_url": api.config.dashboard_url,
        }
    )

"""The catalogue's items: add one (uploaded or fetched, with its caption or transcript
embedded too, by the one item step bulk jobs use, over the API's own limits and metrics),
read one, delete one. No ``from __future__ import annotations``: FastAPI reads these
signatures' types."""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from mmembed.contracts import ItemError
from mmembed.embedding import Item, ItemEmbedder
from mmembed.loaders.audio import sniff_format
from mmembed.serve.http.errors import ApiError, migration_running
from mmembed.serve.http.media import item_kind, parse_meta, resolve_or_raise
from mmembed.serve.http.service import Api, get_api, item_status, mounted
from mmembed.store.catalog import NewItem
from mmembed.store.objects import ObjectStoreError
from mmembed.store.spaces import item_encoders
from mmembed.store.switching import MigrationRunning
from mmembed.store.vectors import StoreError

router = APIRouter()
ApiDep = Annotated[Api, Depends(get_api)]


@router.post("/items", status_code=201)
async def add_item(
    request: Request,
    api: ApiDep,
    file: Annotated[UploadFile | None, File(description="The image or audio file.")] = None,
    url: Annotated[str | None, Form(description="Fetch the object from here instead of uploading it.")] = None,
    kind: Annotated[Literal["image", "audio"] | None, Form()] = None,
    caption: Annotated[str | None, Form()] = None,
    meta: Annotated[str | None, Form(description="A JSON object of your own fields.")] = None,
    source_uri: Annotated[str | None, Form(description="Your id for the item; re-adding it updates it.")] = None,
) -> JSONResponse:
    if (file is None) == (url is None):
        raise ApiError(422, "invalid_request", "send exactly one of file or url")
    if file is not None:
        data, filename, media_type = await file.read(), file.filename, file.content_type or ""
    else:
        data = await resolve_or_raise(url or "", kind or "image", "url", api.fetch_limits)
        filename, media_type = (url or "").rsplit("/", 1)[-1], ""
    kind = item_kind(kind, media_type, data)
    media_type = media_type if media_type.startswith(kind) else f"{kind}/{sniff_format(data) or 'octet-stream'}"
    described = await api.described()
    await api.open_catalog()
    if not any(k == kind for _, k in item_encoders(described, kind)):
        raise ApiError(422, "unsupported_modality", f"no served model encodes {kind} items")
    [outcome] = await ItemEmbedder(described, api, strict_text=True).embed([Item(kind, data, caption)])
    if isinstance(outcome, ItemError):
        raise ApiError(item_status(outcome.code), outcome.code, outcome.message)
    vectors, transcript = outcome.vectors, outcome.transcript
    item = NewItem(
        data=data,
        kind=kind,
        media_type=media_type,
        vectors=vectors,
        source_uri=source_uri,
        filename=filename,
        caption=caption,
        transcript=transcript,
        meta=parse_meta(meta),
        model_versions=outcome.versions,
    )
    try:
        item_id = await api.backend.add_item(item)
    except MigrationRunning as exc:
        raise migration_running(exc, api.config.retry_after_s) from exc
    except (StoreError, ObjectStoreError) as exc:
        raise ApiError(503, "store_unavailable", str(exc)) from exc
    stored = await api.backend.get_item(item_id)
    assert stored is not None
    body = {"id": item_id, "vectors": sorted(vectors), "payload": stored.payload}
    return JSONResponse(body | {"url": mounted(request, stored.url)}, 201)


@router.get("/items/{item_id}")
async def get_item(item_id: str, request: Request, api: ApiDep) -> JSONResponse:
    stored = await api.backend.get_item(item_id)
    if stored is None:
        raise ApiError(404, "item_not_found", f"no item {item_id!r}")
    return JSONResponse({"id": stored.id, "payload": stored.payload, "url": mounted(request, stored.url)})


@router.delete("/items/{item_id}")
async def delete_item(item_id: str, api: ApiDep) -> JSONResponse:
    try:
        deleted = await api.backend.delete_item(item_id)
    except MigrationRunning as exc:
        raise migration_running(exc, api.config.retry_after_s) from exc
    if not deleted:
        raise ApiError(404, "item_not_found", f"no item {item_id!r}")
    return JSONResponse({"id": item_id, "deleted": True})

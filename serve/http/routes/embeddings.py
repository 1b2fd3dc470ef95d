"""Encoding: OpenAI-compatible ``/v1/embeddings`` and the native ``/encode/{text,image,audio}``.
No ``from __future__ import annotations``: FastAPI reads these signatures' types."""

import asyncio
import base64
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, File, UploadFile
from fastapi.responses import JSONResponse

from mmembed.contracts import EncodedItem, Query
from mmembed.serve.http import token_ids
from mmembed.serve.http.errors import ApiError
from mmembed.serve.http.media import data_uri_kind
from mmembed.serve.http.schemas import EmbeddingsRequest, EncodeMediaRequest, EncodeTextRequest, InputType
from mmembed.serve.http.service import Api, get_api, item_status

router = APIRouter()


class VectorsResponse(JSONResponse):
    """JSON with vectors written straight from their float32 arrays by orjson. The stdlib encoder
    made a Python float and a repr of every value: the ingress spent 30 ms of CPU per 32-text
    MiniLM request with it, 14 ms with this (docs/benchmarks.md, "Serving data plane")."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


ApiDep = Annotated[Api, Depends(get_api)]


# The request field behind each refusal, as OpenAI's errors name it.
PARAMS = {"model_not_found": "model", "dimensions_unsupported": "dimensions", "too_many_items": "input"}


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, api: ApiDep) -> JSONResponse:
    """OpenAI's contract, its status codes included: an input the server refuses is a 400,
    which OpenAI clients raise as ``BadRequestError``, as they do for OpenAI's own refusals."""
    try:
        return await _embeddings(body, api)
    except ApiError as exc:
        if exc.status in (413, 422):
            exc.status = 400
        if exc.param is None and (exc.status == 400 or exc.code in PARAMS):
            exc.param = PARAMS.get(exc.code, "input")
        raise


async def _embeddings(body: EmbeddingsRequest, api: Api) -> JSONResponse:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise ApiError(422, "empty_input", "input is an empty list")
    if all(isinstance(i, int) for i in inputs):  # one input as token ids
        inputs = await token_ids.decode([inputs], api.config.token_ids_encoding, api.models)  # type: ignore[list-item]
    elif not all(isinstance(i, str) for i in inputs):
        inputs = await token_ids.decode(inputs, api.config.token_ids_encoding, api.models)  # type: ignore[arg-type]
    limit = api.config.max_items_per_request
    if len(inputs) > limit:
        raise ApiError(413, "too_many_items", f"{len(inputs)} inputs; at most {limit} a request")
    groups: dict[str, list[tuple[int, str]]] = {}
    for index, text in enumerate(inputs):
        groups.setdefault(data_uri_kind(text, f"input[{index}]") or body.modality, []).append((index, text))
    encoders = (await api.describe(body.model)).encoders
    for modality in groups:
        dim = encoders[modality].dim if modality in encoders else None
        if body.dimensions is not None and dim is not None and body.dimensions != dim:
            message = f"model {body.model!r} gives {dim}-d vectors and cannot shorten them"
            raise ApiError(422, "dimensions_unsupported", message)
    outcomes = await asyncio.gather(
        *(
            api.encode(body.model, m, as_input_type([i for _, i in g], body.input_type))
            if m == "text"
            else api.encode_media(body.model, m, [i for _, i in g])
            for m, g in groups.items()
        )
    )
    data: list[dict[str, Any]] = [{}] * len(inputs)
    tokens = 0
    for (modality, group), results in zip(groups.items(), outcomes, strict=True):
        for (index, _), r in zip(group, results, strict=True):
            if r.error is not None:
                message = f"input[{index}] ({modality}): {r.error.message}"
                raise ApiError(item_status(r.error.code), r.error.code, message)
            tokens += int(r.info.get("tokens", 0))
            data[index] = {"object": "embedding", "index": index, "embedding": _format(r.vector, body)}
            if r.info.get("truncated_tokens"):  # MMEMBED_TOKEN_POLICY=truncate: said, not hidden
                data[index]["truncated_tokens"] = r.info["truncated_tokens"]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return VectorsResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


@router.get("/v1/models")
async def list_models(api: ApiDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model(api, name) for name in api.served]})


@router.get("/v1/models/{model}")
async def get_model(model: str, api: ApiDep) -> JSONResponse:
    if model not in api.served:
        message = f"model {model!r} is not served here; served: {sorted(api.served)}"
        raise ApiError(404, "model_not_found", message, param="model")
    return JSONResponse(_model(api, model))


def _model(api: Api, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": api.started, "owned_by": "mmembed"}


@router.post("/encode/text")
async def encode_text(body: EncodeTextRequest, api: ApiDep) -> dict[str, Any]:
    return _native(
        api, body.model, "text", await api.encode(body.model, "text", as_input_type(body.texts, body.input_type))
    )


def as_input_type(texts: list[str], input_type: InputType) -> list[str]:
    """Queries travel to the model as ``Query``, so one with a query prompt puts it before them."""
    return [Query(t) for t in texts] if input_type == "query" else texts


@router.post("/encode/image")
async def encode_image(body: EncodeMediaRequest, api: ApiDep) -> dict[str, Any]:
    return _native(api, body.model, "image", await api.encode_media(body.model, "image", body.items))


@router.post("/encode/image/upload")
async def encode_image_upload(model: str, files: Annotated[list[UploadFile], File()], api: ApiDep) -> JSONResponse:
    items = [await f.read() for f in files]
    return _native(api, model, "image", await api.encode(model, "image", items))


@router.post("/encode/audio")
async def encode_audio(body: EncodeMediaRequest, api: ApiDep) -> dict[str, Any]:
    return _native(api, body.model, "audio", await api.encode_media(body.model, "audio", body.items))


def _format(vector: Any, body: EmbeddingsRequest) -> np.ndarray | str:
    vec = np.ascontiguousarray(vector, dtype="<f4")
    return base64.b64encode(vec.tobytes()).decode() if body.encoding_format == "base64" else vec


def _public_info(r: EncodedItem) -> dict[str, Any]:
    """The encoder's info and the serving path's figures, as the API has always shown them."""
    extra: dict[str, Any] = {"cached": True} if r.cached else {}
    if r.batch_size is not None:
        extra["batch_size"] = r.batch_size
    return r.info | extra | {"queue_ms": round(r.queue_ms, 2), "encode_ms": round(r.encode_ms, 2)}


def _error(r: EncodedItem) -> dict[str, str] | None:
    return None if r.error is None else {"code": r.error.code, "message": r.error.message}


def _native(api: Api, model: str, modality: str, results: list[EncodedItem]) -> JSONResponse:
    """Good items come back even when others fail; a request where every item failed is a 422.
    A ready JSONResponse skips FastAPI's per-value ``jsonable_encoder`` walk of every float."""
    out = [
        {
            "index": i,
            "embedding": None if r.vector is None else np.ascontiguousarray(r.vector, dtype="<f4"),
            "error": _error(r),
            "info": _public_info(r),
        }
        for i, r in enumerate(results)
    ]
    if all(r.error is not None for r in results):
        error = results[0].error
        assert error is not None
        raise ApiError(item_status(error.code), error.code, f"every item failed; items[0]: {error.message}")
    return VectorsResponse({"model": model, "modality": modality, "data": out})

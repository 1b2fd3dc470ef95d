"""The HTTP API (FastAPI on Ray Serve): OpenAI-compatible ``/v1/embeddings``, native
``/encode/{text,image,audio}``, models, health and Prometheus metrics.

The ingress only parses requests and routes items to the model deployments; decoding,
preprocessing and the forward pass happen in the model replicas. Errors are JSON
``{"error": {"code", "message"}}`` with stable codes. A model whose queue is full answers
429 with ``Retry-After`` instead of queueing without limit.

No ``from __future__ import annotations`` here: Serve rebuilds the class's routes and
FastAPI must see the request models as real classes, not strings. Everything the class
uses is defined above it: Serve serialises the class when the decorator runs.
"""

import asyncio
import base64
import binascii
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import fastapi_offline
import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmembed.config import get_settings
from mmembed.loaders.audio import sniff_format
from mmembed.loaders.fetch import FetchError, FetchLimits, fetch
from mmembed.serve.auth import ApiKeys, Cors, RequireKey
from mmembed.serve.config import ServeConfig
from mmembed.store.catalog import NewItem
from mmembed.store.objects import LocalObjects, ObjectStoreError, object_store
from mmembed.store.spaces import RoutingError, default_vector, item_encoders, layout, plan_query
from mmembed.store.vectors import DimensionError, StoreError

# FastAPI's own /docs loads its scripts from a CDN; ours serves them from /ui/. No ReDoc page: its bundle
# fetches a logo from cdn.redoc.ly, so it cannot be served offline as shipped.
app = FastAPI(title="mmembed", description="Multi-modal embeddings: text, images and audio.", docs_url=None,
              redoc_url=None)  # fmt: skip
QUERY_ROUTES = (("text", "direct"), ("image", "direct"), ("audio", "direct"), ("audio", "transcript"))
SWAGGER_UI = Path(fastapi_offline.__file__).parent / "static"
UI_FILES = {p.name: p for p in (Path(__file__).parent / "ui").iterdir() if p.is_file()} | {
    name: SWAGGER_UI / name for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
}  # the pages' files: nothing else
DATA_URI = re.compile(r"^data:(?P<kind>image|audio)/[\w.+-]+;base64,(?P<data>.*)$", re.DOTALL)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status, headers=exc.headers)


HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a body that is not UTF-8) in the API's error shape."""
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code, headers=exc.headers)


class BodyLimit:
    """413 for a declared body over the limit, before anything reads it. A plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = getattr(scope["app"].state, "max_body_bytes", None) if "app" in scope else None
        if scope["type"] == "http" and limit:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _too_large(f"request body is {int(length)} bytes; the limit is {limit}")(scope, receive, send)
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # No length declared (chunked): read up to the limit here, then hand the body on.
                messages, size = [], 0
                while True:
                    message = await receive()
                    messages.append(message)
                    size += len(message.get("body", b""))
                    if size > limit:
                        await _too_large(f"request body is over the limit of {limit} bytes")(scope, receive, send)
                        return
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        break
                replay = iter(messages)

                async def receive_again() -> dict[str, Any]:
                    return next(replay, None) or await receive()

                await self.app(scope, receive_again, send)
                return
        await self.app(scope, receive, send)


def _too_large(message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "body_too_large", "message": message}}, 413)


app.add_middleware(BodyLimit)
app.add_middleware(RequireKey)  # added later is outside: a caller without a key learns nothing of limits
app.add_middleware(Cors)  # outermost, so preflight requests are answered before the key check


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": {"code": "invalid_request", "message": f"{where}: {first.get('msg', exc)}"}}, 422)


class EmbeddingsRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    modality: Literal["text", "image", "audio"] = Field(
        default="text",
        description="How to read the inputs; image/audio inputs are URLs, data URIs or base64. "
        "Data URIs are recognised whatever this says.",
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EncodeTextRequest(BaseModel):
    model: str
    texts: list[str] = Field(min_length=1)


class EncodeMediaRequest(BaseModel):
    model: str
    items: list[str] = Field(min_length=1, description="http(s) URLs, data URIs or base64 bytes")


class IngestRequest(BaseModel):
    source: str = Field(description="A folder or manifest on the server, s3://bucket/prefix, or a .txt of URLs.")
    models: list[str] | None = Field(default=None, description="Default: every model this server runs.")
    sync: bool = Field(default=False, description="Also delete the points of items gone from the source.")


class SearchRequest(BaseModel):
    text: str | None = None
    image: str | None = Field(default=None, description="http(s) URL, data URI or base64 bytes")
    audio: str | None = Field(default=None, description="http(s) URL, data URI or base64 bytes")
    item_id: str | None = Field(default=None, description="More like this: the item's own stored vector.")
    vector: str | None = Field(default=None, description="Named vector to search, e.g. demo-clip.image.")
    via: str | None = Field(default=None, description="Model that encodes the query; default: the vector's own.")
    route: Literal["direct", "transcript"] = Field(
        default="direct", description="Audio: straight into the space (direct) or through its transcript."
    )
    top_k: int = Field(default=10, ge=1, le=1000)
    threshold: float | None = Field(default=None, description="Drop hits scoring below this.")
    filter: dict[str, Any] | None = Field(
        default=None, description='Payload filter, e.g. {"kind": "image", "meta.colour": ["red"], "size": {"lt": 1e6}}'
    )
    offset: int = Field(default=0, ge=0, description="Skip this many hits (pagination).")

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [k for k in ("text", "image", "audio", "item_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, audio or item_id (got {given or 'none'})")
        return self


def _item_kind(kind: str | None, media_type: str, data: bytes) -> str:
    if kind:
        return kind
    if media_type.startswith(("image/", "audio/")):
        return media_type.split("/")[0]
    return "audio" if sniff_format(data) else "image"


def _parse_meta(meta: str | None) -> dict[str, Any]:
    if not meta:
        return {}
    try:
        parsed = json.loads(meta)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_meta", f"meta is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ApiError(422, "invalid_meta", "meta must be a JSON object")
    return parsed


def _item_status(code: str) -> int:
    """A failed item is the client's input (422), unless a remote provider behind the model failed (502)."""
    return 502 if code == "provider_failed" else 422


def _first(results: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """The one result of a one-item encode, or its error."""
    r = results[0]
    if r["error"] is not None:
        raise ApiError(_item_status(r["error"]["code"]), r["error"]["code"], f"{what}: {r['error']['message']}")
    return r


class Metrics:
    """Per-ingress-replica Prometheus metrics, labelled by model and modality."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "modality")
        self.requests = Counter("mmembed_requests", "Encode requests", ("endpoint", "status"), registry=self.registry)
        self.items = Counter("mmembed_items", "Items encoded", labels, registry=self.registry)
        self.errors = Counter("mmembed_item_errors", "Items refused", (*labels, "code"), registry=self.registry)
        self.cache_hits = Counter("mmembed_cache_hits", "Items answered by the embedding cache", labels,
                                  registry=self.registry)  # fmt: skip
        buckets = (1, 2, 4, 8, 16, 32, 64, 128)
        self.batch = Histogram("mmembed_batch_size", "Batch an item ran in", labels, buckets=buckets,
                               registry=self.registry)  # fmt: skip
        self.queue = Histogram("mmembed_queue_wait_seconds", "Wait for a batch", labels, registry=self.registry)
        self.encode = Histogram("mmembed_encode_seconds", "Forward pass of the batch", labels, registry=self.registry)

    def observe(self, model: str, modality: str, results: list[dict[str, Any]]) -> None:
        for r in results:
            if r["error"] is not None:
                self.errors.labels(model, modality, r["error"]["code"]).inc()
                continue
            info = r["info"]
            self.items.labels(model, modality).inc()
            if info.get("cached"):
                self.cache_hits.labels(model, modality).inc()
                continue
            self.batch.labels(model, modality).observe(info["batch_size"])
            self.queue.labels(model, modality).observe(info["queue_ms"] / 1000)
            self.encode.labels(model, modality).observe(info["encode_ms"] / 1000)


async def _media(item: str, kind: str, where: str, limits: FetchLimits) -> bytes | dict[str, str]:
    """The bytes an item names, or its error (so one bad URL fails only its own item)."""
    try:
        if item.startswith(("http://", "https://")):
            return await fetch(item, kind, limits)
        m = DATA_URI.match(item)
        return _b64(m["data"] if m else item, where)
    except FetchError as exc:
        return {"code": exc.code, "message": f"{where}: {exc}"}
    except ApiError as exc:
        return {"code": exc.code, "message": exc.message}


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_base64", f"{where}: not valid base64 ({exc})") from exc


def _format(vector: np.ndarray, body: EmbeddingsRequest) -> list[float] | str:
    vec = np.asarray(vector, dtype="<f4")
    return base64.b64encode(vec.tobytes()).decode() if body.encoding_format == "base64" else vec.tolist()


def _mounted(request: Request, url: str) -> str:
    """Local paths the API answers (objects, jobs) under the app's mount point (Serve's route_prefix)."""
    return request.scope.get("root_path", "").rstrip("/") + url if url.startswith("/") else url


def _public_info(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("queue_ms", "encode_ms")} | {
        "queue_ms": round(info.get("queue_ms", 0.0), 2), "encode_ms": round(info.get("encode_ms", 0.0), 2)}  # fmt: skip


@serve.deployment(name="ingress")  # queue limits: serve.app.build_app, from the config
@serve.ingress(app)
class Ingress:
    def __init__(
        self, encoders: dict[str, DeploymentHandle], catalog: DeploymentHandle, config: dict[str, Any]
    ) -> None:
        self.encoders, self.catalog, self.config = encoders, catalog, ServeConfig.model_validate(config)
        settings = get_settings()
        self.objects = object_store(settings.objects_config())
        app.state.api_keys = ApiKeys.from_strings(*settings.api_keys(), settings.open_reads)
        app.state.cors_origins = tuple(settings.cors_origins)
        self.vectors: dict[str, int] | None = None
        app.state.max_body_bytes = self.config.max_body_bytes
        self.fetch_limits = FetchLimits(max_bytes=self.config.max_body_bytes, policy=settings.url_policy())
        self.metrics = Metrics()
        self.described: dict[str, dict[str, Any]] = {}

    async def _describe(self, model: str) -> dict[str, Any]:
        if model not in self.described:
            self.described[model] = await self._call(model, "describe")
        return self.described[model]

    async def _call(self, model: str, method: str, *args: Any) -> Any:
        """Every call into a model deployment: a full queue there is a 429, a replica that died
        under the request (Serve starts another) a 503; both say when to retry."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        try:
            return await getattr(self._handle(model), method).remote(*args)
        except BackPressureError as exc:
            raise ApiError(429, "overloaded", f"model {model!r} is at capacity; retry", retry) from exc
        except RayActorError as exc:
            message = f"model {model!r}: its replica stopped during the request; Serve is replacing it, retry"
            raise ApiError(503, "replica_unavailable", message, retry) from exc

    def _handle(self, model: str) -> DeploymentHandle:
        if model not in self.encoders:
            raise ApiError(
                404, "model_not_found", f"model {model!r} is not served here; served: {sorted(self.encoders)}"
            )
        return self.encoders[model]

    async def _encode(self, model: str, modality: str, items: list[Any]) -> list[dict[str, Any]]:
        if len(items) > self.config.max_items_per_request:
            raise ApiError(413, "too_many_items", f"{len(items)} items; at most {self.config.max_items_per_request}")
        limit = self.config.max_text_chars
        if modality == "text" and any(len(t) > limit for t in items if isinstance(t, str)):
            # Refused here, item by item: tokenising megabytes costs the model replica seconds.
            short = [t for t in items if len(t) <= limit]
            kept = iter(await self._encode(model, modality, short) if short else [])
            refused = {"code": "text_too_long", "message": f"text over the limit of {limit} characters"}
            return [{"vector": None, "error": refused, "info": {}} if len(t) > limit else next(kept) for t in items]
        described = await self._describe(model)
        if modality not in described["encoders"]:
            raise ApiError(422, "unsupported_modality", f"model {model!r} does not encode {modality}")
        results = await self._call(model, "encode", modality, items)
        self.metrics.observe(model, modality, results)
        return results

    # --- OpenAI-compatible -------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest) -> dict[str, Any]:
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise ApiError(422, "empty_input", "input is an empty list")
        if any(not isinstance(i, str) for i in inputs):
            hint = "LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False)"
            message = f"send text, not token ids: this server tokenises with the model's own tokenizer ({hint})"
            raise ApiError(422, "token_arrays_unsupported", message)
        groups: dict[str, list[tuple[int, Any]]] = {}
        for index, text in enumerate(inputs):
            m = DATA_URI.match(text)
            modality = m["kind"] if m else body.modality
            groups.setdefault(modality, []).append((index, text))
        described = await self._describe(body.model)
        for modality in groups:
            dim = described["encoders"].get(modality, {}).get("dim")
            if body.dimensions is not None and dim is not None and body.dimensions != dim:
                raise ApiError(422, "dimensions_unsupported",
                               f"model {body.model!r} gives {dim}-d vectors and cannot shorten them")  # fmt: skip
        outcomes = await asyncio.gather(
            *(
                self._encode(body.model, m, [i for _, i in g])
                if m == "text"
                else self._encode_media(body.model, m, [i for _, i in g])
                for m, g in groups.items()
            )
        )
        data: list[dict[str, Any]] = [{}] * len(inputs)
        tokens = 0
        for (modality, group), results in zip(groups.items(), outcomes, strict=True):
            for (index, _), r in zip(group, results, strict=True):
                if r["error"] is not None:
                    code, message = r["error"]["code"], f"input[{index}] ({modality}): {r['error']['message']}"
                    raise ApiError(_item_status(code), code, message)
                tokens += int(r["info"].get("tokens", 0))
                data[index] = {"object": "embedding", "index": index, "embedding": _format(r["vector"], body)}
        self.metrics.requests.labels("/v1/embeddings", "200").inc()
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip

    # --- native ---------------------------------------------------------------------------

    @app.post("/encode/text")
    async def encode_text(self, body: EncodeTextRequest) -> dict[str, Any]:
        return self._native(body.model, "text", await self._encode(body.model, "text", body.texts))

    @app.post("/encode/image")
    async def encode_image(self, body: EncodeMediaRequest) -> dict[str, Any]:
        return self._native(body.model, "image", await self._encode_media(body.model, "image", body.items))

    @app.post("/encode/image/upload")
    async def encode_image_upload(self, model: str, files: Annotated[list[UploadFile], File()]) -> JSONResponse:
        items = [await f.read() for f in files]
        return self._native(model, "image", await self._encode(model, "image", items))

    @app.post("/encode/audio")
    async def encode_audio(self, body: EncodeMediaRequest) -> dict[str, Any]:
        return self._native(body.model, "audio", await self._encode_media(body.model, "audio", body.items))

    async def _encode_media(self, model: str, modality: str, items: list[str]) -> list[dict[str, Any]]:
        """Fetch or decode every item's bytes concurrently; items that fail here keep their
        error and the rest are encoded."""
        resolved = await asyncio.gather(
            *(_media(item, modality, f"items[{n}]", self.fetch_limits) for n, item in enumerate(items))
        )
        good = [r for r in resolved if isinstance(r, bytes)]
        encoded = iter(await self._encode(model, modality, good) if good else [])
        return [next(encoded) if isinstance(r, bytes) else {"vector": None, "error": r, "info": {}} for r in resolved]

    def _native(self, model: str, modality: str, results: list[dict[str, Any]]) -> JSONResponse:
        """Good items come back even when others fail; a request where every item failed is a 422.
        A ready JSONResponse skips FastAPI's per-value ``jsonable_encoder`` walk of every float."""
        out = [
            {"index": i, "embedding": None if r["vector"] is None else np.asarray(r["vector"]).tolist(),
             "error": r["error"], "info": _public_info(r["info"])}
            for i, r in enumerate(results)
        ]  # fmt: skip
        if all(r["error"] is not None for r in results):
            code, message = results[0]["error"]["code"], results[0]["error"]["message"]
            raise ApiError(_item_status(code), code, f"every item failed; items[0]: {message}")
        self.metrics.requests.labels(f"/encode/{modality}", "200").inc()
        return JSONResponse({"model": model, "modality": modality, "data": out})

    # --- catalogue: search, add, delete ---------------------------------------------------

    async def _described(self) -> dict[str, dict[str, Any]]:
        return {m.name: await self._describe(m.name) for m in self.config.models}

    async def _open_catalog(self) -> dict[str, int]:
        if self.vectors is None:
            try:
                self.vectors = await self.catalog.open.remote(layout(await self._described()))
            except DimensionError as exc:
                raise ApiError(409, "dimension_mismatch", str(exc)) from exc
        return self.vectors

    async def _query_vector(self, body: SearchRequest) -> tuple[str, str, Any, dict[str, Any]]:
        """(vector searched, model used, query vector, what the query became)."""
        described, vectors = await self._described(), await self._open_catalog()
        if body.item_id is not None:
            vector = body.vector or default_vector(described, vectors)
            item = await self.catalog.get.remote(body.item_id, True)
            if item is None:
                raise ApiError(404, "item_not_found", f"no item {body.item_id!r}")
            if vector not in item["vectors"]:
                raise ApiError(422, "no_such_vector", f"item {body.item_id!r} has no {vector!r}; it has "
                               f"{sorted(item['vectors'])}")  # fmt: skip
            return vector, vector.rsplit(".", 1)[0], item["vectors"][vector], {"item_id": body.item_id}
        modality = next(k for k in ("text", "image", "audio") if getattr(body, k) is not None)
        try:
            plan = plan_query(described, vectors, modality, body.vector, body.via, body.route)
        except RoutingError as exc:
            raise ApiError(422, "no_route", str(exc)) from exc
        value: Any = getattr(body, modality)
        if modality != "text":
            value = await _media(value, modality, modality, self.fetch_limits)
            if isinstance(value, dict):
                raise ApiError(422, value["code"], value["message"])
        became: dict[str, Any] = {"modality": modality}
        if plan.transcribe_with:
            heard = _first(await self._encode(plan.transcribe_with, "audio", [value]), "audio")
            value = became["transcript"] = heard["info"].get("transcript", "")
        encoded = _first(await self._encode(plan.model, plan.modality, [value]), modality)
        return plan.vector, plan.model, encoded["vector"], became

    @app.post("/search")
    async def search(self, body: SearchRequest, request: Request) -> JSONResponse:
        started = time.perf_counter()
        vector, model, query, became = await self._query_vector(body)
        extra = 1 if body.item_id else 0  # more-like-this leaves the item itself out
        try:
            hits = await self.catalog.search.remote(vector, np.asarray(query, dtype=np.float32),
                                                    top_k=body.top_k + extra, threshold=body.threshold,
                                                    filter=body.filter, offset=body.offset)  # fmt: skip
        except StoreError as exc:
            raise ApiError(422, "invalid_search", str(exc)) from exc
        hits = [h | {"url": _mounted(request, h["url"])} for h in hits if h["id"] != body.item_id][: body.top_k]
        self.metrics.requests.labels("/search", "200").inc()
        return JSONResponse({"vector": vector, "model": model, "route": body.route, "query": became, "hits": hits,
                             "took_ms": round((time.perf_counter() - started) * 1000, 1)})  # fmt: skip

    @app.post("/items", status_code=201)
    async def add_item(
        self,
        request: Request,
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
            fetched = await _media(url or "", kind or "image", "url", self.fetch_limits)
            if isinstance(fetched, dict):
                raise ApiError(422, fetched["code"], fetched["message"])
            data, filename, media_type = fetched, (url or "").rsplit("/", 1)[-1], ""
        kind = _item_kind(kind, media_type, data)
        media_type = media_type if media_type.startswith(kind) else f"{kind}/{sniff_format(data) or 'octet-stream'}"
        described = await self._described()
        await self._open_catalog()
        pairs = item_encoders(described, kind)
        direct = [(m, k) for m, k in pairs if k == kind]
        if not direct:
            raise ApiError(422, "unsupported_modality", f"no served model encodes {kind} items")
        results = await asyncio.gather(*(self._encode(m, k, [data]) for m, k in direct))
        vectors = {f"{m}.{k}": _first(r, kind)["vector"] for (m, k), r in zip(direct, results, strict=True)}
        transcript = next((_first(r, kind)["info"]["transcript"] for r in results
                           if "transcript" in r[0]["info"]), None)  # fmt: skip
        words = caption if kind == "image" else transcript
        if words and words.strip():
            texts = [m for m, k in pairs if k == "text"]
            encoded = await asyncio.gather(*(self._encode(m, "text", [words]) for m in texts))
            vectors |= {f"{m}.text": _first(r, "caption")["vector"] for m, r in zip(texts, encoded, strict=True)}
        item = NewItem(data=data, kind=kind, media_type=media_type, vectors=vectors, source_uri=source_uri,
                       filename=filename, caption=caption, transcript=transcript, meta=_parse_meta(meta))  # fmt: skip
        try:
            item_id = await self.catalog.add.remote(item)
        except (StoreError, ObjectStoreError) as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from exc
        self.metrics.requests.labels("/items", "201").inc()
        stored = await self.catalog.get.remote(item_id)
        return JSONResponse({"id": item_id, "vectors": sorted(vectors), "payload": stored["payload"],
                             "url": _mounted(request, stored["url"])}, 201)  # fmt: skip

    @app.get("/items/{item_id}")
    async def get_item(self, item_id: str, request: Request) -> JSONResponse:
        stored = await self.catalog.get.remote(item_id)
        if stored is None:
            raise ApiError(404, "item_not_found", f"no item {item_id!r}")
        return JSONResponse({"id": stored["id"], "payload": stored["payload"], "url": _mounted(request, stored["url"])})

    @app.delete("/items/{item_id}")
    async def delete_item(self, item_id: str) -> JSONResponse:
        if not await self.catalog.delete.remote(item_id):
            raise ApiError(404, "item_not_found", f"no item {item_id!r}")
        return JSONResponse({"id": item_id, "deleted": True})

    @app.post("/ingest", status_code=202)
    async def ingest(self, body: IngestRequest, request: Request) -> JSONResponse:
        """Starts a bulk job in the background; poll GET /jobs/{id}. The same source and models
        are the same job: posting it again while it runs answers the running one."""
        served = [m.name for m in self.config.models]
        unknown = sorted(set(body.models or []) - set(served))
        if unknown:
            raise ApiError(422, "model_not_found", f"models not served here: {unknown}; served: {served}")
        await self._open_catalog()
        started = await self.catalog.start_job.remote(body.source, body.models or served, body.sync)
        if "forbidden" in started:
            raise ApiError(403, "path_forbidden", started["forbidden"])
        if "busy" in started:
            raise ApiError(429, "too_many_jobs", f"{started['busy']} bulk jobs are running; the limit is "
                           "MMEMBED_MAX_CONCURRENT_JOBS", {"Retry-After": "30"})  # fmt: skip
        job_id = started["id"]
        return JSONResponse({"id": job_id, "status_url": _mounted(request, f"/jobs/{job_id}")}, 202)

    @app.get("/jobs")
    async def list_jobs(self) -> JSONResponse:
        return JSONResponse({"data": await self.catalog.list_jobs.remote()})

    @app.get("/jobs/{job_id}")
    async def get_job(self, job_id: str) -> JSONResponse:
        job = await self.catalog.job.remote(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {job_id!r}")
        return JSONResponse(job)

    @app.get("/jobs/{job_id}/dead-letters")
    async def get_dead_letters(self, job_id: str) -> JSONResponse:
        """The job's items that failed past their retries, with the reason (`mmembed dlq list` on the server)."""
        if await self.catalog.job.remote(job_id) is None:
            raise ApiError(404, "job_not_found", f"no job {job_id!r}")
        return JSONResponse({"data": await self.catalog.dead_letters.remote(job_id)})

    @app.get("/objects/{key:path}")
    async def get_object(self, key: str) -> FileResponse:
        """Objects of the local store (an S3 store gives its own URLs)."""
        if not isinstance(self.objects, LocalObjects):
            raise ApiError(404, "not_found", "objects are served by the S3 store here")
        try:
            path = self.objects.path_for(key)
        except ObjectStoreError as exc:  # an escaping key: say nothing about the server's folders
            raise ApiError(404, "not_found", f"no object {key!r}") from exc
        if not path.is_file():
            raise ApiError(404, "not_found", f"no object {key!r}")
        return FileResponse(path)

    @app.get("/catalog")
    async def catalog_info(self) -> JSONResponse:
        """What the search page needs: the vectors, which queries each takes, the item count."""
        described, vectors = await self._described(), await self._open_catalog()
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
        return JSONResponse({"count": await self.catalog.count.remote(), "vectors": searchable,
                             "default_vector": default_vector(described, vectors),
                             "models": [m.name for m in self.config.models],
                             "dashboard_url": self.config.dashboard_url})  # fmt: skip

    # --- the search page -----------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        """The search page; its links are relative to where the app is mounted."""
        return HTMLResponse(UI_FILES["index.html"].read_text().replace("{{BASE}}", _mounted(request, "/")))

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI from /ui/; no validator badge, which would be fetched from validator.swagger.io."""
        base = _mounted(request, "/")
        return get_swagger_ui_html(openapi_url=f"{base}openapi.json", title="mmembed API",
                                   swagger_js_url=f"{base}ui/swagger-ui-bundle.js",
                                   swagger_css_url=f"{base}ui/swagger-ui.css",
                                   swagger_favicon_url=f"{base}ui/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # fmt: skip

    @app.get("/ui/{name}", include_in_schema=False)
    async def page_file(self, name: str) -> FileResponse:
        if name not in UI_FILES:
            raise ApiError(404, "not_found", f"no file {name!r}")
        return FileResponse(UI_FILES[name])

    # --- operations --------------------------------------------------------------------

    @app.get("/models")
    async def models(self) -> dict[str, Any]:
        out = []
        for spec in self.config.models:
            described = await self._describe(spec.name)
            for modality, enc in described["encoders"].items():
                out.append({"model": spec.name, "name": enc["name"], "modality": modality, "dim": enc["dim"],
                            "limits": {k: v for k, v in enc["limits"].items() if v is not None},
                            "device": described["device"],
                            "replicas": {"min": spec.min_replicas, "max": spec.max_replicas}})  # fmt: skip
        return {"data": out}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(asyncio.gather(*(self._describe(m) for m in self.encoders)), timeout=5)
        except Exception as exc:  # any model not answering (or timing out) means not ready
            return JSONResponse({"status": "not_ready", "reason": f"{type(exc).__name__}: {exc}"}, 503)
        return JSONResponse({"status": "ready", "models": sorted(self.encoders)})

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        jobs = CollectorRegistry()  # job figures live in the catalogue replica: read them per scrape
        items = Gauge("mmembed_job_items", "Items of a bulk job by state", ("job", "state"), registry=jobs)
        progress = Gauge("mmembed_job_progress", "Share of a bulk job's items finished", ("job",), registry=jobs)
        for job in await self.catalog.list_jobs.remote():
            progress.labels(job["id"]).set(job["progress"])
            for state, count in job["items"].items():
                items.labels(job["id"], state).set(count)
        body = generate_latest(self.metrics.registry) + generate_latest(jobs)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

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
import re
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from loaders.fetch import FetchError, FetchLimits, fetch
from serve.config import ServeConfig

app = FastAPI(title="mmembed", description="Multi-modal embeddings: text, images and audio.")
DATA_URI = re.compile(r"^data:(?P<kind>image|audio)/[\w.+-]+;base64,(?P<data>.*)$", re.DOTALL)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status, headers=exc.headers)


@app.middleware("http")
async def _body_limit(request: Request, call_next):  # type: ignore[no-untyped-def]
    limit = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length")
    if limit and length and length.isdigit() and int(length) > limit:
        message = f"request body is {length} bytes; the limit is {limit}"
        return JSONResponse({"error": {"code": "body_too_large", "message": message}}, 413)
    return await call_next(request)


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


class Metrics:
    """Per-ingress-replica Prometheus metrics, labelled by model and modality."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "modality")
        self.requests = Counter("mmembed_requests", "Encode requests", ("endpoint", "status"), registry=self.registry)
        self.items = Counter("mmembed_items", "Items encoded", labels, registry=self.registry)
        self.errors = Counter("mmembed_item_errors", "Items refused", (*labels, "code"), registry=self.registry)
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


def _public_info(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("queue_ms", "encode_ms")} | {
        "queue_ms": round(info.get("queue_ms", 0.0), 2), "encode_ms": round(info.get("encode_ms", 0.0), 2)}  # fmt: skip


@serve.deployment(name="ingress", max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, encoders: dict[str, DeploymentHandle], config: dict[str, Any]) -> None:
        self.encoders, self.config = encoders, ServeConfig.model_validate(config)
        app.state.max_body_bytes = self.config.max_body_bytes
        self.fetch_limits = FetchLimits(max_bytes=self.config.max_body_bytes)
        self.metrics = Metrics()
        self.described: dict[str, dict[str, Any]] = {}

    async def _describe(self, model: str) -> dict[str, Any]:
        if model not in self.described:
            self.described[model] = await self._call(model, "describe")
        return self.described[model]

    async def _call(self, model: str, method: str, *args: Any) -> Any:
        """Every call into a model deployment: a full queue there is a 429, not a 503 page."""
        try:
            return await getattr(self._handle(model), method).remote(*args)
        except BackPressureError as exc:
            retry = str(self.config.retry_after_s)
            raise ApiError(429, "overloaded", f"model {model!r} is at capacity; retry", {"Retry-After": retry}) from exc

    def _handle(self, model: str) -> DeploymentHandle:
        if model not in self.encoders:
            raise ApiError(
                404, "model_not_found", f"model {model!r} is not served here; served: {sorted(self.encoders)}"
            )
        return self.encoders[model]

    async def _encode(self, model: str, modality: str, items: list[Any]) -> list[dict[str, Any]]:
        if len(items) > self.config.max_items_per_request:
            raise ApiError(413, "too_many_items", f"{len(items)} items; at most {self.config.max_items_per_request}")
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
                    raise ApiError(422, r["error"]["code"], f"input[{index}] ({modality}): {r['error']['message']}")
                tokens += int(r["info"].get("tokens", 0))
                data[index] = {"object": "embedding", "index": index, "embedding": _format(r["vector"], body)}
        self.metrics.requests.labels("/v1/embeddings", "200").inc()
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    # --- native ---------------------------------------------------------------------------

    @app.post("/encode/text")
    async def encode_text(self, body: EncodeTextRequest) -> dict[str, Any]:
        return self._native(body.model, "text", await self._encode(body.model, "text", body.texts))

    @app.post("/encode/image")
    async def encode_image(self, body: EncodeMediaRequest) -> dict[str, Any]:
        return self._native(body.model, "image", await self._encode_media(body.model, "image", body.items))

    @app.post("/encode/image/upload")
    async def encode_image_upload(self, model: str, files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
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

    def _native(self, model: str, modality: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Good items come back even when others fail; a request where every item failed is a 422."""
        out = [
            {"index": i, "embedding": None if r["vector"] is None else np.asarray(r["vector"]).tolist(),
             "error": r["error"], "info": _public_info(r["info"])}
            for i, r in enumerate(results)
        ]  # fmt: skip
        if all(r["error"] is not None for r in results):
            first = results[0]["error"]
            raise ApiError(422, first["code"], f"every item failed; items[0]: {first['message']}")
        self.metrics.requests.labels(f"/encode/{modality}", "200").inc()
        return {"model": model, "modality": modality, "data": out}

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
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

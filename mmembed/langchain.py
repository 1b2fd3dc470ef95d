"""LangChain over an mmembed server (``pip install mmembed[langchain]``).

- ``MmembedEmbeddings``: LangChain's ``Embeddings`` for texts, plus ``embed_image`` for image
  files and URLs (the signature of langchain-experimental's ``OpenCLIPEmbeddings``), so one
  object embeds both sides of a CLIP space.
- ``MmembedByteStore``: a LangChain ``ByteStore`` over mmembed's embedding cache (the same Redis
  or SQLite the server uses), keyed as the server keys it. ``CacheBackedEmbeddings`` over it and
  the server answer from the same entries: a text the server has embedded is a hit for
  LangChain, and one LangChain stored is a hit for the server.

    store = MmembedByteStore.for_server("http://127.0.0.1:8000", "demo-clip", "redis://cache:6379/0")
    embeddings = CacheBackedEmbeddings.from_bytes_store(
        MmembedEmbeddings("demo-clip"), store, key_encoder=store.key_encoder, query_embedding_cache=store
    )
"""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
from langchain_core.embeddings import Embeddings
from langchain_core.stores import ByteStore

from mmembed.store.cache import EmbeddingCache, cache_key, open_cache
from mmembed.store.config import CacheConfig

REQUEST_INPUTS = 2048  # the server's default max_items_per_request, OpenAI's own limit


class MmembedEmbeddings(Embeddings):
    """Texts and images through ``/v1/embeddings``; a refused input raises with the server's
    error code and message (``httpx.HTTPStatusError``)."""

    def __init__(
        self, model: str, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120
    ) -> None:
        self.model, self.base_url = model, base_url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts, "text")

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text], "text")[0]

    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """Image files (read here and sent as data URIs) or http(s) URLs (the server fetches them)."""
        return self._embed([_image_input(uri) for uri in uris], "image")

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout) as client:
            for body in self._bodies(texts, "text"):
                vectors += _vectors(await client.post("/v1/embeddings", json=body))
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]

    def _embed(self, inputs: list[str], modality: str) -> list[list[float]]:
        vectors: list[list[float]] = []
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout) as client:
            for body in self._bodies(inputs, modality):
                vectors += _vectors(client.post("/v1/embeddings", json=body))
        return vectors

    def _bodies(self, inputs: list[str], modality: str) -> Iterator[dict[str, object]]:
        for start in range(0, len(inputs), REQUEST_INPUTS):
            chunk = inputs[start : start + REQUEST_INPUTS]
            yield {"model": self.model, "input": chunk, "modality": modality, "encoding_format": "float"}


def _image_input(uri: str) -> str:
    if uri.startswith(("http://", "https://", "data:")):
        return uri
    path = Path(uri).expanduser()
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"  # the server sniffs the bytes
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _vectors(response: httpx.Response) -> list[list[float]]:
    if response.status_code != 200:
        error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
        message = f"{error.get('code', response.status_code)}: {error.get('message', response.text[:300])}"
        raise httpx.HTTPStatusError(message, request=response.request, response=response)
    return [d["embedding"] for d in sorted(response.json()["data"], key=lambda d: d["index"])]


class MmembedByteStore(ByteStore):
    """Values are LangChain's serialisation of a vector (JSON of the floats); entries are stored
    as mmembed stores them, so either side reads what the other wrote. Keys come from
    ``key_encoder``, which must be handed to ``CacheBackedEmbeddings``: a key is the server's
    own cache key of (text, model, weights version), which LangChain's default keys are not."""

    def __init__(self, cache: EmbeddingCache, model: str, version: str) -> None:
        self.cache, self.model, self.version = cache, model, version

    @classmethod
    def for_server(cls, base_url: str, model: str, cache_url: str, api_key: str | None = None) -> MmembedByteStore:
        """The store over ``cache_url`` (the server's ``MMEMBED_CACHE_URL``) for ``model`` as the
        server at ``base_url`` runs it: its weights version is part of every key."""
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        rows = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=30).raise_for_status().json()
        versions = {r["version"] for r in rows["data"] if r["model"] == model}
        if len(versions) != 1:
            raise ValueError(f"model {model!r} is not served at {base_url}")
        if cache_url in ("off", "sqlite"):  # "sqlite" alone is a file in the server's data directory
            raise ValueError(f"cache_url {cache_url!r}: name the server's cache, redis://... or sqlite:///PATH")
        cache = open_cache(CacheConfig(url=cache_url, sqlite_path=Path(cache_url.removeprefix("sqlite://"))))
        assert cache is not None
        return cls(cache, model, versions.pop())

    def key_encoder(self, text: str) -> str:
        return cache_key(text, self.model, self.version)

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        found = self.cache.get_many(self.model, keys)
        return [json.dumps(found[k].tolist()).encode() if k in found else None for k in keys]

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        self.cache.put_many(self.model, {k: np.asarray(json.loads(v), dtype=np.float32) for k, v in key_value_pairs})

    def mdelete(self, keys: Sequence[str]) -> None:
        raise NotImplementedError("entries leave mmembed's cache by its TTL and size limits, not one by one")

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        raise NotImplementedError("mmembed's cache is keyed by hashes: there is nothing to list by prefix")

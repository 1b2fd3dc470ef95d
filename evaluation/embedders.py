"""What an evaluation runs a model through: in this process (``LocalEmbedder``), or over HTTP
against a running mmembed server (``HttpEmbedder``), so the figures are what users get.

Both return unit vectors in input order and a zero vector for an item that failed (it then
ranks last, and the failure is counted), so one bad file never stops an evaluation.
"""

from __future__ import annotations

import base64
from typing import Protocol

import httpx
import numpy as np

from mmembed.config import Settings
from mmembed.contracts import Query
from mmembed.encoders import Modality, load
from mmembed.loaders.images import ImageDecodeError, decode_image


class Embedder(Protocol):
    name: str
    modalities: set[str]
    dim: int

    def embed(self, modality: str, contents: list[bytes | str]) -> tuple[np.ndarray, int]:
        """(vectors, how many items failed)."""
        ...


class LocalEmbedder:
    def __init__(self, model: str, settings: Settings) -> None:
        self.loaded = load(model, settings.models_config())
        self.name = model
        self.modalities = {str(m) for m in self.loaded.encoders}
        self.dim = next(iter(self.loaded.encoders.values())).dim

    def embed(self, modality: str, contents: list[bytes | str]) -> tuple[np.ndarray, int]:
        encoder = self.loaded.encoder(modality)
        items: list = []
        for c in contents:
            if modality == Modality.IMAGE:
                try:
                    items.append(decode_image(c))  # type: ignore[arg-type]
                except ImageDecodeError:
                    items.append(None)
            else:
                items.append(c)
        results = encoder.encode_items([i for i in items if i is not None])
        out, failed, it = np.zeros((len(contents), encoder.dim), np.float32), 0, iter(results)
        for row, item in enumerate(items):
            result = next(it) if item is not None else None
            if result is None or not result.ok:
                failed += 1
            else:
                out[row] = result.vector
        return out, failed


class HttpEmbedder:
    def __init__(self, url: str, model: str, timeout: float = 300) -> None:
        self.url, self.name = url.rstrip("/"), model
        self.client = httpx.Client(timeout=timeout)
        served = [
            m for m in self.client.get(f"{self.url}/models").raise_for_status().json()["data"] if m["model"] == model
        ]
        if not served:
            raise ValueError(f"model {model!r} is not served at {url}")
        self.modalities = {m["modality"] for m in served}
        self.dim = served[0]["dim"]

    def embed(self, modality: str, contents: list[bytes | str]) -> tuple[np.ndarray, int]:
        if modality == "text":
            queries = all(isinstance(c, Query) for c in contents)  # the server's search prompts, if any
            body = {"model": self.name, "texts": contents, "input_type": "query" if queries else "document"}
        else:
            body = {"model": self.name, "items": [base64.b64encode(c).decode() for c in contents]}  # type: ignore[arg-type]
        response = self.client.post(f"{self.url}/encode/{modality}", json=body)
        out = np.zeros((len(contents), self.dim), np.float32)
        if response.status_code == 422:  # every item failed
            return out, len(contents)
        data = response.raise_for_status().json()["data"]
        failed = 0
        for row, d in enumerate(data):
            if d["embedding"] is None:
                failed += 1
            else:
                out[row] = d["embedding"]
        return out, failed

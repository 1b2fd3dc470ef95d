"""One catalogue item through every model that gives it a vector: ``ItemEmbedder``.

An image, audio or text item goes through each model native to its kind (``store.spaces``),
which may answer a transcript too; then an image's caption or a recording's transcript goes
through every text tower. What comes out is the item's named vectors (``model.modality``, the names the
catalogue stores) with its transcript, or why it failed (``ItemOutcome``).

The models are reached through ``Encoders``, one call per model and modality for a whole batch
of items, so the same code runs over models in this process (``LocalEncoders``: the bulk
engines) and over the encoder deployments (``POST /items`` through the HTTP layer's limits and
metrics, server jobs through their handles), where a job's items share batches with requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mmembed.contracts import EncodedItem, ItemError, ItemOutcome, ItemVectors, ModelInfo
from mmembed.embedding.model import Media, ModelStep
from mmembed.store.catalog import vector_name
from mmembed.store.spaces import item_encoders

# A failed caption or transcript fails its item only when retrying later may help: the provider behind
# a remote model failed. Otherwise (too many tokens, say) the item is stored without that text vector.
RETRYABLE_TEXT = frozenset({"provider_failed"})


class Encoders(Protocol):
    async def encode(self, model: str, modality: str, inputs: list[Any]) -> list[EncodedItem]:
        """Per-item results in input order; text inputs are strings, media ``bytes`` or ``Media``."""
        ...


@dataclass(frozen=True)
class Item:
    """An item ready to embed. ``content``: its bytes, decoded and preprocessed next to each model, or
    what a job's worker already preprocessed for each model, by model name."""

    kind: str  # "image" | "audio" | "text"
    content: bytes | Mapping[str, Media]
    caption: str | None = None  # an image's caption, embedded by every text tower

    def input(self, model: str) -> str | bytes | Media:
        if isinstance(self.content, bytes):
            return self.content.decode("utf-8") if self.kind == "text" else self.content
        return self.content[model]


class ItemEmbedder:
    """``described``: the models to run, by the names their vectors take. ``strict_text``: any failed
    caption or transcript fails its item (the API tells its client at once, where a job stores the
    item without that vector and fails it only for ``RETRYABLE_TEXT``)."""

    def __init__(self, described: Mapping[str, ModelInfo], encoders: Encoders, strict_text: bool = False) -> None:
        self.described, self.encoders, self.strict_text = dict(described), encoders, strict_text

    async def embed(self, items: Sequence[Item | ItemError]) -> list[ItemOutcome]:
        """One outcome per item, in order; an ``ItemError`` given (a read that failed) is passed on."""
        out: list[ItemOutcome] = [i if isinstance(i, ItemError) else ItemVectors() for i in items]
        for kind in ("image", "audio", "text"):
            await self._direct(kind, items, out)
        await self._texts(items, out)
        return out

    async def _direct(self, kind: str, items: Sequence[Item | ItemError], out: list[ItemOutcome]) -> None:
        rows = [(n, i) for n, i in enumerate(items) if isinstance(i, Item) and i.kind == kind]
        if not rows:
            return
        models = [m for m, k in item_encoders(self.described, kind) if k == kind]
        if not models:
            for n, _ in rows:
                out[n] = ItemError("unsupported_kind", f"no model here encodes {kind} items")
            return
        answers = await asyncio.gather(*(self.encoders.encode(m, kind, [i.input(m) for _, i in rows]) for m in models))
        for model, results in zip(models, answers, strict=True):  # in model order: the first failure names the item's
            for (n, _), r in zip(rows, results, strict=True):
                outcome = out[n]
                if not isinstance(outcome, ItemVectors):
                    continue
                if r.error is not None:
                    out[n] = ItemError(r.error.code or "encode_error", f"{model}: {r.error.message}")
                    continue
                assert r.vector is not None
                outcome.vectors[vector_name(model, kind)] = r.vector
                outcome.versions[model] = self.described[model].version
                if outcome.transcript is None and r.transcript is not None:
                    outcome.transcript = r.transcript

    async def _texts(self, items: Sequence[Item | ItemError], out: list[ItemOutcome]) -> None:
        """Captions (images) and transcripts (audio) through every text tower, one call per tower a batch."""
        rows: list[tuple[int, str, str]] = []
        for n, item in enumerate(items):
            outcome = out[n]
            if isinstance(item, Item) and item.kind != "text" and isinstance(outcome, ItemVectors):
                what, words = ("caption", item.caption) if item.kind == "image" else ("transcript", outcome.transcript)
                if words and words.strip():
                    rows.append((n, what, words))
        models = [m for m, info in self.described.items() if info.native("text")] if rows else []
        answers = await asyncio.gather(*(self.encoders.encode(m, "text", [w for _, _, w in rows]) for m in models))
        for model, results in zip(models, answers, strict=True):
            for (n, what, _), r in zip(rows, results, strict=True):
                outcome = out[n]
                if not isinstance(outcome, ItemVectors):
                    continue
                if r.error is None:
                    assert r.vector is not None
                    outcome.vectors[vector_name(model, "text")] = r.vector
                    outcome.versions[model] = self.described[model].version
                elif self.strict_text or r.error.code in RETRYABLE_TEXT:
                    out[n] = ItemError(r.error.code, f"{model}: {what}: {r.error.message}")


class LocalEncoders:
    """``Encoders`` over models loaded in this process: each model's step with its forward pass called here."""

    def __init__(self, steps: Mapping[str, ModelStep]) -> None:
        self.steps = dict(steps)

    async def encode(self, model: str, modality: str, inputs: list[Any]) -> list[EncodedItem]:
        step = self.steps[model]
        return await step.encode(modality, inputs, step.forward)

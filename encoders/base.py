"""The one interface every encoder implements, and the typed per-item errors.

An encoder is split in two on purpose: ``preprocess`` is CPU work on one item (decode,
resize, tokenise) that can run in DataLoader workers or another process, and
``encode`` turns a ready batch into vectors on the accelerator. Serving and bulk jobs
schedule the two halves separately so the GPU never waits for a JPEG decoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

import numpy as np


class Modality(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


class EncoderError(Exception):
    """Base of all errors the encoders raise on purpose; ``code`` is stable for APIs."""

    code = "encoder_error"


class InputError(EncoderError):
    """One item cannot be encoded. Raised per item, so the rest of a batch survives."""

    code = "invalid_input"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.code


class EmptyInput(InputError):
    code = "empty_input"


class TooManyTokens(InputError):
    code = "too_many_tokens"

    def __init__(self, tokens: int, limit: int, model: str) -> None:
        super().__init__(
            f"text has {tokens} tokens but {model} accepts at most {limit} (start/end tokens included); "
            "shorten it or use token_policy='truncate'"
        )
        self.tokens, self.limit = tokens, limit


class ModelNotAvailable(EncoderError):
    """The model's weights are not in the models directory and cannot be fetched."""

    code = "model_not_available"


class UnknownModel(EncoderError):
    code = "unknown_model"


@dataclass(frozen=True)
class Limits:
    """What one item may be. ``max_tokens`` counts start/end tokens; ``image_size`` is the
    square side the model sees; ``max_pixels`` caps decoded images before resizing;
    ``max_seconds`` caps audio clips."""

    max_tokens: int | None = None
    image_size: int | None = None
    max_pixels: int | None = None
    max_seconds: float | None = None


@dataclass
class Prepared:
    """One preprocessed item: ``data`` is whatever the encoder's batch step stacks
    (a uint8 CHW tensor for images, token ids for text). ``info`` travels back to the
    caller with the vector (e.g. how many tokens were dropped by truncation)."""

    data: Any
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemResult:
    vector: np.ndarray | None = None
    error: InputError | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


T = TypeVar("T")


class Encoder(ABC, Generic[T]):
    """Encodes items of one modality into L2-normalised float32 vectors of size ``dim``."""

    model: str  # registry name, e.g. "demo-clip"
    modality: Modality
    dim: int
    limits: Limits

    @property
    def name(self) -> str:
        """Stable name of this vector space, e.g. ``demo-clip.image``."""
        return f"{self.model}.{self.modality}"

    @abstractmethod
    def preprocess(self, item: T) -> Prepared:
        """CPU work on one raw item; raises InputError for a bad item."""

    @abstractmethod
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        """Vectors for a batch of prepared items, shape (len(batch), dim), float32, unit norm."""

    def encode_prepared(self, batch: Sequence[Prepared]) -> list[ItemResult]:
        """``encode`` as per-item results. Encoders whose forward pass can still reject one
        item (speech with no words in it) override this; the others need not."""
        return [ItemResult(vec, info=p.info) for p, vec in zip(batch, self.encode(batch), strict=True)]

    def encode_items(self, items: Sequence[T]) -> list[ItemResult]:
        """Preprocess each item, encode the good ones as one batch; bad items come back
        with their error and never fail the others."""
        results = [ItemResult() for _ in items]
        good: list[tuple[int, Prepared]] = []
        for i, item in enumerate(items):
            try:
                good.append((i, self.preprocess(item)))
            except InputError as exc:
                results[i].error = exc
        if good:
            for (i, _), result in zip(good, self.encode_prepared([p for _, p in good]), strict=True):
                results[i] = result
        return results


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)

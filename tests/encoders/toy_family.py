"""A whole model family in one file: a deterministic text encoder with no weights (hashed
character trigrams), its table row, and the names it answers to. docs/architecture.md ("Adding a model family")
walks through this file."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmembed.encoders import Encoder, Family, Modality, ModelsConfig, ModelSpec, Prepared, register_family
from mmembed.encoders.base import EmptyInput, Limits, l2_normalise


class TrigramText(Encoder[str]):
    modality = Modality.TEXT

    def __init__(self, model: str, dim: int) -> None:
        self.model, self.dim, self.limits = model, dim, Limits()

    def preprocess(self, item: str) -> Prepared:
        if not item.strip():
            raise EmptyInput("text is empty")
        return Prepared(f"  {item.lower()} ")

    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        out = np.zeros((len(batch), self.dim), dtype=np.float32)
        for row, prepared in enumerate(batch):
            text = prepared.data
            for i in range(len(text) - 2):
                out[row, zlib.crc32(text[i : i + 3].encode()) % self.dim] += 1.0
        return l2_normalise(out)


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    return {Modality.TEXT: TrigramText(spec.name, spec.dim or 256)}


def names(name: str, config: ModelsConfig) -> ModelSpec | None:
    """``trigram:DIM``, e.g. ``trigram:64``."""
    if m := re.fullmatch(r"trigram:(\d+)", name):
        return ModelSpec(name, "trigram", "random", "", dim=int(m[1]), modalities=(Modality.TEXT,))
    return None


FAMILY = register_family(Family("trigram", load=load_model, names=names))

"""Embed every image in a folder: the first, local form of a bulk catalogue job.

Decoding and preprocessing run in DataLoader worker processes, so the process that
drives the model only stacks uint8 batches and runs forward passes. A file that fails to
decode is recorded with its error code and never stops the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mmembed.encoders import Encoder, InputError, Prepared
from mmembed.loaders.images import DecodeLimits, ImageDecodeError, decode_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass
class Decoded:
    index: int
    prepared: Prepared | None
    error: str | None


class ImageFiles(Dataset[Decoded]):
    def __init__(self, files: list[Path], encoder: Encoder, limits: DecodeLimits) -> None:
        self.files, self.encoder, self.limits = files, encoder, limits

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Decoded:
        try:
            image = decode_image(self.files[index].read_bytes(), self.limits)
            return Decoded(index, self.encoder.preprocess(image), None)
        except (ImageDecodeError, InputError, OSError) as exc:
            code = getattr(exc, "code", "read_error")
            return Decoded(index, None, f"{code}: {exc}")


@dataclass
class EmbedSummary:
    files: int
    embedded: int
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    dim: int = 0
    out_dir: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


def embed_folder(
    folder: Path,
    encoder: Encoder,
    out_dir: Path,
    limits: DecodeLimits | None = None,
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
) -> EmbedSummary:
    """Writes ``vectors.npy`` (float32, one row per embedded file) and ``items.jsonl``
    (path and row of every file, or its error) under ``out_dir``."""
    files = list_images(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        ImageFiles(files, encoder, limits or DecodeLimits()),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
        prefetch_factor=4 if workers else None,
    )
    started = time.perf_counter()
    vectors: list[np.ndarray] = []
    summary = EmbedSummary(files=len(files), embedded=0, dim=encoder.dim, out_dir=out_dir)
    with (out_dir / "items.jsonl").open("w") as items, tqdm(total=len(files), disable=not progress, unit="img") as bar:
        for batch in loader:
            good = [d for d in batch if d.prepared is not None]
            if good:
                vectors.append(encoder.encode([d.prepared for d in good]))  # type: ignore[misc]
            for d in batch:
                record = {"path": str(files[d.index].relative_to(folder))}
                if d.error:
                    summary.failed[record["path"]] = d.error
                    record["error"] = d.error
                else:
                    record["row"] = summary.embedded
                    summary.embedded += 1
                items.write(json.dumps(record) + "\n")
            bar.update(len(batch))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)
    np.save(out_dir / "vectors.npy", matrix.astype(np.float32))
    summary.seconds = time.perf_counter() - started
    return summary

"""The demo world on disk: rendered scene files for the quick start and the tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmembed.demo import world

if TYPE_CHECKING:  # importing encoders loads torch: seconds, for a type hint
    from mmembed.encoders import Encoder


def write_scenes(out: Path, count: int, seed: int = 7, size: int = 256) -> int:
    """JPEG scenes plus captions.jsonl ({"file", "caption", "objects"}) as ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (out / "captions.jsonl").open("w") as captions:
        for i in range(count):
            scene = world.random_scene(rng)
            name = f"scene-{i:04d}.jpg"
            world.render(scene, rng, size=size).save(out / name, quality=90)
            objects = [vars(o) for o in scene.objects]
            captions.write(json.dumps({"file": name, "caption": scene.caption(), "objects": objects}) + "\n")
    return count


def top_matches(text_encoder: Encoder, query: str, embed_dir: Path, k: int = 3) -> list[tuple[str, float]]:
    """Brute-force search over an `mmembed embed` output folder."""
    vectors = np.load(embed_dir / "vectors.npy")
    rows = [json.loads(line) for line in (embed_dir / "items.jsonl").read_text().splitlines()]
    paths = {r["row"]: r["path"] for r in rows if "row" in r}
    [result] = text_encoder.encode_items([query])
    if result.vector is None:
        raise result.error or ValueError("query could not be encoded")
    scores = vectors @ result.vector
    return [(paths[i], float(scores[i])) for i in np.argsort(-scores)[:k]]

"""The demo world on disk: rendered scene files for the quick start and the tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mmembed.demo import world


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

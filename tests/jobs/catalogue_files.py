"""The bulk-job tests' source: rendered scenes and one corrupt file behind a JSONL manifest."""

from __future__ import annotations

import json
from pathlib import Path

from mmembed.demo import world

SCENES = 10


def write_catalogue(folder: Path) -> Path:
    """Ten scenes and one corrupt file, with a JSONL manifest carrying captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (scene, image) in enumerate(world.eval_set(SCENES, seed=21)):
        image.save(folder / f"scene-{n}.png")
        rows.append({"uri": f"scene-{n}.png", "caption": scene.caption(), "shop": "north" if n % 2 else "south"})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows.append({"uri": "broken.png"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest

"""The bulk-job tests' source (rendered scenes and one corrupt file behind a JSONL manifest) and settings."""

from __future__ import annotations

import json
from pathlib import Path

from mmembed.config import Settings
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


def job_settings(settings: Settings, data_dir: Path, collection: str) -> Settings:
    """A job's own data folder and collection, with the session's models: a copy per test (104 MB)
    would crowd CI's small disk."""
    update = {"data_dir": data_dir, "models_dir": settings.models_path, "collection": collection}
    return settings.model_copy(update=update)

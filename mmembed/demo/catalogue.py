"""The quick start's demo catalogue on disk: rendered scenes, the photos that ship with
scikit-image, and spoken clips, listed in one JSONL manifest that ``mmembed ingest`` and
``POST /ingest`` read.

The spoken clips ship with the package (espeak-ng recordings), so building the catalogue
needs no speech synthesiser on the user's machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from mmembed.demo.files import write_scenes

# scikit-image's sample photos (they ship in its wheel) and what each shows.
PHOTOS = {
    "astronaut.png": "an astronaut in a spacesuit with a flag",
    "coffee.png": "a cup of coffee on a saucer",
    "chelsea.png": "a tabby cat",
    "rocket.jpg": "a rocket on the launch pad",
    "hubble_deep_field.jpg": "galaxies in deep space",
    "camera.png": "a man with a camera on a tripod",
    "coins.png": "old coins on a table",
    "motorcycle_left.png": "a motorcycle in a workshop",
    "moon.png": "the surface of the moon",
    "retina.jpg": "the retina of an eye",
}
CLIPS = {  # what each shipped clip says
    "red-circle.flac": "a red circle",
    "blue-square.flac": "a blue square",
    "green-triangle.flac": "a large green triangle",
    "yellow-star.flac": "a big yellow star",
    "purple-cross.flac": "a small purple cross",
}
MANIFEST = "catalogue.jsonl"


def build_demo_catalogue(out: Path, scenes: int = 60) -> Path:
    """Write the files and their manifest into ``out``; answers the manifest's path.
    Rewriting the same files keeps their bytes, so a rerun ingests nothing new."""
    rows: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as rendered:  # the same seed renders the same bytes
        write_scenes(Path(rendered), scenes)
        (out / "scenes").mkdir(parents=True, exist_ok=True)
        for file in Path(rendered).iterdir():
            _copy(file, out / "scenes" / file.name)
    for line in (out / "scenes" / "captions.jsonl").read_text().splitlines():
        scene = json.loads(line)
        rows.append({"uri": f"scenes/{scene['file']}", "caption": scene["caption"], "collection": "scenes"})
    photos = resources.files("skimage.data")
    (out / "photos").mkdir(parents=True, exist_ok=True)
    for name, caption in PHOTOS.items():
        with resources.as_file(photos / name) as source:
            _copy(source, out / "photos" / name)
        rows.append({"uri": f"photos/{name}", "caption": caption, "collection": "photos"})
    clips = resources.files("mmembed.demo") / "clips"
    (out / "speech").mkdir(parents=True, exist_ok=True)
    for name, said in CLIPS.items():
        with resources.as_file(clips / name) as source:
            _copy(source, out / "speech" / name)
        rows.append({"uri": f"speech/{name}", "kind": "audio", "said": said, "collection": "speech"})
    manifest = out / MANIFEST
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def _copy(source: Path, target: Path) -> None:
    """Leaves an identical file alone: a new mtime would make an incremental run reread it."""
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)

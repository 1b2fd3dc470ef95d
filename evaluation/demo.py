"""The shipped example: the demo world as an evaluation set the way a user would bring one
(a folder of images, a manifest with captions, a queries file with relevant ids)."""

from __future__ import annotations

import random
from pathlib import Path

from mmembed.demo import world
from mmembed.evaluation.dataset import EvalSet, Item, Query, write_eval_set

DEMO_MODELS = ("demo-clip", "ViT-B-32@random", "all-MiniLM-L6-v2")
DEMO_FUSED = ("demo-clip+all-MiniLM-L6-v2",)  # the pictures and their captions, fused as POST /search does


def build_demo_set(
    out: Path, items: int = 300, text_queries: int = 100, image_queries: int = 50, seed: int = 2024
) -> tuple[Path, Path]:
    """Rendered scenes with their captions; typed queries (the caption reworded) and image
    queries (the same scene drawn again); relevant = every scene with the same objects."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    pool = world.eval_set(items, seed=seed)
    catalogue = []
    for n, (scene, image) in enumerate(pool):
        path = images / f"scene-{n:04d}.png"
        image.save(path)
        catalogue.append(Item(f"scene-{n:04d}", "image", str(path), scene.caption()))
    rng = random.Random(seed)
    same = {}
    for item, (scene, _) in zip(catalogue, pool, strict=True):
        same.setdefault(scene.signature, set()).add(item.id)
    queries = []
    for n in rng.sample(range(items), text_queries):
        scene = pool[n][0]
        text = world.render_query(world.full_query(scene), rng)
        queries.append(Query(f"text-{n:04d}", "text", text, same[scene.signature]))
    redrawn = out / "queries"
    redrawn.mkdir(exist_ok=True)
    for n in rng.sample(range(items), image_queries):
        scene = pool[n][0]
        path = redrawn / f"redrawn-{n:04d}.png"
        world.render(scene, rng).save(path)
        queries.append(Query(f"image-{n:04d}", "image", str(path), same[scene.signature]))
    items_path, queries_path = out / "items.jsonl", out / "queries.jsonl"
    write_eval_set(EvalSet(catalogue, queries), items_path, queries_path)
    return items_path, queries_path

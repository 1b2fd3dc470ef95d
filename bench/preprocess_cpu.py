"""CPU per image from JPEG bytes to the model's input: mmembed's path against open_clip's own
eval transform (what clip-retrieval's bulk workers run), on the same JPEGs, in one process.

On a GPU this work is what keeps the accelerator fed; on this 2-core CPU it competes with the
forward pass for the cores (docs/benchmarks.md, "Bulk at the raw-forward ceiling"). Both paths
resize the short side to 224 with a bicubic filter and centre-crop; mmembed stops at uint8 (the
scaling and normalisation run on the device), open_clip goes on to a normalised float tensor.
Reported: CPU ms per image (process time, single thread, best of ``--rounds``), the ratio, and
how far mmembed's pixels are from Pillow's resize of the same decoded image.

    python bench/preprocess_cpu.py [--rounds 3] [--out bench/results/preprocess_cpu.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from mmembed.demo import world
from mmembed.encoders.clip import square_uint8
from mmembed.loaders.images import DecodeLimits, decode_image

SIDE = 224
LIMITS = DecodeLimits(draft_size=SIDE)  # what Settings.decode_limits gives a 224-px model


def jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    rng = random.Random(size[0])
    out = []
    for _ in range(count):
        image = world.render(world.random_scene(rng), rng, size=max(size)).resize(size)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def cpu_ms(run: Callable[[bytes], object], data: list[bytes], rounds: int) -> float:
    """Process CPU time per image, best of ``rounds`` passes (the host's noise only adds)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for item in data:
            run(item)
        best = min(best, (time.process_time() - started) / len(data) * 1000)
    return best


def pillow_reference(image: Image.Image) -> np.ndarray:
    """Short side to SIDE with Pillow's bicubic, centre crop: the view open_clip's transform takes."""
    w, h = image.size
    scale = SIDE / min(w, h)
    new_w, new_h = max(SIDE, round(w * scale)), max(SIDE, round(h * scale))
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    left, top = (new_w - SIDE) // 2, (new_h - SIDE) // 2
    return resized[top : top + SIDE, left : left + SIDE].transpose(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    transform = open_clip.image_transform(SIDE, is_train=False)

    def mmembed(data: bytes) -> torch.Tensor:
        return square_uint8(decode_image(data, LIMITS), SIDE)

    def peer(data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (SIDE, SIDE))  # the same JPEG draft decode, so the resize is what differs
        return transform(image.convert("RGB"))

    results: dict[str, dict[str, float]] = {}
    for label, size in (("256px", (256, 256)), ("640x480", (640, 480))):
        data = jpegs(args.images, size)
        ours, theirs = cpu_ms(mmembed, data, args.rounds), cpu_ms(peer, data, args.rounds)
        diffs = [
            (mmembed(d).int() - torch.from_numpy(pillow_reference(decode_image(d, LIMITS)).copy()).int()).abs()
            for d in data[:50]
        ]
        results[label] = {
            "mmembed_cpu_ms": round(ours, 3),
            "open_clip_transform_cpu_ms": round(theirs, 3),
            "mmembed_vs_open_clip_time": round(ours / theirs, 2),
            "max_pixel_diff_vs_pillow": int(max(d.max() for d in diffs)),
            "mean_pixel_diff_vs_pillow": round(float(np.mean([d.float().mean() for d in diffs])), 5),
        }
        print(label, json.dumps(results[label]), flush=True)
    report = {
        "benchmark": "preprocess_cpu",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "images": args.images,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

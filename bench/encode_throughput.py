"""Encoder throughput: images/s and texts/s at batch sizes 1, 8 and 32.

Models: ViT-B-32 (real architecture, random weights: same compute as the published
weights) as the baseline, and the shipped demo-clip. Forward passes are timed apart from
CPU preprocessing (which the server runs elsewhere); preprocessing is reported on its own.
Ratios are against ViT-B-32 at the same batch size in this same run, so they hold on a
noisy machine.

    python bench/encode_throughput.py [--min-seconds 2] [--out bench/results/encode_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from mmembed.config import Settings
from mmembed.demo import world
from mmembed.encoders import Encoder, Modality, load

MODELS = ("ViT-B-32@random", "demo-clip")
BATCH_SIZES = (1, 8, 32)


def _rate(encoder: Encoder, items: list, batch_size: int, min_seconds: float) -> float:
    """Items per second of encode() alone, on already-preprocessed batches."""
    batch = [encoder.preprocess(items[i % len(items)]) for i in range(batch_size)]
    encoder.encode(batch)  # warm-up: first call pays for allocations and lazy init
    done, started = 0, time.perf_counter()
    while done < 3 * batch_size or time.perf_counter() - started < min_seconds:
        encoder.encode(batch)
        done += batch_size
    return done / (time.perf_counter() - started)


def _preprocess_rate(encoder: Encoder, items: list) -> float:
    started = time.perf_counter()
    for item in items:
        encoder.preprocess(item)
    return len(items) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encode_throughput.json")
    args = parser.parse_args()

    settings = Settings(allow_downloads=False)
    rng = random.Random(0)
    images = [world.render(world.random_scene(rng), rng, size=256) for _ in range(32)]
    texts = [world.random_scene(rng).caption() for _ in range(32)]
    results: dict[str, dict] = {}
    for name in MODELS:
        model = load(name, settings.models_config())
        entry: dict = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
        for modality, items in ((Modality.IMAGE, images), (Modality.TEXT, texts)):
            encoder = model.encoder(modality)
            entry[f"{modality}_preprocess_per_s"] = round(_preprocess_rate(encoder, items), 1)
            for bs in BATCH_SIZES:
                rate = _rate(encoder, items, bs, args.min_seconds)
                entry[f"{modality}s_per_s@{bs}"] = round(rate, 2)
                print(f"{name:18s} {modality:5s} batch {bs:2d}: {rate:9.1f} /s", flush=True)
        results[name] = entry
        del model

    base, demo = results[MODELS[0]], results[MODELS[1]]
    ratios = {
        f"demo-clip_vs_ViT-B-32_{key}": round(demo[key] / base[key], 2)
        for key in base
        if key.endswith(tuple(f"@{bs}" for bs in BATCH_SIZES))
    }
    for name, entry in results.items():
        for modality in ("image", "text"):
            ratios[f"{name}_{modality}_batch32_vs_batch1"] = round(
                entry[f"{modality}s_per_s@32"] / entry[f"{modality}s_per_s@1"], 2
            )
    report = {
        "benchmark": "encode_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

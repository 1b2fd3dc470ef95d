"""What the forward pass itself can gain on this CPU, outside any server: bf16 against fp32 (this
CPU has AVX-512 BF16), texts batched by length against first come, first batched, and text towers
traced into graphs (``trace_text``) against their eager forward. Same models, images and captions
as ``bench/peers.py``, loaded through mmembed's own encoders.

    python bench/cpu_forward.py [--work /tmp/mmembed-peers] [--out bench/results/cpu_forward.json]

Per model and modality: items/s of batch-32 forward passes over every item, and for bf16 the
cosine of each vector with its fp32 one (mean and minimum). Texts are tokenised before the
timing; ``sorted`` takes four batches' worth at a time and runs them by length, as the server's
text queue does (``text_sort_batches``). Text runs marked ``busy`` have a Python thread beside the
forward holding the GIL a quarter of each 2 ms, as a replica's event loop does while it handles
requests; the eager forward needs the GIL between its ops, a traced graph does not. Runs marked
``two at once`` run two forward passes at the same time, each on its own thread with half the
cores, as a replica with ``concurrent_batches: 2`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import peers
import torch

from mmembed.config import Settings
from mmembed.encoders import Modality, load
from mmembed.encoders.base import Prepared
from mmembed.encoders.device import use_cpu_threads
from mmembed.serve.config import BatchConfig
from mmembed.serve.deployments import Queued, item_cost, sorted_batches

BATCH = 32
RESULTS = Path(__file__).parent / "results" / "cpu_forward.json"


def batches(items: list[Prepared], by_length: bool) -> list[list[int]]:
    """Indices of each forward pass: first come, or grouped by the server's own text queue
    (``sorted_batches`` over each take of ``text_sort_batches`` batches' worth)."""
    if not by_length:
        return [list(range(i, min(i + BATCH, len(items)))) for i in range(0, len(items), BATCH)]
    return asyncio.run(_as_the_server_sorts(items))


async def _as_the_server_sorts(items: list[Prepared]) -> list[list[int]]:
    """In a loop because a ``Queued`` item carries a future of the running one."""
    config = BatchConfig(max_batch_size=BATCH)
    take = BATCH * config.text_sort_batches
    out: list[list[int]] = []
    for start in range(0, len(items), take):
        queued = {
            start + n: Queued(p, item_cost(Modality.TEXT, p, config), 0.0)
            for n, p in enumerate(items[start : start + take])
        }
        index = {id(q): i for i, q in queued.items()}
        out += [[index[id(q)] for q in part] for part in sorted_batches(list(queued.values()), BATCH)]
    return out


def run(encoder: Any, items: list[Prepared], by_length: bool, at_once: int = 1) -> tuple[float, np.ndarray]:
    """Items/s (best of two passes over every item, the first also warming up) and the vectors.
    ``at_once``: forward passes run at the same time, each on its own thread with its share of the
    cores, as a replica with ``concurrent_batches`` runs them."""
    vectors = np.empty((len(items), encoder.dim), dtype=np.float32)
    best = float("inf")
    threads = torch.get_num_threads()
    use_cpu_threads(None, share=at_once)

    def forward(rows: list[int]) -> None:
        vectors[rows] = encoder.encode([items[i] for i in rows])

    try:
        with ThreadPoolExecutor(at_once) as pool:
            for _ in range(2):
                started = time.perf_counter()
                list(pool.map(forward, batches(items, by_length)))
                best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return len(items) / best, vectors


def variants(modality: Modality, precision: str, traced: bool) -> list[tuple[bool, bool, int]]:
    """(by length, GIL held beside, passes at once) per run: texts both ways; bf16's sorted texts
    also beside a busy loop; what the server runs (bf16, texts sorted and traced) also two at once."""
    if modality != Modality.TEXT:
        return [(False, False, 1)] + ([(False, False, 2)] if precision == "bf16" else [])
    runs = [(False, False, 1), (True, False, 1)] + ([(True, True, 1)] if precision == "bf16" else [])
    return runs + ([(True, False, 2)] if traced else [])


@contextmanager
def gil_held(share: float) -> Iterator[None]:
    """A thread running Python (holding the GIL) for ``share`` of every 2 ms, sleeping the rest."""
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            until = time.perf_counter() + 0.002 * share
            while time.perf_counter() < until:
                json.dumps({"request": list(range(50))})
            time.sleep(0.002 * (1 - share))

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmembed-peers"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from PIL import Image

    clip = peers.clip_folder(args.work)
    texts = peers.captions(1000)
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in peers.jpegs(128)]
    config = Settings().models_config()
    result: dict[str, Any] = {
        "batch": BATCH,
        "sort_batches": BatchConfig().text_sort_batches,
        "texts": len(texts),
        "images": len(images),
    }
    for name, modalities in (
        (f"hf-clip:{clip}", (Modality.IMAGE, Modality.TEXT)),
        ("all-MiniLM-L6-v2", (Modality.TEXT,)),
    ):
        label = "clip-vit-b-32" if name.startswith("hf-clip") else name
        reference: dict[str, np.ndarray] = {}
        # fp32 and bf16 eager, then bf16 with the text tower traced (texts only): what the server runs.
        for precision, traced in (("fp32", False), ("bf16", False), ("bf16", True)):
            options = dataclasses.replace(config, device="cpu", precision=precision, trace_text=traced)
            model = load(name, options)
            for modality in modalities if not traced else (Modality.TEXT,):
                encoder = model.encoder(modality)
                items = [encoder.preprocess(x) for x in (images if modality == Modality.IMAGE else texts)]
                for by_length, busy, at_once in variants(modality, precision, traced):
                    key = f"{label} {modality.value} {precision}" + (" sorted" if by_length else "")
                    key += (" traced" if traced else "") + (" busy" if busy else "")
                    key += " two at once" if at_once == 2 else ""
                    with gil_held(0.25) if busy else contextlib.nullcontext():
                        rate, vectors = run(encoder, items, by_length, at_once)
                    point: dict[str, float] = {"items_per_s": round(rate, 1)}
                    ref = reference.setdefault(f"{modality.value}", vectors)
                    if ref is not vectors:
                        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(vectors, axis=1)
                        cosine = np.sum(ref * vectors, axis=1) / norms
                        point |= {
                            "cosine_mean": round(float(cosine.mean()), 5),
                            "cosine_min": round(float(cosine.min()), 5),
                        }
                    result[key] = point
                    print(f"{key}: {json.dumps(point)}", flush=True)
        rate = {k: v["items_per_s"] for k, v in result.items() if isinstance(v, dict) and "items_per_s" in v}
        ratios = {
            when: round(rate[f"{label} text bf16 sorted traced{tail}"] / rate[f"{label} text bf16 sorted{tail}"], 2)
            for when, tail in (("alone", ""), ("busy", " busy"))
        }
        result[f"{label} text traced / eager"] = ratios
        print(f"{label} text traced / eager: {json.dumps(ratios)}", flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

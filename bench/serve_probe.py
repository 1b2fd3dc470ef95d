"""A short serving probe for trying one change to the data plane at a time: ``mmembed serve`` with
``bench/peers.py``'s models, client and requests, a few points only, and the CPU each process
spent per request (where the time outside the forward pass goes).

    python bench/serve_probe.py [--env '{"MMEMBED_SERVE_INGRESS": "proxy"}']
                                [--model-args '{"cpu_threads": 1}']
                                [--points minilm1,minilm32,cliptext32,img1] [--out FILE]

Points: ``minilm1`` (single MiniLM texts at concurrency 1, 8 and 32), ``cliptext1`` (single CLIP
texts at 1), ``minilm32`` and ``cliptext32`` (32 texts per request at 8), ``img1`` (single images at
32), ``imgc1`` (single images at 1).

``--env`` is the environment ``mmembed serve`` (and so the Ray cluster it starts) runs with;
``--model-args`` go into every model's entry of the Serve config. Figures are printed and, with
``--out``, written as JSON. Not a comparison by itself: run it before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import peers
import yaml
from serve_throughput import cpu_ms_per_request, cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="{}")
    parser.add_argument("--model-args", default="{}")
    parser.add_argument("--points", default="minilm1,minilm32,cliptext32,img1")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmembed-peers"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.update(json.loads(args.env))
    model_args = json.loads(args.model_args)
    if model_args:  # into the config file peers.mmembed_server writes
        dump = yaml.safe_dump

        def with_model_args(config: Any, *a: Any, **k: Any) -> str:
            for app in config.get("applications", []):
                for model in app["args"]["models"]:
                    model.update(model_args)
            return dump(config, *a, **k)

        yaml.safe_dump = with_model_args
    clip = peers.clip_folder(args.work)
    texts, images = peers.captions(1000), [peers.data_uri(j) for j in peers.jpegs(64)]
    points = {
        "minilm1": ("all-MiniLM-L6-v2", texts[:480], "text", 1, (1, 8, 32)),
        "cliptext1": (f"hf-clip:{clip}", texts[:240], "text", 1, (1,)),
        "minilm32": ("all-MiniLM-L6-v2", texts, "text", 32, (8,)),
        "cliptext32": (f"hf-clip:{clip}", texts[:512], "text", 32, (8,)),
        "img1": (f"hf-clip:{clip}", images, "image", 1, (32,)),
        "imgc1": (f"hf-clip:{clip}", images[:32], "image", 1, (1,)),
    }
    results: dict[str, Any] = {"env": json.loads(args.env), "model_args": model_args}
    port = peers.free_port()
    with peers.mmembed_server(clip, port, args.work):
        url = f"http://127.0.0.1:{port}"
        for name in args.points.split(","):
            model, inputs, modality, size, concurrency = points[name]
            bodies = [
                {"model": model, "input": inputs[i : i + size], "modality": modality}
                for i in range(0, len(inputs), size)
            ]
            asyncio.run(peers.drive(url, bodies[:4], size, 2))  # warm up
            for c in concurrency:
                before = cpu_seconds()
                point = asyncio.run(peers.drive(url, bodies, size, c))
                point["cpu_ms_per_request"] = cpu_ms_per_request(before, len(bodies))
                results[f"{name}@{c}"] = point
                print(f"{name} c={c}: {json.dumps(point)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

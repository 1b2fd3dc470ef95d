"""mmembed beside its peer on the same machine, with the same models and the same client:
infinity-emb, the single-process embedding server users compare us with.

    python bench/peers.py [--images 256] [--texts 1000] [--work /tmp/mmembed-peers]
                          [--only infinity,mmembed] [--out bench/results/peers.json]

One run:
1. infinity-emb (pinned, ``INFINITY``) is installed into a virtual environment of its own under
   ``--work`` (never into the project's: it pins older transformers and numpy).
2. The shared models: a transformers CLIP ViT-B/32 folder with random weights (the compute of the
   published one; no CLIP weights exist offline) and the provisioned all-MiniLM-L6-v2.
3. The ceiling: the raw batch-32 forward of each model in this process, images pre-decoded, in
   fp32 and in bf16.
4. Each server in turn, alone on the machine: infinity (one process per model, as its CLI serves
   them) and ``mmembed serve`` (both models, ``hf-clip:FOLDER``; the cache off, so repeated content
   costs a forward pass as it does in infinity). Both batch up to 32. Each runs at its default
   precision: infinity's ``auto`` is fp32 on CPU, mmembed's is bf16 on a CPU with native bf16.
   infinity's MiniLM also runs with ``--dtype bfloat16``, so mmembed's ratio is to the faster of
   the two; infinity 0.0.78 applies a dtype to CLIP only on CUDA (``torch_vision.py``), so CLIP has
   no bf16 variant there.
5. One client sends the same JPEGs (about 640x480, as data URIs) and captions to
   ``/v1/embeddings``, closed-loop at concurrency 1, 8 and 32, as single-item requests and as
   32-item requests.

Written to ``--out``: items/s, p50 and p99 per point, each mmembed figure's ratio to the best
infinity figure at that point, and the ceilings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results" / "peers.json"
INFINITY = [
    "infinity-emb[server,torch]==0.0.78",
    "transformers==4.57.6",
    "sentence-transformers==3.4.1",
    "numpy==1.26.4",
    "aiohttp",  # its image inputs (data URIs included) go through it, yet its extras leave it out
]
CONCURRENCY = (1, 8, 32)
BATCH = 32
CAPTION_WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "triangle", "left", "right"]


# --- setup -------------------------------------------------------------------------------------------


def infinity_venv(work: Path) -> Path:
    """The peer's own environment; the machine's pip constraints (the project's pins) are not its."""
    venv = work / "infinity-venv"
    exe = venv / "bin" / "infinity_emb"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = os.environ | {"PIP_CONSTRAINT": ""}
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *INFINITY], check=True, env=env)
    return exe


def clip_folder(work: Path) -> Path:
    """A transformers CLIP ViT-B/32 (``CLIPConfig``'s defaults are openai/clip-vit-base-patch32's
    shape) with random weights and OpenAI's tokenizer, saved as a hub repository is."""
    folder = work / "clip-vit-b-32-random"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' tokenizer builder
    from hf_clip_folder import openai_tokenizer

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder)
    openai_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def minilm_folder() -> Path:
    from mmembed.config import Settings
    from mmembed.encoders.provision import pull

    settings = Settings(allow_downloads=False)
    pull("all-MiniLM-L6-v2", settings.models_config())
    return settings.models_path / "all-MiniLM-L6-v2" / "sentence_transformers"  # what provisioning unpacks


def jpegs(n: int) -> list[bytes]:
    """Demo-world scenes scaled to 640x480 with noise, so each JPEG costs a real decode."""
    import numpy as np
    from PIL import Image

    from mmembed.demo import world

    rng, out = random.Random(0), []
    for _ in range(n):
        image = world.render(world.random_scene(rng), rng, size=96).resize((640, 480))
        noise = np.random.default_rng(len(out)).integers(0, 24, (480, 640, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8) + noise).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def captions(n: int) -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


# --- the ceiling -------------------------------------------------------------------------------------


def ceilings(clip: Path, minilm: Path, images: list[bytes], texts: list[str]) -> dict[str, dict[str, float]]:
    """Items/s of the batch-32 forward in this process: images pre-decoded and preprocessed, texts
    tokenised in the timing (the servers tokenise too)."""
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(clip)
    pixels = processor(images=[Image.open(io.BytesIO(j)).convert("RGB") for j in images[:BATCH]], return_tensors="pt")

    def rate(run: Any, items: int, repeats: int = 3) -> float:
        run()  # warm up
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        return items * repeats / (time.perf_counter() - started)

    out: dict[str, dict[str, float]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = CLIPModel.from_pretrained(clip).to(dtype).eval()
        st = SentenceTransformer(str(minilm), device="cpu").to(dtype)
        image_batch = pixels["pixel_values"].to(dtype)
        with torch.inference_mode():
            out[name] = {
                "clip_images": rate(lambda: model.get_image_features(pixel_values=image_batch), BATCH),  # noqa: B023
                "clip_texts": rate(
                    lambda: model.get_text_features(  # noqa: B023
                        **processor(text=texts[:BATCH], return_tensors="pt", padding=True, truncation=True)
                    ),
                    BATCH,
                ),
                "minilm_texts": rate(lambda: st.encode(texts[:BATCH], batch_size=BATCH), BATCH),  # noqa: B023
            }
    return out


# --- the servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(command: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{command[0]} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{command[0]} was not ready in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def infinity_server(exe: Path, folder: Path, name: str, dtype: str, port: int, work: Path) -> Any:
    command = [
        str(exe), "v2", "--model-id", str(folder), "--served-model-name", name, "--device", "cpu",
        "--engine", "torch", "--batch-size", str(BATCH), "--port", str(port), "--host", "127.0.0.1",
        "--no-model-warmup", "--url-prefix", "/v1", "--dtype", dtype,
    ]  # fmt: skip
    env = os.environ | {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"}
    return running(command, env, f"http://127.0.0.1:{port}/health", work / f"infinity-{name}-{dtype}.log")


def machine() -> dict[str, Any]:
    """Which CPU ran it: runs on CPUs with and without native bf16 differ in kind, not only in speed."""
    from mmembed.encoders.device import cpu_has_native_bf16

    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return {
        "cpus": os.cpu_count(),
        "cpu": names[0] if names else platform.processor(),
        "native_bf16": cpu_has_native_bf16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def mmembed_dtype() -> str:
    """What ``precision: auto`` picks here, which the server runs at."""
    import torch

    from mmembed.encoders.device import pick_dtype

    return str(pick_dtype(torch.device("cpu"))).removeprefix("torch.")


def mmembed_server(clip: Path, port: int, work: Path) -> Any:
    import yaml

    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "mmembed",
                "route_prefix": "/",
                "import_path": "mmembed.serve.app:build_app",
                "args": {
                    "models": [
                        {"name": f"hf-clip:{clip}", "batch": {"max_batch_size": BATCH}},
                        {"name": "all-MiniLM-L6-v2", "batch": {"max_batch_size": BATCH}},
                    ]
                },
            }
        ],
    }
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "mmembed.cli", "serve", "--config", str(path)]
    env = os.environ | {"MMEMBED_CACHE_URL": "off", "MMEMBED_ALLOW_DOWNLOADS": "false"}
    return running(command, env, f"http://127.0.0.1:{port}/readyz", work / "mmembed.log")


# --- the client --------------------------------------------------------------------------------------


async def drive(url: str, bodies: list[dict[str, Any]], items_each: int, concurrency: int) -> dict[str, float]:
    """Closed loop: ``concurrency`` clients, each sending its next body when the last is answered."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    failures = 0
    first_failure = ""

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures, first_failure
        while not queue.empty():
            body = queue.get_nowait()
            started = time.perf_counter()
            answer = await http.post(f"{url}/v1/embeddings", json=body)
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200 or len(answer.json()["data"]) != len(body["input"]):
                failures += 1
                first_failure = first_failure or f"{answer.status_code}: {answer.text[:500]}"

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "items_per_s": len(bodies) * items_each / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "failures": failures,
    } | ({"first_failure": first_failure} if failures else {})


def measure(url: str, model: str, inputs: list[str], modality: str) -> dict[str, dict[str, float]]:
    out = {}
    for per_request in (1, BATCH):
        bodies = [
            {"model": model, "input": inputs[i : i + per_request], "modality": modality}
            for i in range(0, len(inputs), per_request)
        ]
        warm = asyncio.run(drive(url, bodies[: max(2, 8 // per_request)], per_request, 2))
        if warm["failures"]:
            raise SystemExit(f"{model} at {url} refused the warm-up: {warm['first_failure']}")
        for concurrency in CONCURRENCY:
            point = asyncio.run(drive(url, bodies, per_request, concurrency))
            out[f"{per_request}-per-request@{concurrency}"] = point
            print(f"  {model} {modality} {per_request}/request c={concurrency}: {json.dumps(point)}", flush=True)
    return out


# --- main --------------------------------------------------------------------------------------------


def best_infinity(result: dict[str, Any], key: str, point: str) -> float:
    """infinity's items/s at a point, at whichever of its precisions served it faster."""
    runs = (
        result[server][key][point]["items_per_s"] for server in ("infinity", "infinity_bf16") if key in result[server]
    )
    return max(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmembed-peers"))
    parser.add_argument("--only", default="infinity,mmembed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    exe = infinity_venv(args.work)
    clip, minilm = clip_folder(args.work), minilm_folder()
    images, texts = [data_uri(j) for j in jpegs(args.images)], captions(args.texts)
    result: dict[str, Any] = {
        "machine": machine(),
        "setup": {"images": args.images, "texts": args.texts, "max_batch": BATCH, "peer": INFINITY[0]},
        "mmembed_dtype": mmembed_dtype(),
        "ceiling_items_per_s": ceilings(clip, minilm, [base64.b64decode(i.split(",")[1]) for i in images], texts),
    }
    print(f"ceilings: {json.dumps(result['ceiling_items_per_s'])}", flush=True)
    servers = args.only.split(",")
    if "infinity" in servers:
        result["infinity"], result["infinity_bf16"] = {}, {}
        for folder, name, dtype, parts in (
            (clip, "clip-vit-b-32", "auto", (("clip_images", images, "image"), ("clip_texts", texts, "text"))),
            (minilm, "all-MiniLM-L6-v2", "auto", (("minilm_texts", texts, "text"),)),
            (minilm, "all-MiniLM-L6-v2", "bfloat16", (("minilm_texts", texts, "text"),)),
        ):
            port = free_port()
            with infinity_server(exe, folder, name, dtype, port, args.work):
                for key, inputs, modality in parts:
                    figures = measure(f"http://127.0.0.1:{port}", name, inputs, modality)
                    result["infinity" if dtype == "auto" else "infinity_bf16"][key] = figures
    if "mmembed" in servers:
        result["mmembed"] = {}
        port = free_port()
        with mmembed_server(clip, port, args.work):
            url = f"http://127.0.0.1:{port}"
            for key, model, inputs, modality in (
                ("clip_images", f"hf-clip:{clip}", images, "image"),
                ("clip_texts", f"hf-clip:{clip}", texts, "text"),
                ("minilm_texts", "all-MiniLM-L6-v2", texts, "text"),
            ):
                result["mmembed"][key] = measure(url, model, inputs, modality)
    if "infinity" in result and "mmembed" in result:
        result["ratio_to_infinity"] = {
            key: {
                point: figures["items_per_s"] / best_infinity(result, key, point) for point, figures in points.items()
            }
            for key, points in result["mmembed"].items()
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, points in result.get("ratio_to_infinity", {}).items():
        print(f"{key}: " + ", ".join(f"{p} {r:.2f}x" for p, r in points.items()))


if __name__ == "__main__":
    main()

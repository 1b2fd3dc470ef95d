"""Train `demo-clip`, a small open_clip-architecture CLIP, on the rendered demo world.

Why it learns fast on two CPU cores:
- every batch is built from groups of near-duplicate scenes: a scene with its query, a
  twin that differs in one thing the query names (the red circle moved, recoloured or
  reshaped) and, for a short query, a twin it still describes (something it does not name
  changed). Each positive sits beside its hardest negative, and a short query learns to
  ignore the rest of the scene;
- partial captions ("red circle") count as positives for every scene in the batch that
  they describe (soft multi-positive targets), so short queries work too;
- the logit scale starts high (temperature 1/30) instead of CLIP's 1/14;
- scenes are rendered in a DataLoader worker with augmentation, never twice the same.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from mmembed.demo import metrics, world
from mmembed.encoders.clip import OPENAI_MEAN as MEAN
from mmembed.encoders.clip import OPENAI_STD as STD
from mmembed.encoders.clip import square_uint8
from mmembed.encoders.device import ImageToDevice

log = logging.getLogger(__name__)

IMAGE_SIZE = 64

# open_clip's own config format; saved as open_clip_config.json, loaded with open_clip's local-dir: schema.
MODEL_CONFIG: dict = {
    "embed_dim": 128,
    "init_logit_scale": math.log(30.0),
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
PREPROCESS_CONFIG = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}


class TwinBatches(IterableDataset):
    """Endless batches of (uint8 images, token ids, positive mask[text, image])."""

    def __init__(
        self,
        batch_size: int,
        seed: int,
        context_length: int,
        forms: Sequence[str] = world.QUERY_FORMS,
        full_fraction: float = 0.5,
    ) -> None:
        self.batch_size = batch_size
        self.full_fraction = full_fraction
        self.seed = seed
        self.forms = tuple(forms)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            yield self._batch(rng)

    def _batch(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Groups of three scenes: a base with its query, a twin the query no longer matches
        (one named attribute changed) and, for a short query, a twin it still matches."""
        scenes: list[world.Scene] = []
        queries: list[world.Query] = []
        while len(scenes) < self.batch_size:
            base = world.sample_scene(rng, held_out=False)
            query = world.training_query(base, rng, self.full_fraction, self.forms)
            group = [base, world.breaking_twin(base, query, rng), world.keeping_twin(base, query, rng)]
            scenes += group
            queries += [query] + [world.training_query(s, rng, self.full_fraction, self.forms) for s in group[1:]]
        scenes, queries = scenes[: self.batch_size], queries[: self.batch_size]
        texts = [world.render_query(q, rng) for q in queries]
        images = np.stack([np.asarray(world.render(s, rng, IMAGE_SIZE)) for s in scenes])
        positives = torch.tensor([[q.matches(s) for s in scenes] for q in queries])
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), self.tokenizer(texts), positives


def create_model() -> open_clip.CLIP:
    return open_clip.CLIP(**MODEL_CONFIG)


# The same uint8 -> normalised float step the serving encoders use.
to_model_input = ImageToDevice(torch.device("cpu"), torch.float32, MEAN, STD)


def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where a caption may have several positive images and vice versa."""
    logits = scale * txt @ img.T  # [text, image]
    pos = pos.float()
    t2i = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    i2t = -(pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (t2i + i2t) / 2


@torch.no_grad()
def encode_images(model: open_clip.CLIP, images: Sequence[Image.Image], batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = to_model_input([square_uint8(im, IMAGE_SIZE) for im in images[i : i + batch]])
        out.append(F.normalize(model.encode_image(x), dim=-1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_texts(model: open_clip.CLIP, texts: Sequence[str], batch: int = 512) -> np.ndarray:
    tok = open_clip.SimpleTokenizer(context_length=MODEL_CONFIG["text_cfg"]["context_length"])
    out = [
        F.normalize(model.encode_text(tok(list(texts[i : i + batch]))), dim=-1).numpy()
        for i in range(0, len(texts), batch)
    ]
    return np.concatenate(out)


def evaluate(model: open_clip.CLIP, n: int) -> dict[str, float | int]:
    model.eval()
    try:
        return metrics.retrieval_report(
            lambda ims: encode_images(model, ims), lambda ts: encode_texts(model, ts), n=n, typed_pool=2 * n
        )
    finally:
        model.train()


def save_checkpoint(model: open_clip.CLIP, out_dir: Path, extra: dict) -> None:
    """open_clip's local-dir layout: open_clip_config.json + open_clip_model.safetensors (fp16)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
    config = {"model_cfg": MODEL_CONFIG, "preprocess_cfg": PREPROCESS_CONFIG, "training": extra}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _training_of(weights: Path | None) -> dict | None:
    """How the weights a fine-tune starts from were trained, so a checkpoint carries its whole recipe."""
    config = weights.parent / "open_clip_config.json" if weights else None
    if config is None or not config.is_file():
        return None
    training = json.loads(config.read_text()).get("training", {})
    return {k: v for k, v in training.items() if k != "eval_during_training"}


def train(
    out_dir: Path,
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int = 2,
    eval_every: int = 250,
    eval_n: int = 500,
    resume: Path | None = None,
    forms: Sequence[str] = world.QUERY_FORMS,
    full_fraction: float = 0.5,
) -> dict[str, float | int]:
    """``resume``: start from these weights (a fine-tune); ``forms``: what short training
    queries name; ``full_fraction``: the share of full captions among training queries."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = create_model()
    if resume is not None:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(resume)).items()})
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = min(200, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    loader = DataLoader(
        TwinBatches(batch_size, seed, MODEL_CONFIG["text_cfg"]["context_length"], forms, full_fraction),
        batch_size=None,
        num_workers=1,
        prefetch_factor=8,
        persistent_workers=True,
    )
    started = time.time()
    best: dict[str, float | int] = {}
    model.train()
    for step, (images, tokens, pos) in enumerate(loader):
        if step >= steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img = F.normalize(model.encode_image(to_model_input(images)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = soft_clip_loss(img, txt, model.logit_scale.exp(), pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0:
            log.info(
                "step %d loss %.3f scale %.1f lr %.2e %.1f min",
                step,
                loss.item(),
                model.logit_scale.exp().item(),
                lr_at(step),
                (time.time() - started) / 60,
            )
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            report = evaluate(model, eval_n)
            log.info("step %d eval %s", step + 1, json.dumps(report))
            extra = {
                "steps": step + 1,
                "batch_size": batch_size,
                "lr": lr,
                "full_fraction": full_fraction,
                "forms": list(forms),
                "fine_tune_of": _training_of(resume),
                "seed": seed,
                "minutes": (time.time() - started) / 60,
            }
            save_checkpoint(model, out_dir, extra | {"eval_during_training": report})
            best = report
    return best

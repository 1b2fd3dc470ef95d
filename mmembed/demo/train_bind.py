"""Train the bind head: spoken demo-world captions -> demo-clip's text embedding of the words.

The data is made here: captions from training scenes (full captions and the short
partial queries people say), spoken by espeak-ng with training voices. The Whisper
backbone is frozen, so its frame features are computed once and cached on disk in
chunks (a killed run resumes where it stopped); only the small head trains.

Held out, never trained on: every caption whose composition the evaluation uses, and
every evaluation voice (other accents and timbres, see ``speech``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmembed.config import Settings
from mmembed.demo import world
from mmembed.demo.speech import random_voice, speak
from mmembed.demo.train_clip import soft_clip_loss
from mmembed.encoders import Modality, load
from mmembed.encoders.bind import BindHead, HeadConfig, pad_frames, save_head
from mmembed.encoders.whisper_family import WhisperFeatures, load_whisper

log = logging.getLogger(__name__)

BACKBONE, SPACE = "whisper-base", "demo-clip"
EVAL_SEED, GALLERY = 1234, 1000  # the same held-out scenes as the demo-clip report


@dataclass(frozen=True)
class BindData:
    clips: int = 5000
    eval_clips: int = 300
    full_fraction: float = 0.5
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def eval_scenes(n: int = GALLERY) -> list[world.Scene]:
    """The scenes of ``world.eval_set`` (the demo-clip report's gallery)."""
    return [scene for scene, _ in world.eval_set(n, seed=EVAL_SEED)]


def training_texts(data: BindData) -> list[str]:
    """Training captions; full captions of any composition the evaluation uses are skipped,
    whatever their wording."""
    held = {s.signature for s in eval_scenes()}
    rng = random.Random(data.seed)
    texts: list[str] = []
    while len(texts) < data.clips:
        scene = world.sample_scene(rng, held_out=False)
        query = world.training_query(scene, rng, data.full_fraction)
        if query.exact and scene.signature in held:
            continue
        texts.append(world.render_query(query, rng))
    return texts


def spoken_features(
    texts: list[str], held_out_voices: bool, seed: int, features: WhisperFeatures, cache: Path, chunk: int = 250
) -> list[torch.Tensor]:
    """Speak each text with a random voice and keep the backbone's frames (fp16), cached
    per chunk so an interrupted run loses at most one chunk."""
    cache.mkdir(parents=True, exist_ok=True)
    out: list[torch.Tensor] = []
    started = time.time()
    for start in range(0, len(texts), chunk):
        path = cache / f"{start:06d}.pt"
        if not path.exists():
            rng = random.Random(f"{seed}-{start}")
            part: list[torch.Tensor] = []
            for i in range(start, min(start + chunk, len(texts)), 16):
                batch = texts[i : min(i + 16, start + chunk, len(texts))]
                clips = [speak(t, random_voice(rng, held_out_voices), rng).samples for t in batch]
                part += [f.half().cpu() for f in features(clips)]
            torch.save(part, path)
            log.info("features %d/%d (%.1f min)", start + len(part), len(texts), (time.time() - started) / 60)
        out += torch.load(path)
    return out


def recall_at(sim: np.ndarray, relevant: np.ndarray, k: int) -> float:
    order = np.argsort(-sim, axis=1)[:, :k]
    return float(np.mean([relevant[i, order[i]].any() for i in range(len(sim))]))


@torch.no_grad()
def embed(head: BindHead, feats: list[torch.Tensor], batch: int = 128) -> torch.Tensor:
    head.eval()
    out = [head(*pad_frames([f.float() for f in feats[i : i + batch]])) for i in range(0, len(feats), batch)]
    head.train()
    return torch.cat(out)


def length_batches(feats: list[torch.Tensor], batch_size: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of clips of similar length (sorted with jitter, then shuffled), so
    padding to the longest clip in a batch wastes little compute."""
    lengths = np.array([f.shape[0] for f in feats], dtype=np.float64)
    while True:
        order = np.argsort(lengths * rng.uniform(0.8, 1.25, len(lengths)))
        chunks = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        for k in rng.permutation(len(chunks)):
            yield torch.from_numpy(chunks[k])


def train_bind(
    out_dir: Path,
    data: BindData = BindData(),
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    threads: int = 2,
    *,
    settings: Settings,
) -> dict[str, float]:
    torch.manual_seed(data.seed)
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    from mmembed.encoders.provision import pull

    features = WhisperFeatures(load_whisper(pull(BACKBONE, settings.models_config()), device), device)
    text = load(SPACE, settings.models_config()).encoder(Modality.TEXT)

    cache = settings.data_dir.expanduser() / "cache" / f"bind-{data.key()}"
    texts = training_texts(data)
    scenes = eval_scenes()
    eval_texts = [s.caption() for s in scenes[: data.eval_clips]]
    train_feats = spoken_features(texts, False, data.seed, features, cache / "train")
    eval_feats = spoken_features(eval_texts, True, EVAL_SEED, features, cache / "eval")

    unique = sorted(set(texts))
    position = {t: i for i, t in enumerate(unique)}
    text_id = torch.tensor([position[t] for t in texts])
    targets = torch.from_numpy(text.encode([text.preprocess(t) for t in unique]))
    gallery = torch.from_numpy(text.encode([text.preprocess(s.caption()) for s in scenes]))
    sigs = [s.signature for s in scenes]
    relevant = np.array([[a == b for b in sigs] for a in sigs[: data.eval_clips]])

    head = BindHead(HeadConfig(BACKBONE, SPACE, in_dim=features.dim, out_dim=targets.shape[1]))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    opt = torch.optim.AdamW([*head.parameters(), log_scale], lr=lr, weight_decay=0.05)
    warmup = min(200, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    rng = np.random.default_rng(data.seed)
    batches = length_batches(train_feats, batch_size, rng)
    started, report = time.time(), {}
    for step in range(steps):
        idx = next(batches)
        audio = head(*pad_frames([train_feats[i].float() for i in idx]))
        words = targets[text_id[idx]]
        positives = text_id[idx][:, None] == text_id[idx][None, :]
        loss = soft_clip_loss(audio, words, log_scale.exp(), positives) + (1 - (audio * words).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            sim = (embed(head, eval_feats) @ gallery.T).numpy()
            report = {f"audio_to_text_R@{k}": recall_at(sim, relevant, k) for k in (1, 5)}
            log.info(
                "step %d loss %.3f scale %.1f %s %.1f min",
                step,
                loss.item(),
                log_scale.exp().item(),
                json.dumps(report),
                (time.time() - started) / 60,
            )
    minutes = round((time.time() - started) / 60, 1)
    training = asdict(data) | {"steps": steps, "batch_size": batch_size, "lr": lr, "minutes": minutes}
    save_head(head, out_dir, {"training": training, "validation": report})
    return report

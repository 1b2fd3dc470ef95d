"""ImageBind-style joint encoder: audio straight into a frozen CLIP space, no transcript.

ImageBind's recipe, at this project's scale: keep the image-text space frozen and train
only what maps a new modality into it. Here the audio backbone is Whisper's encoder
(frozen, run on the clip's own length) and a small attention-pooling head is trained
contrastively so a spoken caption lands next to the CLIP text embedding of the words.
The head is a few MB and ships in the repository (``encoders/weights/bind``).

A joint model is just a set of encoders, one per modality, whose vectors share a space:
``load("bind")`` returns the audio encoder here plus the CLIP's own image and text
encoders. Any other binding model (a real ImageBind checkpoint where its CC-BY-NC licence
allows) plugs in the same way: one ``Encoder`` per modality, all with the same ``dim``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmembed.encoders.base import Encoder, EncoderError, Limits, Modality, Prepared
from mmembed.encoders.whisper_family import WINDOW_SECONDS, WhisperFeatures, load_whisper, prepare_audio, windows
from mmembed.loaders.audio import AudioInput, AudioLimits

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig
    from mmembed.encoders.registry import ModelSpec

CONFIG_FILE, WEIGHTS_FILE = "bind_config.json", "head.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    backbone: str  # registry name of the frozen audio model, e.g. "whisper-base"
    space: str  # registry name of the frozen joint space, e.g. "demo-clip"
    in_dim: int = 512
    width: int = 256
    out_dim: int = 128
    layers: int = 1
    heads: int = 4
    pool: int = 4  # average this many backbone frames first (50 -> 12.5 per second, ~4 per word)


class BindHead(nn.Module):
    """Frames -> one vector: a transformer layer over the (pooled) frames, then attention
    pooling with a learned query, so the head can tell "red circle and blue square" from
    "blue circle and red square" (a mean over frames cannot)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Sequential(nn.LayerNorm(cfg.in_dim), nn.Linear(cfg.in_dim, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.attend = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.out = nn.Sequential(
            nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.out_dim)
        )

    def forward(self, frames: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """frames (B, T, in_dim), valid (B, T) bool -> unit vectors (B, out_dim)."""
        p = self.cfg.pool
        if p > 1:
            t = math.ceil(frames.shape[1] / p) * p
            frames = F.pad(frames, (0, 0, 0, t - frames.shape[1]))
            valid = F.pad(valid, (0, t - valid.shape[1]))
            weights = valid.float().view(valid.shape[0], -1, p)
            frames = (frames.view(frames.shape[0], -1, p, frames.shape[2]) * weights[..., None]).sum(2)
            frames = frames / weights.sum(2, keepdim=True).clamp(min=1)
            valid = weights.sum(2) > 0
        x = self.blocks(self.proj(frames), src_key_padding_mask=~valid)
        pooled, _ = self.attend(self.query.expand(x.shape[0], -1, -1), x, x, key_padding_mask=~valid)
        return F.normalize(self.out(pooled[:, 0]), dim=-1)


def pad_frames(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length (T_i, D) frame tensors -> (B, T, D) and a (B, T) validity mask."""
    longest = max(f.shape[0] for f in features)
    frames = features[0].new_zeros((len(features), longest, features[0].shape[1]))
    valid = torch.zeros((len(features), longest), dtype=torch.bool, device=features[0].device)
    for i, f in enumerate(features):
        frames[i, : f.shape[0]] = f
        valid[i, : f.shape[0]] = True
    return frames, valid


def save_head(head: BindHead, folder: Path, extra: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"head": asdict(head.cfg), **(extra or {})}, indent=2) + "\n")


def load_head(folder: Path, device: torch.device) -> BindHead:
    cfg = HeadConfig(**json.loads((folder / CONFIG_FILE).read_text())["head"])
    head = BindHead(cfg)
    head.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    return head.to(device).eval()


class BindAudioEncoder(Encoder[AudioInput]):
    """Audio -> the joint space. Clips over 30 s are cut into 30 s windows whose vectors
    are averaged: fine for a spoken query, a coarse summary of a long recording."""

    modality = Modality.AUDIO

    def __init__(self, model: str, features: WhisperFeatures, head: BindHead, audio_limits: AudioLimits) -> None:
        self.model, self.features, self.head, self.audio_limits = model, features, head, audio_limits
        self.dim, self.limits = head.cfg.out_dim, Limits(max_seconds=audio_limits.max_seconds)

    def preprocess(self, item: AudioInput) -> Prepared:
        return prepare_audio(item, self.audio_limits)

    @torch.inference_mode()
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        pieces = [(i, w) for i, p in enumerate(batch) for w in windows(p.data, WINDOW_SECONDS)]
        vectors = self.head(*pad_frames(self.features([w for _, w in pieces])))
        owner = torch.tensor([i for i, _ in pieces], device=vectors.device)
        summed = torch.zeros((len(batch), self.dim), device=vectors.device).index_add_(0, owner, vectors)
        return F.normalize(summed, dim=-1).cpu().numpy()


def load_bind(
    name: str, folder: Path, features: WhisperFeatures, space: dict[Modality, Encoder], audio_limits: AudioLimits
) -> dict[Modality, Encoder]:
    head = load_head(folder, features.device)
    if head.cfg.in_dim != features.dim:
        raise EncoderError(f"{name}: head expects {head.cfg.in_dim}-d audio frames, the backbone gives {features.dim}")
    for enc in space.values():
        if enc.dim != head.cfg.out_dim:
            raise EncoderError(f"{name}: head outputs {head.cfg.out_dim}-d vectors, {enc.name} is {enc.dim}-d")
    return {**space, Modality.AUDIO: BindAudioEncoder(name, features, head, audio_limits)}


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    """A trained head over a frozen backbone (``parts[0]``, a Whisper), in a frozen joint space
    (``parts[1]``, whose own encoders answer the other modalities)."""
    from mmembed.encoders.provision import audio_limits, load, weights_path
    from mmembed.encoders.registry import resolve

    backbone = weights_path(resolve(spec.parts[0], config), config)
    features = WhisperFeatures(load_whisper(backbone, device), device)  # type: ignore[arg-type]
    space = load(spec.parts[1], config).encoders
    return load_bind(spec.name, weights, features, space, audio_limits(config))  # type: ignore[arg-type]

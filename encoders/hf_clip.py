"""CLIP models through transformers (``openai/clip-vit-base-patch32`` style names, or a
local folder saved with ``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from mmembed.encoders.base import Encoder, Modality
from mmembed.encoders.clip import OPENAI_MEAN, OPENAI_STD, ClipImageEncoder, ClipTextEncoder, TextTokens
from mmembed.encoders.device import ImageToDevice
from mmembed.encoders.registry import ModelSpec

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig


def _pooled(out: object) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projection."""
    return out.pooler_output if hasattr(out, "pooler_output") else out  # type: ignore[return-value]


def load(
    spec: ModelSpec,
    weights: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    policy: str,
    max_pixels: int,
    trace: bool = False,
) -> dict[Modality, Encoder]:
    path = str(weights)
    model = CLIPModel.from_pretrained(path).to(device=device, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path)
    try:
        processor = CLIPImageProcessor.from_pretrained(path)
        mean, std, size = processor.image_mean, processor.image_std, processor.crop_size["height"]
    except OSError:  # a folder without preprocessor_config.json: CLIP's defaults
        mean, std, size = OPENAI_MEAN, OPENAI_STD, model.config.vision_config.image_size
    context = model.config.text_config.max_position_embeddings
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = TextTokens(  # the model's own tokenizer, as CLIPProcessor calls it
        lambda text: tok(text, verbose=False)["input_ids"],
        lambda text: tok(text, max_length=context, truncation=True)["input_ids"],
        pad,
        context,
    )
    dim = model.config.projection_dim
    return {
        Modality.IMAGE: ClipImageEncoder(
            spec.name,
            dim,
            size,
            lambda x: _pooled(model.get_image_features(pixel_values=x)),
            ImageToDevice(device, dtype, mean, std),
            max_pixels,
        ),
        Modality.TEXT: ClipTextEncoder(
            spec.name,
            dim,
            tokens,
            lambda ids: _pooled(model.get_text_features(input_ids=ids)),
            device,
            policy,
            pad_to_longest=True,  # position ids follow the input length; causal mask, end-token pooling
            graph_of=model if trace else None,
        ),
    }


def fetch(spec: ModelSpec, target: Path) -> str:
    from huggingface_hub import snapshot_download

    snapshot_download(spec.ref, local_dir=str(target / "hf"))
    return "hf"


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    return load(spec, weights, device, dtype, config.token_policy, config.max_image_pixels, config.trace_text)

